"""Checkpoints in the GPTQ layout that transformers (GPTQModel/optimum) and vLLM load.

Writing converts every :class:`~quantlab.nn.groupwise_int_linear.QuantLinear` of a model to the
GPTQ tensors of
:mod:`quantlab.formats.gptq_layout` (``qweight``/``qzeros``/``scales``/``g_idx``) and stores a
``quantization_config`` with ``quant_method: "gptq"`` and an explicit ``checkpoint_format``.
quantlab's act-order uses static groups, so every ``g_idx`` is ``k // group_size`` and the config
says ``desc_act: false``: loaders take their fast no-reordering path. Reading turns such a
checkpoint (quantlab's or another tool's, as long as its ``g_idx`` is trivial) back into
QuantLinear layers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.export.checkpoint_files import DEFAULT_MAX_SHARD_BYTES
from quantlab.export.foreign_layout import (
    GroupwiseReading,
    load_groupwise,
    read_foreign_checkpoint,
)
from quantlab.export.layout import layer_state, validated_packed
from quantlab.export.quantlab_checkpoint import write_in_layout
from quantlab.formats.gptq_layout import (
    from_gptq_tensors,
    gptq_quantization_config,
    to_gptq_tensors,
)
from quantlab.formats.groupwise_int import unpack
from quantlab.nn.groupwise_int_linear import QuantLinear

__all__ = [
    "GPTQ_SUFFIXES",
    "GPTQLayout",
    "gptq_reading",
    "load_gptq",
    "save_gptq",
]

GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


class GPTQLayout:
    """The GPTQ layout, layer by layer: :meth:`layer_tensors` turns each QuantLinear into its
    GPTQ tensors (every layer must share one bits/group_size/sym, as the format has one for the
    whole model), :meth:`quantization_config` describes the result. Used whole
    (:func:`save_gptq`) and block by block (a streamed quantization's export)."""

    def __init__(self, method_config: dict[str, Any], checkpoint_format: str = "auto") -> None:
        self.method_config = method_config
        self.requested_format = checkpoint_format
        self.encoding: tuple[int, int, bool] | None = None
        self.checkpoint_format: str | None = None

    def layer_tensors(self, name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors stored for quantized layer ``name`` (its codes, scales and zero points in
        the GPTQ layout; its other tensors, such as the bias, as they are)."""
        if not isinstance(layer, QuantLinear):
            raise ValueError(
                f"{name}: the GPTQ layout stores groupwise-integer layers only, not "
                f"{type(layer).__name__}"
            )
        encoding = (layer.meta.bits, layer.meta.group_size, layer.meta.sym)
        if self.encoding is None:
            self.encoding = encoding
            fmt = self.requested_format
            if fmt == "auto":
                fmt = "gptq" if encoding[2] else "gptq_v2"
            self.checkpoint_format = fmt
        elif encoding != self.encoding:
            raise ValueError(
                "the GPTQ layout has one bits/group_size/sym for the whole model; "
                f"found {sorted({self.encoding, encoding})}"
            )
        bits, group_size, _ = encoding
        assert self.checkpoint_format is not None
        r = unpack(validated_packed(name, layer))
        tensors = to_gptq_tensors(
            r.q, r.scales, r.zeros, bits, group_size, self.checkpoint_format, torch.float16
        )
        out = layer_state(name, layer, ("qweight", "scales", "qzeros"))
        out.update({f"{name}.{k}": v.contiguous() for k, v in tensors.items()})
        return out

    def quantization_config(self, model: nn.Module) -> dict[str, Any]:
        if self.encoding is None or self.checkpoint_format is None:
            raise ValueError("the model has no QuantLinear modules; quantize it before saving")
        bits, group_size, sym = self.encoding
        cfg = self.method_config
        qconfig = gptq_quantization_config(
            bits,
            group_size,
            sym,
            desc_act=False,
            checkpoint_format=self.checkpoint_format,
            # Loaders validate damp_percent in (0, 1) even for weights no Hessian produced (RTN);
            # meta.quantlab_method says which method really made them.
            damp_percent=float(cfg.get("damp_percent", 0.01)),
            true_sequential=bool(cfg.get("true_sequential", False)),
            static_groups=bool(cfg.get("act_order", False)),
        )
        qconfig["meta"]["quantlab_method"] = cfg.get("method", "unknown")
        qconfig["meta"]["quantlab_act_order"] = bool(cfg.get("act_order", False))
        return qconfig

    def describe(self) -> str:
        return self.checkpoint_format or "gptq"


def save_gptq(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    method_config: dict[str, Any],
    tokenizer: Any = None,
    report: dict[str, Any] | None = None,
    checkpoint_format: str = "auto",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> tuple[Path, str]:
    """Write ``model`` in the GPTQ layout; return ``(directory, checkpoint_format used)``.

    ``checkpoint_format="auto"`` writes v1 (``"gptq"``, zero points stored minus one) for symmetric
    weights: every GPTQ loader reads it and vLLM's Marlin path takes it. Asymmetric weights get
    ``"gptq_v2"`` (true zero points): v1 cannot store a zero point of 0, and GPTQModel refuses
    asymmetric v1 checkpoints from other producers for that reason.
    """
    layout = GPTQLayout(method_config, checkpoint_format)
    out = write_in_layout(model, out_dir, layout, tokenizer, report, max_shard_bytes)
    return out, layout.describe()


def gptq_reading(path: str | os.PathLike[str], verify: bool = True) -> GroupwiseReading:
    """A GPTQ-layout checkpoint checked (config fields) and how its modules convert."""
    checkpoint = read_foreign_checkpoint(path, "gptq", "a GPTQ", verify)
    bits = checkpoint.field("bits", int)
    group_size = checkpoint.field("group_size", int)
    sym = checkpoint.field("sym", bool, default=True)
    fmt = checkpoint.field("checkpoint_format", str, default="gptq")
    return GroupwiseReading(
        checkpoint,
        GPTQ_SUFFIXES,
        lambda tensors: from_gptq_tensors(tensors, bits, group_size, fmt, sym=sym),
        bits,
        group_size,
        sym,
    )


def load_gptq(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
) -> nn.Module:
    """Load a GPTQ-layout checkpoint as a transformers model with QuantLinear layers (``verify``:
    check the files against the checksums quantlab recorded, when it wrote them)."""
    return load_groupwise(gptq_reading(path, verify), device, dtype)
