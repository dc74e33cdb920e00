#!/usr/bin/env bash
# Fuzzes everything switchyard reads from outside, each target for a fixed
# time: the control protocol's frames, job configs (files and --set flags)
# and checkpoint manifests. Prints executions and crashes per target; a
# crash leaves its input under fuzz/artifacts/<target>/ (turn it into a
# regression test: docs/fuzzing.md).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default 300, all)
#
# Needs rustup's nightly toolchain (libFuzzer's instrumentation) and
# cargo-fuzz, which it installs from crates.io when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-300}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frame config manifest)

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "error: fuzzing needs the nightly toolchain: rustup toolchain install nightly" >&2
  exit 1
fi
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked

# Manifests hold a whole config and every tensor's entry: tens of KiB.
declare -A max_len=([frame]=4096 [config]=8192 [manifest]=65536)
mkdir -p target/fuzz-logs
printf '| target | seconds | executions | exec/s | corpus | crashes |\n|---|---:|---:|---:|---:|---:|\n' > target/fuzz-logs/summary.md
status=0
for target in "${targets[@]}"; do
  echo "== fuzzing $target for ${seconds}s"
  corpus="fuzz/corpus/$target"
  mkdir -p "$corpus" "fuzz/artifacts/$target"
  seeds=()
  [ -d "fuzz/seeds/$target" ] && seeds=("fuzz/seeds/$target")
  log="target/fuzz-logs/$target.log"
  if cargo +nightly fuzz run --fuzz-dir fuzz --target-dir target/fuzz "$target" "$corpus" "${seeds[@]}" -- \
    -max_total_time="$seconds" -max_len="${max_len[$target]}" -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$target/" >"$log" 2>&1; then
    crashes=0
  else
    crashes=$(find "fuzz/artifacts/$target" -type f | wc -l)
    [ "$crashes" -gt 0 ] || { echo "error: the fuzzer for $target failed to run; see $log" >&2; tail -20 "$log" >&2; }
    status=1
  fi
  runs=$(awk '/stat::number_of_executed_units:/ { print $2 }' "$log" | tail -1)
  rate=$(awk '/stat::average_exec_per_sec:/ { print $2 }' "$log" | tail -1)
  corpus_size=$(find "$corpus" -type f | wc -l)
  echo "$target: ${runs:-?} executions (${rate:-?}/s), corpus $corpus_size inputs, $crashes crash(es)"
  printf '| %s | %s | %s | %s | %s | %s |\n' "$target" "$seconds" "${runs:-?}" "${rate:-?}" "$corpus_size" "$crashes" \
    >> target/fuzz-logs/summary.md
done
cat target/fuzz-logs/summary.md
exit $status
