"""What every quantization method shares: the :class:`Method` record and the
:class:`MethodContext` its runner gets, the options every calibrated method takes
(:class:`CalibConfig`) and those of the groupwise-integer family (:class:`GroupwiseIntConfig`), the
per-layer report, the packing of a solved layer into its quantized module, and the choice of
calibration samples.

A method is one module of this package (or a folder, for the large ones) holding its config class
beside its runner; :mod:`quantlab.methods.registry` lists the built-in ones. Methods import this
module, the solvers, formats, layers and calibration code; never :mod:`quantlab.pipeline` (the
entry point that calls them) and never the registry.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from quantlab.calib.activations import ActivationStore
from quantlab.calib.blocks import ModelBlocks, WeightSource
from quantlab.calib.capture import GroupCoverage
from quantlab.calib.parallel import Parallel, assign_owners, solve_cost
from quantlab.formats.groupwise_int import (
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    GroupwiseIntResult,
    PackedGroupwiseInt,
    pack,
)
from quantlab.formats.tensor_layout import SCALE_DTYPES
from quantlab.models.arch import ArchSpec
from quantlab.nn.groupwise_int_linear import QuantLinear

__all__ = [
    "CalibConfig",
    "GroupwiseIntConfig",
    "LayerReport",
    "Method",
    "MethodContext",
    "QuantizationReport",
    "calibration_samples_for",
    "model_blocks",
    "packed_layer",
    "require_resident",
]

SCALE_DTYPE_NAMES = tuple(SCALE_DTYPES)

Result = TypeVar("Result")


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration tokens come from and how many.

    Attributes:
        source: a text source understood by :func:`quantlab.calib.data.load_text`.
        n_samples: number of token windows.
        seq_len: tokens per window.
        seed: seed of the window offsets.
        batch_size: windows per forward pass (``None`` = all at once, which is fastest).
        expert_min_tokens: a routed expert that fewer calibration tokens reach is solved as if
            its inputs were white noise (an identity Hessian: the method's data-free rounding,
            round-to-nearest for GPTQ); the report lists every such expert.
        calibrate_all_experts: every expert's statistics see every calibration token (the
            block's output still uses the router's choice), as llm-compressor's option of that
            name does.
        routing_weighted_hessians: a routed expert's Hessian weights each token by the routing
            weight the router gave it (``H_e = 2 sum_t w_te x_t x_t^T / sum_t w_te``: MoEQuant's
            affinity-guided Hessian, Chen et al., ICML 2025); Hessian-based methods only.
        max_stage_bytes: the most fp32 Hessian bytes one calibration pass gathers; a stage of
            more (a large mixture's experts) runs as several passes over the block, each within
            it (``None``: one pass per stage). Methods whose Hessians come from the sequential
            capture only.
    """

    source: str = "wiki-calib"
    n_samples: int = 32
    seq_len: int = 512
    seed: int = 0
    batch_size: int | None = None
    expert_min_tokens: int = 16
    calibrate_all_experts: bool = False
    routing_weighted_hessians: bool = False
    max_stage_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {self.batch_size}")
        if self.expert_min_tokens < 0:
            raise ValueError(f"expert_min_tokens must be >= 0, got {self.expert_min_tokens}")
        if self.max_stage_bytes is not None and self.max_stage_bytes < 1:
            raise ValueError(f"max_stage_bytes must be >= 1 or None, got {self.max_stage_bytes}")
        if self.calibrate_all_experts and self.routing_weighted_hessians:
            raise ValueError(
                "calibrate_all_experts and routing_weighted_hessians exclude each other: the "
                "tokens an expert sees only for calibration have no routing weight"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GroupwiseIntConfig:
    """Options shared by every method that emits the groupwise integer format.

    Attributes:
        bits: 2, 3, 4 or 8.
        group_size: 32, 64, 128, or -1 for one group per output channel.
        sym: symmetric grid (zero point 2^(bits-1)) instead of min/max with an integer zero point.
        scale_dtype: storage dtype of the scales.
        clip_search: shrink each group's range where that lowers its rounding error.
        modules_to_not_convert: module names (or shell patterns) left in full precision.
    """

    method: ClassVar[str] = ""
    version: ClassVar[int] = 1
    needs_calibration: ClassVar[bool] = False

    bits: int = 4
    group_size: int = 64
    sym: bool = False
    scale_dtype: str = "float16"
    clip_search: bool = False
    modules_to_not_convert: tuple[str, ...] = field(default=("lm_head",))

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"group_size must be one of {SUPPORTED_GROUP_SIZES} (-1 = per-channel), "
                f"got {self.group_size}"
            )
        if self.scale_dtype not in SCALE_DTYPE_NAMES:
            raise ValueError(
                f"scale_dtype must be one of {SCALE_DTYPE_NAMES}, got {self.scale_dtype!r}"
            )
        object.__setattr__(self, "modules_to_not_convert", tuple(self.modules_to_not_convert))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["modules_to_not_convert"] = list(self.modules_to_not_convert)
        return {"method": self.method, "version": self.version, **d}

    def describe(self) -> str:
        """One line for summaries: method and encoding."""
        return f"{self.method} W{self.bits} g{self.group_size} {'sym' if self.sym else 'asym'}"

    def max_linear_bits(self, out_features: int, in_features: int) -> int:
        """Upper bound of the stored bits of one linear quantized with this config, in any of the
        layouts its method exports (quantlab, GPTQ, AWQ)."""
        n, k = out_features, in_features
        groups = 1 if self.group_size == -1 else math.ceil(k / self.group_size)
        scale_bits = max(16, 8 * SCALE_DTYPES[self.scale_dtype].itemsize)
        return (
            n * 32 * math.ceil(k * self.bits / 32)  # codes, rows padded to 32-bit words
            + n * groups * (scale_bits + 16)  # a scale and a zero point (<= 16 bits) per group
            + 32 * (n + k)  # zero-point words padded per row; GPTQ's int32 g_idx per column
        )


@dataclass
class LayerReport:
    """One quantized layer: shape, encoding (``bits``: per weight, may be fractional;
    ``group_size``: ``None`` where the format has no groups), the solver's loss, its time."""

    name: str
    out_features: int
    in_features: int
    bits: float
    group_size: int | None
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
    # Seconds from the start (or the previous block's end) to each block's end: its calibration,
    # solving, evaluation and writing together.
    block_seconds: list[float] = field(default_factory=list)
    peak_rss_bytes: int | None = None
    peak_device_bytes: int | None = None
    # Perplexity of the quantized and of the unquantized model (PerplexityResult dicts), when the
    # run evaluated them.
    ppl: dict[str, Any] | None = None
    ppl_baseline: dict[str, Any] | None = None
    # Tokens that reached each sequential group's input (calibrated methods; summarised for
    # mixtures of experts under details["experts"]).
    coverage: list[GroupCoverage] = field(default_factory=list)

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
            "block_seconds": self.block_seconds,
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_device_bytes": self.peak_device_bytes,
            "ppl": self.ppl,
            "ppl_baseline": self.ppl_baseline,
        }


@dataclass
class MethodContext:
    """What a method runner gets besides the model and its config.

    Attributes:
        tokenizer: the model's tokenizer (``None`` when token ids were given).
        calib: calibration options.
        report: the report being filled (append :class:`LayerReport` rows,
            put method-specific figures under ``report.details[<method>]``).
        device: where blocks are processed.
        progress: show progress bars.
        given_samples: calibration token ids passed by the caller instead of ``calib``'s text.
        weights: streams the model's weights from its checkpoint, one block at a time
            (:class:`quantlab.calib.blocks.WeightSource`); ``None``: the model is in memory.
        block_sink: called with ``(index, block)`` once a block is quantized, before it is put
            away (a streaming export writes it there).
        block_open: called with ``(index, block)`` when a block is opened, before the method
            changes it (a baseline evaluation runs the float block there).
        activations: where calibration activations between blocks are kept (RAM up to a
            budget, then disk); ``None``: in RAM.
        parallel: this process's rank in a multi-process run (data-parallel calibration,
            weight-parallel solving: :mod:`quantlab.calib.parallel`); a single process by
            default.
    """

    tokenizer: Any
    calib: CalibConfig
    report: QuantizationReport
    device: torch.device
    progress: bool
    given_samples: torch.Tensor | None = None
    weights: WeightSource | None = None
    block_sink: Callable[[int, nn.Module], None] | None = None
    block_open: Callable[[int, nn.Module], None] | None = None
    activations: ActivationStore | None = None
    parallel: Parallel = field(default_factory=Parallel.single)
    _samples: torch.Tensor | None = field(default=None, repr=False)

    def samples(self, method: str) -> torch.Tensor:
        """Calibration token ids ``[S, L]``: the given ones, else ``calib``'s windows of its text
        (drawn once)."""
        if self._samples is None:
            self._samples = calibration_samples_for(
                self.tokenizer, self.calib, method, self.given_samples
            )
        return self._samples


@dataclass(frozen=True)
class Method:
    """One quantization method.

    Attributes:
        name: the ``--method`` / ``quantlab.quantize(method=...)`` name; equals
            ``config_cls.method``.
        config_cls: frozen, validating dataclass with ``method``/``version`` class variables,
            ``needs_calibration`` and ``to_dict()``.
        run: ``run(model, config, context)`` quantizes ``model`` in place.
        config_from_args: builds the config from the parsed ``quantlab quantize`` arguments (the
            shared ones, ``--bits``, ``--group-size``, ... included).
        add_arguments: adds the method's own options to the ``quantize`` parser (prefix them with
            the method's name unless the option is the method's alone by nature).
        export_formats: ``--format`` values its checkpoints can be written in.
        help: one line for ``--help``.
        whole_model: for a configuration that needs the whole model in memory at once (it cannot
            stream block by block), the reason; ``None`` for every other configuration.
        runs_distributed: it runs on several ranks (``ctx.parallel``: data-parallel
            calibration, weight-parallel solving); the others are refused in a multi-process run.
        captures_hessians_sequentially: its Hessians come from the sequential capture's hooks, so
            :attr:`CalibConfig.routing_weighted_hessians` and ``max_stage_bytes`` apply to it; the
            others refuse them.
    """

    name: str
    config_cls: type
    run: Callable[[nn.Module, Any, MethodContext], None]
    config_from_args: Callable[[argparse.Namespace], Any]
    add_arguments: Callable[[argparse._ArgumentGroup], None] | None = None
    export_formats: tuple[str, ...] = ("quantlab",)
    help: str = ""
    whole_model: Callable[[Any], str | None] | None = None
    runs_distributed: bool = False
    captures_hessians_sequentially: bool = False

    def whole_model_reason(self, config: Any) -> str | None:
        """Why ``config`` needs the whole model in memory (None: it streams)."""
        return None if self.whole_model is None else self.whole_model(config)

    def __post_init__(self) -> None:
        if getattr(self.config_cls, "method", None) != self.name:
            raise ValueError(
                f"method {self.name!r}: {self.config_cls.__name__}.method is "
                f"{getattr(self.config_cls, 'method', None)!r}"
            )


def model_blocks(model: nn.Module, spec: ArchSpec, ctx: MethodContext) -> ModelBlocks:
    """The decoder blocks of ``model`` as this run processes them: on ``ctx.device``, streamed
    from the checkpoint when ``ctx.weights`` is set, handed to ``ctx.block_sink`` when done."""
    return ModelBlocks(
        model,
        spec.blocks,
        ctx.device,
        source=ctx.weights,
        skip_for_capture=(spec.final_norm, spec.lm_head),
        on_done=ctx.block_sink,
        on_open=ctx.block_open,
        activations=ctx.activations,
    )


def require_resident(ctx: MethodContext, what: str, why: str) -> None:
    """Refuse a streamed run (``ctx.weights`` set) of ``what``, at the start, saying ``why``."""
    if ctx.weights is not None:
        raise ValueError(
            f"{what} cannot run on a model streamed block by block from its checkpoint: {why}. "
            "Load the model in memory (quantlab.quantize on a model object) to use it."
        )


def packed_layer(
    result: GroupwiseIntResult | PackedGroupwiseInt,
    linear: nn.Linear,
    config: GroupwiseIntConfig,
    name: str,
) -> QuantLinear:
    """The :class:`QuantLinear` holding ``result`` (a solver's result, or one already packed with
    ``config.scale_dtype``), on ``linear``'s device with its bias."""
    packed = result if isinstance(result, PackedGroupwiseInt) else pack(result, config.scale_dtype)
    layer = QuantLinear.from_packed(packed, linear.bias, name=name)
    return layer.to(linear.weight.device)


def calibration_samples_for(
    tokenizer: Any, calib: CalibConfig, method: str, given: torch.Tensor | None
) -> torch.Tensor:
    """Calibration token ids ``[S, L]``: ``given`` (checked), else ``calib``'s windows."""
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


def linear_owners(parallel: Parallel, linears: dict[str, nn.Linear], method: str) -> dict[str, int]:
    """The rank that solves each of ``linears`` (solved side by side), balanced by
    :func:`quantlab.calib.parallel.solve_cost` for ``method``; all rank 0 in one process."""
    costs = [solve_cost(method, m.in_features, m.out_features) for m in linears.values()]
    return dict(zip(linears, assign_owners(costs, parallel.world_size), strict=True))


def solve_on_owners(
    parallel: Parallel,
    linears: dict[str, nn.Linear],
    owners: dict[str, int],
    solve: Callable[[str, nn.Linear], Result],
    kind: type[Result],
) -> dict[str, tuple[Result, float]]:
    """Weight-parallel solving: each linear's owner runs ``solve(name, linear)``; an error on any
    rank stops every rank (:meth:`Parallel.settle`); then every rank receives every result (a
    dataclass of ``kind``, :meth:`Parallel.broadcast_record`, on the linear's device).
    Returns, per linear in ``linears``' order, its result and the seconds its owner spent on it
    (0 on the other ranks). One process: every linear solved here, errors raised as they are."""
    solved: dict[str, tuple[Result, float]] = {}
    error: BaseException | None = None
    try:
        for name, linear in linears.items():
            if owners[name] == parallel.rank:
                start = time.perf_counter()
                solved[name] = (solve(name, linear), time.perf_counter() - start)
    except Exception as failure:  # every rank stops with it at the agreement point
        error = failure
    parallel.settle(error)
    shared: dict[str, tuple[Result, float]] = {}
    for name, linear in linears.items():
        mine, seconds = solved.pop(name, (None, 0.0))
        result = parallel.broadcast_record(mine, owners[name], kind, linear.weight.device)
        shared[name] = (result, seconds)
    return shared
