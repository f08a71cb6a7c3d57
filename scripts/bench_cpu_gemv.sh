#!/usr/bin/env bash
# CPU groupwise-int kernel timings of docs/benchmarks.md (the 2026-12-02 sections), printed as the
# doc's markdown tables. The torch-free harness bench/harness/gemv_cpu_timing.cpp is built with the
# extension's flags against the kernel of the working tree (csrc/groupwise_int/cpu_kernels.cpp) or
# of --after REV, and with --before REV against that revision's kernel too (each revision's
# cpu_kernels.cpp, cpu_kernels.h and common/bitstream.h).
#
#   bash scripts/bench_cpu_gemv.sh --before 8ef9d8d --after ac05ede            # GEMV, microseconds
#   bash scripts/bench_cpu_gemv.sh --before 8ef9d8d --after ac05ede --dequant  # fp32 weight, ms
#   bash scripts/bench_cpu_gemv.sh --chunked --after bd4ef2d                   # batches 12-64, ms
#   bash scripts/bench_cpu_gemv.sh --isa --after fcdc5ed                       # AVX2 vs AVX-512, ms
#
# GEMV and --dequant: 4 weight copies rotated, 30 calls per case, before / after alternated per
# case for 3 rounds; best call of each. --chunked: one weight copy, 5 calls, one round; the kernel
# on this CPU's widest path and capped with QUANTLAB_CPU_ISA=avx2, and dequantize + GEMM through
# the torch ops of the built extension (scripts/bench_cpu_dequant_gemm.py). --isa: the same kernel
# on this CPU's widest path and capped at AVX2, 4 alternating rounds, each case's weight rotated
# over enough copies for 220 MB (twice a 105 MB L3). Without --before, only
# the "after" column. Environment: ROUNDS, REPS, COPIES override those counts; CXX (g++), PYTHON
# (python), OMP_NUM_THREADS (the docs' figures: 2 threads on a 2-core machine).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  echo "usage: $0 [--before REV] [--after REV] [--dequant | --chunked | --isa]" >&2
  exit 2
}
before="" after="" mode=gemv
while [ "$#" -gt 0 ]; do
  case "$1" in
    --before) before=${2:?--before needs a revision}; shift 2 ;;
    --after) after=${2:?--after needs a revision}; shift 2 ;;
    --dequant | --chunked | --isa) mode=${1#--}; shift ;;
    *) usage ;;
  esac
done
if { [ "$mode" = chunked ] || [ "$mode" = isa ]; } && [ -n "$before" ]; then usage; fi
for rev in "$before" "$after"; do
  if [ -n "$rev" ]; then git rev-parse --quiet --verify "$rev^{commit}" >/dev/null || usage; fi
done

# Cases: N K GROUP BITS M (the harness's arguments).
case "$mode" in
  gemv)
    cases=("4096 4096 64 4 1" "4096 4096 128 4 1" "4096 14336 64 4 1" "4096 14336 128 4 1"
           "4096 4096 64 4 2" "4096 4096 64 4 4" "4096 4096 64 4 8" "4096 14336 128 4 8"
           "4096 4096 64 2 1" "4096 4096 64 3 1" "4096 4096 64 3 4" "4096 4096 64 3 8"
           "4096 4096 64 8 1" "1536 576 64 4 1")
    rounds=3 reps=30 copies=4 ;;
  dequant)
    cases=("4096 4096 64 3 --dequant" "4096 4096 64 4 --dequant")
    rounds=3 reps=30 copies=4 ;;
  chunked)
    cases=("4096 14336 128 4 16" "4096 14336 128 4 32" "4096 14336 128 4 48" "4096 4096 64 4 16"
           "4096 4096 64 4 32" "4096 4096 64 4 64" "1536 576 64 4 12" "576 1536 64 4 16")
    rounds=1 reps=5 copies=1 ;;
  isa)
    cases=("4096 4096 64 4 1" "4096 4096 64 4 2" "4096 4096 64 4 4" "4096 4096 64 4 8"
           "4096 14336 128 4 1" "4096 14336 128 4 2" "4096 14336 128 4 4" "4096 14336 128 4 8"
           "4096 14336 64 4 1" "4096 14336 64 4 8")
    rounds=4 reps=10 copies=0 ;;  # copies 0: enough for 220 MB per rotation, per case
esac
ROUNDS=${ROUNDS:-$rounds} REPS=${REPS:-$reps} COPIES=${COPIES:-$copies}
CXX=${CXX:-g++} PYTHON=${PYTHON:-python}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
build() {  # build BINARY SOURCE_ROOT (a directory laid out like csrc/)
  "$CXX" -O3 -std=c++20 -fopenmp -I"$2" bench/harness/gemv_cpu_timing.cpp \
    "$2/groupwise_int/cpu_kernels.cpp" -o "$1"
}
build_rev() {  # build_rev BINARY REV: the kernel of REV
  local f
  for f in groupwise_int/cpu_kernels.cpp groupwise_int/cpu_kernels.h common/bitstream.h; do
    mkdir -p "$1.src/$(dirname "$f")"
    git show "$2:csrc/$f" >"$1.src/$f"
  done
  build "$1" "$1.src"
}
if [ -n "$after" ]; then build_rev "$tmp/after" "$after"; else build "$tmp/after" csrc; fi
variants=(after)
if [ "$mode" = chunked ]; then variants=(after avx2); fi
if [ "$mode" = isa ]; then variants=(avx2 after); fi
if [ -n "$before" ]; then
  build_rev "$tmp/before" "$before"
  variants=(before after)
fi

# Every harness line, prefixed with its case index and variant, goes to $tmp/lines (and stderr).
run() {  # run INDEX VARIANT
  local binary=$tmp/$2 isa=${QUANTLAB_CPU_ISA:-} line copies=$COPIES n k bits
  if [ "$2" = avx2 ]; then binary=$tmp/after isa=avx2; fi
  if [ "$copies" = 0 ]; then  # enough copies of the codes for 220 MB
    read -r n k _ bits _ <<<"${cases[$1]}"
    copies=$(( (220000000 * 8 + n * k * bits - 1) / (n * k * bits) ))
  fi
  # shellcheck disable=SC2086  # a case is the harness's argument list
  line=$(QUANTLAB_CPU_ISA=$isa "$binary" ${cases[$1]} --copies "$copies" --reps "$REPS")
  echo "[$2] $line" >&2
  echo "$1 $2 $line" >>"$tmp/lines"
}
for _ in $(seq "$ROUNDS"); do
  for i in "${!cases[@]}"; do
    for v in "${variants[@]}"; do run "$i" "$v"; done
  done
done
if [ "$mode" = chunked ]; then
  # Same shapes through groupwise_int_dequant + torch.matmul, one output line per case in order.
  mapfile -t specs < <(printf '%s\n' "${cases[@]}" | awk '{print $1 "," $2 "," $3 "," $5}')
  "$PYTHON" scripts/bench_cpu_dequant_gemm.py --reps "$REPS" \
    --threads "${OMP_NUM_THREADS:-$(nproc)}" "${specs[@]}" >"$tmp/dequant_gemm"
  i=0
  while read -r line; do
    echo "[dequant_gemm] $line" >&2
    echo "$i dequant_gemm $line" >>"$tmp/lines"
    i=$((i + 1))
  done <"$tmp/dequant_gemm"
fi

# Best call per case and variant, as the doc's table: microseconds (GEMV), else milliseconds.
columns="${variants[*]}"
if [ "$mode" = chunked ]; then columns+=" dequant_gemm"; fi
awk -v mode="$mode" -v columns="$columns" '
  function val(us) {
    if (mode == "gemv") return sprintf("%.0f", us)
    return sprintf(us >= 1e5 ? "%.0f" : "%#.3g", us / 1e3)  # 3 digits
  }
  {
    delete f
    for (j = 3; j <= NF; j++) { split($j, kv, "="); f[kv[1]] = kv[2] }
    c = $1; v = $2; t = f["best_us"] + 0
    if (!((c, v) in best) || t < best[c, v]) best[c, v] = t
    shape[c] = f["n"] " x " f["k"] ", g" f["group"]; m[c] = f["m"]; bits[c] = f["bits"]
    if (v != "dequant_gemm" && !((v, f["path"]) in seen)) {
      seen[v, f["path"]] = 1; path[v] = path[v] (path[v] == "" ? "" : "/") f["path"]
    }
    if (c + 1 > cases) cases = c + 1
  }
  END {
    n = split(columns, col, " ")
    name["before"] = "before"; name["after"] = "after"; name["dequant_gemm"] = "dequantize + GEMM"
    if (mode == "chunked") {
      name["after"] = "chunked kernel, " path["after"]
      name["avx2"] = "chunked kernel, " path["avx2"]
    }
    if (mode == "isa") { name["avx2"] = "AVX2"; name["after"] = path["after"] }
    head = "| N x K, group |" (mode != "dequant" ? " M |" : "") (mode != "chunked" ? " bits |" : "")
    for (j = 1; j <= n; j++) head = head " " name[col[j]] " |"
    if (col[1] == "before" || mode == "isa") head = head " speedup |"
    rule = head; gsub(/[^|]+/, "---", rule)
    print head; print rule
    for (c = 0; c < cases; c++) {
      row = "| " shape[c] " |" (mode != "dequant" ? " " m[c] " |" : "")
      row = row (mode != "chunked" ? " " bits[c] " |" : "")
      for (j = 1; j <= n; j++) row = row " " val(best[c, col[j]]) " |"
      if (col[1] == "before") row = row sprintf(" %.2fx |", best[c, "before"] / best[c, "after"])
      if (mode == "isa") row = row sprintf(" %.2fx |", best[c, "avx2"] / best[c, "after"])
      print row
    }
  }' "$tmp/lines"
