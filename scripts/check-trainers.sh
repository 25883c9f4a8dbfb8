#!/usr/bin/env bash
# Loads a run's pairs into the trainers people use (TRL, with OpenRLHF's and LLaMA-Factory's row
# rules) and runs one DPOTrainer step on a tiny policy: scripts/check-trainers.py says what.
#
#   bash scripts/check-trainers.sh [RUN_DIR] [POLICY_DIR]   (defaults: runs/demo, data/models/tiny-qwen3)
#
# Sets up a virtual environment under ${XDG_CACHE_HOME:-~/.cache}/rbon-trainers from PyPI (torch
# from PyPI is large: a manual check, not part of CI). LLaMA-Factory is installed without its
# dependencies so it cannot change the TRL stack; when it does not import, its rules are checked
# by the script instead, and the output says so.
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/demo}
policy=${2:-data/models/tiny-qwen3}
venv=${RBON_TRAINERS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/rbon-trainers/venv}

if [ ! -f "$run/pairs/dataset_info.json" ]; then
    echo "no exports in $run: running pipelines/demo.yaml" >&2
    cargo run --release -q -p rbon -- run pipelines/demo.yaml
fi
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
fi
"$venv/bin/pip" install -q torch trl datasets transformers pyarrow
"$venv/bin/pip" install -q --no-deps llamafactory || echo "llamafactory: pip could not install it" >&2
exec "$venv/bin/python" scripts/check-trainers.py "$run" "$policy"
