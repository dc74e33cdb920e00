#!/bin/sh
# Runs mpirun over the namespace hosts of netns-hosts.sh, from inside host 1,
# every byte between ranks over TCP on the bridge (so link limits set with
# tc apply to it):
#   scripts/netns-mpirun.sh [-n RANKS --host LIST] PROGRAM ARGS...
# Defaults: 4 ranks, ranks 0,1 on sy-h1, rank 2 on sy-h2, rank 3 on sy-h3
# (-n 4 --host 10.77.0.1:2,10.77.0.2:1,10.77.0.3:1). Each rank runs
# RAYON_NUM_THREADS threads (1 unless set). Used by scripts/bench-overlap.sh
# (as `switchyard bench overlap --launcher`), `switchyard simulate validate`
# and the namespace tests in launcher/tests/mpi.rs: one place for the options.
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
ranks=4
hosts=10.77.0.1:2,10.77.0.2:1,10.77.0.3:1
while [ $# -gt 0 ]; do
  case "$1" in
    -n) ranks="$2"; shift 2 ;;
    --host) hosts="$2"; shift 2 ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "usage: $0 [-n RANKS --host LIST] PROGRAM ARGS..." >&2; exit 2; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-1}"
# The "hosts" share this machine's cores: tell every rank it shares cores,
# and let a rank waiting in MPI yield its core instead of spinning on a core
# another rank needs (one slot per host would tell OpenMPI it has one to itself).
export OMPI_MCA_mpi_oversubscribe=1 OMPI_MCA_mpi_yield_when_idle=1
exec ip netns exec sy-h1 unshare --uts sh -c "hostname sy-h1; exec mpirun -n $ranks \
  --host $hosts --mca plm_rsh_agent $here/netns-rsh.sh \
  --mca btl tcp,self --mca btl_tcp_if_include 10.77.0.0/24 --mca oob_tcp_if_include 10.77.0.0/24 \
  --bind-to none -x RAYON_NUM_THREADS -x OMPI_ALLOW_RUN_AS_ROOT -x OMPI_ALLOW_RUN_AS_ROOT_CONFIRM \
  -x OMPI_MCA_mpi_oversubscribe -x OMPI_MCA_mpi_yield_when_idle \"\$@\"" sh "$@"
