#!/bin/sh
# Runs `mpirun -n 4` over the namespace hosts of netns-hosts.sh (ranks 0,1
# on sy-h1, rank 2 on sy-h2, rank 3 on sy-h3), every byte between ranks
# over TCP on the bridge (so link limits set with tc apply to it):
#   scripts/netns-mpirun.sh PROGRAM ARGS...
# Used by scripts/bench-overlap.sh as `switchyard bench overlap --launcher`.
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# The "hosts" share this machine's cores: tell every rank it shares cores,
# so that waiting ranks yield early instead of spinning on a core another rank needs.
export OMPI_MCA_mpi_oversubscribe=1
exec ip netns exec sy-h1 unshare --uts sh -c "hostname sy-h1; exec mpirun -n 4 \
  --host 10.77.0.1:2,10.77.0.2:1,10.77.0.3:1 --mca plm_rsh_agent $here/netns-rsh.sh \
  --mca btl tcp,self --mca btl_tcp_if_include 10.77.0.0/24 --mca oob_tcp_if_include 10.77.0.0/24 \
  --bind-to none -x RAYON_NUM_THREADS=1 -x OMPI_ALLOW_RUN_AS_ROOT -x OMPI_ALLOW_RUN_AS_ROOT_CONFIRM -x OMPI_MCA_mpi_oversubscribe \"\$@\"" sh "$@"
