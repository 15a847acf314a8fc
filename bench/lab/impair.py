#!/usr/bin/env python3
"""Impairs the UDP packets a router forwards between two subnets (both directions), leaving
TCP and everything else alone. Run it inside the router's network namespace, as root:

  ip netns exec ROUTER python3 bench/lab/impair.py [--a 10.77.1.0/24] [--b 10.77.2.0/24]
        [--seed 1] [--queue 7] [--delay MS] [--jitter MS]  MODE ...

  MODE:  none                       only count (and delay, if asked)
         random P                   drop each packet with probability P (e.g. 0.05)
         bursty P MEANBURST         Gilbert-Elliott: a Good state that never drops and a Bad
                                    state that always drops; mean loss P, mean burst length
                                    MEANBURST packets (P(bad->good) = 1/MEANBURST,
                                    P(good->bad) = P/(1-P)/MEANBURST)

It puts NFQUEUE rules (iptables, chain KOEB_IMPAIR hooked into FORWARD for -p udp between the
two subnets) in place, decides per packet in user space with NetfilterQueue, one seeded
random generator and one loss state per direction (so runs repeat), holds delayed packets
(--delay, --jitter: normal, clipped at 0) and lets them go later. It runs until SIGINT or
SIGTERM, then removes its rules and prints per direction how many packets it saw and dropped,
also as one JSON line starting with "impair-stats " for scripts.
"""
import argparse
import heapq
import ipaddress
import json
import random
import select
import signal
import subprocess
import sys
import time

from netfilterqueue import NetfilterQueue

CHAIN = "KOEB_IMPAIR"


def iptables(*args, check=True):
    return subprocess.run(["iptables", "-w", *args], check=check, capture_output=True, text=True)


def install(a, b, queue):
    remove()
    iptables("-N", CHAIN)
    for src, dst in ((a, b), (b, a)):
        iptables("-A", CHAIN, "-p", "udp", "-s", src, "-d", dst, "-j", "NFQUEUE", "--queue-num", str(queue))
    iptables("-I", "FORWARD", "1", "-p", "udp", "-j", CHAIN)


def remove():
    while iptables("-D", "FORWARD", "-p", "udp", "-j", CHAIN, check=False).returncode == 0:
        pass
    iptables("-F", CHAIN, check=False)
    iptables("-X", CHAIN, check=False)


class Direction:
    def __init__(self, name, mode, params, seed):
        self.name, self.mode, self.params = name, mode, params
        self.rng = random.Random(seed)
        self.bad = False
        self.seen = self.dropped = 0
        self.bursts = 0

    def drop(self):
        """Decides for the next packet."""
        self.seen += 1
        if self.mode == "random":
            lost = self.rng.random() < self.params[0]
        elif self.mode == "bursty":
            p, burst = self.params
            to_good = 1.0 / burst
            to_bad = p / (1.0 - p) * to_good
            # The state for this packet: a transition, then the state decides.
            if self.bad:
                self.bad = self.rng.random() >= to_good
            else:
                self.bad = self.rng.random() < to_bad
                if self.bad:
                    self.bursts += 1
            lost = self.bad
        else:
            lost = False
        self.dropped += lost
        return lost

    def report(self):
        share = 100.0 * self.dropped / self.seen if self.seen else 0.0
        extra = f", {self.bursts} bursts" if self.mode == "bursty" else ""
        return f"{self.name}: saw {self.seen} UDP packets, dropped {self.dropped} ({share:.1f} %{extra})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", default="10.77.1.0/24")
    ap.add_argument("--b", default="10.77.2.0/24")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--queue", type=int, default=7)
    ap.add_argument("--delay", type=float, default=0.0, help="one-way delay added to each packet, ms")
    ap.add_argument("--jitter", type=float, default=0.0, help="standard deviation of the delay, ms")
    ap.add_argument("--ready", help="a file to create once the rules are in place")
    ap.add_argument("mode", choices=["none", "random", "bursty"])
    ap.add_argument("params", nargs="*", type=float)
    args = ap.parse_args()
    need = {"none": 0, "random": 1, "bursty": 2}[args.mode]
    if len(args.params) != need:
        ap.error(f"{args.mode} takes {need} number(s)")
    if args.mode != "none" and not 0 <= args.params[0] < 1:
        ap.error("P is a probability: 0 <= P < 1")
    if args.mode == "bursty" and args.params[1] < 1:
        ap.error("MEANBURST >= 1")
    net_a, net_b = ipaddress.ip_network(args.a), ipaddress.ip_network(args.b)
    a_to_b = Direction(f"{args.a} -> {args.b}", args.mode, args.params, args.seed)
    b_to_a = Direction(f"{args.b} -> {args.a}", args.mode, args.params, args.seed + 1000)
    delay_rng = random.Random(args.seed + 2000)
    held = []  # (due, sequence, packet)
    sequence = 0

    def on_packet(packet):
        nonlocal sequence
        payload = packet.get_payload()
        source = ipaddress.ip_address(payload[12:16])
        direction = a_to_b if source in net_a else b_to_a
        if direction.drop():
            packet.drop()
            return
        if args.delay <= 0 and args.jitter <= 0:
            packet.accept()
            return
        wait = max(0.0, delay_rng.gauss(args.delay, args.jitter)) / 1000.0
        packet.retain()
        sequence += 1
        heapq.heappush(held, (time.monotonic() + wait, sequence, packet))

    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    queue = NetfilterQueue()
    queue.bind(args.queue, on_packet, max_len=4096)
    install(args.a, args.b, args.queue)
    try:
        print(f"impair: {args.mode} {' '.join(str(p) for p in args.params)} delay {args.delay} ms jitter {args.jitter} ms seed {args.seed}", flush=True)
        if args.ready:
            open(args.ready, "w").close()
        fd = queue.get_fd()
        while not stopping:
            timeout = 0.2
            if held:
                timeout = min(timeout, max(0.0, held[0][0] - time.monotonic()))
            try:
                readable, _, _ = select.select([fd], [], [], timeout)
            except InterruptedError:
                continue
            if readable:
                queue.run(block=False)
            now = time.monotonic()
            while held and held[0][0] <= now:
                heapq.heappop(held)[2].accept()
    finally:
        remove()
        for _, _, packet in held:
            packet.accept()
        queue.unbind()
    print(a_to_b.report())
    print(b_to_a.report())
    print("impair-stats " + json.dumps({
        "mode": args.mode, "params": args.params, "seed": args.seed,
        "a_to_b": {"seen": a_to_b.seen, "dropped": a_to_b.dropped},
        "b_to_a": {"seen": b_to_a.seen, "dropped": b_to_a.dropped},
    }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
