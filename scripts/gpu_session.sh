#!/usr/bin/env bash
# One short session on a lent GPU machine (a bare copy of the working tree, no network): build the
# CUDA kernels, VERIFY them first (every family's GPU tests, each family recorded as verified only
# when its tests pass), then measure with the time that is left. Every step has a time box and a
# failure never stops the later steps; a summary is printed last.
#
#   bash scripts/gpu_session.sh                # OUT defaults to out/gpu_session
#   QUANTLAB_COMMIT=$(git rev-parse --short HEAD) bash scripts/gpu_session.sh   # the tree has no .git there
#
# A lent GPU comes with 15 minutes in all (machine start included) and one command may run 10, so
# the verification part (setup, build, the four families' tests) is boxed to ~8 minutes even if
# every step runs to its limit, and comes first: T_SETUP 45, T_BUILD 200, T_VERIFY 120 (the
# groupwise_int tests, the mma kernel's ~600 cases among them) and T_VERIFY_FAMILY 45 for each of
# ternary, BitStack and PVQ. The measurements follow: T_BENCH 120 (kernel suite), T_DECODE 60,
# T_STREAM 120 (8B-shaped GPTQ streamed block by block), T_BENCH_FAMILY 45 each (ternary, BitStack
# quick suites). A normal run takes ~7-10 minutes.
#
# Verification: a family whose GPU tests all pass (pytest exit 0, at least one test passed) gets an
# entry in $OUT/verified_kernels.json (scripts/record_verified_kernels.py record: GPU, compute
# capability, date, commit, the digest of the CUDA sources built). Back home,
#   python scripts/record_verified_kernels.py merge <files_at>/verified_kernels.json
# adds it to quantlab/ops/verified_kernels.json, which makes those kernels the CUDA default
# (quantlab/ops/kernel_policy.py). Tests and benchmarks here run the compiled kernels whether
# verified or not (QUANTLAB_CUDA_KERNELS=1).
#
# Why not scripts/setup_env.sh: it installs torch and the requirements from a package index, and
# the GPU machine reaches none (nor can a 2.14.1 CUDA torch wheel travel: the tree that goes there
# is capped at 64 MiB). This script uses the image's own python3 (its CUDA torch, transformers,
# pytest, pytest-benchmark, matplotlib), adds quantlab to it without dependencies, and builds
# the kernel families for the machine's own architecture (TORCH_CUDA_ARCH_LIST from the device,
# 9.0a on Hopper) with ninja.
#
# Files under $OUT (at most 8 come back from a lent machine): session.log (every step's output),
# env.txt (nvidia-smi, versions, commit, step results), verified_kernels.json, raw.tar.gz
# (junit_*.xml, bench_*.json), benchmarks-generated.md and speedup_vs_batch.png.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-out/gpu_session}
mkdir -p "$OUT"
LOG="$OUT/session.log"
ENV_TXT="$OUT/env.txt"
: >"$LOG"
: >"$ENV_TXT"
PYTHON=${PYTHON:-python3}
T_SETUP=${T_SETUP:-45}
T_BUILD=${T_BUILD:-200}
T_VERIFY=${T_VERIFY:-120}
T_VERIFY_FAMILY=${T_VERIFY_FAMILY:-45}
T_BENCH=${T_BENCH:-120}
T_DECODE=${T_DECODE:-60}
T_STREAM=${T_STREAM:-120}
T_BENCH_FAMILY=${T_BENCH_FAMILY:-45}
export PYTHONUNBUFFERED=1
# Tests and benchmarks measure the compiled kernels, verified or not.
export QUANTLAB_CUDA_KERNELS=1
export QUANTLAB_COMMIT=${QUANTLAB_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
session_start=$(date +%s)
declare -a SUMMARY=()

# step NAME SECONDS COMMAND...: run with a time limit, log it, record "NAME: ok|FAILED (rc)|TIMEOUT".
step() {
  local name=$1 limit=$2
  shift 2
  local start rc
  start=$(date +%s)
  echo "=== [$name] (limit ${limit}s): $*" | tee -a "$LOG"
  # SIGINT first: pytest stops like on Ctrl-C and still writes its JUnit file and summary.
  timeout --signal=INT --kill-after=20 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  local took=$(( $(date +%s) - start ))
  local result="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] || [ "$rc" -eq 130 ]; then
    result="TIMEOUT after ${took}s"
  elif [ "$rc" -ne 0 ]; then
    result="FAILED (rc $rc) after ${took}s"
  else
    result="ok in ${took}s"
  fi
  echo "=== [$name] $result" | tee -a "$LOG"
  SUMMARY+=("$name: $result")
  return "$rc"
}

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "commit: $QUANTLAB_COMMIT"
  echo "host: $(uname -a)"
  nvidia-smi 2>&1 || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,ecc.mode.current --format=csv 2>&1 || true
  nvcc --version 2>&1 | tail -2 || echo "no nvcc"
  "$PYTHON" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
} >>"$ENV_TXT"

# Steps that are shell functions run as `bash -c NAME` (timeout runs programs, not functions).
# The image's python3 is itself a venv (/opt/torch/.venv): a venv made over it would not see its
# torch, so quantlab is installed into it directly (editable, no dependencies, no index); if that
# fails, a .pth file puts the checkout on its path (and quantlab.calib, which the installed
# package maps from calib/, on quantlab's). QUANTLAB_GPU_SKIP_INSTALL=1 skips both (dry runs).
setup() {
  if [ "${QUANTLAB_GPU_SKIP_INSTALL:-0}" != 1 ]; then
    if ! QUANTLAB_BUILD_EXT=0 "$PYTHON" -m pip install -q --no-index --no-deps \
        --no-build-isolation -e .; then
      echo "editable install failed; adding a .pth file for the checkout instead"
      local site
      site=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") || return 1
      printf '%s\nimport quantlab; quantlab.__path__.append("%s")\n' "$PWD" "$PWD" \
        >"$site/quantlab-checkout.pth" || return 1
    fi
  fi
  "$PYTHON" -c "import torch, quantlab.ops, quantlab.nn, quantlab.calib; assert torch.cuda.is_available(), 'no CUDA device'"
}
export -f setup
export PYTHON
step setup "$T_SETUP" bash -c setup

ARCH=$("$PYTHON" -c "import torch; major, minor = torch.cuda.get_device_capability(); print(f'{major}.{minor}' + ('a' if major == 9 else ''))" 2>>"$LOG" || echo "9.0a")
echo "arch: $ARCH" >>"$ENV_TXT"
build() {
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" QUANTLAB_BUILD_ONLY=${QUANTLAB_GPU_FAMILIES} \
    MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PYTHON" setup.py build_ext --inplace || return 1
  "$PYTHON" - <<'PY'
import os
from quantlab.ops import bitstack, groupwise_int, pvq, ternary
from quantlab.ops._extension import extension_error
modules = {"groupwise_int": groupwise_int, "ternary": ternary, "bitstack": bitstack, "pvq": pvq}
for family in os.environ["QUANTLAB_GPU_FAMILIES"].split(","):
    built = modules[family].compiled("cuda")
    print(f"{family}: CUDA kernels {'built' if built else 'MISSING'} ({extension_error(family)})")
    assert built, family
assert groupwise_int.has_mma_kernel(), "the build has no mma kernel"
PY
}
export -f build
export ARCH
# Every family by default; QUANTLAB_GPU_FAMILIES=groupwise_int builds the one issue #5 needs.
export QUANTLAB_GPU_FAMILIES=${QUANTLAB_GPU_FAMILIES:-groupwise_int,ternary,bitstack,pvq}
step build "$T_BUILD" bash -c build

# ---- Verification first: each family's GPU tests; a family is recorded only if they pass. ----
declare -A VERIFY_TESTS=(
  [groupwise_int]="tests/ops/test_groupwise_int_mma_cuda.py tests/ops/test_groupwise_int_gemm_cuda.py tests/ops/test_groupwise_int_grouped_cuda.py tests/ops/test_groupwise_int_ops.py tests/ops/test_kernel_policy.py"
  [ternary]="tests/ops/test_ternary_ops_cuda.py"
  [bitstack]="tests/ops/test_bitstack_ops.py"
  [pvq]="tests/ops/test_pvq_ops.py"
)
for family in groupwise_int ternary bitstack pvq; do
  case ",$QUANTLAB_GPU_FAMILIES," in *",$family,"*) ;; *) continue ;; esac
  limit=$T_VERIFY_FAMILY
  [ "$family" = groupwise_int ] && limit=$T_VERIFY
  # shellcheck disable=SC2086  # the list is space-separated file names
  if step "verify-$family" "$limit" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider \
      --junitxml="$OUT/junit_verify_$family.xml" ${VERIFY_TESTS[$family]}; then
    "$PYTHON" scripts/record_verified_kernels.py record --family "$family" \
      --junit "$OUT/junit_verify_$family.xml" --out "$OUT/verified_kernels.json" 2>&1 \
      | tee -a "$LOG"
  fi
done
echo "=== verification done after $(( $(date +%s) - session_start )) s" | tee -a "$LOG"

# ---- Measurements with the time left. ----
step bench-kernels "$T_BENCH" env QUANTLAB_BENCH_QUICK=1 "$PYTHON" -m pytest -q --benchmark-only \
  -p no:cacheprovider --benchmark-json="$OUT/bench_kernels.json" \
  bench/kernels/test_gpu_groupwise_int.py
step bench-decode "$T_DECODE" env QUANTLAB_DECODE_MODEL=random-llama3-8b QUANTLAB_DECODE_LAYERS=8 \
  "$PYTHON" -m pytest -q --benchmark-only -p no:cacheprovider \
  --benchmark-json="$OUT/bench_decode.json" bench/e2e/test_decode_tokens_per_s.py
# Issue #22: an 8B-shaped model streamed block by block through GPTQ on the GPU (the synthetic
# checkpoint is written here, under /tmp, not in $OUT; random calibration ids, since the machine
# has neither the calibration text's package nor the bundled tokenizer): peak GPU memory should be
# about one block plus its solver and forward, whatever the number of blocks. Issue #23: the JSON
# it prints (block seconds, per-linear solve seconds: one rank's breakdown) gives the N-GPU time,
# back home: python bench/distributed/ranks_vs_threads.py --predict-from RUN.json --link-gbps 3600
step stream-gptq-8b "$T_STREAM" "$PYTHON" bench/memory/stream_quantize.py --preset llama3-8b \
  --blocks 4 --method gptq --dtype bfloat16 --device cuda --calib-samples 32 --calib-seq-len 512 \
  --random-calib --work /tmp/quantlab-stream --markdown
for family in ternary bitstack; do
  [ -f "bench/kernels/test_gpu_${family}.py" ] || continue
  case ",$QUANTLAB_GPU_FAMILIES," in *",$family,"*) ;; *) continue ;; esac
  step "bench-$family" "$T_BENCH_FAMILY" env QUANTLAB_BENCH_QUICK=1 "$PYTHON" -m pytest -q \
    --benchmark-only -p no:cacheprovider --benchmark-json="$OUT/bench_$family.json" \
    "bench/kernels/test_gpu_${family}.py"
done

jsons=()
for f in "$OUT"/bench_*.json; do [ -s "$f" ] && jsons+=("$f"); done
if [ "${#jsons[@]}" -gt 0 ]; then
  step report 60 "$PYTHON" scripts/bench_report.py "${jsons[@]}" --out "$OUT/benchmarks-generated.md" \
    --plot "$OUT/speedup_vs_batch.png"
else
  SUMMARY+=("report: skipped (no benchmark JSON)")
fi

summarize() {
  echo "== quantlab GPU session: commit $QUANTLAB_COMMIT, $(( $(date +%s) - session_start )) s =="
  for line in "${SUMMARY[@]}"; do echo "  $line"; done
  if [ -s "$OUT/verified_kernels.json" ]; then
    echo "  verified: $("$PYTHON" -c "import json,sys; print(', '.join(json.load(open(sys.argv[1]))['families']))" "$OUT/verified_kernels.json")"
  else
    echo "  verified: none"
  fi
  for x in "$OUT"/junit_*.xml; do
    [ -s "$x" ] || continue
    "$PYTHON" - "$x" <<'PY' 2>/dev/null || true
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
t = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print(f"  {sys.argv[1].rsplit('/', 1)[-1]}: {t['tests']} tests, {t['failures']} failures, "
      f"{t['errors']} errors, {t['skipped']} skipped")
for s in suites:
    for case in s.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            print(f"    FAIL {case.get('name')}: {(bad.get('message') or '')[:160]}")
PY
  done
  if [ -s "$OUT/bench_kernels.json" ]; then
    "$PYTHON" - "$OUT/bench_kernels.json" <<'PY' 2>/dev/null || true
import json, sys
data = json.load(open(sys.argv[1]))
rows = [b["extra_info"] for b in data["benchmarks"]]
bw = [r["TB/s"] for r in rows if r.get("suite") == "gpu_bandwidth"]
print(f"  copy bandwidth: {bw[0]:.2f} TB/s" if bw else "  copy bandwidth: not measured")
q = [r for r in rows if r.get("variant") == "quantlab"]
for r in sorted(q, key=lambda r: (r["case"], r["dtype"], r["m"])):
    sc, si = r.get("speedup_vs_cublas"), r.get("speedup_vs_int4pack")
    print(f"  {r['case']} {r['dtype']} M={r['m']}: {r['time_s'] * 1e6:.1f} us, "
          f"{r['weight TB/s']:.2f} TB/s, vs cuBLAS {sc and f'{sc:.2f}x'}, "
          f"vs int4pack {si and f'{si:.2f}x'} [{r.get('path')}]")
PY
  fi
  grep -h "^| llama3-8b x 4 blocks | gptq" "$LOG" | sed 's/^/  streamed /' || true
  if [ -s "$OUT/bench_decode.json" ]; then
    "$PYTHON" - "$OUT/bench_decode.json" <<'PY' 2>/dev/null || true
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    r = b["extra_info"]
    print(f"  decode {r['model']} batch {r['batch']} {r['variant']}: {r['tokens/s']:.0f} tok/s"
          + (f" [{r.get('kernel_path')}]" if r.get("kernel_path") else ""))
PY
  fi
}
summarize | tee -a "$LOG" | tee -a "$ENV_TXT"

# At most 8 files come back from a lent machine: the JUnit and benchmark JSON files travel as one
# archive (raw.tar.gz), beside session.log, env.txt, the generated tables and the plot.
raw=( "$OUT"/junit_*.xml "$OUT"/bench_*.json )
existing=()
for f in "${raw[@]}"; do [ -f "$f" ] && existing+=("$(basename "$f")"); done
if [ "${#existing[@]}" -gt 0 ]; then
  tar -C "$OUT" -czf "$OUT/raw.tar.gz" "${existing[@]}" && (cd "$OUT" && rm -f "${existing[@]}")
fi
