"""Whole-model orchestration: resolve the architecture, calibrate, solve, pack, swap modules.

This is the only module that brings calib, solvers, formats and nn together; it holds no math.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantlab.calib.stats import HessianAccumulator
from quantlab.config import AWQConfig, CalibConfig, GPTQConfig, GroupwiseIntConfig, RTNConfig
from quantlab.formats.groupwise_int import dtype_from_name, pack
from quantlab.models.arch import ArchSpec, get_submodule, resolve
from quantlab.nn.linear import QuantLinear
from quantlab.nn.swap import set_submodule
from quantlab.solvers.base import GroupwiseIntResult
from quantlab.solvers.rtn import rtn_quantize

__all__ = [
    "LayerReport",
    "QuantizationReport",
    "quantize_model",
    "replace_linear",
]


@dataclass
class LayerReport:
    name: str
    out_features: int
    in_features: int
    bits: int
    group_size: int
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


def _packed_layer(
    result: GroupwiseIntResult, linear: nn.Linear, config: GroupwiseIntConfig, name: str
) -> QuantLinear:
    layer = QuantLinear.from_packed(pack(result, config.scale_dtype), linear.bias, name=name)
    return layer.to(linear.weight.device)


def _excluded(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) or name == p or name.endswith("." + p) for p in patterns)


def _rtn_block(
    index: int,
    block: nn.Module,
    spec: ArchSpec,
    config: GroupwiseIntConfig,
    report: QuantizationReport,
) -> None:
    scale_dtype = dtype_from_name(config.scale_dtype)
    for name in spec.block_linears:
        full = f"{spec.blocks}.{index}.{name}"
        if _excluded(full, config.modules_to_not_convert):
            continue
        linear = block.get_submodule(name)
        start = time.perf_counter()
        result = rtn_quantize(
            linear.weight,
            config.bits,
            config.group_size,
            config.sym,
            scale_dtype,
            name=full,
            clip_search=config.clip_search,
        )
        set_submodule(block, name, _packed_layer(result, linear, config, full))
        report.layers.append(
            LayerReport(
                full,
                *linear.weight.shape,
                config.bits,
                config.group_size,
                None,
                time.perf_counter() - start,
            )
        )


def _quantize_rtn(
    model: nn.Module, config: RTNConfig, report: QuantizationReport, progress: bool
) -> None:
    spec = resolve(model)
    blocks = get_submodule(model, spec.blocks)
    for i in tqdm(range(len(blocks)), desc="rtn", disable=not progress):
        _rtn_block(i, blocks[i], spec, config, report)


def _calibration_samples(
    tokenizer: Any, calib: CalibConfig, method: str, given: torch.Tensor | None
) -> torch.Tensor:
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


def _quantize_gptq(
    model: nn.Module,
    config: GPTQConfig,
    calib: CalibConfig,
    samples: torch.Tensor,
    report: QuantizationReport,
    device: torch.device,
    progress: bool,
) -> None:
    from quantlab.calib.capture import run_sequential
    from quantlab.solvers.gptq import gptq_quantize

    spec = resolve(model)
    blocks = get_submodule(model, spec.blocks)
    scale_dtype = dtype_from_name(config.scale_dtype)
    pending: dict[str, GroupwiseIntResult] = {}

    def on_group(
        index: int, block: nn.Module, group: Sequence[str], stats: dict[str, HessianAccumulator]
    ) -> None:
        for name in group:
            full = f"{spec.blocks}.{index}.{name}"
            if _excluded(full, config.modules_to_not_convert):
                continue
            linear = block.get_submodule(name)
            start = time.perf_counter()
            result = gptq_quantize(
                linear.weight.detach(),
                stats[name].hessian(),
                bits=config.bits,
                group_size=config.group_size,
                sym=config.sym,
                damp_percent=config.damp_percent,
                block_size=config.block_size,
                act_order=config.act_order,
                static_groups=config.static_groups,
                scale_dtype=scale_dtype,
                name=full,
                clip_search=config.clip_search,
            )
            # Later groups and blocks must see this layer's quantized output.
            linear.weight.data.copy_(result.dequantize().to(linear.weight.dtype))
            pending[name] = result
            report.layers.append(
                LayerReport(
                    full,
                    *linear.weight.shape,
                    config.bits,
                    config.group_size,
                    result.loss,
                    time.perf_counter() - start,
                )
            )

    def on_block_done(index: int, block: nn.Module) -> None:
        for name, result in pending.items():
            linear = block.get_submodule(name)
            set_submodule(
                block, name, _packed_layer(result, linear, config, f"{spec.blocks}.{index}.{name}")
            )
        pending.clear()

    groups = spec.sequential_groups if config.true_sequential else (spec.block_linears,)
    run_sequential(
        model,
        blocks,
        groups,
        samples,
        on_group,
        on_block_done,
        batch_size=calib.batch_size,
        device=device,
        true_sequential=config.true_sequential,
        progress=progress,
    )


def _quantize_awq(
    model: nn.Module,
    config: AWQConfig,
    calib: CalibConfig,
    samples: torch.Tensor,
    report: QuantizationReport,
    device: torch.device,
    progress: bool,
) -> None:
    from quantlab.awq_smoothing import apply_awq

    spec = resolve(model)

    def round_block(index: int, block: nn.Module) -> None:
        _rtn_block(index, block, spec, config, report)

    smoothing = apply_awq(
        model,
        spec,
        samples,
        config,
        device,
        batch_size=calib.batch_size,
        on_block=round_block if config.rounding == "rtn" else None,
        progress=progress,
    )
    report.details["awq"] = {
        "seconds": smoothing.seconds,
        "maps": [asdict(m) for m in smoothing.maps],
        "skipped_maps": smoothing.skipped_maps,
        "clipped": len(smoothing.clipped),
    }
    if config.rounding == "gptq":
        _quantize_gptq(model, config.gptq_config(), calib, samples, report, device, progress)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: GroupwiseIntConfig,
    tokenizer: Any = None,
    calib: CalibConfig | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    samples: torch.Tensor | None = None,
) -> QuantizationReport:
    """Quantize a transformers causal LM in place; its block linears become :class:`QuantLinear`.

    Args:
        model: a model whose architecture :func:`quantlab.models.arch.resolve` knows.
        config: the method's configuration (``RTNConfig``, ``GPTQConfig``, ...).
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
    if isinstance(config, RTNConfig):
        _quantize_rtn(model, config, report, progress)
    elif isinstance(config, GPTQConfig):
        samples = _calibration_samples(tokenizer, calib, "GPTQ", samples)
        _quantize_gptq(model, config, calib, samples, report, device, progress)
    elif isinstance(config, AWQConfig):
        samples = _calibration_samples(tokenizer, calib, "AWQ", samples)
        _quantize_awq(model, config, calib, samples, report, device, progress)
    else:
        raise ValueError(f"method {config.method!r} is not available in quantize_model")
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
        and not _excluded(name, exclude)
    ]
    for name in targets:
        linear = model.get_submodule(name)
        result = rtn_quantize(
            linear.weight, bits, group_size, sym, dtype_from_name(scale_dtype), name=name
        )
        set_submodule(model, name, _packed_layer(result, linear, config, name))
    return targets
