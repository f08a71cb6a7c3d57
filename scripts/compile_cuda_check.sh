#!/usr/bin/env bash
# Compile-only check of every CUDA source for sm_80, sm_89 and sm_90a. The kernels are torch-free,
# so plain nvcc suffices: no GPU and no CUDA build of torch are needed.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then
  echo "[cuda-check] nvcc not found (set NVCC=...); cannot compile the CUDA sources" >&2
  exit 1
fi
mapfile -t sources < <(find csrc -name '*.cu' | sort)
if [ "${#sources[@]}" -eq 0 ]; then
  echo "[cuda-check] no .cu files"
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
archs=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_89,code=sm_89
       -gencode arch=compute_90a,code=sm_90a)
# torch's CUDAExtension compiles with these; without them here, an implicit float <-> half/bf16
# conversion would pass this check and fail the real build.
torch_defines=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
               -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)
# ptxas at -O0: every source still goes through ptxas for every target (so invalid inline PTX for an
# architecture still fails), at 209 s instead of 373 s on 2 cores; the optimized build is setup.py's.
start=$(date +%s)
pids=()
for src in "${sources[@]}"; do
  obj="$out/$(echo "$src" | tr '/' '_').o"
  "$NVCC" -std=c++17 -O3 -Xptxas -O0 --expt-relaxed-constexpr -Werror all-warnings -Icsrc "${torch_defines[@]}" "${archs[@]}" \
    -c "$src" -o "$obj" &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
if [ "$status" -ne 0 ]; then
  echo "[cuda-check] FAILED" >&2
  exit 1
fi
echo "[cuda-check] compiled ${#sources[@]} CUDA source(s) for sm_80, sm_89, sm_90a in $(( $(date +%s) - start )) s"
