"""GPTQ: Hessian-aware rounding of every block linear, block after block on quantized inputs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from quantlab.calib.blocks import ModelBlocks
from quantlab.calib.capture import run_sequential
from quantlab.calib.parallel import Parallel
from quantlab.calib.stats import HessianAccumulator
from quantlab.formats.groupwise_int import GroupwiseIntResult, PackedGroupwiseInt, pack
from quantlab.formats.tensor_layout import dtype_from_name
from quantlab.methods.base import (
    CalibConfig,
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
from quantlab.methods.rtn import groupwise_options
from quantlab.models.arch import excluded, resolve
from quantlab.nn.swap import set_submodule
from quantlab.solvers.gptq import gptq_quantize

__all__ = ["METHOD", "GPTQConfig", "GPTQTerms", "gptq_options", "run_gptq"]


@dataclass(frozen=True)
class GPTQConfig(GroupwiseIntConfig):
    """GPTQ: Hessian-aware column-by-column rounding with error feedback.

    Attributes:
        damp_percent: damping added to the Hessian diagonal, as a fraction of its mean.
        block_size: columns per lazy batch update.
        act_order: quantize columns in order of decreasing Hessian diagonal.
        static_groups: with ``act_order``, fix each group's grid before the reordering so the
            checkpoint needs no ``g_idx`` permutation at inference.
        true_sequential: solve q/k/v, o, gate/up, down one after another within a block.
    """

    method: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True

    # GPTQ's reference quantizer offers this range search ("mse"); on SmolLM2 W4 g64 it takes the
    # eval ppl from 23.97 to 23.19, so it is on by default here.
    clip_search: bool = True
    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = True
    true_sequential: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"damp_percent must be in (0, 1), got {self.damp_percent}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.act_order and not self.static_groups:
            raise ValueError(
                "act_order without static_groups needs a per-column g_idx at inference, which the "
                "groupwise_int format does not store; keep static_groups=True"
            )


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
        """Before the first block, while the modules outside the blocks are on ``device`` (e.g.
        catch the block inputs of extra sequences)."""

    def block_start(self, index: int, block: nn.Module) -> None:
        """Block ``index`` is open on the device, its float weights not yet quantized."""

    def solver_options(
        self,
        index: int,
        block: nn.Module,
        group: Sequence[str],
        stats: dict[str, HessianAccumulator],
        owners: dict[str, int],
    ) -> dict[str, dict[str, Any]]:
        """Extra :func:`gptq_quantize` keyword arguments per linear of ``group``, computed just
        before the group is quantized (the block's earlier groups already are). ``"hessian"``
        replaces the calibration Hessian; ``"solver"`` replaces :func:`gptq_quantize` by a
        function that takes its arguments and the other extra ones and returns its result. May
        run ``block`` on other inputs.

        ``owners``: the rank that solves each quantized linear of ``group`` (all 0 in one
        process). Called on every rank (collectives go here); only the options of the linears
        this rank owns are used, and ``stats`` holds the reduced Hessian on their owners only."""
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
    blocks: ModelBlocks,
    progress: bool,
    terms: GPTQTerms | None = None,
    parallel: Parallel | None = None,
) -> None:
    """GPTQ over every block of ``model`` (as ``blocks`` brings them in) on calibration
    ``samples`` ``[S, L]``, with the extra objective ``terms`` of a derived method.

    In a multi-process run (``parallel``) each rank calibrates on its share of ``samples``, each
    linear is solved by one owner rank (balanced by :func:`solve_cost`) on the Hessian reduced
    from every rank, and the result is broadcast so that every rank goes on with the same
    quantized block."""
    parallel = parallel or Parallel.single()
    spec = resolve(model)
    scale_dtype = dtype_from_name(config.scale_dtype)
    # Solved layers wait for the block's end packed: int32 codes of a whole block (a mixture's
    # 384 experts: 2.3 GB at Qwen3-30B-A3B's shapes) would outweigh the block itself.
    pending: dict[str, PackedGroupwiseInt] = {}
    terms = terms or GPTQTerms()

    def on_group(
        index: int, block: nn.Module, group: Sequence[str], stats: dict[str, HessianAccumulator]
    ) -> None:
        members = [
            name
            for name in group
            if not excluded(f"{spec.blocks}.{index}.{name}", config.modules_to_not_convert)
        ]
        linears = {name: block.get_submodule(name) for name in members}
        # Weight-parallel: each linear's owner solves it on the Hessian of every rank's tokens.
        owners = linear_owners(parallel, linears, "gptq")
        if members:
            stats[group[0]].reduce_to_owners(parallel, list(owners.values()))
        options = terms.solver_options(index, block, group, stats, owners)

        def solve(name: str, linear: nn.Linear) -> GroupwiseIntResult:
            extra = dict(options.get(name, {}))
            hessian = extra.pop("hessian", None)
            solver = extra.pop("solver", gptq_quantize)
            return solver(
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
                name=f"{spec.blocks}.{index}.{name}",
                clip_search=config.clip_search,
                **extra,
            )

        solved = solve_on_owners(parallel, linears, owners, solve, GroupwiseIntResult)
        for name, (result, seconds) in solved.items():
            linear = linears[name]
            terms.layer_done(index, name, linear.weight.detach(), result)
            # Later groups and blocks must see this layer's quantized output.
            linear.weight.data.copy_(result.dequantize().to(linear.weight.dtype))
            pending[name] = pack(result, config.scale_dtype)
            report.layers.append(
                LayerReport(
                    f"{spec.blocks}.{index}.{name}",
                    *linear.weight.shape,
                    config.bits,
                    config.group_size,
                    result.loss,
                    seconds,
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

    run_sequential(
        blocks,
        spec.stages_of,
        samples,
        on_group,
        on_block_done,
        batch_size=calib.batch_size,
        true_sequential=config.true_sequential,
        progress=progress,
        on_start=lambda: terms.start(model, blocks.blocks, blocks.device),
        on_block_start=terms.block_start,
        parallel=parallel,
        min_tokens=calib.expert_min_tokens,
        max_stage_bytes=calib.max_stage_bytes,
        coverage=report.coverage,
    )


def _run(model: nn.Module, config: GPTQConfig, ctx: MethodContext) -> None:
    blocks = model_blocks(model, resolve(model), ctx)
    run_gptq(
        model, config, ctx.calib, ctx.samples("GPTQ"), ctx.report, blocks, ctx.progress,
        parallel=ctx.parallel,
    )  # fmt: skip


METHOD = Method(
    name="gptq",
    config_cls=GPTQConfig,
    run=_run,
    config_from_args=lambda args: GPTQConfig(**groupwise_options(args), **gptq_options(args)),
    export_formats=("quantlab", "gptq", "awq", "compressed-tensors"),
    help="Hessian-aware rounding with error feedback",
    runs_distributed=True,
    captures_hessians_sequentially=True,
)
