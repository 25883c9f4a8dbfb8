#!/usr/bin/env bash
# The GPU check, run from the repository root on a machine with an NVIDIA GPU (CUDA 13 driver,
# python3 with torch, transformers, pyarrow and the CUDA 13 `nvidia-*` libraries), with the CUDA
# binaries built elsewhere by `scripts/build-cuda.sh --bundle DIR` (rbon and device-tests, the
# model suites in one test binary):
#
#   bash scripts/gpu-check.sh OUT [BUNDLE]          # BUNDLE: that DIR (default .gpu/bundle)
#
# Writes under OUT, and prints as it goes (about 5 minutes on an H200):
#   summary.txt            every part's result
#   nvidia-smi.txt
#   demo-compare.txt       pipelines/demo.yaml on cpu and on cuda:0 (f32), stage by stage
#   gpu-bench.json         sampling and scoring throughput beside transformers and the roofline
#   logs.tar.gz            the rest: the model suites' logs on cuda:0 (decoders in f32 against
#                          transformers' goldens and in bf16 against transformers in bf16 on this
#                          GPU, sampling determinism and teacher forcing, reward models,
#                          embedders), the GPU's bf16 goldens, the demo runs' logs, ldd
# The parts run one after the other and each reports; a failing part does not stop the rest.
#
# To rehearse it on a CPU machine (every step but CUDA's): a bundle of CPU builds, and
#   RBON_CHECK_DEVICE=cpu RBON_KERNELS=candle PYTHON=<python with torch> \
#   RBON_CHECK_BENCH_ARGS="--small --device cpu" bash scripts/gpu-check.sh OUT BUNDLE
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: $0 OUT [BUNDLE]}
bundle=${2:-.gpu/bundle}
mkdir -p "$out"
out=$(cd "$out" && pwd)
logs="$out/logs"
mkdir -p "$logs"
dev=${RBON_CHECK_DEVICE:-cuda:0}
case "$dev" in cuda*) torch_dev=cuda ;; *) torch_dev=cpu ;; esac
py=${PYTHON:-python3}
summary="$out/summary.txt"
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }
started=$(date +%s)
elapsed() { echo "$(( $(date +%s) - started ))s"; }

if [ ! -d "$bundle" ] && [ -f "$bundle.tar.xz" ]; then
  "$py" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$bundle.tar.xz" "$(dirname "$bundle")"
fi
bundle=$(cd "$bundle" && pwd)
chmod +x "$bundle"/* 2>/dev/null

# The CUDA 13 libraries of the machine's Python (torch cu130's nvidia-* packages); libcuda.so.1
# is the driver's.
libs=$("$py" - <<'EOF'
import glob, importlib.util, os
spec = importlib.util.find_spec("nvidia")
dirs = set()
for root in (spec.submodule_search_locations if spec else []):
    dirs.update(glob.glob(os.path.join(root, "*", "lib")))
print(":".join(sorted(dirs)))
EOF
)
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
say "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 1)"
ldd "$bundle/rbon" > "$logs/ldd.txt" 2>&1
if grep -q "not found" "$logs/ldd.txt"; then
  say "ldd: missing libraries: $(grep 'not found' "$logs/ldd.txt" | tr -s ' \t' ' ' | tr '\n' ';')"
fi

# 1. The model suites on cuda:0 (f32 tolerances there: 1e-3 per token, 1e-3 relative for
# rewards): decoders against transformers, sampling and teacher forcing, reward models, embedders.
export RBON_DATA="$PWD/data"
for suite in models_parity sampling score_parity; do
  RBON_TEST_DEVICE=$dev timeout 240 "$bundle/device-tests" "$suite::" --test-threads 1 --nocapture \
    > "$logs/parity-$suite.log" 2>&1
  rc=$?
  say "$suite on $dev: rc $rc; $(grep -E '^test result' "$logs/parity-$suite.log" | tail -n 1) [$(elapsed)]"
  grep -E '^test .* FAILED|panicked at' -A 2 "$logs/parity-$suite.log" | head -n 30 | tee -a "$summary"
  grep -oE 'bf16 tiny-.*' "$logs/parity-$suite.log" | tee -a "$summary"
done

# bf16 against transformers in bf16 on this GPU (the committed bf16 goldens are the CPU's).
gdata=/tmp/rbon-gpu-golden
rm -rf "$gdata" && mkdir -p "$gdata/golden"
cp data/golden/*.json "$gdata/golden/"
ln -s "$PWD/data/models" "$gdata/models"
if timeout 120 "$py" scripts/make-bf16-golden.py --device "$torch_dev" --out "$gdata/golden" > "$logs/bf16-golden.log" 2>&1; then
  cp "$gdata"/golden/*-bf16.json "$logs/" 2>/dev/null
  RBON_DATA="$gdata" RBON_TEST_DEVICE=$dev timeout 120 "$bundle/device-tests" models_parity::bf16 --nocapture \
    > "$logs/parity-bf16-gpu.log" 2>&1
  say "bf16 on $dev against transformers bf16 on this machine ($torch_dev): rc $?"
  grep -oE 'bf16 tiny-.*' "$logs/parity-bf16-gpu.log" | tee -a "$summary"
else
  say "bf16 goldens on the GPU failed: $(tail -n 3 "$logs/bf16-golden.log")"
fi

# 2. The demo on cpu and on cuda:0, f32: the same pipeline, compared stage by stage.
work=/tmp/rbon-gpu-demo
rm -rf "$work" && mkdir -p "$work"
sed "s#output: runs/demo#output: $work/cpu#" pipelines/demo.yaml > "$work/cpu.yaml"
{ sed "s#output: runs/demo#output: $work/gpu#" pipelines/demo.yaml; printf 'runtime:\n  devices: [%s]\n' "$dev"; } > "$work/gpu.yaml"
for d in cpu gpu; do
  t0=$(date +%s.%N)
  timeout 240 "$bundle/rbon" run "$work/$d.yaml" > "$logs/demo-$d.log" 2>&1
  rc=$?
  say "demo on $d: rc $rc in $("$py" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}s')" "$t0" "$(date +%s.%N)")"
  grep -E 'prompts [0-9]+, samples|time per stage|pairs written' "$logs/demo-$d.log" | tee -a "$summary"
done
"$py" scripts/compare-runs.py "$work/cpu" "$work/gpu" > "$out/demo-compare.txt" 2>&1
tee -a "$summary" < "$out/demo-compare.txt"
say "[$(elapsed)]"

# 3. Throughput beside transformers and the roofline.
# shellcheck disable=SC2086
timeout 330 "$py" scripts/gpu-bench.py --rbon "$bundle/rbon" --out "$out" ${RBON_CHECK_BENCH_ARGS:-} 2>&1 | grep -v Warning | tee -a "$summary"
tar -C "$out" -czf "$out/logs.tar.gz" logs && rm -rf "$logs"
say "done in $(elapsed)"
