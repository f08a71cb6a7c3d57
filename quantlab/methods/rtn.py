"""RTN: every group rounded to its own min/max grid, no calibration."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import ClassVar

from torch import nn
from tqdm.auto import tqdm

from quantlab.calib.parallel import Parallel
from quantlab.formats.groupwise_int import GroupwiseIntResult
from quantlab.formats.tensor_layout import dtype_from_name
from quantlab.methods.base import (
    GroupwiseIntConfig,
    LayerReport,
    Method,
    MethodContext,
    QuantizationReport,
    linear_owners,
    model_blocks,
    packed_layer,
    solve_on_owners,
)
from quantlab.models.arch import ArchSpec, excluded, resolve
from quantlab.nn.swap import set_submodule
from quantlab.solvers.rtn import rtn_quantize

__all__ = ["METHOD", "RTNConfig", "groupwise_options", "rtn_block"]


@dataclass(frozen=True)
class RTNConfig(GroupwiseIntConfig):
    """Round-to-nearest: each group rounded to its own min/max grid; no calibration."""

    method: ClassVar[str] = "rtn"


def groupwise_options(args: argparse.Namespace) -> dict[str, object]:
    """The shared ``--bits/--group-size/--sym/--scale-dtype/--clip-search`` options as config
    fields (``clip_search`` only when given, so each method keeps its own default)."""
    options: dict[str, object] = dict(
        bits=args.bits, group_size=args.group_size, sym=args.sym, scale_dtype=args.scale_dtype
    )
    if args.clip_search is not None:
        options["clip_search"] = args.clip_search
    return options


def rtn_block(
    index: int,
    block: nn.Module,
    spec: ArchSpec,
    config: GroupwiseIntConfig,
    report: QuantizationReport,
    parallel: Parallel | None = None,
) -> None:
    """Round every linear of one decoder block and swap in its packed layer.

    On several ranks (``parallel``) each linear is rounded by one owner (balanced by size) and
    broadcast: the same result as one process, bit for bit (rounding is a pure function of the
    weight)."""
    parallel = parallel or Parallel.single()
    scale_dtype = dtype_from_name(config.scale_dtype)
    names = [
        name
        for name in spec.linears_of(block)
        if not excluded(f"{spec.blocks}.{index}.{name}", config.modules_to_not_convert)
    ]
    linears = {name: block.get_submodule(name) for name in names}

    def solve(name: str, linear: nn.Linear) -> GroupwiseIntResult:
        return rtn_quantize(
            linear.weight,
            config.bits,
            config.group_size,
            config.sym,
            scale_dtype,
            name=f"{spec.blocks}.{index}.{name}",
            clip_search=config.clip_search,
        )

    owners = linear_owners(parallel, linears, "rtn")
    for name, (result, seconds) in solve_on_owners(
        parallel, linears, owners, solve, GroupwiseIntResult
    ).items():
        full = f"{spec.blocks}.{index}.{name}"
        linear = linears[name]
        set_submodule(block, name, packed_layer(result, linear, config, full))
        report.layers.append(
            LayerReport(
                full,
                *linear.weight.shape,
                config.bits,
                config.group_size,
                None,
                seconds,
            )
        )


def _run(model: nn.Module, config: RTNConfig, ctx: MethodContext) -> None:
    spec = resolve(model)
    blocks = model_blocks(model, spec, ctx)
    for i in tqdm(range(len(blocks)), desc="rtn", disable=not ctx.progress):
        with blocks.open(i) as block:
            rtn_block(i, block, spec, config, ctx.report, ctx.parallel)


METHOD = Method(
    name="rtn",
    config_cls=RTNConfig,
    run=_run,
    config_from_args=lambda args: RTNConfig(**groupwise_options(args)),
    export_formats=("quantlab", "gptq", "awq", "compressed-tensors"),
    help="round to nearest, groupwise integers (no calibration)",
    runs_distributed=True,
)
