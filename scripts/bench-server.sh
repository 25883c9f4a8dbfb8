#!/usr/bin/env bash
# The server engine's overhead against vLLM used directly (scripts/bench-server.py), on vLLM's
# CPU build serving the fixture policy of scripts/make-server-fixture.py (or --policy DIR, a
# folder vLLM can serve). Extra arguments go to bench-server.py.
#
#   cargo build --release && bash scripts/bench-server.sh [--n 16] [--concurrency 64] ...
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/rbon-target}"
rbon="${RBON:-$CARGO_TARGET_DIR/release/rbon}"
[ -x "$rbon" ] || { echo "no $rbon: cargo build --release first (or set RBON)" >&2; exit 1; }
source scripts/vllm-env.sh
vllm_env
work="$(mktemp -d)"
trap 'vllm_stop; rm -rf "$work"' EXIT
policy="$work/policy"
args=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--policy" ]; then policy="$2"; shift 2; else args+=("$1"); shift; fi
done
[ -f "$policy/config.json" ] || "$VLLM_PY" scripts/make-server-fixture.py "$policy" > /dev/null 2>&1
port="$(free_port)"
vllm_start "$policy" policy "$port" "$work/vllm.log"
echo "vLLM $("$VLLM_PY" -c 'import vllm; print(vllm.__version__)'), $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
if ! "$VLLM_PY" scripts/bench-server.py --url "http://127.0.0.1:$port/v1" --model policy --policy "$policy" \
  --rbon "$rbon" "${args[@]}"; then
  echo "the end of vLLM's log:" >&2
  tail -40 "$work/vllm.log" >&2
  exit 1
fi
