#!/usr/bin/env bash
# Environments of the peer tools quantlab's interop checks run in, kept apart from quantlab's own
# (they pin other transformers releases).
#
#   bash scripts/setup_interop_env.sh compressed-tensors [DIR]
#       torch 2.13.0 (CPU) + llmcompressor 0.14.0.1, which pins compressed-tensors 0.19.0 and
#       transformers 5.17.0 (docs/formats.md); default DIR .venv-compressed-tensors.
#       Used by scripts/check_compressed_tensors_interop.py.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-}
case "$what" in
  compressed-tensors)
    dir=${2:-.venv-compressed-tensors}
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q torch==2.13.0
    "$dir/bin/pip" install -q llmcompressor==0.14.0.1
    "$dir/bin/python" -c "import compressed_tensors, transformers, llmcompressor; print('compressed-tensors', compressed_tensors.__version__, '| transformers', transformers.__version__, '| llmcompressor', llmcompressor.__version__)"
    ;;
  *)
    echo "usage: bash scripts/setup_interop_env.sh compressed-tensors [DIR]" >&2
    exit 2
    ;;
esac
