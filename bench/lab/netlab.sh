#!/usr/bin/env bash
# A small lab of Linux network namespaces for end-to-end call tests, with no NAT:
#
#      site A (NAME-a)                router (NAME-r)                 site B (NAME-b)
#   eth0 10.77.1.2/24  <-veth->  ra 10.77.1.1   rb 10.77.2.1  <-veth->  eth0 10.77.2.2/24
#                                 pub0 10.77.0.1/24 (dummy: the "public" segment; servers)
#
# The router forwards between the sites (ip_forward=1 inside its namespace only); A and B
# route everything via it, so traffic between them crosses the router's FORWARD chain, where
# bench/lab/impair.py impairs it. Only the namespaces created here are touched: the veth
# pairs are created inside the router namespace and moved straight into the sites, so no
# interface ever appears in the host's namespace.
#
#   bench/lab/netlab.sh up   NAME      # creates NAME-r, NAME-a, NAME-b (NAME: [a-z0-9-], <= 20 chars)
#   bench/lab/netlab.sh down NAME      # removes them (and every process still inside); idempotent
#   bench/lab/netlab.sh exec NAME r|a|b CMD...   # runs CMD in one of them
set -euo pipefail

usage() { echo "usage: $0 up|down NAME | exec NAME r|a|b CMD..." >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1 name=$2
[[ $name =~ ^[a-z0-9-]{1,20}$ ]] || { echo "netlab: bad name '$name'" >&2; exit 2; }
R=$name-r A=$name-a B=$name-b

kill_inside() {   # every process in namespace $1 (only processes started in our namespaces)
    local pids
    pids=$(ip netns pids "$1" 2>/dev/null || true)
    [ -n "$pids" ] || return 0
    kill $pids 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        pids=$(ip netns pids "$1" 2>/dev/null || true)
        [ -n "$pids" ] || return 0
        sleep 0.2
    done
    kill -9 $pids 2>/dev/null || true
}

down() {
    local ns
    for ns in "$A" "$B" "$R"; do
        if ip netns list | awk '{print $1}' | grep -qx "$ns"; then
            kill_inside "$ns"
            ip netns del "$ns" 2>/dev/null || true
        fi
    done
}

up() {
    down
    trap 'echo "netlab: setting up failed; removing the lab" >&2; down' ERR
    ip netns add "$R"; ip netns add "$A"; ip netns add "$B"
    for ns in "$R" "$A" "$B"; do ip -n "$ns" link set lo up; done
    ip netns exec "$R" sysctl -qw net.ipv4.ip_forward=1
    ip netns exec "$R" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 2>/dev/null || true
    ip -n "$R" link add pub0 type dummy 2>/dev/null || true
    if ip -n "$R" link show pub0 >/dev/null 2>&1; then
        ip -n "$R" addr add 10.77.0.1/24 dev pub0; ip -n "$R" link set pub0 up
    else   # no dummy interfaces in this kernel: the public address lives on lo
        ip -n "$R" addr add 10.77.0.1/32 dev lo
    fi
    local site ns n
    for site in a b; do
        if [ $site = a ]; then ns=$A n=1; else ns=$B n=2; fi
        ip -n "$R" link add r$site type veth peer name eth0 netns "$ns"
        ip -n "$R" addr add 10.77.$n.1/24 dev r$site
        ip -n "$R" link set r$site up
        ip -n "$ns" addr add 10.77.$n.2/24 dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" route add default via 10.77.$n.1
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 2>/dev/null || true
    done
    # Checks: each site reaches the other and the public segment.
    ip netns exec "$A" ping -c1 -W2 10.77.2.2 >/dev/null
    ip netns exec "$B" ping -c1 -W2 10.77.1.2 >/dev/null
    ip netns exec "$A" ping -c1 -W2 10.77.0.1 >/dev/null
    trap - ERR
    echo "netlab: up: $R (10.77.0.1, 10.77.1.1, 10.77.2.1), $A (10.77.1.2), $B (10.77.2.2)"
}

case $cmd in
    up) up ;;
    down) down ;;
    exec)
        [ $# -ge 4 ] || usage
        case $3 in r) ns=$R ;; a) ns=$A ;; b) ns=$B ;; *) usage ;; esac
        shift 3
        exec ip netns exec "$ns" "$@" ;;
    *) usage ;;
esac
