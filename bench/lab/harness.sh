# Sourced by the lab benchmarks (bench/impaired_calls.sh, bench/quality.sh): what every one of
# them needs around its calls. Logging; Python with its modules; a work directory and a cleanup
# that ends every process started (in `pids`) and removes the lab's namespaces, also on failure
# or Ctrl-C; waits; and a private copy of the Koe binary, which may be rebuilt meanwhile.
#
# The caller sets LAB (the namespaces' prefix), NETLAB (bench/lab/netlab.sh) and KOE (the binary,
# which may be missing), then calls `bench_python` and `bench_start`.

log() { echo "[$(date +%T)] $*" >&2; }
die() { log "error: $*"; exit 1; }

# bench_python "MODULE ..." PIP_PACKAGE...: sets PY to the real interpreter (not a pyenv shim)
# and installs the pip packages unless every module already imports.
bench_python() {
    local modules=$1; shift
    PY=$(python3 -c 'import sys; print(sys.executable)')
    if ! "$PY" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-dev >/dev/null
    fi
    if ! "$PY" -c "import ${modules// /, }" 2>/dev/null; then
        "$PY" -m pip --version >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
        # Debian's own python3 refuses plain pip installs (PEP 668): then into its site-packages.
        "$PY" -m pip install -q "$@" || "$PY" -m pip install -q --break-system-packages "$@"
    fi
}

# bench_start PREFIX: the work directory /tmp/PREFIX.XXXXXX, the cleanup, IN_R / IN_A / IN_B
# (commands that run in the router and sites; not functions, so that "$IN_A cmd &" makes $! the
# pid of cmd itself: ip netns exec execs it), and KOE as a copy in the work directory
# (koe_source: where it came from, koe_built: when).
bench_start() {
    work=$(mktemp -d "/tmp/$1.XXXXXX")
    pids=()
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
    IN_R="ip netns exec $LAB-r" IN_A="ip netns exec $LAB-a" IN_B="ip netns exec $LAB-b"
    koe_built="?"
    if [ -x "$KOE" ]; then
        koe_built=$(date -u -r "$KOE" +%FT%TZ)
        koe_source=$KOE
        cp "$KOE" "$work/koe-bin"
        KOE=$work/koe-bin
    fi
}

bench_cleanup() {
    local status=$?
    set +e
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    sleep 0.3
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null; done
    "$NETLAB" down "$LAB"   # also ends whatever still runs inside the namespaces
    if [ "${KEEP:-0}" = 1 ] || [ $status -ne 0 ]; then log "work directory kept: $work"; else rm -rf "$work"; fi
    exit $status
}

# forget PID: it ended, the cleanup need not end it.
forget() { local keep=() p; for p in "${pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done; pids=("${keep[@]}"); }

# gone PID: it exited (a zombie counts).
gone() { ! kill -0 "$1" 2>/dev/null || [ "$(ps -o stat= -p "$1" | cut -c1)" = Z ]; }

# try_wait SECONDS COMMAND...: until COMMAND succeeds; fails on time-out.
try_wait() {
    local until=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $until ] || return 1
        sleep 0.1
    done
}

# wait_for SECONDS DESCRIPTION COMMAND...: the same, and dies on time-out.
wait_for() {
    local limit=$1 what=$2; shift 2
    try_wait "$limit" "$@" || die "timed out waiting for $what"
}

# koe_lab_network NAME: a Koe network for the lab in $k (network file, login server and two
# supernodes in the router namespace at 10.77.0.1:4100 and :4200, each supernode's relay node
# on the next two ports), and alice and bob signed up from sites A and B. The servers join
# $pids; needs $KOE, $IN_R, $IN_A, $IN_B.
koe_lab_network() {
    "$KOE" network init --dir "$k/net" --name "$1" --auth-listen 10.77.0.1:7400 > "$k/init.log"
    $IN_R "$KOE" auth serve --no-rate-limits --network "$k/net/network.toml" --secret-dir "$k/net/secret" \
        --db "sqlite:$k/accounts.db" > "$k/auth.out" 2> "$k/auth.log" &
    pids+=($!)
    wait_for 10 "the login server" grep -q "listening on" "$k/auth.out"
    local i
    for i in 1 2; do
        $IN_R "$KOE" --home "$k/node$i" node --network "$k/net/network.toml" --listen "10.77.0.1:4${i}00" \
            > "$k/node$i.out" 2> "$k/node$i.log" &
        pids+=($!)
        wait_for 10 "supernode $i" grep -q /p2p/ "$k/node$i.out"
        "$KOE" network add-bootstrap --network "$k/net/network.toml" "$(grep -m1 /p2p/ "$k/node$i.out")" >&2
    done
    echo "a good password" | $IN_A "$KOE" --home "$k/alice" signup alice --network "$k/net/network.toml" --password-stdin >&2
    echo "a good password" | $IN_B "$KOE" --home "$k/bob" signup bob --network "$k/net/network.toml" --password-stdin >&2
}

# impair_start ARGS...: bench/lab/impair.py in the router (with $IMPAIR_ARGS, if set, before
# ARGS) until impair_stop, which saves its counts to $work/impair-$CALL.json.
impair_start() {
    rm -f "$work/impair.ready"
    # shellcheck disable=SC2086
    $IN_R "$PY" "$ROOT/bench/lab/impair.py" --seed "$seed" --ready "$work/impair.ready" ${IMPAIR_ARGS:-} "$@" \
        > "$work/impair-$CALL.log" 2>&1 &
    impair_pid=$!
    pids+=("$impair_pid")
    wait_for 10 "impair.py" test -e "$work/impair.ready"
}
impair_stop() {
    local rc=0
    kill -TERM "$impair_pid"
    wait "$impair_pid" || rc=$?
    [ $rc = 0 ] || die "impair.py failed (exit status $rc): $(cat "$work/impair-$CALL.log")"
    forget "$impair_pid"
    grep '^impair-stats ' "$work/impair-$CALL.log" | cut -d' ' -f2- > "$work/impair-$CALL.json"
}

# baresip_lab JACK_NAME FEC: baresip's real-time clock, a JACK server with the dummy backend
# and 20 ms periods (baresip's jack module wants one Opus frame per period), in the router
# namespace only so that `netlab.sh down` ends it too (it uses no network); and the
# configurations of baresip A (10.77.1.2, dials) and B (10.77.2.2, answers by itself) in
# $work/baresip-a and -b: Opus 28 kbit/s, in-band FEC if FEC is yes.
baresip_lab() {
    local jack_name=$1 fec=$2 side ip answer
    $IN_R jackd --no-realtime -n "$jack_name" -d dummy -r 48000 -p 960 -C 1 -P 1 > "$work/jackd.log" 2>&1 &
    pids+=($!)
    export JACK_DEFAULT_SERVER=$jack_name JACK_NO_AUDIO_RESERVATION=1
    wait_for 10 "jackd" jack_lsp
    for side in a b; do
        if [ $side = a ]; then ip=10.77.1.2 answer=manual; else ip=10.77.2.2 answer=auto; fi
        mkdir -p "$work/baresip-$side"
        cat > "$work/baresip-$side/config" <<CONFIG
poll_method		epoll
sip_listen		$ip:5060
call_local_timeout	120
audio_player		jack,
audio_source		jack,
audio_alert		jack,
ausrc_format		float
auplay_format		float
ausrc_srate		48000
auplay_srate		48000
ausrc_channels		1
auplay_channels		1
audio_buffer		20-160
rtp_ports		10000-10020
jitter_buffer_delay	5-10
rtp_stats		yes
module_path		/usr/lib/baresip/modules
module			opus.so
module			jack.so
module_tmp		account.so
module_app		menu.so
opus_bitrate		28000
opus_stereo		no
opus_sprop_stereo	no
opus_inbandfec		$fec
$([ "$fec" = yes ] && echo "opus_packet_loss	10")
jack_connect_ports	no
jack_client_name	bs$side
CONFIG
        echo "<sip:$side@$ip;transport=tcp>;regint=0;audio_codecs=opus;answermode=$answer" > "$work/baresip-$side/accounts"
    done
}
