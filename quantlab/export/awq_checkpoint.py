"""Checkpoints in the AutoAWQ GEMM layout (``quant_method: "awq"``) that transformers and vLLM load.

Writing converts every :class:`~quantlab.nn.groupwise_int_linear.QuantLinear` to the tensors of
:mod:`quantlab.formats.awq_layout`; linears left in float precision are listed in
``modules_to_not_convert``. Reading turns an AWQ GEMM checkpoint (quantlab's or AutoAWQ's /
llm-compressor's) back into QuantLinear layers.
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
from quantlab.formats.awq_layout import awq_quantization_config, from_awq_tensors, to_awq_tensors
from quantlab.formats.groupwise_int import unpack
from quantlab.nn.groupwise_int_linear import QuantLinear

__all__ = [
    "AWQ_SUFFIXES",
    "AWQLayout",
    "awq_reading",
    "load_awq",
    "save_awq",
]

AWQ_SUFFIXES = ("qweight", "qzeros", "scales")


class AWQLayout:
    """The AWQ GEMM layout, layer by layer (4-bit, one group size for the whole model); linears
    left in float precision are listed in ``modules_to_not_convert``."""

    def __init__(self, method_config: dict[str, Any]) -> None:
        self.method_config = method_config
        self.encoding: tuple[int, int] | None = None

    def layer_tensors(self, name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
        if not isinstance(layer, QuantLinear):
            raise ValueError(
                f"{name}: the AWQ layout stores groupwise-integer layers only, not "
                f"{type(layer).__name__}"
            )
        encoding = (layer.meta.bits, layer.meta.group_size)
        if self.encoding is None:
            self.encoding = encoding
        elif encoding != self.encoding:
            raise ValueError(
                "the AWQ layout has one bits/group_size for the whole model; found "
                f"{sorted({self.encoding, encoding})}"
            )
        r = unpack(validated_packed(name, layer))
        out = layer_state(name, layer, AWQ_SUFFIXES)
        out.update(
            {f"{name}.{k}": v for k, v in to_awq_tensors(r.q, r.scales, r.zeros, *encoding).items()}
        )
        if f"{name}.bias" in out:
            out[f"{name}.bias"] = out[f"{name}.bias"].to(torch.float16)  # AWQ kernels add fp16
        return out

    def quantization_config(self, model: nn.Module) -> dict[str, Any]:
        if self.encoding is None:
            raise ValueError("the model has no QuantLinear modules; quantize it before saving")
        float_linears = float_linear_names(model)
        qconfig = awq_quantization_config(*self.encoding, float_linears or None)
        qconfig["quantlab"] = {"method": self.method_config.get("method", "unknown")}
        return qconfig

    def describe(self) -> str:
        return "awq gemm"


def save_awq(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    method_config: dict[str, Any],
    tokenizer: Any = None,
    report: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``model`` in the AWQ GEMM layout (4-bit, one group size for the whole model)."""
    layout = AWQLayout(method_config)
    return write_in_layout(model, out_dir, layout, tokenizer, report, max_shard_bytes)


def awq_reading(path: str | os.PathLike[str], verify: bool = True) -> GroupwiseReading:
    """An AWQ GEMM checkpoint checked (config fields) and how its modules convert."""
    checkpoint = read_foreign_checkpoint(path, "awq", "an AWQ", verify)
    cfg_path = checkpoint.config_path
    version = checkpoint.field("version", str, "format", default="gemm").lower()
    if version != "gemm":
        raise CheckpointError(
            f"{cfg_path}: AWQ version {version!r}; quantlab reads the GEMM layout only"
        )
    if not checkpoint.field("zero_point", bool, default=True):
        raise CheckpointError(f"{cfg_path}: AWQ without zero points is not supported")
    bits = checkpoint.field("bits", int, "w_bit", default=4)
    group_size = checkpoint.field("group_size", int, "q_group_size", default=128)
    # AWQ stores zero points even for symmetric weights; they load as explicit zeros.
    return GroupwiseReading(
        checkpoint,
        AWQ_SUFFIXES,
        lambda tensors: from_awq_tensors(tensors, bits, group_size),
        bits,
        group_size,
        False,
    )


def load_awq(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
) -> nn.Module:
    """Load an AWQ GEMM checkpoint as a transformers model with QuantLinear layers (``verify``:
    check the files against the checksums quantlab recorded, when it wrote them)."""
    return load_groupwise(awq_reading(path, verify), device, dtype)
