"""Loading any quantized checkpoint directory: the one dispatch over the layouts quantlab reads.

:func:`quantlab.load`, the CLI (through :func:`quantlab.export.model_source.load_model`), the
transformers integration (:func:`prepare_model_for_weights` and
:func:`finish_model_after_weights`, around transformers' own weight loading) and user code all
come here. The layout is read from config.json's ``quantization_config.quant_method``
(:func:`checkpoint_kind`); BitStack checkpoints, which load to a memory budget, are recognised by
their format first. Each layout's loader is strict (docs/reliability.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.export.awq_checkpoint import awq_reading, load_awq
from quantlab.export.bitnet_checkpoint import load_bitnet
from quantlab.export.bitstack_checkpoint import is_bitstack_checkpoint, load_bitstack
from quantlab.export.checksums import verify_checksums
from quantlab.export.compressed_tensors_checkpoint import (
    compressed_tensors_reading,
    load_compressed_tensors,
)
from quantlab.export.errors import CheckpointError
from quantlab.export.foreign_layout import open_groupwise_lazily
from quantlab.export.gptq_checkpoint import gptq_reading, load_gptq
from quantlab.export.lazy_model import LazyModel
from quantlab.export.model_fill import finish_loaded_layers
from quantlab.export.quantlab_checkpoint import load_quantized, open_lazily
from quantlab.export.safetensors_file import TensorInfo, read_header
from quantlab.export.schema import read_config_json
from quantlab.export.state_check import check_state_matches_model
from quantlab.formats.compressed_tensors_layout import CT_QUANT_METHOD
from quantlab.models.arch import linearize
from quantlab.nn.swap import swap_in_empty

__all__ = [
    "LOADABLE_KINDS",
    "checkpoint_kind",
    "finish_model_after_weights",
    "load_checkpoint",
    "open_checkpoint_lazily",
    "prepare_model_for_weights",
]

# quant_method values of the layouts :func:`load_checkpoint` reads.
LOADABLE_KINDS = ("quantlab", "gptq", "awq", CT_QUANT_METHOD, "bitnet")


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
    if kind == CT_QUANT_METHOD:
        return load_compressed_tensors(path, device=device, dtype=dtype, verify=verify)
    if kind == "bitnet":
        return load_bitnet(path, device=device, dtype=dtype)
    return load_quantized(path, device=device, dtype=dtype, verify=verify)


def open_checkpoint_lazily(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
) -> LazyModel | None:
    """A quantized checkpoint as a :class:`LazyModel` (each block read, converted and checked
    only when it is loaded), for the layouts that stream: quantlab's, GPTQ and AWQ. ``None`` for
    the others (BitNet and BitStack checkpoints are converted whole as they load)."""
    if is_bitstack_checkpoint(path):
        return None
    kind = checkpoint_kind(str(path))
    if kind == "quantlab":
        return open_lazily(path, device, dtype, verify)
    readings = {
        "gptq": gptq_reading,
        "awq": awq_reading,
        CT_QUANT_METHOD: compressed_tensors_reading,
    }
    if kind in readings:
        return open_groupwise_lazily(readings[kind](path, verify), device, dtype)
    return None


def prepare_model_for_weights(
    model: nn.Module, specs: dict[str, dict[str, Any]], checkpoint_files: list[str] | None
) -> None:
    """For a loader that copies the tensors itself (transformers' ``from_pretrained``): swap an
    empty quantized layer in for every module of ``specs`` (checked by
    :func:`quantlab.export.schema.module_specs`), then check, before a value is read, that the
    safetensors files hold exactly the tensors the model now expects and match the checksums
    recorded at export.

    Raises:
        CheckpointError: a module the model lacks, no files or a file that is not safetensors,
            missing or unexpected tensors, or a checksum mismatch.
    """
    # Fused experts as one linear per expert projection, named as the checkpoint stores them.
    linearize(model)
    for name, spec in specs.items():
        try:
            swap_in_empty(model, name, spec)
        except ValueError as exc:
            raise CheckpointError(f"quantization_config: module {name}: {exc}") from exc
    if not checkpoint_files:
        raise CheckpointError(
            "quantlab checkpoints load from their safetensors files; the loader passed none"
        )
    files = [Path(f) for f in checkpoint_files]
    found: dict[str, TensorInfo] = {}
    for path in files:
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: quantlab checkpoints are safetensors only")
        found.update(read_header(path).tensors)
    source = files[0] if len(files) == 1 else files[0].parent
    check_state_matches_model(model, found, source)
    verify_checksums(files[0].parent)


def finish_model_after_weights(model: nn.Module, source: object) -> None:
    """The other half of :func:`prepare_model_for_weights`, once the tensors are in: every
    quantized layer's own checks and fix-ups, and every float tensor finite.

    Raises:
        CheckpointError: naming ``source`` and the module or tensor that failed.
    """
    finish_loaded_layers(model, source)
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{key} holds NaN or Inf values")
