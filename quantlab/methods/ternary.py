"""Ternary (1.58-bit) post-training quantization: every block linear becomes a
:class:`~quantlab.nn.ternary_linear.TernaryLinear` (``W = s * t``, ``t`` in ``{-1, 0, +1}``).

Solvers (``quantlab/solvers/ternary.py``): ``absmean`` (BitNet b1.58's rule, no calibration),
``mse`` (the L2-optimal scale per granule, no calibration) and ``gptq`` (Hessian-aware: GPTQ error
feedback over the ternary grid with least-squares scale refits, block by block on quantized
inputs). Ternary PTQ of a model that was not trained for it loses a lot; see docs/methods/ternary.md
for the measured figures.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn
from tqdm.auto import tqdm

from quantlab.calib.capture import run_sequential
from quantlab.calib.stats import HessianAccumulator
from quantlab.formats.tensor_layout import SCALE_DTYPES, dtype_from_name
from quantlab.formats.ternary import GROUP_SIZES, TernaryResult, granularity_name, pack
from quantlab.formats.ternary_packing import PACKINGS, PER_ROW, PER_TENSOR
from quantlab.methods.base import (
    LayerReport,
    Method,
    MethodContext,
    QuantizationReport,
    linear_owners,
    model_blocks,
    solve_on_owners,
)
from quantlab.models.arch import excluded, resolve
from quantlab.nn.swap import set_submodule
from quantlab.nn.ternary_linear import TernaryLinear
from quantlab.solvers.ternary import (
    SCALE_RULES,
    absmean_ternarize,
    gptq_ternarize,
    mse_ternarize,
)

__all__ = ["SOLVERS", "TernaryConfig", "ternary_layer"]

SOLVERS = ("absmean", "mse", "gptq")
_GRANULARITIES = {"tensor": PER_TENSOR, "row": PER_ROW}


@dataclass(frozen=True)
class TernaryConfig:
    """Ternary PTQ of every block linear.

    Attributes:
        solver: ``"absmean"`` (BitNet), ``"mse"`` (L2-optimal scales) or ``"gptq"``
            (Hessian-aware; needs calibration).
        group_size: scale granularity: ``0`` per tensor (BitNet), ``-1`` per output row, or 32 /
            64 / 128 input columns per scale.
        packing: ``"i2"`` (2 bits per trit) or ``"tq1"`` (5 trits per byte, 1.6 bits).
        scale_dtype: storage dtype of the scales.
        scale_rule: ``gptq``'s initial scales: ``"mse"`` (L2-optimal, Hessian-diagonal weighted)
            or ``"absmean"``.
        refit_rounds: ``gptq``: least-squares scale refits on the output error, each but the last
            followed by another error-feedback pass (0 = keep the initial scales).
        damp_percent, block_size, act_order, true_sequential: GPTQ's options.
        modules_to_not_convert: module names (or shell patterns) left in full precision.
    """

    method: ClassVar[str] = "ternary"
    version: ClassVar[int] = 1

    solver: str = "gptq"
    group_size: int = 64
    packing: str = "i2"
    scale_dtype: str = "float16"
    scale_rule: str = "mse"
    refit_rounds: int = 2
    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = True
    true_sequential: bool = True
    modules_to_not_convert: tuple[str, ...] = field(default=("lm_head",))

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        allowed = (PER_TENSOR, PER_ROW, *GROUP_SIZES)
        if self.group_size not in allowed:
            raise ValueError(
                f"group_size must be one of {allowed} (0 = per tensor, -1 = per row), "
                f"got {self.group_size}"
            )
        if self.packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {self.packing!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(
                f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {self.scale_dtype!r}"
            )
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"scale_rule must be one of {SCALE_RULES}, got {self.scale_rule!r}")
        if self.refit_rounds < 0:
            raise ValueError(f"refit_rounds must be >= 0, got {self.refit_rounds}")
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"damp_percent must be in (0, 1), got {self.damp_percent}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        object.__setattr__(self, "modules_to_not_convert", tuple(self.modules_to_not_convert))

    @property
    def needs_calibration(self) -> bool:
        """Only the Hessian-aware solver reads calibration data."""
        return self.solver == "gptq"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["modules_to_not_convert"] = list(self.modules_to_not_convert)
        return {"method": self.method, "version": self.version, **d}

    def describe(self) -> str:
        return f"ternary {self.solver} {granularity_name(self.group_size)} {self.packing}"

    def max_linear_bits(self, out_features: int, in_features: int) -> int:
        """Upper bound of the stored bits of one linear: at most 2 bits per weight plus scales,
        bounded by 16 bits per weight and a row of slack."""
        return 16 * out_features * in_features + 64 * out_features


def ternary_layer(
    result: TernaryResult, linear: nn.Linear, config: TernaryConfig, name: str
) -> TernaryLinear:
    """The :class:`TernaryLinear` holding ``result``, on ``linear``'s device with its bias."""
    packed = pack(result, config.packing, config.scale_dtype)
    layer = TernaryLinear.from_packed(packed, linear.bias, name=name)
    return layer.to(linear.weight.device)


def _layer_report(
    name: str, linear: nn.Linear, layer: TernaryLinear, loss: float | None, seconds: float
) -> LayerReport:
    n, k = linear.weight.shape
    group = layer.group_size if layer.group_size > 0 else None
    return LayerReport(name, n, k, layer.storage_bits() / (n * k), group, loss, seconds)


def _details(config: TernaryConfig, zeros: dict[str, float]) -> dict[str, Any]:
    return {
        "solver": config.solver,
        "granularity": granularity_name(config.group_size),
        "packing": config.packing,
        "zero_fraction": sum(zeros.values()) / max(len(zeros), 1),
        "zero_fraction_by_layer": zeros,
    }


def _run_calibration_free(model: nn.Module, config: TernaryConfig, ctx: MethodContext) -> None:
    spec = resolve(model)
    blocks = model_blocks(model, spec, ctx)
    scale_dtype = dtype_from_name(config.scale_dtype)
    zeros: dict[str, float] = {}

    def solve(full: str, linear: nn.Linear) -> TernaryResult:
        if config.solver == "absmean":
            return absmean_ternarize(linear.weight, config.group_size, scale_dtype, full)
        return mse_ternarize(linear.weight, config.group_size, scale_dtype, name=full)

    for index in tqdm(range(len(blocks)), desc="ternary", disable=not ctx.progress):
        with blocks.open(index) as block:
            linears = {
                f"{spec.blocks}.{index}.{name}": block.get_submodule(name)
                for name in spec.linears_of(block)
                if not excluded(f"{spec.blocks}.{index}.{name}", config.modules_to_not_convert)
            }
            # On several ranks each linear is ternarized by one owner (balanced by size) and
            # broadcast: the rules are pure functions of the weight, so the result is the single
            # process's bit for bit.
            owners = linear_owners(ctx.parallel, linears, f"ternary-{config.solver}")
            solved = solve_on_owners(ctx.parallel, linears, owners, solve, TernaryResult)
            for full, (result, seconds) in solved.items():
                linear = linears[full]
                layer = ternary_layer(result, linear, config, full)
                set_submodule(block, full.removeprefix(f"{spec.blocks}.{index}."), layer)
                zeros[full] = result.zero_fraction
                ctx.report.layers.append(_layer_report(full, linear, layer, None, seconds))
    ctx.report.details["ternary"] = _details(config, zeros)


def _run_gptq(model: nn.Module, config: TernaryConfig, ctx: MethodContext) -> None:
    spec = resolve(model)
    scale_dtype = dtype_from_name(config.scale_dtype)
    pending: dict[str, tuple[TernaryResult, float]] = {}
    zeros: dict[str, float] = {}
    report: QuantizationReport = ctx.report
    parallel = ctx.parallel

    def on_group(
        index: int, block: nn.Module, group: Sequence[str], stats: dict[str, HessianAccumulator]
    ) -> None:
        linears = {
            name: block.get_submodule(name)
            for name in group
            if not excluded(f"{spec.blocks}.{index}.{name}", config.modules_to_not_convert)
        }
        # Weight-parallel: each linear's owner solves it on the Hessian of every rank's tokens.
        owners = linear_owners(parallel, linears, "ternary")
        if linears:
            stats[group[0]].reduce_to_owners(parallel, list(owners.values()))

        def solve(name: str, linear: nn.Linear) -> TernaryResult:
            return gptq_ternarize(
                linear.weight.detach(),
                stats[name].hessian(),
                group_size=config.group_size,
                scale_dtype=scale_dtype,
                scale_rule=config.scale_rule,
                damp_percent=config.damp_percent,
                block_size=config.block_size,
                act_order=config.act_order,
                refit_rounds=config.refit_rounds,
                name=f"{spec.blocks}.{index}.{name}",
            )

        shared = solve_on_owners(parallel, linears, owners, solve, TernaryResult)
        for name, solved in shared.items():
            result = solved[0]
            # Later groups and blocks must see this layer's quantized output.
            linears[name].weight.data.copy_(result.dequantize().to(linears[name].weight.dtype))
            pending[name] = solved

    def on_block_done(index: int, block: nn.Module) -> None:
        for name, (result, seconds) in pending.items():
            full = f"{spec.blocks}.{index}.{name}"
            linear = block.get_submodule(name)
            layer = ternary_layer(result, linear, config, full)
            set_submodule(block, name, layer)
            zeros[full] = result.zero_fraction
            report.layers.append(_layer_report(full, linear, layer, result.loss, seconds))
        pending.clear()

    run_sequential(
        model_blocks(model, spec, ctx),
        spec.stages_of,
        ctx.samples("ternary"),
        on_group,
        on_block_done,
        batch_size=ctx.calib.batch_size,
        true_sequential=config.true_sequential,
        progress=ctx.progress,
        parallel=parallel,
        min_tokens=ctx.calib.expert_min_tokens,
        max_stage_bytes=ctx.calib.max_stage_bytes,
        coverage=report.coverage,
    )
    report.details["ternary"] = _details(config, zeros)


def _run(model: nn.Module, config: TernaryConfig, ctx: MethodContext) -> None:
    if config.solver == "gptq":
        _run_gptq(model, config, ctx)
    else:
        _run_calibration_free(model, config, ctx)


def _add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--ternary-solver",
        default="gptq",
        choices=list(SOLVERS),
        help="absmean (BitNet b1.58's rule), mse (L2-optimal scales) or gptq (Hessian-aware, "
        "default)",
    )
    group.add_argument(
        "--ternary-scales",
        default="group",
        choices=["tensor", "row", "group"],
        help="one scale per tensor (BitNet), per output row, or per --group-size columns (default)",
    )
    group.add_argument(
        "--ternary-packing",
        default="i2",
        choices=list(PACKINGS),
        help="i2: 2 bits per trit (default); tq1: 5 trits per byte (1.6 bits)",
    )
    group.add_argument(
        "--ternary-scale-rule",
        default="mse",
        choices=list(SCALE_RULES),
        help="gptq's initial scales (default mse)",
    )
    group.add_argument(
        "--ternary-refit-rounds",
        type=int,
        default=2,
        help="gptq: least-squares scale refits on the output error (default 2)",
    )


def _config_from_args(args: argparse.Namespace) -> TernaryConfig:
    granularity = args.ternary_scales
    group_size = _GRANULARITIES.get(granularity, args.group_size)
    if granularity == "group" and group_size not in GROUP_SIZES:
        raise ValueError(
            f"--ternary-scales group needs --group-size in {GROUP_SIZES}, got {args.group_size}"
        )
    return TernaryConfig(
        solver=args.ternary_solver,
        group_size=group_size,
        packing=args.ternary_packing,
        scale_dtype=args.scale_dtype,
        scale_rule=args.ternary_scale_rule,
        refit_rounds=args.ternary_refit_rounds,
        damp_percent=args.damp_percent,
        act_order=not args.no_act_order,
        true_sequential=not args.no_true_sequential,
    )


METHOD = Method(
    name="ternary",
    config_cls=TernaryConfig,
    run=_run,
    config_from_args=_config_from_args,
    add_arguments=_add_arguments,
    help="ternary 1.58-bit weights (BitNet absmean, L2-optimal or Hessian-aware)",
    runs_distributed=True,
    captures_hessians_sequentially=True,
)
