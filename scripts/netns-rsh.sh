#!/bin/sh
# OpenMPI's remote-shell agent for the namespace hosts of netns-hosts.sh:
# `netns-rsh.sh 10.77.0.N command...` runs the command in namespace sy-hN,
# through a shell as ssh would, with its own host name (a UTS namespace) so
# each host looks like a separate machine. mpirun --mca plm_rsh_agent <this>.
set -eu
host="$1"
shift
n="${host##*.}"
exec ip netns exec "sy-h$n" unshare --uts sh -c "hostname sy-h$n; $*"
