#!/usr/bin/env bash
# Chaos suite: runs N trials of each fault against short real MPI training
# jobs and counts what happened (docs/faults.md). For every fault kind it
# reports how long the job took to notice and to react, how it ended, whether
# a committed checkpoint was lost, and whether the final per-step losses
# equal an uninterrupted reference run's, bit for bit.
#
#   scripts/chaos.sh [--trials N] [--faults a,b,...] [--seed S] [--out DIR]
#                    [--steps N] [--ranks N] [--timeout S] [--cut-seconds S] [--keep-checkpoints]
#
# Fault kinds (default: all): worker-kill rank-stop sigterm-launcher
# sigterm-rank sigterm-coordinator coordinator-kill launcher-kill upload-kill
# s3-restart link-cut.
#
# Needs a switchyard built with MPI ($SWITCHYARD, else target/release/switchyard:
# cargo build --release --features mpi), OpenMPI, python3; s3-restart needs
# s3s-fs ($S3S_FS, on PATH or ~/.cargo/bin); link-cut needs root and `ip netns`.
# A fault kind whose needs are missing is reported as not run (and the suite
# fails), never as passed. Exit status: 0 when every trial of every selected
# kind finished with the expected losses, lost no commit and did not hang.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LIB="$ROOT/scripts/chaos/lib.py"
ALL_FAULTS="worker-kill,rank-stop,sigterm-launcher,sigterm-rank,sigterm-coordinator,coordinator-kill,launcher-kill,upload-kill,s3-restart,link-cut"

TRIALS=3
FAULTS=$ALL_FAULTS
SEED=""
OUT=""
STEPS=40
RANKS=2
TIMEOUT=180
CUT_S=60
KEEP_CKPT=0
UPLOAD_DELAY_MS=2000

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --trials) TRIALS=$2; shift 2 ;;
    --faults) FAULTS=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --ranks) RANKS=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --cut-seconds) CUT_S=$2; shift 2 ;;
    --keep-checkpoints) KEEP_CKPT=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "chaos.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done
[ "$FAULTS" = all ] && FAULTS=$ALL_FAULTS
for f in ${FAULTS//,/ }; do
  case ",$ALL_FAULTS," in *",$f,"*) ;; *) echo "chaos.sh: unknown fault kind '$f' (kinds: $ALL_FAULTS)" >&2; exit 2 ;; esac
done
if [ "$STEPS" -lt 20 ]; then echo "chaos.sh: --steps must be at least 20" >&2; exit 2; fi
EVERY=$((STEPS / 4))

SY=${SWITCHYARD:-$ROOT/target/release/switchyard}
case "$SY" in /*) ;; *) SY="$PWD/$SY" ;; esac
if [ ! -x "$SY" ]; then
  echo "chaos.sh: no switchyard binary at $SY (build it: cargo build --release --features mpi, or set SWITCHYARD)" >&2
  exit 2
fi
command -v mpirun >/dev/null || { echo "chaos.sh: mpirun not found (apt-get install openmpi-bin)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "chaos.sh: python3 not found" >&2; exit 2; }

[ -n "$SEED" ] || SEED=$(( $(date +%s) % 100000 ))
RANDOM=$SEED
if [ -z "$OUT" ]; then OUT=$(mktemp -d /tmp/switchyard-chaos.XXXXXX); fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/results.jsonl"
: > "$OUT/faults.jsonl"

# OpenMPI refuses root unless told; the S3 client must not probe the cloud metadata address.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 AWS_EC2_METADATA_DISABLED=true
export SWITCHYARD_TOKEN="chaos-$$-$RANDOM$RANDOM"
TAGBASE="chaos-$$."   # every process a trial starts carries SWITCHYARD_TEST_TAG=$TAGBASE<fault>.<trial>.

# bash reports each background job that died of a signal ("line N: PID Killed ...");
# the suite kills its jobs on purpose, so those notices are dropped from its stderr.
exec 2> >(grep --line-buffered -v -E '^.*line [0-9]+: +[0-9]+ (Killed|Terminated|Stopped) ' >&2)

lib() { python3 "$LIB" "$@"; }
# The long waits run in the background and are waited for with `wait`, which
# a signal to the suite interrupts at once (its trap then cleans up), where
# a foreground command would first run to its end.
lib_waiting() {  # stdout-file lib-args... -> lib's exit status
  local out=$1; shift
  python3 "$LIB" "$@" >"$out" &
  local pid=$!
  wait "$pid"
}
now() { date +%s.%N; }
rand() { printf -v "$1" %d $(( $2 + RANDOM % ($3 - $2 + 1) )); }  # rand VAR lo hi: an integer in [lo, hi], in this shell (seeded)
step_num() { case "$1" in step-*) echo $((10#${1#step-})) ;; *) echo -1 ;; esac; }
json_get() { python3 -c "import json,sys; v=json.loads(sys.argv[1]).get(sys.argv[2]); print('' if v is None else (json.dumps(v) if isinstance(v,(bool,dict,list)) else v))" "$1" "$2"; }
secs() { printf %d.%03d $(($1 / 1000)) $(($1 % 1000)); }  # milliseconds -> seconds
say() { printf '%s\n' "$*"; }

# ---------------------------------------------------------------- cleanup

S3_PID=""; S3_PORT=""; S3_ROOT=""; NETNS_UP=0; CUT_LINK=""
kill_tagged() {  # every process still carrying a tag that starts with $1
  local pids
  pids=$(lib tagged "$1")
  [ -n "$pids" ] || return 0
  kill -CONT $pids 2>/dev/null
  kill -KILL $pids 2>/dev/null
  sleep 0.2
}
cleanup() {
  trap - EXIT INT TERM
  kill_tagged "$TAGBASE"
  [ -n "$S3_PID" ] && { kill -KILL "$S3_PID" 2>/dev/null; wait "$S3_PID" 2>/dev/null; }
  [ -n "$CUT_LINK" ] && ip link set "$CUT_LINK" up 2>/dev/null
  if [ "$NETNS_UP" = 1 ]; then
    for h in 1 2 3; do for pid in $(ip netns pids "sy-h$h" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done; done
    "$ROOT/scripts/netns-hosts.sh" down >/dev/null 2>&1
  fi
}
interrupted() {
  say ""; say "chaos.sh: interrupted; cleaning up (logs in $OUT)"
  # The suite's own helpers (monitors) still running, then everything tagged.
  local pid
  for pid in $(jobs -p); do kill -TERM "$pid" 2>/dev/null; done
  cleanup
  exit 130
}
trap cleanup EXIT
trap interrupted INT TERM

# ---------------------------------------------------------------- jobs

# The job every configuration trains: the built-in tiny model, short.
JOB=(--set "train.steps=$STEPS" --set "checkpoint.every=$EVERY" --set train.log_every=1 --set parallel.collective_timeout_s=10)

# train via the launcher (its own mpirun and coordinator), in the background: JOB_PID.
start_train() {  # tag run log [extra args...]
  local tag=$1 run=$2 log=$3; shift 3
  SWITCHYARD_TEST_TAG=$tag "$SY" train --quiet --backend mpi --ranks "$RANKS" --run-dir "$run" "${JOB[@]}" "$@" \
    >"$log" 2>&1 </dev/null &
  JOB_PID=$!
}

# A separate `switchyard coordinator` (COORD_PID, COORD_ADDR) and the workers' mpirun (WORKERS_PID).
start_coordinator() {  # tag run log
  local tag=$1 run=$2 log=$3 i
  SWITCHYARD_TEST_TAG=$tag "$SY" coordinator --ranks "$RANKS" --addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
    --run-dir "$run" "${JOB[@]}" >"$log" 2>&1 </dev/null &
  COORD_PID=$!
  COORD_ADDR=""
  for i in $(seq 400); do
    COORD_ADDR=$(awk 'NR==1 && $1=="coordinator" {print $2}' "$log" 2>/dev/null)
    [ -n "$COORD_ADDR" ] && return 0
    kill -0 "$COORD_PID" 2>/dev/null || break
    sleep 0.05
  done
  return 1
}
start_workers() {  # tag run log [extra args...]
  local tag=$1 run=$2 log=$3; shift 3
  SWITCHYARD_TEST_TAG=$tag mpirun -n "$RANKS" --oversubscribe --bind-to none "$SY" worker --coordinator "$COORD_ADDR" \
    --backend mpi --quiet --run-dir "$run" "${JOB[@]}" "$@" >"$log" 2>&1 </dev/null &
  WORKERS_PID=$!
}

# The namespace-hosts job (link-cut): 4 ranks on sy-h1 (2), sy-h2, sy-h3, the launcher in sy-h1.
HOSTS_JOB=(--set "train.steps=$STEPS" --set "checkpoint.every=$EVERY" --set train.log_every=1
  --set train.global_batch_size=24 --set train.micro_batch_size=2 --set parallel.collective_timeout_s=30)
start_hosts_train() {  # tag run log [extra args...]
  local tag=$1 run=$2 log=$3; shift 3
  local agent="$ROOT/scripts/netns-rsh.sh"
  local extra="launch.extra_args=[\"--mca\", \"plm_rsh_agent\", \"$agent\", \"--mca\", \"btl\", \"tcp,self\", \"--mca\", \"btl_tcp_if_include\", \"10.77.0.0/24\", \"--mca\", \"oob_tcp_if_include\", \"10.77.0.0/24\"]"
  SWITCHYARD_TEST_TAG=$tag ip netns exec sy-h1 unshare --uts sh -c 'hostname sy-h1; exec "$@"' sh \
    "$SY" train --quiet --backend mpi --ranks 4 --hosts 10.77.0.1:2,10.77.0.2:1,10.77.0.3:1 --run-dir "$run" \
    "${HOSTS_JOB[@]}" --set "$extra" "$@" >"$log" 2>&1 </dev/null &
  JOB_PID=$!
}

# Waits for a job started in the background (its pid $1) to end, at most
# $TIMEOUT s; a job still running then hung: everything tagged $2 is killed.
# Sets RC (exit status, or 124 when it hung).
finish() {  # pid tag
  local m
  lib_waiting "$OUT/.finish.json" monitor --t0 "$(now)" --pid "$1" --until-gone "$2" --timeout "$TIMEOUT"
  m=$(cat "$OUT/.finish.json")
  if [ "$(json_get "$m" timed_out)" = true ]; then
    kill_tagged "$2"; wait "$1" 2>/dev/null; RC=124
  else
    wait "$1" 2>/dev/null; RC=$?
  fi
}

# ---------------------------------------------------------------- S3 server

s3s_binary() {
  if [ -n "${S3S_FS:-}" ]; then echo "$S3S_FS"; return; fi
  command -v s3s-fs 2>/dev/null && return
  [ -x "$HOME/.cargo/bin/s3s-fs" ] && echo "$HOME/.cargo/bin/s3s-fs"
}
S3_KEY=chaos-access
S3_SECRET=chaos-secret-0123456789
start_s3() {  # serve $S3_ROOT on $S3_PORT: S3_PID
  SWITCHYARD_TEST_TAG="${TAGBASE}s3s." "$S3S" --host 127.0.0.1 --port "$S3_PORT" --access-key "$S3_KEY" \
    --secret-key "$S3_SECRET" "$S3_ROOT" >>"$OUT/s3s-fs.log" 2>&1 </dev/null &
  S3_PID=$!
  local i
  for i in $(seq 200); do
    (echo >"/dev/tcp/127.0.0.1/$S3_PORT") 2>/dev/null && return 0
    sleep 0.05
  done
  return 1
}
stop_s3() {
  kill -TERM "$S3_PID" 2>/dev/null
  local i
  for i in $(seq 40); do kill -0 "$S3_PID" 2>/dev/null || break; sleep 0.05; done
  kill -KILL "$S3_PID" 2>/dev/null
  wait "$S3_PID" 2>/dev/null
  S3_PID=""
}
s3_env() {
  export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
    AWS_ACCESS_KEY_ID=$S3_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET
}

# ---------------------------------------------------------------- references

declare -A REF_METRICS REF_SECONDS
# One uninterrupted run per configuration: mpi (launcher), separate
# (coordinator + mpirun workers), s3 (checkpoints on s3s-fs), hosts (namespaces).
ensure_ref() {  # config -> REF_METRICS[config], or return 1
  local cfg=$1
  [ -n "${REF_METRICS[$cfg]:-}" ] && return 0
  local dir="$OUT/reference-$cfg" tag="${TAGBASE}ref-$cfg." t
  mkdir -p "$dir"
  t=$(now)
  case "$cfg" in
    mpi) start_train "$tag" "$dir/run" "$dir/job.log"; finish "$JOB_PID" "$tag" ;;
    s3) start_train "$tag" "$dir/run" "$dir/job.log" --set checkpoint.url=s3://chaos/reference; finish "$JOB_PID" "$tag" ;;
    separate)
      start_coordinator "$tag" "$dir/run" "$dir/coordinator.log" || { say "reference $cfg: the coordinator did not start"; return 1; }
      start_workers "$tag" "$dir/run" "$dir/workers.log"
      finish "$WORKERS_PID" "$tag"; local wrc=$RC
      finish "$COORD_PID" "$tag"; [ "$wrc" = 0 ] || RC=$wrc ;;
    hosts) start_hosts_train "$tag" "$dir/run" "$dir/job.log"; finish "$JOB_PID" "$tag" ;;
  esac
  REF_SECONDS[$cfg]=$(python3 -c "import sys; print(round(float(sys.argv[1]) - float(sys.argv[2]), 1))" "$(now)" "$t")
  local n
  n=$(grep -c . "$dir/run/metrics.jsonl" 2>/dev/null || echo 0)
  if [ "$RC" != 0 ] || [ "$n" != "$STEPS" ]; then
    say "reference run ($cfg) failed: exit $RC, $n of $STEPS steps; see $dir"
    return 1
  fi
  REF_METRICS[$cfg]="$dir/run/metrics.jsonl"
  [ "$KEEP_CKPT" = 1 ] || rm -rf "$dir/run/checkpoints"
  say "reference ($cfg): $STEPS steps in ${REF_SECONDS[$cfg]} s, uninterrupted ($dir)"
}

# ---------------------------------------------------------------- one trial

# Per-trial state, reset by trial_begin and written by trial_end.
trial_begin() {  # fault trial
  FAULT=$1; TRIAL=$2
  TDIR="$OUT/$FAULT/trial-$(printf %03d "$TRIAL")"
  TAG="${TAGBASE}$FAULT.$TRIAL."
  RUN="$TDIR/run"
  rm -rf "$TDIR"; mkdir -p "$TDIR"
  T_START=$(now)
  WHAT=""; OUTCOME=""; WHY=""; NOTE=""
  BEFORE=-1; AFTER=-1; RESUMED_FROM=""; COMMIT_LOST=false; HUNG=false; MISSED=false
  DETECT=""; NOTICED=""; LOSSES_OK=false; LOSSES="—"; FINISHED=false
}
fail() { WHY="${WHY:+$WHY; }$*"; }

# The fault's moment: t0 and each log's line count just before it.
mark_fault() { T0=$(now); }

# Compares the trial's metrics with the reference; sets LOSSES_OK and LOSSES.
check_losses() {  # reference metrics [compare args...]
  local ref=$1; shift
  local c
  c=$(lib compare "$ref" "$RUN/metrics.jsonl" "$@")
  if [ "$(json_get "$c" identical)" = true ]; then
    LOSSES_OK=true; LOSSES="identical"
  elif [ "$EXPECT" != identical ] && [ "$(json_get "$c" within_tol)" = true ]; then
    LOSSES_OK=true; LOSSES="within tolerance (max rel diff $(json_get "$c" max_rel_diff))"
  else
    LOSSES="DIFFERENT: $(json_get "$c" first_diff)"
    fail "losses differ from the reference: $(json_get "$c" first_diff)"
  fi
}

# Checks the newest commit is still there and whole: latest >= BEFORE and
# `ckpt verify` of the root passes. $1: the root (path or URL), $2: its latest file.
check_committed() {
  local root=$1 latest_file=$2
  AFTER=$(step_num "$(cat "$latest_file" 2>/dev/null)")
  if [ "$BEFORE" -ge 0 ] && [ "$AFTER" -lt "$BEFORE" ]; then
    COMMIT_LOST=true; fail "newest commit was step $BEFORE before the fault, $AFTER after"
  fi
  if [ "$AFTER" -ge 0 ] && ! "$SY" ckpt verify "$root" >"$TDIR/verify.log" 2>&1; then
    COMMIT_LOST=true; fail "ckpt verify $root failed (verify.log)"
  fi
}

# Where a resumed run started: "resuming from <url> (step N)" in its log.
check_resumed_from() {  # log
  local from
  from=$(grep -o 'resuming from [^ ]* (step [0-9]*)' "$1" | head -1 | sed 's/.*(step \([0-9]*\))/\1/')
  if [ -z "$from" ]; then
    if [ "$BEFORE" -ge 0 ]; then COMMIT_LOST=true; fail "the resume did not start from a checkpoint"; fi
    RESUMED_FROM="start"
  else
    RESUMED_FROM=$from
    if [ "$from" -lt "$BEFORE" ]; then COMMIT_LOST=true; fail "resumed from step $from, older than the commit $BEFORE"; fi
  fi
}

# After a fault: the monitor's answer. Sets NOTICED, DETECT (seconds from the
# fault to the restart line, else to the end of every process of the job) and HUNG.
watch_job() {  # pid log... (the job's launcher or mpirun, its logs)
  watch_job_start "$@"
  watch_job_wait
}
# The same in two halves, for faults that last a while (the monitor runs meanwhile).
watch_job_start() {
  local pid=$1; shift
  local args=() log
  for log in "$@"; do args+=(--log "$log" --skip-lines "${SKIP[$log]:-0}"); done
  lib monitor --t0 "$T0" --pid "$pid" --until-gone "$TAG" --timeout "$TIMEOUT" "${args[@]}" >"$TDIR/monitor.json" &
  MON_PID=$!
}
watch_job_wait() {
  wait "$MON_PID"
  M=$(cat "$TDIR/monitor.json")
  NOTICED=$(json_get "$M" noticed_s)
  DETECT=$(json_get "$M" restart_s)
  [ -n "$DETECT" ] || DETECT=$(json_get "$M" gone_s)
  if [ "$(json_get "$M" timed_out)" = true ]; then
    HUNG=true; fail "still running ${TIMEOUT}s after the fault: hung ($(lib tagged "$TAG" | wc -w) process(es) left, killed)"
    kill_tagged "$TAG"
  fi
}
declare -A SKIP
remember_lines() { local log; SKIP=(); for log in "$@"; do SKIP[$log]=$(wc -l <"$log" 2>/dev/null || echo 0); done; }

trial_end() {
  local ok=false secs
  [ "$HUNG" = false ] && [ "$COMMIT_LOST" = false ] && [ "$LOSSES_OK" = true ] && ok=true
  [ "$MISSED" = true ] && ok=true
  secs=$(python3 -c "import sys; print(round(float(sys.argv[1]) - float(sys.argv[2]), 1))" "$(now)" "$T_START")
  kill_tagged "$TAG"
  lib record "$OUT/results.jsonl" fault="$FAULT" trial="$TRIAL" ok=$ok missed=$MISSED what="$WHAT" outcome="$OUTCOME" \
    detect_s="${DETECT:-null}" noticed_s="${NOTICED:-null}" committed_before="$BEFORE" committed_after="$AFTER" \
    resumed_from="$RESUMED_FROM" commit_lost=$COMMIT_LOST hung=$HUNG losses_ok=$LOSSES_OK losses="$LOSSES" \
    why="$WHY" note="$NOTE" seconds="$secs" dir="$TDIR"
  # Checkpoints of passed trials are removed (20 MB a step); failed trials keep everything.
  if [ "$KEEP_CKPT" = 0 ] && [ "$ok" = true ]; then
    rm -rf "$RUN/checkpoints"
    [ "$FAULT" = s3-restart ] && rm -rf "$S3_ROOT/chaos/$FAULT-$TRIAL"
  fi
  local status="ok"
  [ "$MISSED" = true ] && status="missed"
  [ "$ok" = false ] && status="FAIL: $WHY"
  printf '[%s %d/%d] %s | commit before %s, after %s, resumed from %s | noticed %ss, detection %ss | %s | losses %s | %ss | %s%s\n' \
    "$FAULT" "$TRIAL" "$TRIALS" "$WHAT" "$(fmt_step "$BEFORE")" "$(fmt_step "$AFTER")" "${RESUMED_FROM:-—}" \
    "${NOTICED:-—}" "${DETECT:-—}" "${OUTCOME:-—}" "$LOSSES" "$secs" "$status" "${NOTE:+ ($NOTE)}"
}
fmt_step() { if [ "$1" -ge 0 ]; then echo "$1"; else echo none; fi; }

# Runs the job again as a scheduler would (`--resume-if-any`: the newest
# commit, or a fresh start when the fault came before the first one) to its
# end; checks where it started.
resume_train() {  # extra args...
  start_train "$TAG" "$RUN" "$TDIR/resume.log" "$@" --resume-if-any
  finish "$JOB_PID" "$TAG"
  if [ "$RC" = 124 ]; then HUNG=true; fail "the resumed run hung"; return 1; fi
  if [ "$RC" != 0 ]; then fail "the resumed run failed (exit $RC, resume.log)"; return 1; fi
  check_resumed_from "$TDIR/resume.log"
  FINISHED=true
}
resume_separate() {
  if ! start_coordinator "$TAG" "$RUN" "$TDIR/resume-coordinator.log"; then fail "the new coordinator did not start"; return 1; fi
  start_workers "$TAG" "$RUN" "$TDIR/resume-workers.log" --resume-if-any
  finish "$WORKERS_PID" "$TAG"; local wrc=$RC
  finish "$COORD_PID" "$TAG"; local crc=$RC
  if [ "$wrc" = 124 ] || [ "$crc" = 124 ]; then HUNG=true; fail "the resumed run hung"; return 1; fi
  if [ "$wrc" != 0 ] || [ "$crc" != 0 ]; then fail "the resumed run failed (workers $wrc, coordinator $crc)"; return 1; fi
  check_resumed_from "$TDIR/resume-workers.log"
  FINISHED=true
}

# The rank pid of $TAG's job (random rank when $1 is empty): VICTIM_RANK, VICTIM_PID.
pick_rank() {
  local want=$1 i line
  [ -n "$want" ] || rand want 0 $((RANKS - 1))
  VICTIM_RANK=$want; VICTIM_PID=""
  for i in $(seq 100); do
    line=$(lib ranks "$TAG" | awk -v r="$want" '$1==r {print $2}')
    [ -n "$line" ] && { VICTIM_PID=$line; return 0; }
    sleep 0.05
  done
  return 1
}

# Starts the job and waits until it ran step $1 (and has a commit with $2=commit).
wait_step() {  # step [commit] -> 0, or sets MISSED/WHY
  local args=("$RUN" "$1" --pid "$JOB_WATCH_PID" --timeout "$TIMEOUT")
  [ "${2:-}" = commit ] && args+=(--latest-file "$LATEST_FILE")
  [ -n "${3:-}" ] && args+=(--latest-is "$3")
  lib_waiting /dev/null wait-progress "${args[@]}" 2>"$TDIR/wait.err"
  case $? in
    0) return 0 ;;
    2) fail "the job ended before step $1 without a fault: $(cat "$TDIR/wait.err")"; return 1 ;;
    *) HUNG=true; fail "$(cat "$TDIR/wait.err")"; return 1 ;;
  esac
}
# Sleeps a random part of a step (0-99 ms), so faults do not all land at a step boundary.
jitter() { local j; rand j 0 99; sleep "0.0$(printf %02d "$j")"; }
send() {  # signal pid
  if ! kill "-$1" "$2" 2>/dev/null; then MISSED=true; NOTE="the process was gone before the signal"; return 1; fi
  mark_fault
}

# ---------------------------------------------------------------- fault kinds

# A random rank of a job run with --max-restarts 1 gets SIGNAL (named
# NAME in the trial line) at a random step; the launcher must restart it.
signal_a_rank_and_restart() {  # SIGNAL NAME
  local k; rand k 1 $((STEPS - 2))
  LATEST_FILE="$RUN/checkpoints/latest"
  start_train "$TAG" "$RUN" "$TDIR/job.log" --max-restarts 1; JOB_WATCH_PID=$JOB_PID
  wait_step "$k" || return 1
  pick_rank "" || { fail "no rank process found"; return 1; }
  jitter
  BEFORE=$(step_num "$(cat "$LATEST_FILE" 2>/dev/null)")
  remember_lines "$TDIR/job.log"
  WHAT="$2 rank $VICTIM_RANK at step $(grep -c . "$RUN/metrics.jsonl")"
  send "$1" "$VICTIM_PID" || return 1
  after_restart_kind
  return 0  # the trial ran; its verdict is in FINISHED, HUNG, COMMIT_LOST
}

# worker-kill: kill -9 of a random rank at a random step; the launcher restarts the job.
trial_worker_kill() {
  signal_a_rank_and_restart KILL "kill -9"
}

# rank-stop: SIGSTOP of a random rank; the job must notice (heartbeat or
# collective timeout, 10 s) and the launcher restarts it.
trial_rank_stop() {
  signal_a_rank_and_restart STOP SIGSTOP || return
  if kill -0 "$VICTIM_PID" 2>/dev/null && [ -d "/proc/$VICTIM_PID" ] && [ "$(awk '{print $3}' "/proc/$VICTIM_PID/stat" 2>/dev/null)" != Z ]; then
    NOTE="the stopped rank (pid $VICTIM_PID) outlived the job"; kill -KILL "$VICTIM_PID" 2>/dev/null
  fi
}

# After a fault in a job run with --max-restarts 1: the restart, the end, the checks.
after_restart_kind() {
  watch_job "$JOB_PID" "$TDIR/job.log"
  [ "$HUNG" = true ] && { OUTCOME="hung"; wait "$JOB_PID" 2>/dev/null; return; }
  wait "$JOB_PID" 2>/dev/null; local rc=$?
  local line; line=$(grep -m1 -E 'restart [0-9]+/[0-9]+:' "$TDIR/job.log")
  case "$line" in
    *"resuming from step"*)
      RESUMED_FROM=$(echo "$line" | sed 's/.*resuming from step \([0-9]*\).*/\1/')
      [ "$RESUMED_FROM" -lt "$BEFORE" ] && { COMMIT_LOST=true; fail "restart resumed from step $RESUMED_FROM, older than the commit $BEFORE"; }
      OUTCOME="restarted" ;;
    *"no checkpoint was committed yet"*)
      RESUMED_FROM="start"
      [ "$BEFORE" -ge 0 ] && { COMMIT_LOST=true; fail "restart started over although step $BEFORE was committed"; }
      OUTCOME="restarted from the start (nothing committed yet)" ;;
    *) OUTCOME="no restart" ;;
  esac
  if [ "$rc" = 0 ]; then OUTCOME="$OUTCOME, finished"; FINISHED=true
  else OUTCOME="$OUTCOME, failed (exit $rc)"; fail "the job failed (exit $rc, job.log)"; fi
  check_committed "$RUN/checkpoints" "$RUN/checkpoints/latest"
  [ "$FINISHED" = true ] && check_losses "${REF_METRICS[$REF]}"
}

# sigterm-launcher / sigterm-rank: the job saves the current step, exits 143; `--resume` finishes it.
trial_sigterm() {  # launcher|rank
  local k; rand k 1 $((STEPS - 2))
  LATEST_FILE="$RUN/checkpoints/latest"
  start_train "$TAG" "$RUN" "$TDIR/job.log"; JOB_WATCH_PID=$JOB_PID
  wait_step "$k" || return
  local pid=$JOB_PID
  if [ "$1" = rank ]; then pick_rank "" || { fail "no rank process found"; return; }; pid=$VICTIM_PID; fi
  jitter
  BEFORE=$(step_num "$(cat "$LATEST_FILE" 2>/dev/null)")
  remember_lines "$TDIR/job.log"
  local at; at=$(grep -c . "$RUN/metrics.jsonl")
  if [ "$1" = rank ]; then WHAT="SIGTERM rank $VICTIM_RANK at step $at"; else WHAT="SIGTERM launcher at step $at"; fi
  send TERM "$pid" || return
  watch_job "$JOB_PID" "$TDIR/job.log"
  [ "$HUNG" = true ] && { OUTCOME="hung"; wait "$JOB_PID" 2>/dev/null; return; }
  wait "$JOB_PID" 2>/dev/null; local rc=$?
  local stopped; stopped=$(grep -c . "$RUN/metrics.jsonl")
  check_committed "$RUN/checkpoints" "$RUN/checkpoints/latest"
  if [ "$rc" = 143 ] && [ "$AFTER" = "$stopped" ]; then OUTCOME="exit 143, checkpoint of its last step"
  elif [ "$rc" = 143 ]; then OUTCOME="exit 143, checkpoint $AFTER (ran $stopped)"
  else OUTCOME="exit $rc (not 143), checkpoint $AFTER (ran $stopped)"; fi
  resume_train && OUTCOME="$OUTCOME; resumed, finished"
  [ "$FINISHED" = true ] && check_losses "${REF_METRICS[$REF]}"
}

# sigterm-coordinator / coordinator-kill: a separate `switchyard coordinator` with mpirun workers.
trial_separate() {  # TERM|KILL
  local k; rand k 1 $((STEPS - 2))
  LATEST_FILE="$RUN/checkpoints/latest"
  start_coordinator "$TAG" "$RUN" "$TDIR/coordinator.log" || { fail "the coordinator did not start"; return; }
  start_workers "$TAG" "$RUN" "$TDIR/workers.log"; JOB_WATCH_PID=$WORKERS_PID
  wait_step "$k" || return
  jitter
  BEFORE=$(step_num "$(cat "$LATEST_FILE" 2>/dev/null)")
  remember_lines "$TDIR/coordinator.log" "$TDIR/workers.log"
  local at; at=$(grep -c . "$RUN/metrics.jsonl")
  WHAT="$([ "$1" = TERM ] && echo SIGTERM || echo "kill -9") coordinator at step $at"
  send "$1" "$COORD_PID" || return
  watch_job "$WORKERS_PID" "$TDIR/coordinator.log" "$TDIR/workers.log"
  [ "$HUNG" = true ] && { OUTCOME="hung"; wait "$WORKERS_PID" "$COORD_PID" 2>/dev/null; return; }
  wait "$WORKERS_PID" 2>/dev/null; local wrc=$?
  wait "$COORD_PID" 2>/dev/null; local crc=$?
  local stopped; stopped=$(grep -c . "$RUN/metrics.jsonl")
  check_committed "$RUN/checkpoints" "$RUN/checkpoints/latest"
  if [ "$1" = TERM ]; then
    OUTCOME="coordinator exit $crc, workers exit $wrc, checkpoint $([ "$AFTER" = "$stopped" ] && echo "of the last step" || echo "$AFTER (ran $stopped)")"
  else
    OUTCOME="workers exit $wrc"
  fi
  resume_separate && OUTCOME="$OUTCOME; new coordinator, resumed, finished"
  [ "$FINISHED" = true ] && check_losses "${REF_METRICS[$REF]}"
}

# launcher-kill: kill -9 of the launcher, which runs the job's coordinator; the ranks must end by themselves.
trial_launcher_kill() {
  local k; rand k 1 $((STEPS - 2))
  LATEST_FILE="$RUN/checkpoints/latest"
  start_train "$TAG" "$RUN" "$TDIR/job.log"; JOB_WATCH_PID=$JOB_PID
  wait_step "$k" || return
  jitter
  BEFORE=$(step_num "$(cat "$LATEST_FILE" 2>/dev/null)")
  remember_lines "$TDIR/job.log"
  WHAT="kill -9 launcher (coordinator) at step $(grep -c . "$RUN/metrics.jsonl")"
  send KILL "$JOB_PID" || return
  watch_job "$JOB_PID" "$TDIR/job.log"
  wait "$JOB_PID" 2>/dev/null
  [ "$HUNG" = true ] && { OUTCOME="ranks hung"; return; }
  check_committed "$RUN/checkpoints" "$RUN/checkpoints/latest"
  OUTCOME="every rank ended"
  resume_train && OUTCOME="$OUTCOME; resumed, finished"
  [ "$FINISHED" = true ] && check_losses "${REF_METRICS[$REF]}"
}

# upload-kill: every upload waits $UPLOAD_DELAY_MS; kill -9 of a rank (odd
# trials) or of the launcher/coordinator (even) while a save's upload is in
# flight, the previous step committed; `--resume` continues from it.
trial_upload_kill() {
  local j save; rand j 2 $((STEPS / EVERY - 1)); save=$((EVERY * j))
  local prev="step-$(printf %08d $((save - EVERY)))"
  LATEST_FILE="$RUN/checkpoints/latest"
  SWITCHYARD_FAULT_UPLOAD_DELAY_MS=$UPLOAD_DELAY_MS start_train "$TAG" "$RUN" "$TDIR/job.log"; JOB_WATCH_PID=$JOB_PID
  wait_step "$save" commit "$prev" || return
  local victim=launcher pid=$JOB_PID
  if [ $((TRIAL % 2)) = 1 ]; then pick_rank "" || { fail "no rank process found"; return; }; victim="rank $VICTIM_RANK"; pid=$VICTIM_PID; fi
  local off; rand off 0 $((UPLOAD_DELAY_MS * 4 / 5))
  sleep "$(secs "$off")"
  BEFORE=$(step_num "$(cat "$LATEST_FILE" 2>/dev/null)")
  remember_lines "$TDIR/job.log"
  WHAT="kill -9 $victim ${off} ms into the upload of step $save"
  [ "$BEFORE" -ge "$save" ] && NOTE="step $save was already committed at the kill"
  send KILL "$pid" || return
  watch_job "$JOB_PID" "$TDIR/job.log"
  wait "$JOB_PID" 2>/dev/null; local rc=$?
  [ "$HUNG" = true ] && { OUTCOME="hung"; return; }
  check_committed "$RUN/checkpoints" "$RUN/checkpoints/latest"
  OUTCOME="$([ "$victim" = launcher ] && echo "launcher killed, every rank ended" || echo "job failed (exit $rc)")"
  [ -e "$RUN/checkpoints/step-$(printf %08d "$save")/manifest.json" ] && [ "$BEFORE" -lt "$save" ] && OUTCOME="$OUTCOME, step $save committed anyway"
  resume_train && OUTCOME="$OUTCOME; resumed, finished"
  [ "$FINISHED" = true ] && check_losses "${REF_METRICS[$REF]}"
}

# s3-restart: checkpoints on s3s-fs; the server is stopped while an upload is
# in flight and started again on the same folder after 0.5-8 s. The job runs
# with --max-restarts 1; if it still fails, `--resume` once the server is back.
trial_s3_restart() {
  local j save; rand j 2 $((STEPS / EVERY - 1)); save=$((EVERY * j))
  local prev="step-$(printf %08d $((save - EVERY)))"
  local prefix="$FAULT-$TRIAL"
  local url="s3://chaos/$prefix"
  LATEST_FILE="$S3_ROOT/chaos/$prefix/latest"
  SWITCHYARD_FAULT_UPLOAD_DELAY_MS=$UPLOAD_DELAY_MS start_train "$TAG" "$RUN" "$TDIR/job.log" \
    --set "checkpoint.url=$url" --max-restarts 1
  JOB_WATCH_PID=$JOB_PID
  wait_step "$save" commit "$prev" || return
  local off; rand off 0 $((UPLOAD_DELAY_MS * 4 / 5))
  local down_ms; rand down_ms 1 16; down_ms=$((down_ms * 500))
  sleep "$(secs "$off")"
  BEFORE=$(step_num "$(cat "$LATEST_FILE" 2>/dev/null)")
  remember_lines "$TDIR/job.log"
  WHAT="s3s-fs stopped ${off} ms into the upload of step $save, for $(secs "$down_ms") s"
  mark_fault
  watch_job_start "$JOB_PID" "$TDIR/job.log"
  stop_s3
  sleep "$(secs "$down_ms")"
  start_s3 || { fail "s3s-fs did not start again"; wait "$MON_PID"; return; }
  watch_job_wait
  wait "$JOB_PID" 2>/dev/null; local rc=$?
  [ "$HUNG" = true ] && { OUTCOME="hung"; return; }
  check_committed "$url" "$LATEST_FILE"
  local restart; restart=$(grep -m1 -E 'restart [0-9]+/[0-9]+:' "$TDIR/job.log")
  if [ "$rc" = 0 ] && [ -z "$restart" ]; then
    OUTCOME="finished, no restart (retries rode it out)"; DETECT=""; FINISHED=true
  elif [ "$rc" = 0 ]; then
    OUTCOME="failed, launcher restarted, finished"; FINISHED=true
    local from; from=$(echo "$restart" | sed -n 's/.*resuming from step \([0-9]*\).*/\1/p')
    RESUMED_FROM=${from:-start}
    [ -n "$from" ] && [ "$from" -lt "$BEFORE" ] && { COMMIT_LOST=true; fail "restart resumed from step $from, older than the commit $BEFORE"; }
  else
    if [ -n "$restart" ]; then OUTCOME="failed, launcher restarted, failed again (exit $rc); resumed"
    elif grep -q '^error: could not read s3://' "$TDIR/job.log"; then
      OUTCOME="failed; the launcher's restart could not read the store (still down); resumed"
    else OUTCOME="failed (exit $rc); resumed"; fi
    resume_train --set "checkpoint.url=$url" && OUTCOME="$OUTCOME, finished"
  fi
  [ "$FINISHED" = true ] && check_losses "${REF_METRICS[$REF]}"
  NOTE="${NOTE:+$NOTE; }$(grep -m1 -oE 'checkpoint step [0-9]+ failed: could not [a-z]+' "$TDIR/job.log")"
}

# link-cut: 4 ranks on three namespace hosts; the link of host 2 or 3 to the
# bridge goes down at a random step after the first commit. The job runs with
# --max-restarts 1 (a lost host is left out, the job continues on 3 ranks).
# The link stays down --cut-seconds (60); a job that has neither restarted nor
# ended by then is counted as hung, and the link is restored to see whether it recovers.
trial_link_cut() {
  local k; rand k $((EVERY + 2)) $((STEPS - 8))
  local host; rand host 2 3
  LATEST_FILE="$RUN/checkpoints/latest"
  start_hosts_train "$TAG" "$RUN" "$TDIR/job.log" --max-restarts 1; JOB_WATCH_PID=$JOB_PID
  wait_step "$k" commit || return
  jitter
  BEFORE=$(step_num "$(cat "$LATEST_FILE" 2>/dev/null)")
  remember_lines "$TDIR/job.log"
  WHAT="link of host $host (rank $host) cut at step $(grep -c . "$RUN/metrics.jsonl")"
  CUT_LINK="sy-v$host"
  ip link set "$CUT_LINK" down || { fail "could not set $CUT_LINK down"; CUT_LINK=""; return; }
  mark_fault
  # Phase 1: the link is down; the launcher should restart (or end) by itself.
  local args=(--log "$TDIR/job.log" --skip-lines "${SKIP[$TDIR/job.log]}")
  lib_waiting "$TDIR/monitor-cut.json" monitor --t0 "$T0" --pid "$JOB_PID" --timeout "$CUT_S" "${args[@]}" --stop-on-restart
  local m1; m1=$(cat "$TDIR/monitor-cut.json")
  NOTICED=$(json_get "$m1" noticed_s)
  DETECT=$(json_get "$m1" restart_s)
  [ -n "$DETECT" ] || DETECT=$(json_get "$m1" exit_s)
  if [ -z "$DETECT" ]; then
    HUNG=true
    fail "neither restarted nor ended within ${CUT_S}s of the cut (coordinator noticed after ${NOTICED:-—}s)"
  fi
  ip link set "$CUT_LINK" up; CUT_LINK=""
  # Phase 2: the link is back; wait for the end.
  lib_waiting "$TDIR/monitor.json" monitor --t0 "$T0" --pid "$JOB_PID" --timeout "$((CUT_S + TIMEOUT))" "${args[@]}"
  M=$(cat "$TDIR/monitor.json")
  if [ "$(json_get "$M" timed_out)" = true ]; then
    fail "still running ${TIMEOUT}s after the link came back"; OUTCOME="hung"; kill_tagged "$TAG"; wait "$JOB_PID" 2>/dev/null; return
  fi
  wait "$JOB_PID" 2>/dev/null; local rc=$?
  local restart_s; restart_s=$(json_get "$M" restart_s)
  local line; line=$(grep -m1 -E 'restart [0-9]+/[0-9]+:' "$TDIR/job.log")
  RESUMED_FROM=$(echo "$line" | sed -n 's/.*resuming from step \([0-9]*\).*/\1/p')
  [ -n "$RESUMED_FROM" ] && [ "$RESUMED_FROM" -lt "$BEFORE" ] && { COMMIT_LOST=true; fail "restart resumed from step $RESUMED_FROM, older than the commit $BEFORE"; }
  local ranks_after; ranks_after=$(grep -o 'continuing on [^ ]* with [0-9]* rank(s)' "$TDIR/job.log" | head -1)
  if [ "$HUNG" = true ]; then
    if [ -n "$restart_s" ]; then
      OUTCOME="stuck while the link was down, restarted once it was back"
      DETECT=$restart_s
      NOTE="restart line $(python3 -c "import sys; print(round(float(sys.argv[1]) - float(sys.argv[2]), 1))" "$restart_s" "$CUT_S") s after the link came back"
    else
      OUTCOME="stuck while the link was down, no restart after it came back"
    fi
  else
    OUTCOME="restarted"
  fi
  [ -n "$ranks_after" ] && OUTCOME="$OUTCOME on 3 ranks"
  [ -n "$ranks_after" ] && NOTE="${NOTE:+$NOTE; }$ranks_after"
  if [ "$rc" = 0 ]; then OUTCOME="$OUTCOME, finished"; FINISHED=true; else OUTCOME="$OUTCOME, failed (exit $rc)"; fail "the job failed (exit $rc)"; fi
  check_committed "$RUN/checkpoints" "$RUN/checkpoints/latest"
  # Up to the resumed step the losses are the 4-rank run's, bit for bit; after
  # it the job runs on 3 ranks, which matches to fp32 reduction-order tolerance.
  [ "$FINISHED" = true ] && check_losses "${REF_METRICS[$REF]}" --exact-through "${RESUMED_FROM:-0}" --rel-tol 1e-5
}

# ---------------------------------------------------------------- driver

describe() {  # fault -> WHAT_DESC RESUME_DESC REF EXPECT
  EXPECT=identical
  case "$1" in
    worker-kill) WHAT_DESC="kill -9 of a random rank at a random step"; RESUME_DESC="--max-restarts 1"; REF=mpi ;;
    rank-stop) WHAT_DESC="SIGSTOP of a random rank at a random step"; RESUME_DESC="--max-restarts 1"; REF=mpi ;;
    sigterm-launcher) WHAT_DESC="SIGTERM to the launcher at a random step"; RESUME_DESC="train --resume-if-any"; REF=mpi ;;
    sigterm-rank) WHAT_DESC="SIGTERM to a random rank at a random step"; RESUME_DESC="train --resume-if-any"; REF=mpi ;;
    sigterm-coordinator) WHAT_DESC="SIGTERM to a separate switchyard coordinator (mpirun workers)"; RESUME_DESC="new coordinator, workers --resume-if-any"; REF=separate ;;
    coordinator-kill) WHAT_DESC="kill -9 of a separate switchyard coordinator (mpirun workers)"; RESUME_DESC="new coordinator, workers --resume-if-any"; REF=separate ;;
    launcher-kill) WHAT_DESC="kill -9 of the launcher, which runs the coordinator"; RESUME_DESC="train --resume-if-any"; REF=mpi ;;
    upload-kill) WHAT_DESC="kill -9 of a rank (odd trials) or the launcher (even) during a checkpoint upload"; RESUME_DESC="train --resume-if-any"; REF=mpi ;;
    s3-restart) WHAT_DESC="s3s-fs stopped during an upload, restarted 0.5-8 s later"; RESUME_DESC="--max-restarts 1, else train --resume-if-any"; REF=s3 ;;
    link-cut) WHAT_DESC="link of namespace host 2 or 3 down for ${CUT_S} s (4 ranks, 3 hosts)"; RESUME_DESC="--max-restarts 1 (host left out, 3 ranks)"; REF=hosts; EXPECT="exact to the restart, 1e-5 after" ;;
  esac
}

not_run() {  # fault reason
  describe "$1"
  lib record "$OUT/faults.jsonl" fault="$1" what="$WHAT_DESC" resume="$RESUME_DESC" expect="$EXPECT" not_run="$2"
  say "[$1] NOT RUN: $2"
}

# Needs of the optional kinds, checked before any trial.
prepare() {  # fault -> 0, or 1 with NOT_RUN
  NOT_RUN=""
  case "$1" in
    s3-restart)
      S3S=$(s3s_binary)
      if [ -z "$S3S" ]; then NOT_RUN="s3s-fs not found (cargo install s3s-fs@0.14.1 --locked --features binary, or set S3S_FS)"; return 1; fi
      if [ -z "$S3_PID" ]; then
        S3_ROOT="$OUT/s3"; mkdir -p "$S3_ROOT/chaos"
        S3_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        start_s3 || { NOT_RUN="s3s-fs did not start (see $OUT/s3s-fs.log)"; return 1; }
        s3_env
      fi ;;
    link-cut)
      if [ "$(id -u)" != 0 ]; then NOT_RUN="needs root (ip netns, veth links)"; return 1; fi
      if ! command -v ip >/dev/null || ! ip netns list >/dev/null 2>&1; then NOT_RUN="ip netns is not available (apt-get install iproute2)"; return 1; fi
      if [ "$NETNS_UP" = 0 ]; then
        if ip netns list 2>/dev/null | grep -q '^sy-h'; then
          NOT_RUN="namespace hosts sy-h1..3 already exist (another test using them? remove with scripts/netns-hosts.sh down)"; return 1
        fi
        if ! "$ROOT/scripts/netns-hosts.sh" up >"$OUT/netns.log" 2>&1; then
          NOT_RUN="scripts/netns-hosts.sh up failed: $(tail -1 "$OUT/netns.log")"; "$ROOT/scripts/netns-hosts.sh" down >/dev/null 2>&1; return 1
        fi
        NETNS_UP=1
      fi ;;
  esac
  return 0
}

say "chaos.sh: seed $SEED (repeat with --seed $SEED) | trials $TRIALS per fault | $STEPS steps, checkpoint every $EVERY | $RANKS ranks | binary $SY"
say "chaos.sh: faults $FAULTS | logs in $OUT"
SUITE_START=$(now)
for fault in ${FAULTS//,/ }; do
  describe "$fault"
  if ! prepare "$fault"; then not_run "$fault" "$NOT_RUN"; continue; fi
  if ! ensure_ref "$REF"; then not_run "$fault" "the uninterrupted reference run ($REF) failed: see $OUT/reference-$REF"; continue; fi
  lib record "$OUT/faults.jsonl" fault="$fault" what="$WHAT_DESC" resume="$RESUME_DESC" expect="$EXPECT" reference="$REF"
  for i in $(seq 1 "$TRIALS"); do
    trial_begin "$fault" "$i"
    case "$fault" in
      worker-kill) trial_worker_kill ;;
      rank-stop) trial_rank_stop ;;
      sigterm-launcher) trial_sigterm launcher ;;
      sigterm-rank) trial_sigterm rank ;;
      sigterm-coordinator) trial_separate TERM ;;
      coordinator-kill) trial_separate KILL ;;
      launcher-kill) trial_launcher_kill ;;
      upload-kill) trial_upload_kill ;;
      s3-restart) trial_s3_restart ;;
      link-cut) trial_link_cut ;;
    esac
    trial_end
  done
done
TOTAL=$(python3 -c "import sys; print(round(float(sys.argv[1]) - float(sys.argv[2])))" "$(now)" "$SUITE_START")
say ""
say "chaos.sh: $TOTAL s in all, seed $SEED, $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'))"
lib summary "$OUT"
status=$?
say ""
say "summary: $OUT/summary.md | per-trial results: $OUT/results.jsonl"
exit $status
