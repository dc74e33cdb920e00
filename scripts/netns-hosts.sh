#!/bin/sh
# Makes (up) or removes (down) "hosts" on this machine for multi-node
# tests: network namespaces sy-h1..sy-hN (N = 3 unless given, at most 4)
# with addresses 10.77.0.1..N/24 on one bridge, so MPI traffic between
# them crosses real TCP links.
#   scripts/netns-hosts.sh up [N] | down
# Needs root (or CAP_NET_ADMIN) and iproute2. Only these addresses are used.
set -eu
MAX=4
case "${1:-}" in
up)
    count="${2:-3}"
    case "$count" in
    2|3|4) ;;
    *) echo "$0: between 2 and $MAX hosts, got $count" >&2; exit 2 ;;
    esac
    "$0" down 2>/dev/null || true
    ip link add sy-br type bridge
    ip link set sy-br up
    for i in $(seq 1 "$count"); do
        ip netns add "sy-h$i"
        ip link add "sy-v$i" type veth peer name eth0 netns "sy-h$i"
        ip link set "sy-v$i" master sy-br up
        ip -n "sy-h$i" addr add "10.77.0.$i/24" dev eth0
        ip -n "sy-h$i" link set eth0 up
        ip -n "sy-h$i" link set lo up
    done
    ;;
down)
    for i in $(seq 1 "$MAX"); do
        ip netns del "sy-h$i" 2>/dev/null || true
        ip link del "sy-v$i" 2>/dev/null || true
    done
    ip link del sy-br 2>/dev/null || true
    ;;
*)
    echo "usage: $0 up [hosts, 2-$MAX; default 3] | down" >&2
    exit 2
    ;;
esac
