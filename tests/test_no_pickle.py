"""Nothing is ever unpickled: no reader in the package can call pickle, and a model directory that
only has a pickled ``pytorch_model.bin`` is refused instead of loaded."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import quantlab

_PACKAGE = Path(quantlab.__file__).parent
# Calls that unpickle (torch.load with any weights_only, pickle/dill/joblib, numpy with pickles).
_UNPICKLERS = re.compile(
    r"\btorch\.load\(|\bpickle\.|\bimport pickle\b|\bdill\b|\bjoblib\b|allow_pickle\s*=\s*True"
)


def test_the_package_has_no_unpickling_call() -> None:
    sources = sorted(_PACKAGE.rglob("*.py"))
    assert len(sources) > 50  # the package itself (quantlab/ and the installed calib/)
    offenders = [
        f"{path.relative_to(_PACKAGE)}:{n}: {line.strip()}"
        for path in sources
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if _UNPICKLERS.search(line)
    ]
    assert not offenders, offenders


def test_a_pickled_model_is_refused(
    tiny_llama: nn.Module, tmp_path: Path, default_tokenizer: Any
) -> None:
    from quantlab.export.model_source import load_model

    # A model directory as older tools wrote it: config.json and a pickled state dict.
    tiny_llama.config.save_pretrained(tmp_path)
    default_tokenizer.save_pretrained(tmp_path)
    torch.save(tiny_llama.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="no file named model.safetensors"):
        load_model(str(tmp_path))
