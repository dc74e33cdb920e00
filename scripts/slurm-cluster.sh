#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine (DESIGN section 10), for
# the Slurm tests and for trying `switchyard slurm submit` by hand:
#   scripts/slurm-cluster.sh up   STATE_DIR   # prints: export SLURM_CONF=STATE_DIR/slurm.conf
#   scripts/slurm-cluster.sh down STATE_DIR
# Installs slurm-wlm and munge when missing (apt), starts munged (as user
# munge), slurmctld and slurmd with a generated slurm.conf in STATE_DIR.
# Needs root (slurmd runs jobs as their user).
set -euo pipefail
action=${1:?usage: slurm-cluster.sh up|down STATE_DIR}
state=$(mkdir -p "${2:?usage: slurm-cluster.sh up|down STATE_DIR}" && cd "$2" && pwd)
conf="$state/slurm.conf"

stop_daemons() {
  for pidfile in "$state/slurmd.pid" "$state/slurmctld.pid"; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  for _ in $(seq 50); do
    pgrep -f "slurm(ctld|d) .*-f $conf" >/dev/null || break
    sleep 0.1
  done
  pkill -9 -f "slurm(ctld|d) .*-f $conf" 2>/dev/null || true
}

if [ "$action" = down ]; then
  stop_daemons
  exit 0
fi

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: one daemon for the machine, started once.
if ! pgrep -x munged >/dev/null; then
  install -d -o munge -g munge -m 0755 /run/munge
  [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; }
  runuser -u munge -- /usr/sbin/munged
fi

host=$(hostname -s)
# The node's memory, so jobs that ask for memory (`slurm render` writes
# --mem from the memory model) fit when they fit the machine.
mem_mb=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
mkdir -p "$state/spool/ctld" "$state/spool/d" "$state/log"
cat > "$conf" <<CONF
ClusterName=switchyard
SlurmctldHost=$host
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$state/spool/ctld
SlurmdSpoolDir=$state/spool/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=30
JobRequeue=1
NodeName=$host CPUs=8 RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

stop_daemons
slurmctld -f "$conf"
slurmd -f "$conf"
export SLURM_CONF="$conf"
for _ in $(seq 100); do
  if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
    echo "export SLURM_CONF=$conf"
    exit 0
  fi
  scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
  sleep 0.2
done
echo "slurm did not come up; logs in $state/log" >&2
tail -5 "$state/log/slurmctld.log" "$state/log/slurmd.log" >&2 || true
exit 1
