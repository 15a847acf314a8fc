#!/usr/bin/env bash
# Koe's TURN relay node (`koe relay`) against coturn's turnserver, on this machine, in the same
# run, with the same load: coturn's own load generator, turnutils_uclient, whose clients each
# allocate a relay address and send through it to turnutils_peer, a UDP echo peer on
# 127.0.0.1, which sends every message back through the relay. Each client sends 172-byte
# messages every 20 ms (an Opus voice stream's packet size and rate: `-l 172 -z 20`) for
# DURATION seconds; uclient runs with -c (no second, "RTCP" allocation per client: one
# allocation per client, as a Koe call uses). Data goes through channels (ChannelData:
# uclient's default, and what WebRTC stacks use once a channel is bound); Koe's own clients
# send Send indications instead (crates/koe-media/src/relay.rs): a row TRANSPORT:CLIENTS:send
# measures that path (uclient -s). Rows (ROWS): clients over UDP and over TCP (uclient -t; the
# relayed leg to the peer is UDP in both), 50 and 200 clients.
#
# For each row and server — servers one after the other, never at once, each on its own port,
# a fresh server process and a fresh echo peer for every run — bench/lab/relay_load.py runs
# uclient and samples the server process (/proc/PID/stat utime+stime of all its threads,
# /proc/PID/status VmRSS) every 0.25 s. Reported:
#   * relayed packets per second while every client is sending (uclient starts its clients at
#     random 1-6 s after connecting them, so "full load" is from 6.5 s after the connect phase
#     to 0.5 s before the first client's last message): uclient's per-second counters of
#     messages sent + echoed back (both directions through the relay), next to the offered
#     rate (2 x clients x 50/s);
#   * the same count over uclient's whole "Total transmit time" (whole seconds; includes the
#     staggered start, and 10 s more if any reply went missing: uclient then waits for it);
#   * loss (uclient: sent - received, over sent) and average round trip (uclient's 1 ms
#     timer resolution: on loopback mostly 0-1 ms);
#   * the server's CPU in % of one core, during full load and over the whole uclient run
#     (that includes uclient's connect phase, ~0.1 s per client, with little traffic);
#   * memory per allocation: server RSS in the middle of full load minus its RSS before the
#     run (idle, just started), over the allocations alive then, counted as the UDP sockets the
#     server gained (every allocation has its relayed UDP socket, in both servers). With -c a
#     client has one allocation of its own, but uclient first makes a "load-balancing probe"
#     allocation per client on another socket and drops it without deleting it: over TCP it
#     ends when uclient closes the probe's connection; over UDP it stays until its lifetime
#     runs out, and over TLS uclient never closes the probe's socket, so UDP and TLS rows hold
#     2 allocations per client (one of them idle);
# then Koe/coturn ratios. A run that fails (uclient error or time-out, server gone, nothing
# relayed) is a row that says so; the script carries on. Load generator, echo peer and server
# share the machine's cores (the generator's and the peer's CPU are in the notes): run it on
# an otherwise idle machine.
#
#   bench/relay.sh                    # ~6 min; release build at target/release/koe (never built here)
#   QUICK=1 bench/relay.sh            # smoke test: UDP and TCP with 50 clients, 10 s each (~1.5 min)
#   ROWS="udp:50 udp:200 tcp:50 tcp:200 tls:50 udp:200:send"   # TRANSPORT:CLIENTS[:send];
#                                     # transports udp, tcp, tls (TURN over TLS: uclient -t -S;
#                                     # coturn gets a throwaway self-signed certificate); :send:
#                                     # Send/Data indications instead of channels (uclient -s)
#   DURATION=20                       # seconds each client sends (default 20, QUICK 10); below
#                                     # 10 s there is no full-load window (those columns: –)
#   SERVERS="koe coturn"  KOE=/path/to/koe  KEEP=1 (keep the work directory: logs, JSON)
#
# coturn runs as
#   turnserver -n --listening-ip=127.0.0.1 --relay-ip=127.0.0.1 --listening-port=PORT
#     --lt-cred-mech --user=bench:benchpass --realm=koe --no-tls --no-dtls --allow-loopback-peers
#     --no-cli --total-quota=0 --user-quota=0 --log-file=stdout --simple-log
#     --pidfile=WORK/turnserver.pid --userdb=WORK/turndb
# (in the foreground: -n is "no configuration file", and without -o it does not detach; its
# default relay threads: one per core; --pidfile and --userdb keep it out of /var/run and
# /var/lib/turn), Koe as
#   koe relay --listen 127.0.0.1:PORT --relay-user bench:benchpass --max-allocations 0
#     --max-allocations-per-user 0 --max-kbps-per-allocation 0 --summary-every 3600s
# (no limits on either). The exact commands of the run are printed with the table.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
KOE=${KOE:-$ROOT/target/release/koe}
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
    ROWS=${ROWS:-udp:50 tcp:50}
    DURATION=${DURATION:-10}
else
    ROWS=${ROWS:-udp:50 udp:200 tcp:50 tcp:200}
    DURATION=${DURATION:-20}
fi
SERVERS=${SERVERS:-koe coturn}
INTERVAL=20          # ms between a client's messages
LENGTH=172           # bytes per message
MESSAGES=$((DURATION * 1000 / INTERVAL))
TURN_USER=bench TURN_PASSWORD=benchpass
PY=$(python3 -c 'import sys; print(sys.executable)')

log() { echo "[$(date +%T)] $*" >&2; }
die() { log "error: $*"; exit 1; }

for row in $ROWS; do
    [[ $row =~ ^(udp|tcp|tls):[0-9]+(:send)?$ ]] || die "ROWS: '$row' is not TRANSPORT:CLIENTS[:send] (udp, tcp or tls)"
done
for server in $SERVERS; do
    [[ $server =~ ^(koe|coturn)$ ]] || die "SERVERS: '$server' is neither koe nor coturn"
done
[[ " $SERVERS " != *" koe "* ]] || [ -x "$KOE" ] || die "no Koe binary at $KOE (this script never builds it)"
if ! command -v turnutils_uclient >/dev/null || ! command -v turnutils_peer >/dev/null ||
    { [[ " $SERVERS " == *" coturn "* ]] && ! command -v turnserver >/dev/null; }; then
    [ "$(id -u)" = 0 ] || die "coturn is missing (turnserver, turnutils_uclient, turnutils_peer): apt-get install coturn"
    log "installing coturn"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq coturn >/dev/null
fi
command -v ss >/dev/null || die "ss (iproute2) is needed to see when the servers listen"

# 200 clients over TCP: a socket each to the server, a relayed socket each in it, uclient's.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# ---------------------------------------------------------------------------- cleanup
work=$(mktemp -d /tmp/koe-relay-bench.XXXXXX)
pids=()
cleanup() {
    local status=$?
    set +e
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    sleep 0.5
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null; done
    wait 2>/dev/null
    if [ "${KEEP:-0}" = 1 ] || [ $status -ne 0 ]; then log "work directory kept: $work"; else rm -rf "$work"; fi
    exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM
forget() { local keep=() p; for p in "${pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done; pids=("${keep[@]}"); }

wait_for() {   # wait_for SECONDS COMMAND...: 0 once COMMAND succeeds, 1 on time-out
    local until=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $until ] || return 1
        sleep 0.1
    done
}
alive() { kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
listening() {   # listening PROTO PORT (PROTO: t or u)
    [ -n "$(ss -Hln"$1" "sport = :$2" 2>/dev/null)" ]
}
listening_both() { listening t "$1" && listening u "$1"; }
# A port free for both TCP and UDP, below the ephemeral range (uclient's sockets) and
# coturn's relay range (49152-65535).
port() {
    "$PY" - <<'PY'
import random, socket
while True:
    p = random.randint(20000, 32000)
    try:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            s = socket.socket(socket.AF_INET, kind)
            s.bind(("127.0.0.1", p))
            s.close()
    except OSError:
        continue
    print(p)
    break
PY
}

# The Koe binary may be rebuilt while this runs: the runs use one copy of it.
if [[ " $SERVERS " == *" koe "* ]]; then
    koe_built=$(date -u -r "$KOE" +%FT%TZ)
    koe_version=$("$KOE" --version 2>/dev/null || echo "koe ?")
    cp "$KOE" "$work/koe-bin"
    koe_bin=$work/koe-bin
fi
coturn_version=$(dpkg-query -W -f '${Version}' coturn 2>/dev/null || turnserver --version 2>/dev/null || echo ?)

koe_port=$(port) coturn_port=$(port) peer_port=$(port)
koe_tls_port=$(port) coturn_tls_port=$(port)
if [[ " $ROWS " == *tls:* ]] && [[ " $SERVERS " == *" coturn "* ]]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
        -keyout "$work/coturn.key" -out "$work/coturn.crt" 2>/dev/null
fi

# ---------------------------------------------------------------------------- servers
server_command() {   # server_command SERVER TRANSPORT: the server's command line, one word a line
    local server=$1 transport=$2
    if [ "$server" = koe ]; then
        printf '%s\n' "$koe_bin" relay --listen "127.0.0.1:$koe_port" --relay-user "$TURN_USER:$TURN_PASSWORD" \
            --max-allocations 0 --max-allocations-per-user 0 --max-kbps-per-allocation 0 --summary-every 3600s
        [ "$transport" != tls ] || printf '%s\n' --tls-listen "127.0.0.1:$koe_tls_port"
    else
        printf '%s\n' turnserver -n --listening-ip=127.0.0.1 --relay-ip=127.0.0.1 "--listening-port=$coturn_port" \
            --lt-cred-mech "--user=$TURN_USER:$TURN_PASSWORD" --realm=koe --no-dtls --allow-loopback-peers \
            --no-cli --total-quota=0 --user-quota=0 --log-file=stdout --simple-log \
            "--pidfile=$work/turnserver.pid" "--userdb=$work/turndb"
        if [ "$transport" = tls ]; then
            printf '%s\n' "--tls-listening-port=$coturn_tls_port" "--cert=$work/coturn.crt" "--pkey=$work/coturn.key"
        else
            printf '%s\n' --no-tls
        fi
    fi
}
uclient_command() {   # uclient_command SERVER TRANSPORT CLIENTS METHOD (channel or send)
    local server=$1 transport=$2 clients=$3 method=$4 port
    if [ "$server" = koe ]; then port=$koe_port; else port=$coturn_port; fi
    printf '%s\n' turnutils_uclient
    case $transport in
        tcp) printf '%s\n' -t ;;
        tls) printf '%s\n' -t -S; if [ "$server" = koe ]; then port=$koe_tls_port; else port=$coturn_tls_port; fi ;;
    esac
    [ "$method" != send ] || printf '%s\n' -s
    printf '%s\n' -c -l "$LENGTH" -z "$INTERVAL" -n "$MESSAGES" -m "$clients" -u "$TURN_USER" -w "$TURN_PASSWORD" \
        -p "$port" -e 127.0.0.1 -r "$peer_port" 127.0.0.1
}

server_pid= peer_pid=
start_server() {   # start_server SERVER TRANSPORT RUN: 0 once it listens; 1 and $work/RUN.why if not
    local server=$1 transport=$2 run=$3 command
    mapfile -t command < <(server_command "$server" "$transport")
    "${command[@]}" > "$work/$run-server.out" 2> "$work/$run-server.log" &
    server_pid=$!
    pids+=("$server_pid")
    local port=$koe_port tls_port=$koe_tls_port until=$((SECONDS + 30))
    [ "$server" = koe ] || port=$coturn_port tls_port=$coturn_tls_port
    until listening_both "$port" && { [ "$transport" != tls ] || listening t "$tls_port"; } &&
        { [ "$server" != koe ] || grep -q "^relay node:" "$work/$run-server.out"; }; do
        if ! alive "$server_pid" || [ $SECONDS -ge $until ]; then
            echo "$server did not start listening: $(cat "$work/$run-server.log" "$work/$run-server.out" 2>/dev/null |
                sed 's/\x1b\[[0-9;]*m//g' | grep -v '^ *$' | tail -2 | tr '\n' ' ' | sed 's/ *$//')" > "$work/$run.why"
            return 1
        fi
        sleep 0.1
    done
}
stop() {   # stop PID: TERM, then KILL after 5 s
    local pid=$1
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget "$pid"
}
start_peer() {
    turnutils_peer -L 127.0.0.1 -p "$peer_port" > "$work/$1-peer.log" 2>&1 &
    peer_pid=$!
    pids+=("$peer_pid")
    wait_for 10 listening u "$peer_port" || die "turnutils_peer did not start: $(cat "$work/$1-peer.log")"
}

# ---------------------------------------------------------------------------- the runs
results=$work/results.jsonl
: > "$results"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for row in $ROWS; do
    IFS=: read -r transport clients method <<< "$row"
    method=${method:-channel}
    for server in $SERVERS; do
        run=$transport-$clients-$method-$server
        log "$server, $clients clients over $transport ($method), $DURATION s"
        start_peer "$run"
        if start_server "$server" "$transport" "$run"; then
            sleep 1   # idle: its start-up done before the baseline sample
            mapfile -t uclient < <(uclient_command "$server" "$transport" "$clients" "$method")
            # In the background, so that a signal to this script reaches its trap (and then
            # relay_load.py, which ends its uclient) at once, not after the run.
            "$PY" "$ROOT/bench/lab/relay_load.py" --server-pid "$server_pid" --peer-pid "$peer_pid" \
                --timeout $((DURATION + 150)) --log "$work/$run-uclient.log" --messages "$MESSAGES" \
                --interval "$INTERVAL" -- "${uclient[@]}" > "$work/$run.json" &
            load_pid=$!
            pids+=("$load_pid")
            wait "$load_pid" || true
            forget "$load_pid"
            out=$(cat "$work/$run.json")
            [ -n "$out" ] || out='{"failed": true, "why": "relay_load.py printed nothing"}'
            if ! alive "$server_pid"; then
                wait "$server_pid" 2>/dev/null && status=0 || status=$?
                out=$("$PY" -c 'import json, sys; r = json.loads(sys.argv[1]); r["failed"] = True
gone = "the server process ended during the run"
r["why"] = "; ".join(filter(None, [gone + " (exit status " + sys.argv[2] + ")"] + [w for w in r.get("why", "").split("; ") if w != gone]))
print(json.dumps(r))' "$out" "$status")
            fi
            stop "$server_pid"
        else
            stop "$server_pid"
            out=$("$PY" -c 'import json, sys; print(json.dumps({"failed": True, "why": sys.argv[1]}))' "$(cat "$work/$run.why")")
        fi
        stop "$peer_pid"
        server_pid= peer_pid=
        # Koe prints what it relayed when it stops: a count of its own, beside uclient's.
        own=$(grep -o '^relay: .*packets relayed[^;]*' "$work/$run-server.out" 2>/dev/null | tail -1 || true)
        "$PY" -c 'import json, sys; r = json.loads(sys.argv[1])
r.update(server=sys.argv[2], transport=sys.argv[3], clients=int(sys.argv[4]), method=sys.argv[5], own=sys.argv[6])
print(json.dumps(r))' "$out" "$server" "$transport" "$clients" "$method" "$own" >> "$results"
        log "$server, $clients clients over $transport ($method): $(tail -1 "$results" | "$PY" -c 'import json, sys; r = json.load(sys.stdin)
print("failed: " + r["why"] if r["failed"] else "%s pkt/s at full load, loss %s %%, server CPU %s %%" % tuple(
    "–" if r.get(k) is None else format(r[k], ".1f") for k in ("pps_full_load", "loss_percent", "server_cpu_full_load")))')"
    done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------------------- report
"$PY" - "$results" "$INTERVAL" "$SERVERS" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
interval = int(sys.argv[2])
servers = sys.argv[3].split()
names = {"koe": "Koe", "coturn": "coturn"}
label = lambda r: r["transport"].upper() + (", Send indications" if r.get("method") == "send" else "")

def num(value, fmt, unit=""):
    return "–" if value is None else format(value, fmt) + unit

def allocations(r):
    """Counted (the server's new UDP sockets), else what uclient makes: 1 a client over TCP, 2 else."""
    if r.get("allocations_mid"):
        return r["allocations_mid"]
    return r["clients"] * (1 if r["transport"] == "tcp" else 2)

def per_allocation(r):
    if r.get("rss_mid_kib") is None or r.get("rss_before_kib") is None:
        return None
    return (r["rss_mid_kib"] - r["rss_before_kib"]) / allocations(r)

print("| transport | clients | server | relayed pkt/s, all clients sending (offered) | pkt/s over uclient's transmit time | loss | avg round trip | server CPU, all sending | server CPU, whole run | RSS per allocation |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    offered = 2 * r["clients"] * 1000 // interval
    head = f"| {label(r)} | {r['clients']} | {names[r['server']]} |"
    if r["failed"]:
        loss = num(r.get("loss_percent"), ".2f", " %")
        print(f"{head} **failed**: {r['why']} | – | {loss} | – | – | {num(r.get('server_cpu_run'), '.0f', ' %')} | – |")
        continue
    print(f"{head} {num(r.get('pps_full_load'), '.0f')} ({offered}) | {num(r.get('pps_transmit'), '.0f')}"
          f" ({r.get('transmit_s')} s) | {num(r.get('loss_percent'), '.2f', ' %')} | {num(r.get('rtt_ms'), '.2f', ' ms')} |"
          f" {num(r.get('server_cpu_full_load'), '.1f', ' %')} | {num(r.get('server_cpu_run'), '.1f', ' %')} |"
          f" {num(per_allocation(r), '.1f', ' KiB')} |")

if "koe" in servers and "coturn" in servers:
    print()
    print("| transport | clients | pkt/s Koe/coturn | server CPU Koe/coturn (all sending) | server CPU per packet Koe/coturn | RSS per allocation Koe/coturn |")
    print("|---|---|---|---|---|---|")
    by = {(label(r), r["clients"], r["server"]): r for r in rows}
    seen = []
    for r in rows:
        key = (label(r), r["clients"])
        if key in seen:
            continue
        seen.append(key)
        k, c = by.get(key + ("koe",)), by.get(key + ("coturn",))
        def ratio(f):
            if not k or not c or k["failed"] or c["failed"]:
                return "–"
            a, b = f(k), f(c)
            return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}"
        pps = lambda r: r.get("pps_full_load")
        cpu = lambda r: r.get("server_cpu_full_load")
        per_packet = lambda r: None if not pps(r) or cpu(r) is None else cpu(r) / pps(r)
        failed = [names[x["server"]] + " failed" for x in (k, c) if x and x["failed"]]
        note = f" ({', '.join(failed)})" if failed else ""
        print(f"| {key[0]} | {key[1]} | {ratio(pps)}{note} | {ratio(cpu)} | {ratio(per_packet)} | {ratio(per_allocation)} |")

print()
print("Per run:")
print()
busy = []
for r in rows:
    parts = []
    if r.get("sent") is not None:
        parts.append(f"uclient sent {r['sent']}, got back {r['received']} (send errors {r.get('send_dropped')}),"
                     f" connect phase {r.get('connect_s')} s, transmit time {r.get('transmit_s')} s, run {r.get('run_s')} s,"
                     f" full-load window {r.get('window_s')} s, max round trip {r.get('rtt_max_ms')} ms")
    if r.get("udp_rcvbuf_drops") is not None:
        parts.append(f"the kernel dropped {r['udp_rcvbuf_drops']} UDP datagrams for a full receive buffer"
                     f" and {r['udp_sndbuf_drops']} for a full send buffer (all sockets)")
    if r.get("rss_before_kib") is not None and r.get("rss_mid_kib") is not None:
        counted = "counted" if r.get("allocations_mid") else "not counted: assumed"
        parts.append(f"server RSS {r['rss_before_kib']} KiB before, {r.get('rss_mid_kib')} KiB mid-run"
                     f" with {allocations(r)} allocations ({counted})")
    if r.get("client_cpu_full_load") is not None:
        others = None
        if r.get("machine_cpu_full_load") is not None:
            others = max(0, r["machine_cpu_full_load"] - sum(r.get(k) or 0 for k in
                                                      ("server_cpu_full_load", "client_cpu_full_load", "peer_cpu_full_load")))
            if others > 25:
                busy.append(f"{label(r)} {r['clients']}, {names[r['server']]}: {others:.0f} %")
        parts.append(f"at full load uclient used {r['client_cpu_full_load']:.0f} %, the echo peer"
                     f" {num(r.get('peer_cpu_full_load'), '.0f', ' %')}, everything else on the machine"
                     f" {num(others, '.0f', ' %')} (100 % = one core)")
    if r.get("own"):
        parts.append(f"Koe's own count: {r['own']}")
    if r.get("warnings"):
        parts.append("uclient warned: " + " / ".join(r["warnings"]))
    if r["failed"]:
        parts.append("FAILED: " + r["why"])
    print(f"- {label(r)} {r['clients']}, {names[r['server']]}: " + "; ".join(parts) + ".")
if busy:
    print()
    print("**Warning:** other processes were busy during these runs (CPU beyond server, uclient and echo peer,"
          " 100 % = one core): " + "; ".join(busy) + ". The CPU figures are less trustworthy for them.")
PY
echo
echo "Versions: ${koe_version:-koe not run}${koe_built:+ (binary built $koe_built)}; coturn $coturn_version (turnserver, turnutils_uclient, turnutils_peer)."
echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), Linux $(uname -r);" \
     "load average $load_before before, $load_after after; open files limit $(ulimit -n)."
echo "Each client: $LENGTH-byte messages every $INTERVAL ms, $MESSAGES messages ($DURATION s); channels unless a row says Send indications; one allocation of its own per client (-c), plus uclient's probe allocation over UDP and TLS (see the header of bench/relay.sh)."
echo
echo "Commands, for UDP rows (TCP adds -t to uclient; TLS -t -S, the TLS port, and the server's TLS options; :send rows -s;"
echo "a fresh server and echo peer for every run):"
echo
echo '```'
echo "turnutils_peer -L 127.0.0.1 -p $peer_port"
for server in $SERVERS; do
    server_command "$server" udp | sed "s|^$work/koe-bin\$|koe|; s|$work|WORK|g" | tr '\n' ' ' | sed 's/ $/\n/'
    uclient_command "$server" udp "CLIENTS" channel | tr '\n' ' ' | sed 's/ $/\n/'
done
echo '```'
