#!/usr/bin/env bash
# Builds the CUDA binary of rbon (`--features cuda`) on a machine without a GPU or driver, with
# the CUDA 13.0 toolkit from PyPI's `nvidia-*` wheels:
#
#   bash scripts/build-cuda.sh            # → $RBON_CUDA_CACHE/target/release/rbon
#   bash scripts/build-cuda.sh --check    # type-checks the workspace with the feature (no link)
#   bash scripts/build-cuda.sh --bundle DIR   # the binary and the model suites' test binary,
#                                             # stripped, for scripts/gpu-check.sh
#
# What it does, and why (see README, "GPU build"):
# - a virtual environment with the toolkit pinned to 13.0.x: the unpinned nvcc is newer than
#   the CUDA versions candle 0.11's cudarc 0.19 knows;
# - CUDA_COMPUTE_CAP (default 90, Hopper: H100/H200) since there is no `nvidia-smi` to ask;
# - a folder of link-time libraries: unversioned links to the wheels' libcublas, libcublasLt,
#   libcurand, libnvrtc and libcudart, and a stub libcuda.so (every driver entry point of
#   cuda.h as an empty function, SONAME libcuda.so.1) for the linker only. The binary loads the
#   real libcuda.so.1 of the driver at start; the stub is never shipped or put on a loader path.
# The build has its own target directory: RUSTFLAGS differ from a CPU build's, which would
# otherwise rebuild everything each time one follows the other.
#
# On a machine with a CUDA toolkit installed (nvcc on PATH, libraries in the usual places),
# `cargo build --release --features cuda` is enough; set CUDA_COMPUTE_CAP when the build
# machine has no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=build
case "${1:-}" in
  --check) mode=check ;;
  --bundle)
    mode=bundle
    bundle=${2:?usage: $0 --bundle DIR}
    ;;
  "") ;;
  *) echo "usage: $0 [--check | --bundle DIR]" >&2; exit 2 ;;
esac

cache=${RBON_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rbon-cuda}
venv=$cache/venv
export CARGO_TARGET_DIR=${RBON_CUDA_TARGET:-$cache/target}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

# The compiler and headers are all a type check needs; linking needs the libraries too.
wheels=('nvidia-cuda-nvcc==13.0.*' 'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-crt==13.0.*'
        'nvidia-cuda-cccl==13.0.*' 'nvidia-nvvm==13.0.*')
if [ "$mode" != check ]; then
  wheels+=('nvidia-cublas==13.0.*' 'nvidia-curand==10.*' 'nvidia-cuda-nvrtc==13.0.*')
fi
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check "${wheels[@]}"

toolkit=$(echo "$venv"/lib/python3.*/site-packages/nvidia/cu13)
if [ ! -x "$toolkit/bin/nvcc" ]; then
  echo "build-cuda: no nvcc under $toolkit" >&2
  exit 1
fi
export PATH="$toolkit/bin:$PATH" CUDA_ROOT="$toolkit" CUDA_PATH="$toolkit" CUDA_HOME="$toolkit"
nvcc --version | tail -n 2

if [ "$mode" = check ]; then
  cargo check --workspace --all-targets --features rbon/cuda
  exit 0
fi

link="$cache/link"
mkdir -p "$link"
for lib in cublas cublasLt curand nvrtc cudart; do
  file=$(ls "$toolkit"/lib/lib$lib.so.* 2>/dev/null | sort | head -n 1)
  if [ -z "$file" ]; then
    echo "build-cuda: lib$lib.so.* is not in $toolkit/lib" >&2
    exit 1
  fi
  ln -sf "$file" "$link/lib$lib.so"
done
if [ ! -f "$link/libcuda.so" ] || [ "$toolkit/include/cuda.h" -nt "$link/libcuda.so" ]; then
  gcc -E -P -I"$toolkit/include" "$toolkit/include/cuda.h" \
    | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | sed 's/[[:space:]]*($//' | sort -u \
    | awk '{print "void " $1 "(void) {}"}' > "$link/libcuda-stub.c"
  gcc -shared -fPIC -o "$link/libcuda.so" -Wl,-soname,libcuda.so.1 "$link/libcuda-stub.c"
fi
export RUSTFLAGS="${RUSTFLAGS:-} -L $link"

cargo build --release --features cuda -p rbon
bin="$CARGO_TARGET_DIR/release/rbon"
if [ "$mode" = bundle ]; then
  # The binary and the model suites in one test binary (crates/sample/tests/device.rs), stripped:
  # what scripts/gpu-check.sh runs on a machine without a Rust toolchain.
  mkdir -p "$bundle"
  cargo test --release --no-run -p rbon-sample --features rbon-sample/cuda,rbon-score/cuda --test device \
      --message-format=json \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "device":
        print(m["executable"])
' | while read -r exe; do strip -o "$bundle/device-tests" "$exe"; done
  strip -o "$bundle/rbon" "$bin"
  # Compressed too, for machines it must be copied to (scripts/gpu-check.sh unpacks it).
  tar -C "$(dirname "$bundle")" -cf - "$(basename "$bundle")" | xz -T0 -6 > "$bundle.tar.xz"
  ls -la "$bundle" "$bundle.tar.xz"
  exit 0
fi
echo "built $bin"
echo "it needs at run time: libcuda.so.1 (the NVIDIA driver) and, on LD_LIBRARY_PATH, the CUDA 13"
echo "libraries (libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libcudart.so.13, libnvrtc.so.13):"
readelf -d "$bin" | grep NEEDED || true
