#!/usr/bin/env bash
# End-to-end call quality through a real, impaired network path: baresip <-> baresip (Opus)
# and Koe <-> Koe, in the same run, with the same speech.
#
# A lab of network namespaces (bench/lab/netlab.sh): site A 10.77.1.2 and site B 10.77.2.2,
# each behind its own veth link to a router namespace that forwards between them (no NAT) and
# also hosts Koe's login server and two supernodes (10.77.0.1). For each condition — clean,
# random loss 5/10/20 %, bursty (Gilbert-Elliott) loss 10/20 % with mean bursts of 3 packets —
# bench/lab/impair.py drops UDP packets forwarded between A and B (both directions; TCP, i.e.
# SIP-over-TCP and Koe's overlay, is left alone; seeded: the same drop decisions each run), and
#   * baresip(A) calls baresip(B) (direct IP, SIP over TCP, Opus 28 kbit/s, B answers by
#     itself); both run their audio on one JACK server with the dummy backend, the real-time
#     clock; bench/lab/jack_playrec.py feeds the speech into A's JACK input and records B's
#     JACK output in the same process cycles;
#   * Koe: `koe call bob --play speech.wav` from A to B's `koe up --auto-answer --record`
#     (Koe's voice engine: Opus (opus_pure, VoIP mode) at 32 kbit/s with copies of earlier
#     frames and an adaptive jitter buffer; ICE + DTLS-SRTP).
# The callee's recording is scored with PESQ-WB (bench/pesq_score.py, 16 kHz), which also
# gives the alignment lag to the sent speech: the mouth-to-ear delay. Time origins:
#   * baresip: sample 0 of B's recording is the JACK cycle (20 ms) in which sample 0 of the
#     speech was handed to A's audio source, so the lag runs from A's "microphone" to B's
#     "loudspeaker" (JACK runs the recorder after B's player and before A's source within a
#     cycle, so JACK should add no buffering of its own; at most one 20 ms period if not).
#   * Koe: A sends its speech from the moment A's media connects (ICE + DTLS done), and B
#     records its playout from the moment B's media connects; both moments are in the
#     daemons' logs (str0m "Connected", microsecond timestamps, same machine clock), so
#     mouth-to-ear = lag - (A connected - B connected).
# Speech: alsa-utils' voice samples (all but Noise.wav), concatenated and resampled with sox
# as bench/voice.sh does (48 kHz to send, 16 kHz as the PESQ reference).
#
#   bench/impaired_calls.sh          # as root; installs what is missing (apt, pip); ~3 min
#   PEERS="baresip" bench/impaired_calls.sh      # only one peer (baresip, koe)
#   REPEAT=3 bench/impaired_calls.sh             # 3 calls per condition and peer (seeds
#                                                # SEED, SEED+1, ...): mean (min-max); ~3 min each
#   KEEP=1 ...                                   # keep the work directory (recordings, logs)
#   KOE=/path/to/koe  SEED=1  BARESIP_FEC=no|yes (Opus in-band FEC in baresip, with
#   opus_packet_loss 10; default: no, which is baresip's default)
#   IMPAIR_ARGS="--delay 40 --jitter 10"         # added to every condition (impair.py options)
#
# Prints a Markdown table: condition | peer | PESQ-WB | mouth-to-ear | UDP packets dropped,
# then what each callee itself reported, and a line with versions and the machine. Never
# runs cargo: it uses the Koe binary as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
KOE=${KOE:-$ROOT/target/release/koe}
SEED=${SEED:-1}
PEERS=${PEERS:-baresip koe}
BARESIP_FEC=${BARESIP_FEC:-no}
IMPAIR_ARGS=${IMPAIR_ARGS:-}
REPEAT=${REPEAT:-1}
LAB=koeb$$
NETLAB=$ROOT/bench/lab/netlab.sh
CONDITIONS=(
    "clean|none"
    "random 5 %|random 0.05"
    "random 10 %|random 0.10"
    "random 20 %|random 0.20"
    "bursty 10 %, bursts of 3|bursty 0.10 3"
    "bursty 20 %, bursts of 3|bursty 0.20 3"
)

source "$ROOT/bench/lab/harness.sh"

[ "$(id -u)" = 0 ] || die "run as root (network namespaces, iptables)"
[ -x "$KOE" ] || [[ " $PEERS " != *" koe "* ]] || die "no Koe binary at $KOE (this script never builds it)"

# ---------------------------------------------------------------------------- dependencies
need_apt=()
command -v baresip >/dev/null || need_apt+=(baresip)
command -v sox >/dev/null || need_apt+=(sox)
[ -d /usr/share/sounds/alsa ] || need_apt+=(alsa-utils)
command -v iptables >/dev/null || need_apt+=(iptables)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v ping >/dev/null || need_apt+=(iputils-ping)
command -v jackd >/dev/null || need_apt+=(jackd2)
[ -e /usr/include/libnetfilter_queue/libnetfilter_queue.h ] || need_apt+=(libnetfilter-queue-dev)
command -v gcc >/dev/null || need_apt+=(gcc)
if [ ${#need_apt[@]} -gt 0 ]; then
    log "installing ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
bench_python "numpy pesq netfilterqueue jack" numpy pesq NetfilterQueue JACK-Client

# ---------------------------------------------------------------------------- cleanup
bench_start koeb

# ---------------------------------------------------------------------------- speech
alsa=/usr/share/sounds/alsa
sox "$alsa"/Front_Center.wav "$alsa"/Front_Left.wav "$alsa"/Front_Right.wav "$alsa"/Rear_Center.wav \
    "$alsa"/Rear_Left.wav "$alsa"/Rear_Right.wav "$alsa"/Side_Left.wav "$alsa"/Side_Right.wav \
    -r 48000 -c 1 -b 16 "$work/speech.wav"
sox "$work/speech.wav" -r 16000 -c 1 -b 16 "$work/reference.wav"
speech_s=$(soxi -D "$work/speech.wav")
talk_s=$("$PY" -c "import math; print(math.ceil($speech_s + 1.5))")   # whole seconds (koe call --duration)

# ---------------------------------------------------------------------------- lab
"$NETLAB" up "$LAB" >&2

# ---------------------------------------------------------------------------- baresip
[[ " $PEERS " == *" baresip "* ]] && baresip_lab koeb$$ "$BARESIP_FEC"

baresip_call() {   # one call A -> B; B's received audio to $work/$CALL.wav (16 kHz)
    local a_log="$work/$CALL-baresip-a.log" b_log="$work/$CALL-baresip-b.log" a_pid b_pid to from
    $IN_B baresip -f "$work/baresip-b" > "$b_log" 2>&1 &
    b_pid=$!; pids+=("$b_pid")
    wait_for 10 "baresip B" grep -q "baresip is ready" "$b_log"
    $IN_A baresip -f "$work/baresip-a" -e "/dial sip:b@10.77.2.2;transport=tcp" > "$a_log" 2>&1 &
    a_pid=$!; pids+=("$a_pid")
    wait_for 15 "baresip call setup" grep -q "Call established" "$a_log"
    wait_for 5 "baresip B to answer" grep -q "Call established" "$b_log"
    wait_for 5 "baresip's JACK ports" sh -c "jack_lsp | grep -q '^bsa.*:input_1' && jack_lsp | grep -q '^bsb.*:output_1'"
    to=$(jack_lsp | grep -m1 '^bsa.*:input_1$')
    from=$(jack_lsp | grep -m1 '^bsb.*:output_1$')
    "$PY" "$ROOT/bench/lab/jack_playrec.py" --play "$work/speech.wav" --to "$to" --from "$from" \
        --record "$work/$CALL-48k.wav" --seconds "$talk_s"
    kill -TERM "$a_pid"; wait "$a_pid" || true; forget "$a_pid"
    sleep 0.3
    kill -TERM "$b_pid"; wait "$b_pid" || true; forget "$b_pid"
    sox "$work/$CALL-48k.wav" -r 16000 -c 1 -b 16 "$work/$CALL.wav"
    # What B's RTP stack counted as received and lost (rtp_stats at the end of the call).
    tr '\r' '\n' < "$b_log" | awk '/^packets:/{p=$3} /^lost:/{l=$3} /^jitter:/{j=$3} END{if(p!="") printf "baresip B: received %s RTP packets, %s lost (RTP sequence gaps), jitter %s ms", p, l, j}' \
        > "$work/$CALL.note"
    echo "0" > "$work/$CALL.origin"   # the recording starts in the cycle the speech starts
}

# ---------------------------------------------------------------------------- Koe
if [[ " $PEERS " == *" koe "* ]]; then
    k=$work/koe
    mkdir -p "$k"
    koe_lab_network koe-bench
    # str0m=debug: the "Connected" lines give each side's media start (the time origins); -v:
    # the log on stderr (not koe.log in the profile).
    koe_log=warn,koe=info,koe_media=info,koe_call=info,koe_overlay=info,str0m=debug
    KOE_LOG=$koe_log $IN_B "$KOE" -v --home "$k/bob" up --auto-answer --record "$k/bob-heard.wav" \
        > "$k/bob-up.out" 2> "$k/bob-up.log" &
    pids+=($!)
    KOE_LOG=$koe_log $IN_A "$KOE" -v --home "$k/alice" up > "$k/alice-up.out" 2> "$k/alice-up.log" &
    pids+=($!)
    wait_for 15 "alice's client to attach" sh -c "ip netns exec $LAB-a $KOE --home $k/alice status | grep -q /p2p/"
    wait_for 15 "bob's client to attach" sh -c "ip netns exec $LAB-b $KOE --home $k/bob status | grep -q /p2p/"
    wait_for 15 "alice to see bob online" sh -c "ip netns exec $LAB-a $KOE --home $k/alice lookup bob | grep -q '1 device(s) online'"
fi

koe_call() {   # one call alice(A) -> bob(B); bob's recording to $work/$CALL.wav (16 kHz)
    local a_from b_from recordings
    a_from=$(($(stat -c %s "$k/alice-up.log") + 1))
    b_from=$(($(stat -c %s "$k/bob-up.log") + 1))
    recordings=$(grep -c "recording: " "$k/bob-up.log" || true)
    if ! $IN_A "$KOE" --home "$k/alice" call bob --play "$work/speech.wav" --duration "${talk_s}s" > "$work/$CALL-call.out" 2>&1; then
        log "koe call failed: $(tr '\n' ' ' < "$work/$CALL-call.out")"
        echo "koe call failed: $(tr '\n' ' ' < "$work/$CALL-call.out")" > "$work/$CALL.note"
        return 1
    fi
    if ! grep -q '^answered' "$work/$CALL-call.out"; then
        echo "not answered: $(tr '\n' ' ' < "$work/$CALL-call.out")" > "$work/$CALL.note"
        return 1
    fi
    wait_for 15 "bob's recording" sh -c "[ \$(grep -c 'recording: ' '$k/bob-up.log') -gt $recordings ]"
    sox "$k/bob-heard.wav" -r 16000 -c 1 -b 16 "$work/$CALL.wav"
    tail -c "+$a_from" "$k/alice-up.log" > "$work/$CALL-alice.log"
    tail -c "+$b_from" "$k/bob-up.log" > "$work/$CALL-bob.log"
    # Origin: A's speech starts at A's media "Connected", B's recording at B's.
    "$PY" - "$work/$CALL-alice.log" "$work/$CALL-bob.log" > "$work/$CALL.origin" <<'PY'
import re, sys
from datetime import datetime
def connected(path):
    text = re.sub(r"\x1b\[[0-9;]*m", "", open(path, errors="replace").read())
    times = [m.group(1) for m in re.finditer(r"^(\S+Z)\s+DEBUG str0m: Connected$", text, re.M)]
    if not times:
        sys.exit(f"no 'str0m: Connected' in {path}")
    return datetime.fromisoformat(times[-1].replace("Z", "+00:00"))
print(f"{(connected(sys.argv[1]) - connected(sys.argv[2])).total_seconds() * 1000:.1f}")
PY
    sed 's/\x1b\[[0-9;]*m//g' "$work/$CALL-bob.log" | grep -o 'received [0-9]* frames.*copies of earlier frames per packet\(, reaching [0-9]* ms back\)\?\(, each packet sent twice\)\?' | tail -1 |
        sed 's/^/Koe bob: /; s/;/,/g' > "$work/$CALL.note" || true
}

# ---------------------------------------------------------------------------- the runs
results=$work/results.tsv
: > "$results"
n=0
for condition in "${CONDITIONS[@]}"; do
    name=${condition%%|*}
    read -r -a mode <<< "${condition#*|}"
    n=$((n + 1))
    for rep in $(seq 1 "$REPEAT"); do
        seed=$((SEED + rep - 1))   # each repetition its own loss pattern; the peers share it
        for peer in $PEERS; do
            CALL=$n-$peer-$rep
            log "$name (seed $seed): $peer A -> B"
            impair_start "${mode[@]}"
            if "${peer}_call"; then
                impair_stop
                read -r pesq lag < <("$PY" "$ROOT/bench/pesq_score.py" "$work/reference.wav" "$work/$CALL.wav")
            else   # the call itself failed: a row that says so
                impair_stop
                pesq=nan lag=nan
                echo nan > "$work/$CALL.origin"
            fi
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$peer" "$seed" "$pesq" "$lag" "$(cat "$work/$CALL.origin")" \
                "$(cat "$work/impair-$CALL.json")" "$(cat "$work/$CALL.note" 2>/dev/null)" >> "$results"
            log "$name (seed $seed): $peer PESQ-WB $pesq, lag $lag ms, origin offset $(cat "$work/$CALL.origin") ms"
            if [ "$name" = clean ] && [ "$pesq" != nan ] && "$PY" -c "import sys; sys.exit(float('$pesq') >= 3.5)"; then
                log "warning: $peer scores $pesq on a clean path: is the recording really speech? ($work/$CALL.wav)"
            fi
        done
    done
done

# ---------------------------------------------------------------------------- report
koe_version=$([ -x "$KOE" ] && "$KOE" --version 2>/dev/null || echo "koe ?")
baresip_version=$(dpkg-query -W -f '${Version}' baresip 2>/dev/null || echo ?)
opus_version=$(dpkg-query -W -f '${Version}' libopus0 2>/dev/null || echo ?)
"$PY" - "$results" "$REPEAT" <<'PY'
import json, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
repeat = int(sys.argv[2])
names = {"baresip": "baresip 1.0, Opus 28 kbit/s", "koe": "Koe, Opus 32 kbit/s + copies"}

def spread(values, fmt, unit=""):
    """One value, or with repetitions: mean (min-max)."""
    if not values:
        return "call failed"
    mean = sum(values) / len(values)
    text = format(mean, fmt) + unit
    if len(values) > 1:
        text += f" ({format(min(values), fmt)}–{format(max(values), fmt)})"
    return text

def dropped(stats, key):
    seen = sum(s[key]["seen"] for s in stats)
    lost = sum(s[key]["dropped"] for s in stats)
    return f"{lost} of {seen} ({100.0 * lost / seen if seen else 0.0:.1f} %)"

print("| condition | peer | PESQ-WB | mouth-to-ear | UDP packets dropped by impair.py (A→B; B→A) |")
print("|---|---|---|---|---|")
groups = {}
for row in rows:
    groups.setdefault((row[0], row[1]), []).append(row)
for (name, peer), calls in groups.items():
    ok = [c for c in calls if c[3] != "nan"]
    score = spread([float(c[3]) for c in ok], ".2f")
    m2e = spread([float(c[4]) - float(c[5]) for c in ok], ".0f", " ms")
    failed = len(calls) - len(ok)
    if failed and ok:
        score += f", {failed} call(s) failed"
    stats = [json.loads(c[6]) for c in calls]
    print(f"| {name} | {names[peer]} | {score} | {m2e} | {dropped(stats, 'a_to_b')}; {dropped(stats, 'b_to_a')} |")
if repeat > 1:
    print(f"\n{repeat} calls per row (impair.py seeds differ per repetition, shared by both peers): mean (min–max); drops summed.")
print()
print("Per call, what the callee itself reported:")
print()
for name, peer, seed, pesq, lag, origin, stats, note in rows:
    extra = ""
    if pesq != "nan":
        extra = f"; PESQ-WB {float(pesq):.2f}, recording lag {float(lag):.1f} ms"
        if peer == "koe":
            extra += f", A's media started {float(origin):.1f} ms after B's"
    print(f"- {name}, seed {seed}, {peer}: {note or '-'}{extra}")
PY
echo
echo "Versions: $koe_version (target/release/koe built ${koe_built:-?}); baresip $baresip_version" \
     "(Opus in-band FEC: $BARESIP_FEC; jitter buffer: audio_buffer 20-160 ms, jitter_buffer_delay 5-10 frames); libopus $opus_version;" \
     "impair.py seed $SEED$([ "$REPEAT" -gt 1 ] && echo "..$((SEED + REPEAT - 1))")${IMPAIR_ARGS:+ $IMPAIR_ARGS}; speech $(printf %.1f "$speech_s") s."
echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), Linux $(uname -r), $(. /etc/os-release; echo "$PRETTY_NAME")."
