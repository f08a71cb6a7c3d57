"""AWQ: activation-aware scales and clips folded into the float model, then RTN (or GPTQ)
rounding.

It runs on several ranks (``ctx.parallel``): the smoothing's statistics are data-parallel with
the same decisions on every rank and a weight-parallel clip search
(:mod:`quantlab.methods.awq.smoothing`), and the rounding is RTN's or GPTQ's own distributed
solve."""

from __future__ import annotations

import argparse
from dataclasses import asdict

import torch
from torch import nn

from quantlab.methods.awq.config import AWQConfig
from quantlab.methods.awq.smoothing import AWQSmoother, apply_awq
from quantlab.methods.base import Method, MethodContext, model_blocks
from quantlab.methods.gptq import GPTQTerms, gptq_options, run_gptq
from quantlab.methods.rtn import groupwise_options, rtn_block
from quantlab.models.arch import resolve


class _SmoothThenGPTQ(GPTQTerms):
    """AWQ's smoothing of each block as GPTQ opens it: one pass over the blocks. The smoothing
    runs on its own stream of float block outputs (AWQ's), GPTQ on the quantized ones (GPTQ's), so
    the result is that of smoothing every block first and running GPTQ after."""

    def __init__(self, smoother: AWQSmoother) -> None:
        self.smoother = smoother

    def start(self, model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
        self.smoother.start(blocks)

    def block_start(self, index: int, block: nn.Module) -> None:
        self.smoother.process(index, block)


def _run(model: nn.Module, config: AWQConfig, ctx: MethodContext) -> None:
    spec = resolve(model)
    samples = ctx.samples("AWQ")
    blocks = model_blocks(model, spec, ctx)
    if config.rounding == "rtn":

        def round_block(index: int, block: nn.Module) -> None:
            rtn_block(index, block, spec, config, ctx.report, ctx.parallel)

        smoothing = apply_awq(
            blocks,
            spec,
            samples,
            config,
            batch_size=ctx.calib.batch_size,
            on_block=round_block,
            progress=ctx.progress,
            parallel=ctx.parallel,
            min_tokens=ctx.calib.expert_min_tokens,
            coverage=ctx.report.coverage,
        )
    else:
        # The smoother calibrates on this rank's windows of the scored and the other sequences,
        # GPTQ on its own share of them (run_sequential); each reduces over every rank.
        smoother = AWQSmoother(
            model,
            spec,
            samples,
            config,
            ctx.device,
            ctx.calib.batch_size,
            blocks.activations,
            ctx.parallel,
            ctx.calib.expert_min_tokens,
            ctx.report.coverage,
        )
        run_gptq(
            model,
            config.gptq_config(),
            ctx.calib,
            samples,
            ctx.report,
            blocks,
            ctx.progress,
            terms=_SmoothThenGPTQ(smoother),
            parallel=ctx.parallel,
        )
        smoother.release()
        smoothing = smoother.report
    ctx.report.details["awq"] = {
        "seconds": smoothing.seconds,
        "maps": [asdict(m) for m in smoothing.maps],
        "skipped_maps": smoothing.skipped_maps,
        "clipped": len(smoothing.clipped),
    }


def _add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--awq-rounding",
        default="rtn",
        choices=["rtn", "gptq"],
        help="round the scaled, clipped weights to nearest (AWQ proper) or with GPTQ",
    )
    group.add_argument(
        "--awq-scales",
        default="both",
        choices=["duo", "plain", "both"],
        help="scale form: x^a/w^(1-a) (duo, AutoAWQ's default), x^a (plain, the paper's), "
        "or search both (default; the better one per layer group)",
    )
    group.add_argument(
        "--awq-search-samples",
        type=int,
        default=4,
        help="calibration sequences each scale candidate is scored on",
    )
    group.add_argument("--no-awq-clip", action="store_true", help="skip the clip search")
    group.add_argument(
        "--awq-full-grid",
        action="store_true",
        help="score all 20 grid points instead of every other one and the best's neighbours",
    )


def _config_from_args(args: argparse.Namespace) -> AWQConfig:
    return AWQConfig(
        **groupwise_options(args),
        scale_modes=("plain", "duo") if args.awq_scales == "both" else (args.awq_scales,),
        search_samples=args.awq_search_samples,
        coarse_to_fine=not args.awq_full_grid,
        apply_clip=not args.no_awq_clip,
        rounding=args.awq_rounding,
        **gptq_options(args),
    )


METHOD = Method(
    name="awq",
    config_cls=AWQConfig,
    run=_run,
    config_from_args=_config_from_args,
    add_arguments=_add_arguments,
    export_formats=("quantlab", "gptq", "awq", "compressed-tensors"),
    help="activation-aware scale search and clipping",
    runs_distributed=True,
)
