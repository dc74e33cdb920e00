#!/usr/bin/env bash
# `switchyard bench overlap` where communication is a real share of the
# step: 4 MPI ranks on three network-namespace hosts (ranks 0,1 on sy-h1,
# 2 on sy-h2, 3 on sy-h3; scripts/netns-hosts.sh), every link limited to
# RATE with tc's token bucket filter (tbf) in both directions.
#   sudo scripts/bench-overlap.sh [bench overlap options, e.g. --steps 20 --chunks 4]
#   RATE=200mbit sudo scripts/bench-overlap.sh
# Needs root (namespaces, tc), iproute2 and OpenMPI (installed if missing).
# Latency is not added: netem is not in every kernel (the script says
# whether it is); the links then have the bridge's own sub-millisecond latency.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE="${RATE:-300mbit}"
mapfile -t need < <(scripts/missing-mpi-packages.sh)
command -v tc >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --quiet --features mpi
scripts/netns-hosts.sh up
trap 'scripts/netns-hosts.sh down' EXIT
for i in 1 2 3; do
  tc qdisc replace dev "sy-v$i" root tbf rate "$RATE" burst 256kb latency 100ms
  tc -n "sy-h$i" qdisc replace dev eth0 root tbf rate "$RATE" burst 256kb latency 100ms
done
if tc -n sy-h1 qdisc add dev lo root netem delay 1ms 2>/dev/null; then
  tc -n sy-h1 qdisc del dev lo root
  echo "links: $RATE each way (tbf); this kernel has netem, but no latency is added" >&2
else
  echo "links: $RATE each way (tbf); netem is not available in this kernel, so no latency is added" >&2
fi
target/release/switchyard bench overlap --backend mpi --launcher scripts/netns-mpirun.sh "$@"
