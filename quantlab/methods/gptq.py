"""GPTQ: Hessian-aware rounding of every block linear, block after block on quantized inputs."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

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

__all__ = ["gptq_options", "run_gptq"]


def gptq_options(args: argparse.Namespace) -> dict[str, object]:
    """The shared GPTQ options (``--damp-percent``, ``--no-act-order``, ``--no-true-sequential``)
    as config fields."""
    return dict(
        damp_percent=args.damp_percent,
        act_order=not args.no_act_order,
        true_sequential=not args.no_true_sequential,
    )


def run_gptq(
    model: nn.Module,
    config: GPTQConfig,
    calib: CalibConfig,
    samples: object,
    report: QuantizationReport,
    device: object,
    progress: bool,
) -> None:
    """GPTQ over every block of ``model`` on calibration ``samples`` ``[S, L]``."""
    spec = resolve(model)
    blocks = get_submodule(model, spec.blocks)
    scale_dtype = dtype_from_name(config.scale_dtype)
    pending: dict[str, GroupwiseIntResult] = {}

    def on_group(
        index: int, block: nn.Module, group: Sequence[str], stats: dict[str, HessianAccumulator]
    ) -> None:
        for name in group:
            full = f"{spec.blocks}.{index}.{name}"
            if excluded(full, config.modules_to_not_convert):
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
                block, name, packed_layer(result, linear, config, f"{spec.blocks}.{index}.{name}")
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
