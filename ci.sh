#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this file).
# Works on a fresh Debian machine with Rust: it installs what the tests
# need, builds once into one target folder and runs every test.
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TERM_COLOR=never
export CARGO_INCREMENTAL=0
# The suites never ask a cloud metadata address for credentials (the AWS
# tools' standard opt-out; switchyard refuses S3 without credentials then).
export AWS_EC2_METADATA_DISABLED=true

# rustfmt and clippy come with rustup's default profile; add them if this
# toolchain was installed without them.
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$component"
  fi
done

# System packages the suites use: OpenMPI for the MPI backend (and bindgen's
# libclang to build its bindings), iproute2 for the network-namespace hosts,
# Slurm and munge for the one-node cluster the Slurm test starts, OpenSSH
# for the MPIJob test, Chromium for the dashboard test, oneDNN for bf16.
mapfile -t need < <(scripts/missing-mpi-packages.sh)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || need+=(munge)
# sshd and ssh: the MPIJob test runs mpirun over SSH between namespace hosts.
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
# A real browser for the dashboard test (launcher/tests/dashboard.rs).
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# oneDNN, the kernel library bf16 products run on (loaded at run time;
# model/tests/gemm_kernels.rs tests it and the built-in fallback).
ldconfig -p 2>/dev/null | grep -q 'libdnnl\.so\.2 ' || need+=(libdnnl2)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The S3-compatible server the checkpoint suites store to (DESIGN section
# 10). Built once into ~/.cargo/bin; a machine that has it skips this.
if ! command -v s3s-fs >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/s3s-fs" ]; then
  echo "== installing s3s-fs (S3-compatible server for the checkpoint tests)"
  cargo install s3s-fs@0.14.1 --locked --features binary --quiet
fi

# The offline Kubernetes schema checker the k8s suite runs on every rendered
# manifest (DESIGN section 10); it brings PyYAML, which the suite also uses.
if ! python3 -c 'import kubernetes_validate' >/dev/null 2>&1; then
  echo "== installing kubernetes-validate (manifest checks of launcher/tests/k8s.rs)"
  pip install --quiet kubernetes-validate
fi

# TensorBoard's own reader checks the event files a run writes
# (launcher/tests/tensorboard.rs).
if ! python3 -c 'import tensorboard' >/dev/null 2>&1; then
  echo "== installing tensorboard (event file checks of launcher/tests/tensorboard.rs)"
  pip install --quiet tensorboard
fi

# transformers (and torch, CPU use) for the Hugging Face export tests
# (launcher/tests/hf.rs loads exports with AutoModelForCausalLM). Pinned:
# the tests compare against these versions' Mixtral, Qwen2-MoE and
# GLM-4-MoE code (GLM-4-MoE came in transformers 4.54).
if ! python3 -c 'import torch, transformers, sys; sys.exit(transformers.__version__ != "4.57.6")' >/dev/null 2>&1; then
  echo "== installing torch and transformers (Hugging Face export tests of launcher/tests/hf.rs)"
  pip install --quiet torch==2.5.1 transformers==4.57.6
fi

# Every optional backend that builds on this machine: MPI is tested, the
# CUDA switch (NCCL stub) must at least compile.
features="collectives/mpi,worker/mpi,launcher/mpi"

echo "== formatting"
cargo fmt --all -- --check

echo "== lints"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --workspace --all-targets --locked --features "$features,launcher/cuda" -- -D warnings

mkdir -p target
log=target/ci-tests.log
: > "$log"
status=0
echo "== tests (with the MPI backend: real mpirun, namespace hosts)"
cargo test --workspace --all-targets --locked --no-fail-fast --features "$features" 2>&1 | tee -a "$log" || status=1

echo "== data tests of a lean worker (--no-default-features: no Hugging Face tokenizer)"
cargo test -p worker --test data --no-default-features --locked --no-fail-fast 2>&1 | tee -a "$log" || status=1

# Real faults on real jobs, counted (docs/faults.md): a few trials of every
# kind, on the MPI build the tests above made.
echo "== chaos suite: 2 trials of every fault kind"
rm -rf target/chaos
chaos=ok
SWITCHYARD=target/debug/switchyard scripts/chaos.sh --trials 2 --seed 20261206 --out target/chaos || { chaos=FAILED; status=1; }

# One closing line over every test binary above.
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed", p, f }' "$log"
echo "; chaos suite $chaos (target/chaos/summary.md)"
exit $status
