"""Checkpoints in compressed-tensors' ``pack-quantized`` layout: what llm-compressor writes and
vLLM serves natively (Marlin/Machete W4A16 kernels), and transformers loads through its
compressed-tensors integration.

Writing converts every :class:`~quantlab.nn.groupwise_int_linear.QuantLinear` to the tensors of
:mod:`quantlab.formats.compressed_tensors_layout` (the codes and scales as they are, the zero
points re-packed along the output dimension) and stores a ``quantization_config`` with
``quant_method: "compressed-tensors"``, one config group per encoding and the float linears
(head, routers) in ``ignore``. Reading turns such a checkpoint, quantlab's or llm-compressor's,
back into QuantLinear layers bit for bit (scales kept in their stored dtype), whole or block by
block.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.export.checkpoint_files import DEFAULT_MAX_SHARD_BYTES
from quantlab.export.errors import CheckpointError
from quantlab.export.foreign_layout import (
    GroupwiseReading,
    load_groupwise,
    read_foreign_checkpoint,
)
from quantlab.export.layout import float_linear_names, layer_state, validated_packed
from quantlab.export.quantlab_checkpoint import write_in_layout
from quantlab.formats.compressed_tensors_layout import (
    CT_FORMAT,
    CT_QUANT_METHOD,
    CtEncoding,
    ct_quantization_config,
    encoding_from_weights_args,
    from_ct_tensors,
    to_ct_tensors,
)
from quantlab.formats.groupwise_int import unpack
from quantlab.formats.tensor_layout import SCALE_DTYPES
from quantlab.nn.groupwise_int_linear import QuantLinear

__all__ = [
    "CT_SUFFIXES",
    "CompressedTensorsLayout",
    "compressed_tensors_reading",
    "load_compressed_tensors",
    "save_compressed_tensors",
]

CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
_PACKED = ("qweight", "scales", "qzeros")


class CompressedTensorsLayout:
    """The ``pack-quantized`` layout, layer by layer (whole: :func:`save_compressed_tensors`;
    block by block: a streamed quantization's export)."""

    def __init__(self, method_config: dict[str, Any]) -> None:
        self.method_config = method_config
        self.groups: dict[CtEncoding, list[str]] = {}

    def layer_tensors(self, name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
        if not isinstance(layer, QuantLinear):
            raise ValueError(
                f"{name}: the compressed-tensors layout stores groupwise-integer layers only, "
                f"not {type(layer).__name__}"
            )
        packed = validated_packed(name, layer)
        meta = packed.meta
        self.groups.setdefault((meta.bits, meta.group_size, meta.sym), []).append(name)
        out = layer_state(name, layer, _PACKED)
        for key, tensor in to_ct_tensors(packed).items():
            out[f"{name}.{key}"] = tensor.detach().to("cpu").contiguous()
        return out

    def quantization_config(self, model: nn.Module) -> dict[str, Any]:
        if not self.groups:
            raise ValueError("the model has no QuantLinear modules; quantize it before saving")
        ignore = float_linear_names(model)
        act_order = bool(self.method_config.get("act_order", False))
        qconfig = ct_quantization_config(self.groups, len(self.groups) == 1, ignore, act_order)
        qconfig["quantlab"] = {"method": self.method_config.get("method", "unknown")}
        return qconfig

    def describe(self) -> str:
        return f"compressed-tensors {CT_FORMAT}"


def save_compressed_tensors(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    method_config: dict[str, Any],
    tokenizer: Any = None,
    report: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``model`` in compressed-tensors' ``pack-quantized`` layout."""
    layout = CompressedTensorsLayout(method_config)
    return write_in_layout(model, out_dir, layout, tokenizer, report, max_shard_bytes)


def _encoding(qcfg: dict[str, Any], where: object) -> CtEncoding:
    """The one encoding of a ``pack-quantized``, weight-only, compressed checkpoint's config
    groups; anything quantlab's layers cannot hold is a :class:`CheckpointError`."""
    fmt = qcfg.get("format", CT_FORMAT)
    status = qcfg.get("quantization_status", "compressed")
    problems = []
    if fmt != CT_FORMAT:
        problems.append(f"format {fmt!r} (quantlab reads {CT_FORMAT!r})")
    if status != "compressed":
        problems.append(f"quantization_status {status!r} (the weights are not packed)")
    for key in ("sparsity_config", "transform_config"):
        if qcfg.get(key):
            problems.append(f"a {key}")
    if qcfg.get("kv_cache_scheme") is not None:
        problems.append("a kv_cache_scheme")
    groups = qcfg.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        problems.append("no config_groups")
        groups = {}
    encodings = set()
    for gname, group in groups.items():
        if not isinstance(group, dict):
            problems.append(f"config group {gname} is not an object")
            continue
        if group.get("format") not in (None, CT_FORMAT):
            problems.append(f"config group {gname} in format {group.get('format')!r}")
        if group.get("input_activations") or group.get("output_activations"):
            problems.append(f"config group {gname} quantizes activations (not weight-only)")
        try:
            encodings.add(encoding_from_weights_args(group.get("weights"), f"group {gname}"))
        except ValueError as exc:
            problems.append(str(exc))
    if len(encodings) > 1:
        problems.append(f"{len(encodings)} weight encodings (quantlab reads one per checkpoint)")
    if problems:
        raise CheckpointError(
            f"{where}: a compressed-tensors checkpoint quantlab cannot read: " + "; ".join(problems)
        )
    return next(iter(encodings))


def compressed_tensors_reading(
    path: str | os.PathLike[str], verify: bool = True
) -> GroupwiseReading:
    """A compressed-tensors checkpoint checked (config, one encoding) and how its modules
    convert; scales keep the dtype the checkpoint stores."""
    checkpoint = read_foreign_checkpoint(path, CT_QUANT_METHOD, "a compressed-tensors", verify)
    encoding = _encoding(checkpoint.quantization_config, checkpoint.config_path)
    bits, group_size, sym = encoding
    with checkpoint.files() as files:
        scale_dtypes = {
            info.dtype for key, info in files.tensors.items() if key.endswith(".weight_scale")
        }
    names = {dtype: name for name, dtype in SCALE_DTYPES.items()}
    if len(scale_dtypes) != 1 or next(iter(scale_dtypes)) not in names:
        raise CheckpointError(
            f"{checkpoint.root}: weight_scale tensors in {sorted(map(str, scale_dtypes))}; "
            f"quantlab reads one of {sorted(SCALE_DTYPES)} for the whole checkpoint"
        )
    scale_dtype = names[next(iter(scale_dtypes))]

    def convert(tensors: dict[str, torch.Tensor]) -> tuple:
        r = unpack(from_ct_tensors(tensors, encoding))
        return r.q, r.scales, r.zeros

    return GroupwiseReading(
        checkpoint,
        CT_SUFFIXES if not sym else CT_SUFFIXES[:3],
        convert,
        bits,
        group_size,
        sym,
        marker="weight_packed",
        scale_dtype=scale_dtype,
    )


def load_compressed_tensors(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
) -> nn.Module:
    """Load a compressed-tensors ``pack-quantized`` checkpoint as a transformers model with
    QuantLinear layers."""
    return load_groupwise(compressed_tensors_reading(path, verify), device, dtype)
