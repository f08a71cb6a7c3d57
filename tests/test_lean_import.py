from __future__ import annotations

import subprocess
import sys


def test_import_quantlab_loads_neither_transformers_nor_cuda() -> None:
    code = (
        "import sys, quantlab, quantlab.nn, torch\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialized'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
