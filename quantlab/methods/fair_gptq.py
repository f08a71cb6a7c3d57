"""Fair-GPTQ: GPTQ with a group-bias term, calibrated on stereotype / anti-stereotype pairs.

Everything GPTQ does is unchanged (:func:`quantlab.methods.gptq.run_gptq`: the calibration text's
Hessians, act-order, clip search, true-sequential replay). Fair-GPTQ adds a
:class:`~quantlab.methods.gptq.GPTQTerms`: the calibration half of a pair set runs in lockstep
through the model (:class:`quantlab.calib.paired.PairStream`); for each debiased linear the
group-bias matrix ``D`` of its paired inputs is accumulated just before the linear is quantized,
and the linear is quantized by :func:`quantlab.solvers.fair_gptq.fair_gptq_quantize` with
``fair_hessian=D, fair_alpha=alpha``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from quantlab.calib.paired import ALIGNMENTS, PairStream, pair_batches
from quantlab.calib.pairs import (
    SPLITS,
    SentencePair,
    load_pairs,
    split_pairs,
    target_swap_pairs,
)
from quantlab.calib.parallel import Parallel
from quantlab.calib.stats import HessianAccumulator
from quantlab.formats.groupwise_int import GroupwiseIntResult
from quantlab.methods.base import Method, MethodContext, model_blocks
from quantlab.methods.gptq import GPTQConfig, GPTQTerms, gptq_options, run_gptq
from quantlab.methods.rtn import groupwise_options
from quantlab.models.arch import ArchSpec, get_submodule, resolve
from quantlab.solvers.fair_gptq import (
    bias_subspace,
    check_fair_alpha,
    fair_gptq_quantize,
    group_bias_term,
)

__all__ = ["FairGPTQConfig", "fair_layer_indices"]

# The output projections (they write into the residual stream), per architecture family's naming:
# Llama/Mistral/Qwen/Gemma/Phi-3 o_proj and down_proj, OPT out_proj and fc2. Patterns that match
# nothing in a model are ignored as long as one matches.
# The attention's and the MLP's output projections (a mixture's shared expert is its MLP that every
# token reaches; routed experts are never debiased, see _debiased_names).
_OUTPUT_PROJECTIONS = (
    "self_attn.o_proj",
    "mlp.down_proj",
    "self_attn.out_proj",
    "fc2",
    "mlp.shared_expert.down_proj",
    "mlp.shared_experts.down_proj",
)
PAIR_KINDS = ("group", "target", "both")
_LAYER_PRESETS = ("all", "lower", "upper", "lower-upper")


def _parse_layer_list(spec: str) -> list[int]:
    layers: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first = int(lo)
            last = int(hi) if sep else first
        except ValueError:
            raise ValueError(
                f"fair_layers: {part!r} is not a layer index or range; use {_LAYER_PRESETS} or "
                "indices and ranges such as '0,1,28-29'"
            ) from None
        if first < 0 or last < first:
            raise ValueError(f"fair_layers: bad range {part!r} (need 0 <= first <= last)")
        layers += range(first, last + 1)
    if not layers:
        raise ValueError("fair_layers: empty layer list")
    return sorted(set(layers))


def fair_layer_indices(spec: str, n_layers: int) -> list[int]:
    """Decoder-block indices a ``fair_layers`` spec selects in a model with ``n_layers`` blocks.

    ``all``; ``lower`` / ``upper``: the first / last ``k`` blocks, ``k`` = 10% of the depth
    rounded up, then up to an even number (the reference's Fair-GPTQ_l / _u); ``lower-upper``:
    ``k / 2`` at each end (_lu); or a list of indices and ranges (``"0,1,28-29"``).
    """
    if spec == "all":
        return list(range(n_layers))
    if spec in ("lower", "upper", "lower-upper"):
        k = math.ceil(n_layers * 10 / 100)
        k += k % 2
        k = min(k, n_layers)
        if spec == "lower":
            return list(range(k))
        if spec == "upper":
            return list(range(n_layers - k, n_layers))
        half = max(1, k // 2)
        return sorted(set(range(half)) | set(range(n_layers - half, n_layers)))
    layers = _parse_layer_list(spec)
    if layers[-1] >= n_layers:
        raise ValueError(
            f"fair_layers {spec!r} selects block {layers[-1]}, but the model has {n_layers} "
            f"blocks (0..{n_layers - 1})"
        )
    return layers


@dataclass(frozen=True)
class FairGPTQConfig(GPTQConfig):
    """Fair-GPTQ: GPTQ plus ``fair_alpha * ||Q (X0 - X1)||^2`` on the debiased linears.

    Attributes:
        fair_alpha: weight of the group-bias term (0 = plain GPTQ).
        fair_layers: decoder blocks whose linears are debiased (see :func:`fair_layer_indices`).
        fair_modules: names (or shell patterns) inside a block of the debiased linears; the
            default is the output projections.
        fair_pairs: pair source (:func:`quantlab.calib.pairs.load_pairs`).
        fair_pairs_split: which half of the source calibrates (the other is for evaluation).
        fair_max_pairs: use only the first this many calibration pairs (``None`` = all).
        fair_sum_hessians: exact shift (invert ``H + alpha D``) or first-order (invert ``H``).
        fair_pairs_in_hessian: add the pair sentences' tokens to the ordinary Hessian of the
            debiased linears (weighted by token count), as the reference, which calibrates on
            pairs only, implicitly does.
        fair_alignment: which token positions of a pair are compared
            (:func:`quantlab.calib.paired.align_positions`).
        fair_pair_batch: pairs per forward batch.
        fair_pair_kind: which pairs calibrate the term: ``group`` (the source's pairs, which
            differ in the group word), ``target`` (counterfactual pairs that name the same group
            with targets stereotyped the other way, :func:`quantlab.calib.pairs.target_swap_pairs`;
            the difference then sits *before* the group word) or ``both``.
        fair_rank: restrict ``D`` to its this many leading directions relative to ``H``
            (:func:`quantlab.solvers.fair_gptq.bias_subspace`); ``None`` keeps all of it.
    """

    method: ClassVar[str] = "fair-gptq"

    fair_alpha: float = 0.1
    fair_layers: str = "all"
    fair_modules: tuple[str, ...] = _OUTPUT_PROJECTIONS
    fair_pairs: str = "quantlab"
    fair_pairs_split: str = "calib"
    fair_max_pairs: int | None = None
    fair_sum_hessians: bool = True
    fair_pairs_in_hessian: bool = False
    fair_alignment: str = "span"
    fair_pair_batch: int = 64
    fair_pair_kind: str = "group"
    fair_rank: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fair_alpha(self.fair_alpha, "fair-gptq")
        if self.fair_layers not in _LAYER_PRESETS:
            _parse_layer_list(self.fair_layers)
        object.__setattr__(self, "fair_modules", tuple(self.fair_modules))
        if not self.fair_modules or not all(isinstance(m, str) and m for m in self.fair_modules):
            raise ValueError(
                f"fair_modules must be a non-empty list of module names, got {self.fair_modules}"
            )
        if self.fair_pairs_split not in SPLITS:
            raise ValueError(
                f"fair_pairs_split must be one of {SPLITS}, got {self.fair_pairs_split!r}"
            )
        if self.fair_max_pairs is not None and self.fair_max_pairs < 1:
            raise ValueError(f"fair_max_pairs must be >= 1 or None, got {self.fair_max_pairs}")
        if self.fair_alignment not in ALIGNMENTS:
            raise ValueError(
                f"fair_alignment must be one of {ALIGNMENTS}, got {self.fair_alignment!r}"
            )
        if self.fair_pair_batch < 1:
            raise ValueError(f"fair_pair_batch must be >= 1, got {self.fair_pair_batch}")
        if self.fair_rank is not None and self.fair_rank < 1:
            raise ValueError(f"fair_rank must be >= 1 or None, got {self.fair_rank}")
        if self.fair_pair_kind not in PAIR_KINDS:
            raise ValueError(
                f"fair_pair_kind must be one of {PAIR_KINDS}, got {self.fair_pair_kind!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["fair_modules"] = list(self.fair_modules)
        return d

    def describe(self) -> str:
        modules = ",".join(m.rsplit(".", 1)[-1] for m in self.fair_modules)
        return f"{super().describe()} alpha={self.fair_alpha:g} layers={self.fair_layers} {modules}"

    def gptq_config(self) -> GPTQConfig:
        """The plain GPTQ configuration underneath."""
        return GPTQConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(GPTQConfig)})


def _debiased_names(spec: ArchSpec, patterns: Sequence[str]) -> list[str]:
    """The block linears ``patterns`` name. Routed experts are never debiased: the two sentences
    of a pair route their tokens to different experts, so an expert has no aligned token pairs to
    form ``X0 - X1`` from (they get plain GPTQ; attention and shared or dense MLPs are
    debiased)."""
    names = [
        name
        for name in spec.block_linears
        if "*" not in name
        and any(name == p or fnmatch.fnmatch(name, p) or name.endswith("." + p) for p in patterns)
    ]
    if not names:
        raise ValueError(
            f"fair_modules {list(patterns)} match no linear of a {spec.family} block; its linears "
            f"are {list(spec.block_linears)}"
        )
    return names


class _FairTerms(GPTQTerms):
    """The group-bias term: ``D`` per debiased linear from the pair stream.

    On several ranks each rank carries its share of the pair batches; ``D`` (and the pair
    tokens' Hessian) is reduced to the owners of the debiased linears that read it, and each
    layer's bias-term figures are gathered from its owner once its block is done."""

    def __init__(
        self,
        config: FairGPTQConfig,
        stream: PairStream,
        layers: Sequence[int],
        names: Sequence[str],
        blocks_path: str,
        device: torch.device,
        parallel: Parallel,
    ) -> None:
        self.config = config
        self.stream = stream
        self.layers = set(layers)
        self.last_layer = max(layers)
        self.names = set(names)
        self.blocks_path = blocks_path
        self.device = device
        self.parallel = parallel
        self.bias_matrices: dict[tuple[int, str], torch.Tensor] = {}
        # This block's debiased linears, in solving order, with their owners and (on the owner)
        # [bias term before, after, layer loss].
        self.block_rows: dict[str, tuple[int, list[float]]] = {}
        self.rows: list[dict[str, Any]] = []
        self.seconds = 0.0

    def start(self, model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
        start = time.perf_counter()
        self.stream.start(model, blocks, self.device)
        self.seconds += time.perf_counter() - start

    def solver_options(
        self,
        index: int,
        block: nn.Module,
        group: Sequence[str],
        stats: dict[str, HessianAccumulator],
        owners: dict[str, int],
    ) -> dict[str, dict[str, Any]]:
        in_layer = index in self.layers
        debiased = [n for n in group if n in owners and n in self.names] if in_layer else []
        if not debiased:
            return {}
        start = time.perf_counter()
        diff, pair_hessian = self.stream.accumulate(
            index, block, group[0], self.device, with_hessian=self.config.fair_pairs_in_hessian
        )
        solvers = [owners[n] for n in debiased]
        diff.reduce_to_owners(self.parallel, solvers)
        if pair_hessian is not None:
            pair_hessian.reduce_to_owners(self.parallel, solvers)
        nan = float("nan")
        self.block_rows.update((n, (owners[n], [nan, nan, nan])) for n in debiased)
        mine = [n for n in debiased if owners[n] == self.parallel.rank]
        if not mine:
            self.seconds += time.perf_counter() - start
            return {}
        d = diff.matrix()
        text = stats[group[0]]
        options: dict[str, Any] = dict(
            solver=fair_gptq_quantize,
            fair_alpha=self.config.fair_alpha,
            sum_hessians=self.config.fair_sum_hessians,
        )
        if pair_hessian is not None:
            # Token-weighted average of the two Hessians, i.e. one Hessian over both token sets.
            n_text, n_pairs = text.n_tokens, pair_hessian.n_tokens
            options["hessian"] = (text.hessian() * n_text + pair_hessian.hessian() * n_pairs) / (
                n_text + n_pairs
            )
        options["fair_hessian"] = d
        if self.config.fair_rank is not None:
            hessian = options["hessian"] if pair_hessian is not None else text.hessian()
            rank = min(self.config.fair_rank, d.shape[0])
            options["fair_hessian"] = bias_subspace(d, hessian, rank, self.config.damp_percent)
        for name in mine:
            self.bias_matrices[(index, name)] = d
        self.seconds += time.perf_counter() - start
        return dict.fromkeys(mine, options)

    def layer_done(
        self, index: int, name: str, weight: torch.Tensor, result: GroupwiseIntResult
    ) -> None:
        d = self.bias_matrices.pop((index, name), None)
        if d is None:
            return
        before = group_bias_term(weight, d)
        after = group_bias_term(result.dequantize(), d)
        loss = float("nan") if result.loss is None else result.loss
        self.block_rows[name] = (self.block_rows[name][0], [before, after, loss])

    def block_done(self, index: int, block: nn.Module) -> None:
        start = time.perf_counter()
        # Every rank's figures, each layer's taken from its owner (one process: its own).
        mine = [value for _, values in self.block_rows.values() for value in values]
        gathered = self.parallel.gather_floats(mine)
        for i, (name, (owner, _)) in enumerate(self.block_rows.items()):
            before, after, loss = gathered[owner][3 * i : 3 * i + 3]
            self.rows.append(
                {
                    "name": f"{self.blocks_path}.{index}.{name}",
                    "bias_term_before": before,
                    "bias_term_after": after,
                    "bias_term_ratio": after / before if before > 0 else None,
                    "loss": None if math.isnan(loss) else loss,
                }
            )
        self.block_rows.clear()
        if index < self.last_layer:
            self.stream.advance(index, block, self.device)
        elif index == self.last_layer:
            self.stream.release()  # no later block is debiased
        self.seconds += time.perf_counter() - start


def calibration_pairs(config: FairGPTQConfig) -> list[SentencePair]:
    """The pairs the group-bias term is calibrated on: the configured half of the source, as
    given (``group``), turned into target-swapped pairs (``target``), or both; then capped."""
    half = split_pairs(load_pairs(config.fair_pairs), config.fair_pairs_split)
    if not half:
        raise ValueError(f"the {config.fair_pairs_split} half of {config.fair_pairs!r} is empty")
    pairs = [] if config.fair_pair_kind == "target" else list(half)
    if config.fair_pair_kind in ("target", "both"):
        swapped = target_swap_pairs(half)
        if not swapped:
            raise ValueError(
                f"fair_pair_kind={config.fair_pair_kind!r} needs pairs with a target column whose "
                f"sentences differ only in it and the group word (the shipped 'quantlab' set); "
                f"{config.fair_pairs!r} has none"
            )
        pairs += swapped
    if config.fair_max_pairs is not None:
        pairs = pairs[: config.fair_max_pairs]
    return pairs


def _run(model: nn.Module, config: FairGPTQConfig, ctx: MethodContext) -> None:
    samples = ctx.samples("Fair-GPTQ")
    if config.fair_alpha == 0.0:
        # No group-bias term: exactly GPTQ, without the cost of capturing the pairs.
        blocks = model_blocks(model, resolve(model), ctx)
        run_gptq(
            model, config.gptq_config(), ctx.calib, samples, ctx.report, blocks, ctx.progress,
            parallel=ctx.parallel,
        )  # fmt: skip
        ctx.report.details["fair-gptq"] = {"alpha": 0.0, "debiased": []}
        return
    if ctx.tokenizer is None:
        raise ValueError("fair-gptq needs a tokenizer to encode its calibration sentence pairs")
    spec = resolve(model)
    blocks = get_submodule(model, spec.blocks)
    layers = fair_layer_indices(config.fair_layers, len(blocks))
    names = _debiased_names(spec, config.fair_modules)
    pairs = calibration_pairs(config)
    batches = pair_batches(ctx.tokenizer, pairs, config.fair_pair_batch, config.fair_alignment)
    parallel = ctx.parallel
    if len(batches) < parallel.world_size:
        raise ValueError(
            f"{len(batches)} batches of sentence pairs for {parallel.world_size} ranks: every rank "
            "needs at least one; lower --fair-pair-batch (pairs per batch) or use fewer ranks"
        )
    # Data-parallel: each rank carries its share of the pair batches.
    stream = PairStream(batches[parallel.share(len(batches))])
    terms = _FairTerms(config, stream, layers, names, spec.blocks, ctx.device, parallel)
    run_gptq(
        model,
        config.gptq_config(),
        ctx.calib,
        samples,
        ctx.report,
        model_blocks(model, spec, ctx),
        ctx.progress,
        terms=terms,
        parallel=parallel,
    )
    ratios = [r["bias_term_ratio"] for r in terms.rows if r["bias_term_ratio"] is not None]
    ctx.report.details["fair-gptq"] = {
        "alpha": config.fair_alpha,
        "pairs": len(pairs),
        "pair_source": config.fair_pairs,
        "pair_split": config.fair_pairs_split,
        "pair_kind": config.fair_pair_kind,
        "pair_positions": int(sum(b.stereo_index.numel() for b in batches)),
        "layers": layers,
        "modules": names,
        "pair_seconds": terms.seconds,
        "mean_bias_term_ratio": sum(ratios) / len(ratios) if ratios else None,
        "debiased": terms.rows,
    }


def _add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--fair-alpha",
        type=float,
        default=0.1,
        help="weight of the group-bias term alpha * ||Q (X0 - X1)||^2 (0 = plain GPTQ)",
    )
    group.add_argument(
        "--fair-layers",
        default="all",
        help="debiased decoder blocks: all, lower, upper, lower-upper (10%% of the depth, as the "
        "reference's _l/_u/_lu), or indices/ranges such as 0,1,28-29",
    )
    group.add_argument(
        "--fair-modules",
        default=",".join(_OUTPUT_PROJECTIONS),
        help="comma-separated linears (names inside a block, shell patterns allowed) to debias "
        "(default: the output projections)",
    )
    group.add_argument(
        "--fair-pairs",
        default="quantlab",
        help="calibration pairs: quantlab (shipped), stereoset, crows-pairs (hub), or a "
        "CrowS-Pairs .csv / StereoSet .json / .jsonl file; its calibration half is used",
    )
    group.add_argument("--fair-max-pairs", type=int, default=None, help="cap on calibration pairs")
    group.add_argument(
        "--fair-sum-hessians",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="exact shift W (H + aD)^-1 H (default) or the first-order W - W aD H^-1",
    )
    group.add_argument(
        "--fair-pairs-in-hessian",
        action="store_true",
        help="add the pair sentences' tokens to the ordinary Hessian of the debiased linears",
    )
    group.add_argument(
        "--fair-alignment",
        default="span",
        choices=list(ALIGNMENTS),
        help="compare pair tokens around the differing span (default) or position by position",
    )
    group.add_argument(
        "--fair-pair-kind",
        default="group",
        choices=list(PAIR_KINDS),
        help="calibrate on the pairs as given (differ in the group word, default), on "
        "target-swapped pairs (same group word, opposite-stereotype targets), or both",
    )
    group.add_argument(
        "--fair-rank",
        type=int,
        default=None,
        help="keep only this many leading directions of the pair-difference matrix, relative to "
        "the Hessian (default: all)",
    )


def _config_from_args(args: argparse.Namespace) -> FairGPTQConfig:
    return FairGPTQConfig(
        **groupwise_options(args),
        **gptq_options(args),
        fair_alpha=args.fair_alpha,
        fair_layers=args.fair_layers,
        fair_modules=tuple(m.strip() for m in args.fair_modules.split(",") if m.strip()),
        fair_pairs=args.fair_pairs,
        fair_max_pairs=args.fair_max_pairs,
        fair_sum_hessians=args.fair_sum_hessians,
        fair_pairs_in_hessian=args.fair_pairs_in_hessian,
        fair_alignment=args.fair_alignment,
        fair_pair_kind=args.fair_pair_kind,
        fair_rank=args.fair_rank,
    )


METHOD = Method(
    name="fair-gptq",
    config_cls=FairGPTQConfig,
    run=_run,
    config_from_args=_config_from_args,
    add_arguments=_add_arguments,
    export_formats=("quantlab", "gptq", "awq", "compressed-tensors"),
    help="GPTQ with a group-bias term from stereotype/anti-stereotype pairs",
    runs_distributed=True,
    captures_hessians_sequentially=True,
)
