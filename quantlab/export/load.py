"""Loading any quantized checkpoint directory: the one dispatch over the layouts quantlab reads.

:func:`quantlab.load`, the CLI (through :func:`quantlab.models.loading.load_model`) and user code
all come here. The layout is read from config.json's ``quantization_config.quant_method``
(:func:`checkpoint_kind`); BitStack checkpoints, which load to a memory budget, are recognised by
their format first. Each layout's loader is strict (docs/reliability.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from quantlab.export.awq_checkpoint import load_awq
from quantlab.export.bitnet_checkpoint import load_bitnet
from quantlab.export.bitstack_checkpoint import is_bitstack_checkpoint, load_bitstack
from quantlab.export.errors import CheckpointError
from quantlab.export.gptq_checkpoint import load_gptq
from quantlab.export.quantlab_checkpoint import load_quantized
from quantlab.export.schema import read_config_json

__all__ = ["LOADABLE_KINDS", "checkpoint_kind", "load_checkpoint"]

# quant_method values of the layouts :func:`load_checkpoint` reads.
LOADABLE_KINDS = ("quantlab", "gptq", "awq", "bitnet")


def checkpoint_kind(path: str | os.PathLike[str]) -> str | None:
    """The quant_method ("quantlab", "gptq", "awq", ...) of a quantized directory, else None.

    Raises:
        CheckpointError: config.json is not valid JSON, or its quantization_config is not an
            object with a string quant_method (naming the file).
    """
    root = Path(path)
    if not (root / "config.json").is_file():
        return None
    cfg_path, config = read_config_json(root)
    qcfg = config.get("quantization_config")
    if qcfg is None:
        return None
    if not isinstance(qcfg, dict) or not isinstance(qcfg.get("quant_method"), str):
        raise CheckpointError(
            f"{cfg_path}: quantization_config must be an object with a string quant_method"
        )
    return qcfg["quant_method"]


def load_checkpoint(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    memory_budget: str | int | float | None = None,
    verify: bool = True,
) -> Any:
    """Load a quantized checkpoint directory in any layout quantlab reads (see
    :func:`quantlab.load`, which documents the arguments)."""
    dtype = dtype or torch.float32
    if is_bitstack_checkpoint(path):
        return load_bitstack(path, memory_budget, device=device, dtype=dtype, verify=verify)
    if memory_budget is not None:
        raise ValueError(f"memory_budget applies to BitStack checkpoints only; {path} is not one")

    kind = checkpoint_kind(str(path))
    if kind == "gptq":
        return load_gptq(path, device=device, dtype=dtype, verify=verify)
    if kind == "awq":
        return load_awq(path, device=device, dtype=dtype, verify=verify)
    if kind == "bitnet":
        return load_bitnet(path, device=device, dtype=dtype)
    return load_quantized(path, device=device, dtype=dtype, verify=verify)
