"""BitStack: activation-aware scaling, then every block linear decomposed into ~1-bit residual
blocks, then one global loading order so any memory budget maps to a prefix of the blocks.

This module registers the method (:data:`METHOD`: runner, CLI options); the parts live beside it:
the options in :mod:`quantlab.methods.bitstack.config`, the decomposition in
:mod:`quantlab.methods.bitstack.decompose`, the prefix distillation in
:mod:`quantlab.methods.bitstack.distill`, the loading order in
:mod:`quantlab.methods.bitstack.ordering`.
"""

from __future__ import annotations

import argparse
import time

from torch import nn

from quantlab.methods.base import Method, MethodContext, require_resident
from quantlab.methods.bitstack.config import ORDERS, BitStackConfig
from quantlab.methods.bitstack.decompose import decompose_model, fixed_bytes
from quantlab.methods.bitstack.ordering import order_blocks
from quantlab.solvers.bitstack import SVD_METHODS

__all__ = ["METHOD"]


def _whole_model(config: BitStackConfig) -> str | None:
    if config.distill_steps:
        return (
            "BitStack's prefix distillation (--bitstack-distill-steps) trains the compressed "
            "prefix of every layer against the float model's outputs, all blocks at once; without "
            "it (the paper's method) the model streams"
        )
    if config.order == "ppl":
        return (
            "BitStack's measured-ppl order (--bitstack-order ppl) evaluates the whole model once "
            "per layer and stage; --bitstack-order hessian (free, from the decomposition) streams"
        )
    return None


def _run(model: nn.Module, config: BitStackConfig, ctx: MethodContext) -> None:
    reason = _whole_model(config)
    if reason is not None:
        if ctx.parallel.active:
            raise ValueError(
                f"this BitStack configuration does not run on several ranks "
                f"({ctx.parallel.world_size} were started): {reason}. Run it in a single process"
            )
        require_resident(ctx, "this BitStack configuration", reason)
    decomposition = decompose_model(model, config, ctx)
    records, skipped_maps = decomposition.records, decomposition.skipped_maps
    decompose_seconds, distill = decomposition.seconds, decomposition.distill

    order_start = time.perf_counter()
    errors = {name: r.errors for name, r in records.items()}
    order, measured = order_blocks(model, config, ctx, errors)
    fixed = fixed_bytes(model, element_bytes=2)
    base = sum(r.block_bytes for r in records.values())
    stage_bytes = [fixed + base]
    for stage in range(1, config.n_blocks):
        stage_bytes.append(
            stage_bytes[-1]
            + sum(r.block_bytes for r in records.values() if len(r.errors) - 1 > stage)
        )
    ctx.report.details["bitstack"] = {
        "decompose_seconds": decompose_seconds,
        "order_seconds": time.perf_counter() - order_start,
        "svd_seconds": sum(r.svd_seconds for r in records.values()),
        "skipped_maps": skipped_maps,
        "fixed_bytes_fp16": fixed,
        "stage_bytes_fp16": stage_bytes,
        "order": [[name, block] for name, block in order],
        "step_bytes": [records[name].block_bytes for name, _ in order],
        "output_errors": {name: r.errors for name, r in records.items()},
        "order_ppl": measured,
        "distill": distill,
    }


def _add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--blocks", type=int, default=16, help="BitStack: residual blocks per linear (default 16)"
    )
    group.add_argument(
        "--rank", type=int, default=2, help="BitStack: rank of each block's magnitude (default 2)"
    )
    group.add_argument(
        "--bitstack-order",
        default="hessian",
        choices=list(ORDERS),
        help="BitStack: order blocks by calibration output error per byte (hessian, free) or by "
        "measured validation ppl (ppl; (blocks-1) x layers evaluations)",
    )
    group.add_argument(
        "--bitstack-order-max-stage",
        type=int,
        default=None,
        help="BitStack ppl order: measure only the first stages, score the rest by hessian",
    )
    group.add_argument(
        "--bitstack-alpha",
        type=float,
        default=0.5,
        help="BitStack: exponent of the activation scales (0 = no scaling; default 0.5, the "
        "paper's 1 measured worse with error-feedback signs)",
    )
    group.add_argument(
        "--bitstack-svd", default="lowrank", choices=list(SVD_METHODS), help="BitStack: SVD method"
    )
    group.add_argument(
        "--bitstack-no-feedback",
        action="store_true",
        help="BitStack: choose each block's signs as sign(residual) (the paper's rule) instead of "
        "with GPTQ's error feedback on the layer's Hessian",
    )
    group.add_argument(
        "--bitstack-replay-blocks",
        type=int,
        default=0,
        help="BitStack: calibrate each decoder block on the earlier blocks compressed to this "
        "many residual blocks per linear (0 = float inputs, the paper's choice)",
    )
    group.add_argument(
        "--bitstack-distill-steps",
        type=int,
        default=0,
        help="BitStack: tune the first --bitstack-distill-blocks blocks' magnitude factors by "
        "distillation from the float model for this many steps (0 = off, the paper's choice)",
    )
    group.add_argument(
        "--bitstack-distill-blocks",
        type=int,
        default=2,
        help="BitStack: the prefix (blocks per linear) the distillation tunes (default 2)",
    )
    group.add_argument(
        "--bitstack-distill-lr",
        type=float,
        default=5e-4,
        help="BitStack: distillation learning rate",
    )


def _config_from_args(args: argparse.Namespace) -> BitStackConfig:
    return BitStackConfig(
        n_blocks=args.blocks,
        rank=args.rank,
        scale_alpha=args.bitstack_alpha,
        svd=args.bitstack_svd,
        order=args.bitstack_order,
        order_max_stage=args.bitstack_order_max_stage,
        error_feedback=not args.bitstack_no_feedback,
        replay_blocks=args.bitstack_replay_blocks,
        distill_steps=args.bitstack_distill_steps,
        distill_blocks=args.bitstack_distill_blocks,
        distill_lr=args.bitstack_distill_lr,
        damp_percent=args.damp_percent,
        seed=args.seed,
    )


METHOD = Method(
    name="bitstack",
    config_cls=BitStackConfig,
    run=_run,
    config_from_args=_config_from_args,
    add_arguments=_add_arguments,
    export_formats=("quantlab",),
    help="sign x low-rank residual blocks, loadable to any memory budget",
    whole_model=_whole_model,
    runs_distributed=True,
)
