#!/usr/bin/env python3
"""One load run against a TURN server for bench/relay.sh.

Runs coturn's turnutils_uclient with the given arguments, stamps each line it prints with the
time it arrived (uclient flushes every line), and every 0.25 s samples the CPU time
(utime + stime, all threads) and VmRSS of the server process, the CPU time of uclient and of
the echo peer, and the busy time of the whole machine. Prints one JSON object:

  * from uclient's own summary: tot_send_msgs, tot_recv_msgs, "Total transmit time" (whole
    seconds, from the end of the connect phase to the last client's end: it includes the 1-6 s
    random start of each client and, when a client misses replies, the 10 s it then waits),
    lost packets and %, average round trip (ms, at uclient's 1 ms timer resolution);
  * over the full-load window, while every client is sending (uclient starts each client
    1-6 s after the connect phase, at random, and each sends MESSAGES * INTERVAL ms): the
    relayed packets per second (uclient's per-second counters, sent + received, over the
    arrival times of those lines) and the server's CPU;
  * over the whole uclient run (connect phase included): the server's CPU;
  * the server's RSS and UDP sockets before the run (idle, no allocation) and in the middle of
    the full-load window (of the sending phase when there is none); the UDP sockets it gained
    are its allocations (each has its own relayed UDP socket, in Koe as in coturn);
  * the kernel's UDP datagrams dropped for full receive / send buffers during the run (all
    sockets on the machine: the server's, uclient's, the peer's);
  * failed + why, when uclient exits with an error, times out, prints no summary, relays
    nothing, or the server process ends.

  relay_load.py --server-pid PID --peer-pid PID --timeout S --log FILE --messages N
                --interval MS -- turnutils_uclient ARGS...
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_EVERY = 0.25
# uclient: each client's first message 1000 + random() % 5000 ms after the connect phase
# (startuclient/uclient.c, start_mclient), then one every INTERVAL ms.
LAST_START_S = 6.0
FIRST_START_S = 1.0
MARGIN_S = 0.5


def cpu_ticks(pid):
    """utime + stime of a whole process (all threads), in clock ticks; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    if fields[0] == "Z":   # state: a zombie has ended
        return None
    return int(fields[11]) + int(fields[12])


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


def udp_sockets(pid):
    """How many UDP sockets a process holds: its listener, and one per allocation (the relayed
    address) in both servers."""
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        count = 0
        for table in ("/proc/net/udp", "/proc/net/udp6"):
            with open(table) as f:
                next(f)
                count += sum(1 for line in f if line.split()[9] in inodes)
        return count
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def udp_drops():
    """The kernel's UDP counters of this network namespace (all sockets): datagrams dropped for a
    full receive buffer, and for a full send buffer."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    counters = dict(zip(rows[0][1:], (int(v) for v in rows[1][1:])))
    return counters.get("RcvbufErrors", 0), counters.get("SndbufErrors", 0)


def machine_busy():
    """(busy, total) jiffies of all CPUs."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]   # idle + iowait
    total = sum(values[:8])        # guest time is already in user
    return total - idle, total


def sample(server_pid, peer_pid, client_pid):
    return {
        "t": time.monotonic(),
        "server": cpu_ticks(server_pid),
        "rss": rss_kib(server_pid),
        "peer": cpu_ticks(peer_pid) if peer_pid else None,
        "client": cpu_ticks(client_pid) if client_pid else None,
        "machine": machine_busy(),
    }


def cpu_percent(a, b, key):
    """% of one core used by a process between two samples."""
    if a[key] is None or b[key] is None or b["t"] <= a["t"]:
        return None
    return 100.0 * (b[key] - a[key]) / CLK_TCK / (b["t"] - a["t"])


def machine_percent(a, b):
    """Busy share of the whole machine between two samples, in % of one core."""
    busy = b["machine"][0] - a["machine"][0]
    total = b["machine"][1] - a["machine"][1]
    return 100.0 * os.cpu_count() * busy / total if total else None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--peer-pid", type=int)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--interval", type=int, required=True, help="ms between a client's messages")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command

    result = {"failed": False, "why": ""}
    lines = []   # (arrival time, text)
    before = sample(args.server_pid, args.peer_pid, None)
    udp_before = udp_sockets(args.server_pid)
    drops_before = udp_drops()
    if before["server"] is None:
        result.update(failed=True, why="the server was not running before the run")
        print(json.dumps(result))
        return
    start = time.monotonic()
    client = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              text=True, errors="replace")

    def end(signum, _frame):   # bench/relay.sh's cleanup: uclient ends with us
        client.kill()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, end)
    signal.signal(signal.SIGINT, end)

    def read():
        for line in client.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    samples = [dict(before, client=cpu_ticks(client.pid))]
    timed_out = server_gone = False
    send_s = args.messages * args.interval / 1000.0
    # Offsets from the end of uclient's connect phase: the full-load window, and its middle,
    # when the allocations are counted and the RSS is read.
    lo, hi = LAST_START_S + MARGIN_S, FIRST_START_S + send_s - MARGIN_S
    middle_at = (lo + hi) / 2 if hi - lo >= 2 else FIRST_START_S + send_s / 2
    middle = None
    while client.poll() is None:
        time.sleep(SAMPLE_EVERY)
        s = sample(args.server_pid, args.peer_pid, client.pid)
        if s["client"] is not None:
            samples.append(s)
        connected = [t for t, line in list(lines) if "Total connect time is" in line]
        if middle is None and connected and s["t"] >= connected[-1] + middle_at:
            middle = {"t": s["t"], "rss": rss_kib(args.server_pid), "udp": udp_sockets(args.server_pid)}
        if s["server"] is None:
            server_gone = True
            client.kill()
            break
        if s["t"] - start > args.timeout:
            timed_out = True
            client.kill()
            break
    client.wait()
    reader.join(timeout=5)
    end = sample(args.server_pid, args.peer_pid, None)
    drops_after = udp_drops()
    if end["server"] is None:
        server_gone = True
    samples.append(dict(end, client=samples[-1]["client"]))

    with open(args.log, "w") as f:
        for t, text in lines:
            f.write(f"{t - start:8.3f} {text}\n")

    text = "\n".join(line for _, line in lines)
    def grab(pattern, cast=float):
        found = re.findall(pattern, text)
        return cast(found[-1]) if found else None
    final = re.findall(r"start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)$", text, re.M)
    if final:
        sent, received = int(final[-1][0]), int(final[-1][1])
    else:
        sent = received = None
    result.update(
        sent=sent,
        received=received,
        transmit_s=grab(r"Total transmit time is (\d+)", int),
        lost=grab(r"Total lost packets (\d+)", int),
        loss_percent=grab(r"Total lost packets \d+ \(([\d.]+)%\)"),
        send_dropped=grab(r"total send dropped (\d+)", int),
        rtt_ms=grab(r"Average round trip delay ([\d.]+) ms"),
        rtt_max_ms=grab(r"Average round trip delay [\d.]+ ms; min = \d+ ms, max = (\d+) ms", int),
        connect_s=grab(r"Total connect time is (\d+)", int),
        run_s=round(end["t"] - start, 2),
        rss_before_kib=before["rss"],
        udp_rcvbuf_drops=drops_after[0] - drops_before[0],
        udp_sndbuf_drops=drops_after[1] - drops_before[1],
        exit_status=client.returncode,
    )
    # The whole run.
    result["server_cpu_run"] = cpu_percent(before, end, "server") if not server_gone else None
    if sent is not None and received is not None and result["transmit_s"]:
        result["pps_transmit"] = (sent + received) / result["transmit_s"]

    # The full-load window: every client sending.
    connected = [t for t, line in lines if "Total connect time is" in line]
    progress = [(t, int(m.group(1)) + int(m.group(2))) for t, line in lines
                for m in [re.search(r"msz=\d+, tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", line)] if m]
    if connected:
        t0 = connected[-1]
        inside = [p for p in progress if t0 + lo <= p[0] <= t0 + hi]
        result["window_s"] = round(max(0.0, hi - lo), 1)
        if len(inside) >= 2 and inside[-1][0] - inside[0][0] >= 1.5:
            (ta, na), (tb, nb) = inside[0], inside[-1]
            result["pps_full_load"] = (nb - na) / (tb - ta)
            in_window = [s for s in samples if ta <= s["t"] <= tb and s["server"] is not None]
            if len(in_window) >= 2:
                a, b = in_window[0], in_window[-1]
                result["server_cpu_full_load"] = cpu_percent(a, b, "server")
                result["client_cpu_full_load"] = cpu_percent(a, b, "client")
                result["peer_cpu_full_load"] = cpu_percent(a, b, "peer")
                result["machine_cpu_full_load"] = machine_percent(a, b)
    if middle:
        result["rss_mid_kib"] = middle["rss"]
        if middle["udp"] is not None and udp_before is not None:
            result["allocations_mid"] = middle["udp"] - udp_before

    # Did it work?
    errors = [line.split(": : ", 1)[-1].strip() for _, line in lines
              if re.search(r"error|cannot|can't|fail|refused|not completed|wrong", line, re.I)]
    why = []
    if server_gone:
        why.append("the server process ended during the run")
    if timed_out:
        why.append(f"uclient still running after {args.timeout:.0f} s (killed)")
        if not connected:
            why.append("it never finished connecting its clients")
    elif server_gone:
        pass   # uclient was killed then
    elif client.returncode != 0:
        why.append(f"uclient exited with status {client.returncode}")
    if sent is None and not timed_out and not server_gone:
        why.append("uclient printed no summary")
    elif sent == 0:
        why.append("no message sent")
    elif received == 0:
        why.append("nothing came back")
    if why:
        if errors:
            # The first and the last distinct error uclient printed.
            distinct = list(dict.fromkeys(errors))
            why.append("uclient: " + " … ".join(dict.fromkeys([distinct[0], distinct[-1]])))
        result.update(failed=True, why="; ".join(why))
    elif errors:
        result["warnings"] = list(dict.fromkeys(errors))[:3]
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
