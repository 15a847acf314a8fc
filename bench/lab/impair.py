#!/usr/bin/env python3
"""Impairs the UDP packets a router forwards between two subnets (both directions), leaving
TCP and everything else alone. Run it inside the router's network namespace, as root:

  ip netns exec ROUTER python3 bench/lab/impair.py [--a 10.77.1.0/24] [--b 10.77.2.0/24]
        [--seed 1] [--queue 7] [--delay MS] [--jitter MS] [--tcp-ports PORTS]  MODE ...

  MODE:  none                       only count (and delay, if asked)
         random P                   drop each packet with probability P (e.g. 0.05)
         bursty P MEANBURST         Gilbert-Elliott: a Good state that never drops and a Bad
                                    state that always drops; mean loss P, mean burst length
                                    MEANBURST packets (P(bad->good) = 1/MEANBURST,
                                    P(good->bad) = P/(1-P)/MEANBURST)

With --tcp-ports PORTS (e.g. 4101,4201) it impairs TCP instead: the packets the router itself
receives for those ports (INPUT, destination port in PORTS: "a_to_b", towards the server) and
sends from them (OUTPUT, source port in PORTS: "b_to_a", back from it), which is how
bench/quality.sh drops 1 % of a TURN-over-TCP/TLS stream to a relay node running in the router
(each packet is seen once, also on the loopback interface); --a and --b are then unused.

It puts NFQUEUE rules (iptables, chain KOEB_IMPAIR hooked into FORWARD for -p udp between the
two subnets; with --tcp-ports, KOEB_IMPAIR in INPUT and KOEB_IMPAIR_OUT in OUTPUT) in place,
decides per packet in user space with NetfilterQueue, one seeded random generator and one loss
state per direction (so runs repeat), holds delayed packets (--delay, --jitter: normal,
clipped at 0) and lets them go later. It runs until SIGINT or
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
CHAIN_OUT = "KOEB_IMPAIR_OUT"


def iptables(*args, check=True):
    return subprocess.run(["iptables", "-w", *args], check=check, capture_output=True, text=True)


def install(a, b, queue, tcp_ports=None):
    remove()
    iptables("-N", CHAIN)
    if tcp_ports:
        iptables("-N", CHAIN_OUT)
        iptables("-A", CHAIN, "-p", "tcp", "-m", "multiport", "--dports", tcp_ports, "-j", "NFQUEUE", "--queue-num", str(queue))
        iptables("-A", CHAIN_OUT, "-p", "tcp", "-m", "multiport", "--sports", tcp_ports, "-j", "NFQUEUE", "--queue-num", str(queue))
        iptables("-I", "INPUT", "1", "-p", "tcp", "-j", CHAIN)
        iptables("-I", "OUTPUT", "1", "-p", "tcp", "-j", CHAIN_OUT)
        return
    for src, dst in ((a, b), (b, a)):
        iptables("-A", CHAIN, "-p", "udp", "-s", src, "-d", dst, "-j", "NFQUEUE", "--queue-num", str(queue))
    iptables("-I", "FORWARD", "1", "-p", "udp", "-j", CHAIN)


def remove():
    for hook, proto, chain in (("FORWARD", "udp", CHAIN), ("INPUT", "tcp", CHAIN), ("OUTPUT", "tcp", CHAIN_OUT)):
        while iptables("-D", hook, "-p", proto, "-j", chain, check=False).returncode == 0:
            pass
    for chain in (CHAIN, CHAIN_OUT):
        iptables("-F", chain, check=False)
        iptables("-X", chain, check=False)


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
        kind = "TCP" if self.name.startswith("TCP") else "UDP"
        return f"{self.name}: saw {self.seen} {kind} packets, dropped {self.dropped} ({share:.1f} %{extra})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", default="10.77.1.0/24")
    ap.add_argument("--b", default="10.77.2.0/24")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--queue", type=int, default=7)
    ap.add_argument("--delay", type=float, default=0.0, help="one-way delay added to each packet, ms")
    ap.add_argument("--jitter", type=float, default=0.0, help="standard deviation of the delay, ms")
    ap.add_argument("--ready", help="a file to create once the rules are in place")
    ap.add_argument("--tcp-ports", help="impair TCP to and from these local ports (comma-separated) instead of UDP between --a and --b")
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
    tcp_ports = None
    if args.tcp_ports:
        try:
            tcp_ports = {int(port) for port in args.tcp_ports.split(",")}
        except ValueError:
            ap.error("--tcp-ports: port numbers separated by commas")
        names = (f"TCP to ports {args.tcp_ports}", f"TCP from ports {args.tcp_ports}")
    else:
        names = (f"{args.a} -> {args.b}", f"{args.b} -> {args.a}")
    a_to_b = Direction(names[0], args.mode, args.params, args.seed)
    b_to_a = Direction(names[1], args.mode, args.params, args.seed + 1000)
    delay_rng = random.Random(args.seed + 2000)
    held = []  # (due, sequence, packet)
    sequence = 0

    def on_packet(packet):
        nonlocal sequence
        payload = packet.get_payload()
        if tcp_ports:
            header = (payload[0] & 0x0F) * 4
            destination_port = int.from_bytes(payload[header + 2 : header + 4], "big")
            direction = a_to_b if destination_port in tcp_ports else b_to_a
        else:
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
    install(args.a, args.b, args.queue, args.tcp_ports)
    try:
        what = f"TCP ports {args.tcp_ports}" if tcp_ports else "UDP"
        print(f"impair: {what}: {args.mode} {' '.join(str(p) for p in args.params)} delay {args.delay} ms jitter {args.jitter} ms seed {args.seed}", flush=True)
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
        "mode": args.mode, "params": args.params, "seed": args.seed, "tcp_ports": args.tcp_ports,
        "a_to_b": {"seen": a_to_b.seen, "dropped": a_to_b.dropped},
        "b_to_a": {"seen": b_to_a.seen, "dropped": b_to_a.dropped},
    }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
