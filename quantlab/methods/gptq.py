"""GPTQ: Hessian-aware rounding of every block linear, block after block on quantized inputs."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from quantlab.calib.capture import run_sequential
from quantlab.calib.stats import HessianAccumulator
from quantlab.config import CalibConfig, GPTQConfig
from quantlab.formats.groupwise_int import dtype_from_name
from quantlab.methods import Method, MethodContext, register_method
from quantlab.methods.rtn import groupwise_options
from quantlab.models.arch import get_submodule, resolve
from quantlab.nn.swap import set_submodule
from quantlab.pipeline import LayerReport, QuantizationReport, excluded, packed_layer
from quantlab.solvers.base import GroupwiseIntResult
from quantlab.solvers.gptq import gptq_quantize

__all__ = ["GPTQTerms", "gptq_options", "run_gptq"]


def gptq_options(args: argparse.Namespace) -> dict[str, object]:
    """The shared GPTQ options (``--damp-percent``, ``--no-act-order``, ``--no-true-sequential``)
    as config fields."""
    return dict(
        damp_percent=args.damp_percent,
        act_order=not args.no_act_order,
        true_sequential=not args.no_true_sequential,
    )


class GPTQTerms:
    """Hooks for a method that adds terms to GPTQ's per-layer objective (Fair-GPTQ does).

    :func:`run_gptq` calls them at fixed points of the block-by-block pass; this base class adds
    nothing, so GPTQ with it is GPTQ.
    """

    def start(self, model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
        """Before the first block (e.g. catch the block inputs of extra sequences)."""

    def solver_options(
        self,
        index: int,
        block: nn.Module,
        group: Sequence[str],
        stats: dict[str, HessianAccumulator],
    ) -> dict[str, dict[str, Any]]:
        """Extra :func:`gptq_quantize` keyword arguments per linear of ``group``, computed just
        before the group is quantized (the block's earlier groups already are). ``"hessian"``
        replaces the calibration Hessian. May run ``block`` on other inputs."""
        return {}

    def layer_done(
        self, index: int, name: str, weight: torch.Tensor, result: GroupwiseIntResult
    ) -> None:
        """After one linear is quantized; ``weight`` is its weight before quantization."""

    def block_done(self, index: int, block: nn.Module) -> None:
        """After every group of block ``index`` is quantized (its linears still hold the
        dequantized weights, not yet the packed layers)."""


def run_gptq(
    model: nn.Module,
    config: GPTQConfig,
    calib: CalibConfig,
    samples: object,
    report: QuantizationReport,
    device: object,
    progress: bool,
    terms: GPTQTerms | None = None,
) -> None:
    """GPTQ over every block of ``model`` on calibration ``samples`` ``[S, L]``, with the extra
    objective ``terms`` of a derived method."""
    spec = resolve(model)
    blocks = get_submodule(model, spec.blocks)
    scale_dtype = dtype_from_name(config.scale_dtype)
    pending: dict[str, GroupwiseIntResult] = {}
    terms = terms or GPTQTerms()

    def on_group(
        index: int, block: nn.Module, group: Sequence[str], stats: dict[str, HessianAccumulator]
    ) -> None:
        options = terms.solver_options(index, block, group, stats)
        for name in group:
            full = f"{spec.blocks}.{index}.{name}"
            if excluded(full, config.modules_to_not_convert):
                continue
            linear = block.get_submodule(name)
            start = time.perf_counter()
            extra = dict(options.get(name, {}))
            hessian = extra.pop("hessian", None)
            result = gptq_quantize(
                linear.weight.detach(),
                stats[name].hessian() if hessian is None else hessian,
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
                **extra,
            )
            terms.layer_done(index, name, linear.weight.detach(), result)
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
        terms.block_done(index, block)
        for name, result in pending.items():
            linear = block.get_submodule(name)
            set_submodule(
                block, name, packed_layer(result, linear, config, f"{spec.blocks}.{index}.{name}")
            )
        pending.clear()

    groups = spec.sequential_groups if config.true_sequential else (spec.block_linears,)
    terms.start(model, blocks, torch.device(device))  # type: ignore[arg-type]
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


def _run(model: nn.Module, config: GPTQConfig, ctx: MethodContext) -> None:
    run_gptq(model, config, ctx.calib, ctx.samples("GPTQ"), ctx.report, ctx.device, ctx.progress)


register_method(
    Method(
        name="gptq",
        config_cls=GPTQConfig,
        run=_run,
        config_from_args=lambda args: GPTQConfig(**groupwise_options(args), **gptq_options(args)),
        export_formats=("quantlab", "gptq", "awq"),
        help="Hessian-aware rounding with error feedback",
    )
)
