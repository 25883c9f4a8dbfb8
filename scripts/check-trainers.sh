#!/usr/bin/env bash
# Loads a run's exports with the trainers' own data loaders (TRL's DPOTrainer, LLaMA-Factory's
# get_dataset, OpenRLHF's RewardDataset), each in a virtual environment of its own with the
# versions it pins, and prints the rows each keeps and drops per export; TRL also takes one
# training step. scripts/check-trainers.py says what each runs.
#
#   bash scripts/check-trainers.sh [RUN_DIR] [POLICY_DIR]   (defaults: runs/demo, data/models/tiny-qwen3)
#
# The environments live under ${XDG_CACHE_HOME:-~/.cache}/rbon-trainers (PyPI's torch is large,
# about 3 GB per environment the first time; a manual check, not part of CI):
#   venv          torch, trl, transformers, datasets (the latest)
#   llamafactory  llamafactory 0.9.5 with its own pins (trl 0.24, transformers 5.6, datasets 4.0)
#   openrlhf      openrlhf 0.11.2 without its dependencies (deepspeed, flash-attn, vllm, ray need
#                 a GPU stack) beside torch, transformers, datasets and pylatexenc, which its data
#                 loaders import
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/demo}
policy=${2:-data/models/tiny-qwen3}
root=${XDG_CACHE_HOME:-$HOME/.cache}/rbon-trainers

if [ ! -f "$run/pairs/dataset_info.json" ]; then
    echo "no exports in $run: running pipelines/demo.yaml" >&2
    cargo run --release -q -p rbon -- run pipelines/demo.yaml
fi

# make_env NAME PACKAGES...: makes (or updates) the environment NAME with pip install PACKAGES.
make_env() {
    local venv="$root/$1"
    shift
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q --upgrade pip
    fi
    "$venv/bin/pip" install -q "$@"
}
make_env venv torch trl datasets transformers pyarrow
make_env llamafactory llamafactory==0.9.5 pyarrow
make_env openrlhf torch transformers datasets pyarrow pylatexenc
"$root/openrlhf/bin/pip" install -q --no-deps openrlhf==0.11.2

"$root/venv/bin/python" scripts/check-trainers.py trl "$run" "$policy"
"$root/llamafactory/bin/python" scripts/check-trainers.py llamafactory "$run" "$policy"
"$root/openrlhf/bin/python" scripts/check-trainers.py openrlhf "$run" "$policy"
echo "trainers ok"
