#!/usr/bin/env bash
# The PSTN gateway's costs as Markdown tables: transcoding one call at several Opus
# complexities, N calls at once through the gateway's call driver to sipp (echo), and the
# ledger's admissions per second on SQLite and PostgreSQL.
#   CALLS=100 KOE_TEST_POSTGRES_URL=postgres://… bench/gateway.sh
# Needs sipp (apt install sip-tester) for the second table; PostgreSQL for the third's
# second row.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_INCREMENTAL=0 cargo build --release --workspace --examples
exec target/release/examples/gateway_bench --calls "${CALLS:-100}" ${KOE_TEST_POSTGRES_URL:+--postgres "$KOE_TEST_POSTGRES_URL"}
