"""Whole-model entry points: :func:`quantize_model` (any registered method) and
:func:`replace_linear` (RTN on any torch model), and the report both fill.

Each method's orchestration (which solver on which layer with which statistics) lives in its
module of :mod:`quantlab.methods`; this module holds the parts they share and no math.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from quantlab.config import CalibConfig, GroupwiseIntConfig, RTNConfig
from quantlab.formats.groupwise_int import dtype_from_name, pack
from quantlab.methods import MethodContext, get_method
from quantlab.nn.linear import QuantLinear
from quantlab.nn.swap import set_submodule
from quantlab.solvers.base import GroupwiseIntResult
from quantlab.solvers.rtn import rtn_quantize

__all__ = [
    "LayerReport",
    "QuantizationReport",
    "calibration_samples_for",
    "excluded",
    "packed_layer",
    "quantize_model",
    "replace_linear",
]


@dataclass
class LayerReport:
    """One quantized layer: shape, encoding (``bits``: per weight, may be fractional;
    ``group_size``: ``None`` where the format has no groups), the solver's loss, its time."""

    name: str
    out_features: int
    in_features: int
    bits: float
    group_size: int | None
    loss: float | None
    seconds: float


@dataclass
class QuantizationReport:
    method: str
    config: dict[str, Any]
    calib: dict[str, Any] | None
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def n_weights(self) -> int:
        return sum(layer.out_features * layer.in_features for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "config": self.config,
            "calib": self.calib,
            "seconds": self.seconds,
            "layers": [asdict(layer) for layer in self.layers],
            "details": self.details,
        }


def packed_layer(
    result: GroupwiseIntResult, linear: nn.Linear, config: GroupwiseIntConfig, name: str
) -> QuantLinear:
    """The :class:`QuantLinear` holding ``result``, on ``linear``'s device with its bias."""
    layer = QuantLinear.from_packed(pack(result, config.scale_dtype), linear.bias, name=name)
    return layer.to(linear.weight.device)


def excluded(name: str, patterns: Sequence[str]) -> bool:
    """Whether module path ``name`` matches one of ``modules_to_not_convert``'s patterns."""
    return any(fnmatch.fnmatch(name, p) or name == p or name.endswith("." + p) for p in patterns)


def calibration_samples_for(
    tokenizer: Any, calib: CalibConfig, method: str, given: torch.Tensor | None
) -> torch.Tensor:
    """Calibration token ids ``[S, L]``: ``given`` (checked), else ``calib``'s windows."""
    from quantlab.calib.data import calibration_samples

    if given is not None:
        if given.dim() != 2 or given.dtype not in (torch.int32, torch.int64) or given.numel() == 0:
            raise ValueError(
                f"samples must be a non-empty 2-D integer [S, L] tensor of token ids, got "
                f"{given.dtype} {tuple(given.shape)}"
            )
        return given.to(torch.int64)
    if tokenizer is None:
        raise ValueError(f"{method} needs a tokenizer for its calibration text")
    return calibration_samples(tokenizer, calib.source, calib.n_samples, calib.seq_len, calib.seed)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: Any,
    tokenizer: Any = None,
    calib: CalibConfig | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    samples: torch.Tensor | None = None,
) -> QuantizationReport:
    """Quantize a transformers causal LM in place; its block linears become quantized layers
    (:class:`QuantLinear` or the method's own layer format).

    Args:
        model: a model whose architecture :func:`quantlab.models.arch.resolve` knows.
        config: the method's configuration (``RTNConfig``, ``GPTQConfig``, ...; any method of
            :func:`quantlab.methods.methods`).
        tokenizer: needed by calibrated methods to tokenize the calibration text.
        calib: calibration options (defaults to :class:`CalibConfig`'s defaults).
        device: where blocks are processed (default: where the model is).
        samples: calibration token ids ``[S, L]`` to use instead of drawing ``calib``'s windows
            from its text source (then no tokenizer is needed).
    """
    start = time.perf_counter()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    calib = calib or CalibConfig()
    report = QuantizationReport(
        method=config.method,
        config=config.to_dict(),
        calib=calib.to_dict() if config.needs_calibration else None,
    )
    if samples is not None and config.needs_calibration:
        report.calib = {"source": "given token ids", "shape": list(samples.shape)}
    method = get_method(config.method)
    if not isinstance(config, method.config_cls):
        raise TypeError(
            f"method {config.method!r} expects a {method.config_cls.__name__}, got "
            f"{type(config).__name__}"
        )
    context = MethodContext(tokenizer, calib, report, device, progress, given_samples=samples)
    method.run(model, config, context)
    report.seconds = time.perf_counter() - start
    return report


@torch.no_grad()
def replace_linear(
    model: nn.Module,
    bits: int = 4,
    group_size: int = 64,
    sym: bool = False,
    scale_dtype: str = "float16",
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = ("lm_head",),
) -> list[str]:
    """Swap every matching ``nn.Linear`` of any torch model for an RTN-quantized
    :class:`QuantLinear`.

    Names are matched with shell-style patterns against the module's dotted path. Layers whose
    ``in_features`` the group size does not divide raise ``ValueError`` (exclude them or pick
    another group size). Returns the names of the replaced modules.
    """
    config = RTNConfig(bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype)
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and any(fnmatch.fnmatch(name, p) for p in include)
        and not excluded(name, exclude)
    ]
    for name in targets:
        linear = model.get_submodule(name)
        result = rtn_quantize(
            linear.weight, bits, group_size, sym, dtype_from_name(scale_dtype), name=name
        )
        set_submodule(model, name, packed_layer(result, linear, config, name))
    return targets
