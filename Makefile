# Two commands for a newcomer:  `make demo`  and  `make test`.
VENV ?= .venv
RUN := . $(VENV)/bin/activate &&
OUT ?= out/smollm2-rtn-w4g64

.PHONY: setup demo demo-gptq demo-awq test test-fast lint bench bench-gpu cuda-check clean

setup:
	@bash scripts/setup_env.sh

## Quantize the bundled SmolLM2-135M-Instruct with RTN W4 g64, evaluate it, print the summary table.
demo: setup
	$(RUN) quantlab quantize --model default --method rtn --bits 4 --group-size 64 --out $(OUT) --overwrite

## Same with GPTQ.
demo-gptq: setup
	$(RUN) quantlab quantize --model default --method gptq --bits 4 --group-size 64 --out out/smollm2-gptq-w4g64 --overwrite

## AWQ, exported in the AutoAWQ GEMM layout transformers and vLLM read.
demo-awq: setup
	$(RUN) quantlab quantize --model default --method awq --bits 4 --group-size 64 --format awq --out out/smollm2-awq-w4g64 --overwrite

## Lint and format check, then the whole CPU test suite (GPU tests skip without a GPU).
test: setup
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) python -m pytest -q --durations=15

test-fast: setup
	$(RUN) python -m pytest -q -m "not slow and not model"

lint: setup
	$(RUN) ruff check .
	$(RUN) ruff format --check .

## Benchmarks. The JSON goes under $(BENCH_OUT); then scripts/bench_report.py rebuilds
## $(BENCH_MD) and $(BENCH_PLOT) from every JSON there (where two runs measured the same thing,
## the newer one wins). The report is written even when a benchmark failed; make still fails.
## Extra pytest options: BENCH_ARGS, e.g. BENCH_ARGS="--benchmark-max-time=0.2 -k 4096x4096".
BENCH_OUT ?= out/bench
BENCH_ARGS ?=
BENCH_MD ?= docs/benchmarks-generated.md
BENCH_PLOT ?= docs/img/speedup_vs_batch.png
BENCH_PYTEST := python -m pytest -q --benchmark-only
BENCH_REPORT := python scripts/bench_report.py $(BENCH_OUT)/*.json --out $(BENCH_MD) --plot $(BENCH_PLOT)

## Every suite under bench/: CPU kernels, decode, quantize time; the GPU kernel suite skips
## without a GPU.
bench: setup
	mkdir -p $(BENCH_OUT)
	$(RUN) $(BENCH_PYTEST) bench --benchmark-json=$(BENCH_OUT)/bench.json $(BENCH_ARGS); \
	status=$$?; $(RUN) $(BENCH_REPORT) && exit $$status

## GPU kernel suite (quantlab vs cuBLAS vs _weight_int4pack_mm) and decode tokens/s on the GPU.
## QUANTLAB_BENCH_QUICK=1 trims the kernel suite to 3 shapes x 5 batch sizes. It measures the
## compiled kernels whether or not a GPU run has verified them (QUANTLAB_CUDA_KERNELS=1).
bench-gpu: export QUANTLAB_CUDA_KERNELS = 1
bench-gpu: setup
	$(RUN) python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'bench-gpu: no CUDA device')"
	mkdir -p $(BENCH_OUT)
	$(RUN) $(BENCH_PYTEST) bench/kernels/test_gpu_groupwise_int.py bench/e2e/test_decode_tokens_per_s.py \
	  --benchmark-json=$(BENCH_OUT)/gpu.json $(BENCH_ARGS); \
	status=$$?; $(RUN) $(BENCH_REPORT) && exit $$status

## Compile every .cu for sm_80, sm_89 and sm_90a (compile only; no GPU needed).
cuda-check:
	bash scripts/compile_cuda_check.sh

clean:
	rm -rf build out .pytest_cache quantlab/_C_*.so quantlab/_kernel_build.json
