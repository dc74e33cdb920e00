#!/usr/bin/env bash
# `switchyard bench checkpoint` on a local folder and on a real S3-compatible
# server (s3s-fs, installed with cargo if missing, started here on a scratch
# folder with throwaway credentials and stopped at the end).
#   scripts/bench-checkpoint.sh [--config examples/small.toml] [--json]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v s3s-fs >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/s3s-fs" ]; then
  cargo install s3s-fs@0.14.1 --locked --features binary --quiet
fi
s3s=$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")
cargo build --release --quiet
scratch=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$scratch/s3/bench"
"$s3s" --host 127.0.0.1 --port "$port" --access-key bench --secret-key bench-secret-key "$scratch/s3" >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$scratch"' EXIT
for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
  AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret-key \
  ./target/release/switchyard bench checkpoint --url "$scratch/file" --url s3://bench/run "$@"
