"""What an output path may replace, and whether a checkpoint will fit there.

quantlab replaces only what it wrote itself: :func:`check_output_target` refuses a file, a
non-empty directory that is not a quantlab checkpoint, a symbolic link, the input model's directory
or one containing it, and an existing quantlab checkpoint unless ``overwrite`` is given.
:func:`estimate_checkpoint_bytes` bounds the size of the checkpoint a method will write, from the
unquantized model and the method's config, so :func:`check_free_space` can refuse before hours of
quantization are spent. Run both under :func:`quantlab.export.atomic.output_lock`, so that nothing
changes the target between the check and the write.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "OutputTargetError",
    "check_free_space",
    "check_output_target",
    "estimate_checkpoint_bytes",
    "is_quantlab_output",
]

_SCALE_BITS = {"float16": 16, "bfloat16": 16, "float32": 32}
# config.json (with one quantization_config entry per module), generation config, report,
# checksum manifest: a fixed allowance plus one per tensor (also covers its safetensors header).
_FIXED_BYTES = 1 << 20
_PER_TENSOR_BYTES = 1 << 10
# tokenizer.json stores each vocabulary entry and merge; 256 bytes per token bounds the large
# vocabularies measured (SmolLM2 49k: 3.5 MB, Gemma 256k: 34 MB).
_TOKENIZER_BYTES_PER_TOKEN = 256


class OutputTargetError(ValueError):
    """The output path holds something quantlab must not replace, or too little space is free."""


def is_quantlab_output(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a checkpoint directory quantlab wrote: its ``config.json`` parses and
    its ``quantization_config`` is quantlab's own layout, or quantlab's export of the GPTQ layout
    (``meta.quantlab_method``) or of the AWQ layout (a ``quantlab`` entry)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    qcfg = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qcfg, dict):
        return False
    method = qcfg.get("quant_method")
    if method == "quantlab":
        return True
    if method == "gptq":
        meta = qcfg.get("meta")
        return isinstance(meta, dict) and "quantlab_method" in meta
    return method == "awq" and "quantlab" in qcfg


def check_output_target(
    out: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> None:
    """Raise :class:`OutputTargetError` unless writing a checkpoint to ``out`` replaces nothing
    but a quantlab checkpoint the caller agreed to replace (``overwrite``).

    ``inputs`` are directories the run reads (the model): ``out`` may be neither one of them nor
    a directory containing one, since replacing it would delete them.
    """
    path = Path(out)
    resolved = path.resolve()
    for source in inputs:
        source_path = Path(source).resolve()
        if resolved == source_path:
            raise OutputTargetError(
                f"{out} is the input model directory; writing the checkpoint there would replace "
                "the model: choose another output directory"
            )
        if resolved in source_path.parents:
            raise OutputTargetError(
                f"{out} contains the input model directory {source}; replacing it would delete "
                "the model: choose another output directory"
            )
    if path.is_symlink():
        raise OutputTargetError(
            f"{out} is a symbolic link (to {resolved}); the link itself would be replaced: give "
            "the directory it points to, or another output directory"
        )
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputTargetError(
            f"{out} exists and is a file, not a checkpoint directory; remove it or choose "
            "another output directory"
        )
    if not any(path.iterdir()):
        return
    if not is_quantlab_output(path):
        raise OutputTargetError(
            f"{out} is a non-empty directory that is not a quantlab checkpoint; quantlab replaces "
            "only its own outputs: choose a new or empty directory"
        )
    if not overwrite:
        raise OutputTargetError(
            f"{out} already holds a quantlab checkpoint; pass --overwrite (overwrite=True) to "
            "replace it"
        )


def _quantized_linear_bits(config: Any, out_features: int, in_features: int) -> int:
    """Upper bound of the stored bits of one linear quantized with ``config``, in any of the
    layouts its method exports (quantlab, GPTQ, AWQ)."""
    from quantlab.config import GroupwiseIntConfig
    from quantlab.formats.bitstack import block_bytes
    from quantlab.methods.bitstack import BitStackConfig

    n, k = out_features, in_features
    if isinstance(config, GroupwiseIntConfig):  # rtn, gptq, awq, fair-gptq
        groups = 1 if config.group_size == -1 else math.ceil(k / config.group_size)
        scale_bits = max(16, _SCALE_BITS.get(config.scale_dtype, 32))
        return (
            n * 32 * math.ceil(k * config.bits / 32)  # codes, rows padded to 32-bit words
            + n * groups * (scale_bits + 16)  # a scale and a zero point (<= 16 bits) per group
            + 32 * (n + k)  # zero-point words padded per row; GPTQ's int32 g_idx per column
        )
    if isinstance(config, BitStackConfig):
        # n_blocks residual blocks of 1 sign bit per weight plus factors: 16 blocks exceed 16 bits
        # per weight, so this method gets its exact size.
        return 8 * config.n_blocks * block_bytes(n, k, config.rank)
    # Ternary (<= 2 bits plus scales) and PVQ (bits_per_weight <= 16 by validation, all its
    # tensors included): 16 bits per weight plus a row of slack bounds them.
    return 16 * n * k + 64 * n


def estimate_checkpoint_bytes(model: nn.Module, config: Any, tokenizer: Any = None) -> int:
    """Upper bound of the bytes of the checkpoint ``model`` will have once quantized with
    ``config`` (computed from the unquantized model, before quantization).

    Counts every tensor of the state dict as written today (float tensors in the model's dtype,
    tied tensors once), except the weights of the linears the method will quantize, which count
    at the method's bound (:func:`_quantized_linear_bits`); plus the tokenizer and the JSON files.
    The quantized linears are the ones every method takes: the architecture's block linears not
    matched by ``config.modules_to_not_convert``.
    """
    from quantlab.models.arch import get_submodule, resolve
    from quantlab.pipeline import excluded

    spec = resolve(model)
    blocks = get_submodule(model, spec.blocks)
    patterns = getattr(config, "modules_to_not_convert", ())
    quantized: dict[str, tuple[int, int]] = {}
    for index, block in enumerate(blocks):
        for name in spec.block_linears:
            full = f"{spec.blocks}.{index}.{name}"
            if not excluded(full, patterns):
                weight = get_submodule(block, name).weight
                quantized[f"{full}.weight"] = tuple(weight.shape)

    total_bits = 0
    seen: set[tuple[int, int, Any]] = set()
    tensors = 0
    for key, tensor in model.state_dict().items():
        # Same de-duplication as the writer's state_dict_without_shared: tied tensors once.
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.dtype)
        if tensor.numel() and ident in seen:
            continue
        seen.add(ident)
        tensors += 1
        if key in quantized:
            total_bits += _quantized_linear_bits(config, *quantized[key])
            tensors += 3  # codes, scales, zero points (plus g_idx) replace the weight
        else:
            total_bits += 8 * tensor.numel() * tensor.element_size()
    total = math.ceil(total_bits / 8) + _FIXED_BYTES + _PER_TENSOR_BYTES * tensors
    if tokenizer is not None:
        total += _FIXED_BYTES + _TOKENIZER_BYTES_PER_TOKEN * len(tokenizer)
    return total


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB ({n} bytes)"


def check_free_space(out: str | os.PathLike[str], needed: int) -> None:
    """Raise :class:`OutputTargetError` when the filesystem of ``out``'s parent (which must
    exist) has fewer than ``needed`` bytes free. An existing checkpoint at ``out`` frees nothing
    in advance: it is deleted only once the new one is complete."""
    parent = Path(os.path.abspath(os.fspath(out))).parent
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise OutputTargetError(
            f"not enough free space for {out}: the checkpoint needs up to {_fmt_bytes(needed)}, "
            f"{parent} has {_fmt_bytes(free)} free; free some space or choose another output "
            "directory"
        )
