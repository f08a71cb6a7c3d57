#!/usr/bin/env bash
# Register, spill and stack use of every CUDA kernel, as ptxas reports it (-Xptxas -v), for one
# architecture (default sm_90a; ARCH=89 or 80 for the others). The figures in docs/benchmarks.md
# ("registers per thread, spill bytes, stack") come from this script. Compile-only: no GPU needed.
#
#   bash scripts/ptxas_report.sh            # every .cu under csrc/, sm_90a
#   ARCH=80 bash scripts/ptxas_report.sh csrc/groupwise_int/cuda_mma_f16.cu
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
ARCH=${ARCH:-90a}
if [ "$#" -gt 0 ]; then sources=("$@"); else mapfile -t sources < <(find csrc -name '*.cu' | sort); fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
torch_defines=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
               -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)
for src in "${sources[@]}"; do
  "$NVCC" -std=c++17 -O3 --expt-relaxed-constexpr -Icsrc "${torch_defines[@]}" \
    -gencode "arch=compute_${ARCH},code=sm_${ARCH}" -Xptxas -v -c "$src" \
    -o "$out/$(basename "$src").o" 2>"$out/ptxas.log" || { cat "$out/ptxas.log" >&2; exit 1; }
  # "Compiling entry function 'NAME'" is followed by "... N bytes stack frame, N bytes spill
  # stores, N bytes spill loads" and "Used N registers": one line per kernel instance.
  python3 - "$src" "$out/ptxas.log" <<'PY'
import re, subprocess, sys
src, log = sys.argv[1], open(sys.argv[2]).read()
rows = []
for block in re.split(r"ptxas info\s+: Compiling entry function ", log)[1:]:
    name = block.split("'")[1]
    stack = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
    regs = re.search(r"Used (\d+) registers", block)
    demangled = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
    rows.append((demangled or name, int(regs[1]) if regs else -1, *(int(g) for g in stack.groups())))
if not rows:
    print(f"{src}: no kernels (host code)")
    raise SystemExit(0)
regs = [r[1] for r in rows]
spills = sum(r[3] + r[4] for r in rows)
print(f"{src}: {len(rows)} kernels, {min(regs)}-{max(regs)} registers, max stack {max(r[2] for r in rows)} B, spill bytes {spills}")
for name, reg, stack, st, ld in rows:
    print(f"  {reg:4d} regs  {stack:5d} B stack  {st + ld:5d} B spills  {name[:150]}")
PY
done
