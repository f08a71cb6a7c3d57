"""Writing a quantized model: the ``--format`` dispatch over the layouts quantlab writes, and the
bound on a checkpoint's size that lets the CLI refuse a full disk before quantizing.

``quantlab``: quantlab's own layout (:mod:`quantlab.export.quantlab_checkpoint`), any method.
``gptq`` and ``awq``: the layouts transformers, vLLM, GPTQModel and AutoAWQ load, for the
groupwise-integer methods (:mod:`quantlab.export.gptq_checkpoint`,
:mod:`quantlab.export.awq_checkpoint`); ``compressed-tensors``: llm-compressor's
``pack-quantized``, vLLM's native format (:mod:`quantlab.export.compressed_tensors_checkpoint`).
Each method lists the formats it can be written in (``Method.export_formats``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from torch import nn

from quantlab.export.awq_checkpoint import AWQLayout
from quantlab.export.checkpoint_files import DEFAULT_MAX_SHARD_BYTES, CheckpointFiles
from quantlab.export.compressed_tensors_checkpoint import CompressedTensorsLayout
from quantlab.export.gptq_checkpoint import GPTQLayout
from quantlab.export.layout import CheckpointLayout, QuantlabLayout
from quantlab.export.quantlab_checkpoint import write_in_layout
from quantlab.formats.awq_layout import awq_quantization_config
from quantlab.models.arch import excluded, get_submodule, resolve

__all__ = [
    "EXPORT_FORMATS",
    "check_exportable",
    "checkpoint_layout",
    "estimate_checkpoint_bytes",
    "layout_for",
    "save_checkpoint",
]

EXPORT_FORMATS = ("quantlab", "gptq", "awq", "compressed-tensors")
# config.json (with one quantization_config entry per module), generation config, report,
# checksum manifest: a fixed allowance plus one per tensor (also covers its safetensors header).
_FIXED_BYTES = 1 << 20
_PER_TENSOR_BYTES = 1 << 10
# tokenizer.json stores each vocabulary entry and merge; 256 bytes per token bounds the large
# vocabularies measured (SmolLM2 49k: 3.5 MB, Gemma 256k: 34 MB).
_TOKENIZER_BYTES_PER_TOKEN = 256


def check_exportable(config: Any, export_format: str) -> None:
    """Refuse an encoding ``export_format`` cannot store, before any quantization time is spent
    (the AWQ layout holds 4-bit grouped weights only)."""
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {export_format!r}")
    if export_format == "awq":
        awq_quantization_config(config.bits, config.group_size)


def checkpoint_layout(export_format: str, config: Any) -> CheckpointLayout:
    """The layout object that writes ``export_format`` for a model quantized with ``config``."""
    return layout_for(export_format, config.method, config.to_dict())


def layout_for(export_format: str, method: str, method_config: dict[str, Any]) -> CheckpointLayout:
    """The layout object that writes ``export_format`` for a model quantized by ``method`` with
    the settings ``method_config`` (a config's ``to_dict()``, as a report records it)."""
    if export_format == "gptq":
        return GPTQLayout(method_config)
    if export_format == "awq":
        return AWQLayout(method_config)
    if export_format == "compressed-tensors":
        return CompressedTensorsLayout(method_config)
    if export_format != "quantlab":
        raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {export_format!r}")
    return QuantlabLayout(method, method_config)


def save_checkpoint(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    export_format: str,
    config: Any,
    tokenizer: Any = None,
    report: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> tuple[Path, str]:
    """Write ``model``, quantized with ``config``, in ``export_format`` (shards of at most
    ``max_shard_bytes``); return the directory and a description of the layout written (e.g.
    ``"quantlab groupwise_int v1"``, ``"gptq_v2"``)."""
    layout = checkpoint_layout(export_format, config)
    out = write_in_layout(model, out_dir, layout, tokenizer, report, max_shard_bytes)
    return out, layout.describe()


def estimate_checkpoint_bytes(
    files: CheckpointFiles, model: nn.Module, config: Any, tokenizer: Any = None
) -> int:
    """Upper bound of the bytes of the checkpoint the source ``files`` (whose model, possibly a
    meta-device skeleton, is ``model``) will give once quantized with ``config``, computed before
    quantization.

    Counts every stored tensor at its stored size (what a streamed run writes for the tensors it
    does not quantize), except the weights of the linears the method will quantize, which count
    at the bound its config gives (``config.max_linear_bits``); plus the tokenizer and the JSON
    files. The quantized linears are the ones every method takes: the architecture's block
    linears not matched by ``config.modules_to_not_convert``.
    """
    spec = resolve(model)
    blocks = get_submodule(model, spec.blocks)
    patterns = getattr(config, "modules_to_not_convert", ())
    quantized: dict[str, tuple[int, int]] = {}
    for index, block in enumerate(blocks):
        for name in spec.linears_of(block):
            full = f"{spec.blocks}.{index}.{name}"
            if not excluded(full, patterns):
                weight = get_submodule(block, name).weight
                quantized[f"{full}.weight"] = tuple(weight.shape)

    total_bits = 0
    tensors = 0
    for key, info in files.tensors.items():
        tensors += 1
        if key in quantized:
            total_bits += config.max_linear_bits(*quantized[key])
            tensors += 3  # codes, scales, zero points (plus g_idx) replace the weight
        else:
            total_bits += 8 * info.nbytes()
    total = math.ceil(total_bits / 8) + _FIXED_BYTES + _PER_TENSOR_BYTES * tensors
    if tokenizer is not None:
        total += _FIXED_BYTES + _TOKENIZER_BYTES_PER_TOKEN * len(tokenizer)
    return total
