# Two commands for a newcomer:  `make demo`  and  `make test`.
VENV ?= .venv
RUN := . $(VENV)/bin/activate &&
OUT ?= out/smollm2-rtn-w4g64

.PHONY: setup demo demo-gptq test test-fast lint bench cuda-check clean

setup:
	bash scripts/setup_env.sh

## Quantize the bundled SmolLM2-135M-Instruct with RTN W4 g64, evaluate it, print the summary table.
demo: setup
	$(RUN) quantlab quantize --model default --method rtn --bits 4 --group-size 64 --out $(OUT)

## Same with GPTQ.
demo-gptq: setup
	$(RUN) quantlab quantize --model default --method gptq --bits 4 --group-size 64 --out out/smollm2-gptq-w4g64

## Lint, then the whole CPU test suite (GPU tests skip without a GPU).
test: setup
	$(RUN) ruff check .
	$(RUN) python -m pytest -q

test-fast: setup
	$(RUN) python -m pytest -q -m "not slow and not model"

lint: setup
	$(RUN) ruff check .

bench: setup
	$(RUN) python -m pytest bench -q --benchmark-only

## Compile every .cu for sm_80, sm_89 and sm_90a (compile only; no GPU needed).
cuda-check:
	bash scripts/compile_cuda_check.sh

clean:
	rm -rf build out .pytest_cache quantlab/_C*.so
