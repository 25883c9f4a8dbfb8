#!/usr/bin/env bash
# The server engine against a real vLLM server (its CPU build from PyPI): a fixture policy is
# served on 127.0.0.1 and crates/cli/tests/server.rs's real-server test runs a sampled pipeline
# through it, checking that every recorded log-prob equals rbon's teacher forcing of the same
# tokens within 1e-3, that a second run gives the same samples, and that a run killed with
# SIGKILL resumes to identical shards.
#
#   bash scripts/check-server.sh
#
# First run: about 4 GB of wheels into ~/.cache/rbon-vllm (torch with its CUDA libraries, which
# the CPU build does not use, vLLM and its requirements), a few minutes; then about 2 minutes
# (server start ~1 min, the test ~15 s, plus the test binary's build if it is not built).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/rbon-target}"
source scripts/vllm-env.sh
vllm_env
work="$(mktemp -d)"
trap 'vllm_stop; rm -rf "$work"' EXIT
"$VLLM_PY" scripts/make-server-fixture.py "$work/policy" > /dev/null
port="$(free_port)"
vllm_start "$work/policy" tiny "$port" "$work/vllm.log"
echo "vLLM $("$VLLM_PY" -c 'import vllm; print(vllm.__version__)') serves the fixture on port $port"
# --workspace: the binaries of `cargo test --workspace`, not a rebuild with other features.
RBON_VLLM_URL="http://127.0.0.1:$port/v1" RBON_VLLM_MODEL=tiny RBON_VLLM_POLICY="$work/policy" \
  cargo test --workspace --test server a_real_vllm_server -- --nocapture
