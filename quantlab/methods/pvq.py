"""PVQ: pyramid vector quantization of every block linear in a randomly rotated input space, with
GPTQ-style error feedback over whole vectors (block after block, on quantized inputs).

Orchestration only: the math is in :mod:`quantlab.solvers.pvq` and
:mod:`quantlab.transforms.rotation`, the
layout in :mod:`quantlab.formats.pvq`, the layer in :mod:`quantlab.nn.pvq_linear`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from quantlab.calib.blocks import WeightSource
from quantlab.calib.capture import run_sequential
from quantlab.calib.stats import HessianAccumulator
from quantlab.formats.pvq import PVQMeta, PVQResult, pack
from quantlab.formats.pvq_codebook import MAX_CODE_BITS, PVQParams
from quantlab.methods.base import (
    LayerReport,
    Method,
    MethodContext,
    linear_owners,
    model_blocks,
    solve_on_owners,
)
from quantlab.models.arch import ArchSpec, excluded, get_submodule, resolve
from quantlab.nn.pvq_linear import PVQLinear
from quantlab.nn.swap import set_submodule
from quantlab.solvers.pvq import pvq_quantize
from quantlab.transforms.rotation import random_signs

__all__ = [
    "Candidate",
    "PVQConfig",
    "candidate_params",
    "choose_params",
    "layer_seed",
    "model_bits_per_weight",
    "resolve_params",
]


class RowSource(Protocol):
    """A weight matrix the encoding choice samples rows from: a tensor, or a streamed model's
    :class:`quantlab.export.lazy_model.StoredWeight` (only the sampled rows are read)."""

    @property
    def shape(self) -> Sequence[int]: ...

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor: ...


# Vector lengths the automatic choice considers. Longer vectors code more efficiently, but the
# 63-bit code limit caps D at 16 for rates above ~3.9 bits/weight (D = 16: 63 bits = 3.94 b/w).
DEFAULT_DIMS = (8, 12, 16)
# More amplitude levels than this never paid for their bits in the search (the amplitudes of a
# rotated row are concentrated, chi-distributed around the row scale).
MAX_AUTO_LEVELS = 64


@dataclass(frozen=True)
class PVQConfig:
    """PVQ of every block linear.

    Attributes:
        bits_per_weight: the rate target: the automatic choice picks the encoding with the lowest
            measured distortion whose whole-model storage (codes, row scales, levels, rotation
            signs) stays at or below it.
        dim, pulses, levels: fix the encoding instead (``D`` weights per vector, ``P`` pulses,
            ``L`` amplitude levels). ``dim`` alone restricts the search to that vector length;
            ``dim`` and ``pulses`` without ``levels`` take the most levels the rate allows.
        dims: vector lengths the automatic choice tries (each must divide every layer's width).
        hessian: GPTQ-style error feedback with the calibration Hessians (``False``: each vector
            to its nearest code, no calibration).
        hessian_search: score the pulse moves (``search_moves`` of them, at least 1) under each
            vector's Hessian metric instead of in weight space; amplitudes always use the metric
            when ``hessian``. Measured on SmolLM2: 7% less layer loss, no perplexity gain, twice
            the time, so off by default.
        search_moves: rounds of single-pulse moves after the greedy pyramid search (0 = greedy).
        damp_percent: damping added to the Hessian diagonal, as a fraction of its mean.
        block_size: columns per lazy error-feedback update.
        true_sequential: solve q/k/v, o, gate/up, down one after another within a block.
        seed: seed of the rotation signs (each layer's signs come from it and the layer's name).
        modules_to_not_convert: module names (or shell patterns) left in full precision.
    """

    method: ClassVar[str] = "pvq"
    version: ClassVar[int] = 1
    needs_calibration: ClassVar[bool] = True

    bits_per_weight: float = 3.25
    dim: int | None = None
    pulses: int | None = None
    levels: int | None = None
    dims: tuple[int, ...] = DEFAULT_DIMS
    hessian: bool = True
    hessian_search: bool = False
    search_moves: int = 0
    damp_percent: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    seed: int = 0
    modules_to_not_convert: tuple[str, ...] = field(default=("lm_head",))

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(self.dims))
        object.__setattr__(self, "modules_to_not_convert", tuple(self.modules_to_not_convert))
        if not (math.isfinite(self.bits_per_weight) and 0.5 <= self.bits_per_weight <= 16):
            raise ValueError(f"bits_per_weight must be in [0.5, 16], got {self.bits_per_weight}")
        if self.pulses is not None and self.dim is None:
            raise ValueError("pulses needs dim (the pyramid is P(dim, pulses))")
        if self.levels is not None and self.pulses is None:
            raise ValueError("levels needs dim and pulses")
        if self.dim is not None and not 2 <= self.dim <= 64:
            raise ValueError(f"dim must be in [2, 64], got {self.dim}")
        if not self.dims or any(not 2 <= d <= 64 for d in self.dims):
            raise ValueError(
                f"dims must be a non-empty tuple of values in [2, 64], got {self.dims}"
            )
        if self.dim is not None and self.pulses is not None and self.levels is not None:
            PVQParams(self.dim, self.pulses, self.levels)  # raises naming the bad field
        if self.search_moves < 0:
            raise ValueError(f"search_moves must be >= 0, got {self.search_moves}")
        if self.hessian_search and (not self.hessian or self.search_moves < 1):
            raise ValueError(
                f"hessian_search needs hessian=True and search_moves >= 1, got hessian="
                f"{self.hessian}, search_moves={self.search_moves}"
            )
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"damp_percent must be in (0, 1), got {self.damp_percent}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dims"] = list(self.dims)
        d["modules_to_not_convert"] = list(self.modules_to_not_convert)
        return {"method": self.method, "version": self.version, **d}

    def describe(self) -> str:
        if self.dim is not None and self.pulses is not None and self.levels is not None:
            enc = f"D={self.dim} P={self.pulses} L={self.levels}"
        else:
            enc = f"<= {self.bits_per_weight:g} bits/weight"
        return f"pvq {enc}{' hessian' if self.hessian else ''}"

    def max_linear_bits(self, out_features: int, in_features: int) -> int:
        """Upper bound of the stored bits of one linear: ``bits_per_weight <= 16`` by validation,
        all its tensors included, plus a row of slack."""
        return 16 * out_features * in_features + 64 * out_features


# ---------------------------------------------------------------------------------------------
# Choosing the encoding


@dataclass(frozen=True)
class Candidate:
    """One encoding the automatic choice scored."""

    dim: int
    pulses: int
    levels: int
    code_bits: int
    bits_per_weight: float
    distortion: float | None = None  # relative squared error on the sampled weights

    @property
    def params(self) -> PVQParams:
        return PVQParams(self.dim, self.pulses, self.levels)


def layer_seed(seed: int, name: str) -> int:
    """The rotation seed of the layer at module path ``name`` (stable across runs and Pythons)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFF


def model_bits_per_weight(shapes: Sequence[tuple[int, int]], params: PVQParams) -> float:
    """Stored bits per weight over layers of ``(out, in)`` ``shapes`` (format version 1)."""
    bits = weights = 0
    for (n, k), count in Counter(shapes).items():
        bits += count * PVQMeta(k, n, params.dim, params.pulses, params.levels).storage_bits()
        weights += count * n * k
    return bits / weights


def candidate_params(
    shapes: Sequence[tuple[int, int]],
    bits_per_weight: float,
    dims: Sequence[int],
    pulses: int | None = None,
    max_levels: int = MAX_AUTO_LEVELS,
) -> list[Candidate]:
    """Every ``(D, P, L)`` worth scoring for a rate target: per ``D``, the widest code that keeps
    the model at or below ``bits_per_weight``, and each pulse count that leaves it 1 to
    ``max_levels`` amplitude levels (or only ``pulses``, with the most levels that fit)."""
    widths = {k for _, k in shapes}
    out: list[Candidate] = []
    for d in dims:
        if any(k % d for k in widths):
            continue
        # Codes alone cost bits / D per weight: start from the widest code that can fit.
        top = min(MAX_CODE_BITS, math.floor(bits_per_weight * d))
        for bits in range(top, 0, -1):
            options = []
            for p in range(1, 256) if pulses is None else (pulses,):
                levels = PVQParams.max_levels(d, p, bits)
                if levels < 1:
                    break
                if pulses is None and levels > max_levels:
                    continue
                params = PVQParams(d, p, levels)
                if params.code_bits != bits:
                    continue
                rate = model_bits_per_weight(shapes, params)
                if rate <= bits_per_weight + 1e-12:
                    options.append(Candidate(d, p, levels, bits, rate))
            if options:
                # Several pulse counts can leave the same number of levels; the most pulses wins.
                best: dict[int, Candidate] = {}
                for c in options:
                    if c.levels not in best or c.pulses > best[c.levels].pulses:
                        best[c.levels] = c
                out += sorted(best.values(), key=lambda c: c.pulses)
                break
    return out


def _sample_rows(
    weights: Sequence[RowSource], rows_per_layer: int, seed: int
) -> dict[int, torch.Tensor]:
    """A few random rows of every layer, grouped by width."""
    gen = torch.Generator().manual_seed(seed)
    by_width: dict[int, list[torch.Tensor]] = {}
    for w in weights:
        idx = torch.randperm(w.shape[0], generator=gen)[:rows_per_layer]
        by_width.setdefault(w.shape[1], []).append(w[idx].detach().to(torch.float32))
    return {k: torch.cat(v) for k, v in by_width.items()}


def choose_params(
    weights: Sequence[RowSource],
    bits_per_weight: float,
    dims: Sequence[int] = DEFAULT_DIMS,
    pulses: int | None = None,
    rows_per_layer: int = 16,
    seed: int = 0,
) -> tuple[Candidate, list[Candidate]]:
    """Pick the encoding with the least distortion at (or under) a rate, on the model's weights.

    Every candidate of :func:`candidate_params` quantizes a sample of weight rows (a few rows of
    every layer, rotated as the layers will be) with plain PVQ, its amplitude levels fitted to
    that sample, and is scored by the relative squared error ``||W - Q||^2 / ||W||^2`` over all
    sampled rows (the rotation is orthogonal, so this is also the error in the rotated space).

    Returns:
        The best candidate and every scored candidate (for the report).
    """
    shapes = [(w.shape[0], w.shape[1]) for w in weights]
    cands = candidate_params(shapes, bits_per_weight, dims, pulses)
    if not cands:
        raise ValueError(
            f"no PVQ encoding with vectors of {list(dims)} weights fits {bits_per_weight} bits "
            f"per weight for these layer widths {sorted({k for _, k in shapes})}; raise "
            "bits_per_weight or allow other dims"
        )
    sample = _sample_rows(weights, rows_per_layer, seed)
    scored = []
    for cand in cands:
        err = ref = 0.0
        for k, rows in sample.items():
            q = pvq_quantize(rows, cand.params, random_signs(k, seed)).dequantize()
            err += float(((rows - q) ** 2).sum(dtype=torch.float64))
            ref += float((rows**2).sum(dtype=torch.float64))
        scored.append(dataclasses.replace(cand, distortion=err / ref))
    best = min(scored, key=lambda c: (c.distortion, c.bits_per_weight))
    return best, scored


# ---------------------------------------------------------------------------------------------
# Running


def _quantized_linears(model: nn.Module, spec: ArchSpec, config: PVQConfig) -> list[str]:
    blocks = get_submodule(model, spec.blocks)
    return [
        f"{spec.blocks}.{i}.{name}"
        for i in range(len(blocks))
        for name in spec.linears_of(blocks[i])
        if not excluded(f"{spec.blocks}.{i}.{name}", config.modules_to_not_convert)
    ]


def resolve_params(
    model: nn.Module, spec: ArchSpec, config: PVQConfig, source: WeightSource | None = None
) -> tuple[PVQParams, dict[str, Any]]:
    """The encoding for ``model`` under ``config`` and what the choice saw (for the report).
    ``source``: a streamed model's checkpoint, which the choice samples rows of without loading
    the blocks."""
    names = _quantized_linears(model, spec, config)
    if not names:
        raise ValueError("no block linear is left to quantize (check modules_to_not_convert)")
    weights: list[RowSource] = [
        model.get_submodule(n).weight if source is None else source.stored_weight(f"{n}.weight")
        for n in names
    ]
    if config.dim is not None and config.pulses is not None and config.levels is not None:
        params = PVQParams(config.dim, config.pulses, config.levels)
        return params, {"chosen_by": "config", "candidates": []}
    dims = (config.dim,) if config.dim is not None else config.dims
    start = time.perf_counter()
    best, scored = choose_params(
        weights, config.bits_per_weight, dims, config.pulses, seed=config.seed
    )
    info = {
        "chosen_by": "least distortion on sampled rotated weights",
        "seconds": time.perf_counter() - start,
        "candidates": [dataclasses.asdict(c) for c in scored],
    }
    return best.params, info


def _run(model: nn.Module, config: PVQConfig, ctx: MethodContext) -> None:
    spec = resolve(model)
    blocks = model_blocks(model, spec, ctx)
    params, choice = resolve_params(model, spec, config, ctx.weights)
    start = time.perf_counter()
    pending: dict[str, PVQResult] = {}

    parallel = ctx.parallel

    def quantize(
        index: int,
        block: nn.Module,
        group: Sequence[str],
        stats: dict[str, HessianAccumulator] | None,
    ) -> None:
        linears = {
            name: block.get_submodule(name)
            for name in group
            if not excluded(f"{spec.blocks}.{index}.{name}", config.modules_to_not_convert)
        }
        # Weight-parallel: each linear's owner solves it (on the Hessian of every rank's tokens).
        owners = linear_owners(parallel, linears, "pvq" if stats is not None else "pvq-no-hessian")
        if stats is not None and linears:
            stats[group[0]].reduce_to_owners(parallel, list(owners.values()))

        def solve(name: str, linear: nn.Linear) -> PVQResult:
            full = f"{spec.blocks}.{index}.{name}"
            return pvq_quantize(
                linear.weight.detach(),
                params,
                random_signs(linear.in_features, layer_seed(config.seed, full)),
                hessian=None if stats is None else stats[name].hessian(),
                damp_percent=config.damp_percent,
                block_size=config.block_size,
                search_moves=config.search_moves,
                hessian_search=config.hessian_search,
                name=full,
            )

        for name, (result, seconds) in solve_on_owners(
            parallel, linears, owners, solve, PVQResult
        ).items():
            linear = linears[name]
            # Later groups and blocks must see this layer's quantized output.
            linear.weight.data.copy_(result.dequantize().to(linear.weight.dtype))
            pending[name] = result
            meta = PVQMeta(
                linear.in_features, linear.out_features, params.dim, params.pulses, params.levels
            )
            ctx.report.layers.append(
                LayerReport(
                    f"{spec.blocks}.{index}.{name}",
                    linear.out_features,
                    linear.in_features,
                    meta.bits_per_weight(),
                    None,
                    result.loss,
                    seconds,
                )
            )

    def on_block_done(index: int, block: nn.Module) -> None:
        for name, result in pending.items():
            linear = block.get_submodule(name)
            layer = PVQLinear.from_packed(
                pack(result), linear.bias, name=f"{spec.blocks}.{index}.{name}"
            )
            set_submodule(block, name, layer.to(linear.weight.device))
        pending.clear()

    if config.hessian:

        def on_group(
            index: int,
            block: nn.Module,
            group: Sequence[str],
            stats: dict[str, HessianAccumulator],
        ) -> None:
            quantize(index, block, group, stats)

        run_sequential(
            blocks,
            spec.stages_of,
            ctx.samples("PVQ"),
            on_group,
            on_block_done,
            batch_size=ctx.calib.batch_size,
            true_sequential=config.true_sequential,
            progress=ctx.progress,
            parallel=parallel,
            min_tokens=ctx.calib.expert_min_tokens,
            max_stage_bytes=ctx.calib.max_stage_bytes,
            coverage=ctx.report.coverage,
        )
    else:
        for index in tqdm(range(len(blocks)), desc="pvq", disable=not ctx.progress):
            with blocks.open(index) as block:
                quantize(index, block, spec.linears_of(block), None)
                on_block_done(index, block)

    shapes = [(layer.out_features, layer.in_features) for layer in ctx.report.layers]
    ctx.report.details["pvq"] = {
        "dim": params.dim,
        "pulses": params.pulses,
        "levels": params.levels,
        "code_bits": params.code_bits,
        "bits_per_weight": model_bits_per_weight(shapes, params) if shapes else None,
        "seconds": time.perf_counter() - start,
        **choice,
    }


def _add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--bits-per-weight",
        type=float,
        default=3.25,
        help="PVQ rate target (all stored bits of the quantized linears, per weight); the "
        "encoding with the least measured distortion at or below it is chosen",
    )
    group.add_argument("--pvq-dim", type=int, default=None, help="weights per PVQ vector")
    group.add_argument("--pvq-pulses", type=int, default=None, help="pulses per PVQ vector")
    group.add_argument("--pvq-levels", type=int, default=None, help="PVQ amplitude levels")
    group.add_argument(
        "--pvq-no-hessian",
        action="store_true",
        help="PVQ without error feedback (nearest code per vector, no calibration)",
    )
    group.add_argument(
        "--pvq-hessian-search",
        action="store_true",
        help="score pulse moves under each vector's Hessian metric (about 2x slower)",
    )
    group.add_argument(
        "--pvq-search-moves",
        type=int,
        default=None,
        help="rounds of single-pulse moves after the greedy pyramid search (default 0, or 2 "
        "with --pvq-hessian-search)",
    )
    group.add_argument("--pvq-seed", type=int, default=0, help="seed of the rotation signs")


def _config_from_args(args: argparse.Namespace) -> PVQConfig:
    return PVQConfig(
        bits_per_weight=args.bits_per_weight,
        dim=args.pvq_dim,
        pulses=args.pvq_pulses,
        levels=args.pvq_levels,
        hessian=not args.pvq_no_hessian,
        hessian_search=args.pvq_hessian_search,
        search_moves=(2 if args.pvq_hessian_search else 0)
        if args.pvq_search_moves is None
        else args.pvq_search_moves,
        damp_percent=args.damp_percent,
        true_sequential=not args.no_true_sequential,
        seed=args.pvq_seed,
    )


METHOD = Method(
    name="pvq",
    config_cls=PVQConfig,
    run=_run,
    config_from_args=_config_from_args,
    add_arguments=_add_arguments,
    help="pyramid vector quantization in a rotated space, Hessian-aware",
    runs_distributed=True,
    captures_hessians_sequentially=True,
)
