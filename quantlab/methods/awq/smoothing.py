"""AWQ applied to a float model, block by block: search and fold input scales, then clip.

For each decoder block (alone on the compute device): one float forward over every calibration
batch records each linear group's input statistics (mean ``|x|``, per-group Gram matrices) and the
inspected modules' calls on the first ``search_samples`` sequences, and yields the block's output,
which is the next block's input. Then, in forward order, every smoothing map of the architecture
gets its scales searched (:func:`quantlab.solvers.awq.search_scales`) and folded
(:func:`quantlab.transforms.fold.fold_smooth_map`); then every linear except the architecture's
``clip_skip`` ones gets its clipping thresholds. The block stays float and computes the same
function up to the clipping; a rounding solver then rounds it while it is still open (RTN through
:func:`apply_awq`'s ``on_block``; GPTQ runs :class:`AWQSmoother` from its own block loop), so a
model streamed from its checkpoint is read once.

As in llm-awq, the next block sees the *float* block output: scaling is output-preserving, so the
only difference rounding would make is what a later GPTQ pass accounts for.

On several ranks (:mod:`quantlab.calib.parallel`) the statistics are data-parallel and the
decisions identical everywhere: each rank runs its share of the scored sequences and its share
of the others (:func:`rank_windows`; the union is what one process runs), the mean ``|x|`` is
reduced to every rank in a fixed order, each scale candidate's loss is the mean over every
rank's scored elements (the same float on every rank, hence the same choice and the same folded
scales), and the clip search is weight-parallel: each clipped linear's owner searches it on the
Gram matrices reduced to it and broadcasts the thresholds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from quantlab.calib.activations import ActivationStore
from quantlab.calib.blocks import ModelBlocks
from quantlab.calib.capture import (
    BlockInputs,
    GroupCoverage,
    ModuleCall,
    capture_block_inputs,
    run_block_with_taps,
)
from quantlab.calib.parallel import Parallel
from quantlab.calib.stats import ChannelStatsAccumulator
from quantlab.formats.tensor_layout import dtype_from_name
from quantlab.methods.awq.config import AWQConfig
from quantlab.methods.base import linear_owners, solve_on_owners
from quantlab.models.arch import ArchSpec, SmoothMap, expand_smooth_maps, smooth_maps_for
from quantlab.solvers.awq import (
    apply_clip,
    linear_output_mse,
    linear_output_sse,
    output_mse,
    output_sse,
    search_clip,
    search_scales,
)
from quantlab.transforms.fold import fold_smooth_map, smooth_map_applies

__all__ = [
    "AWQSmoother",
    "ClipThresholds",
    "MapReport",
    "SmoothingReport",
    "apply_awq",
    "rank_windows",
]


@dataclass
class MapReport:
    """What the scale search chose for one smoothing map of one block."""

    block: int
    prev: str
    alpha: float | None
    duo: bool
    loss: float
    base_loss: float


@dataclass
class SmoothingReport:
    maps: list[MapReport] = field(default_factory=list)
    skipped_maps: list[str] = field(default_factory=list)
    clipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class ClipThresholds:
    """One linear's clip search result, as its owner rank broadcasts it: fp32 ``[N, G]``."""

    max_val: torch.Tensor


def _first_batch_sizes(n_samples: int, batch_size: int | None, search_samples: int) -> int:
    """Calibration batch size: the scored sequences form the first batch(es) exactly."""
    size = min(search_samples, n_samples)
    if batch_size is not None:
        size = min(size, batch_size)
    return max(1, size)


def _scored_windows(n_samples: int, per_batch: int, search_samples: int) -> int:
    """How many of the first windows one process scores: the whole batches that hold the first
    ``search_samples`` (more than ``search_samples`` when ``per_batch`` does not divide it)."""
    batches = -(-min(search_samples, n_samples) // per_batch)
    return min(n_samples, batches * per_batch)


def rank_windows(n_samples: int, n_scored: int, parallel: Parallel) -> tuple[slice, slice]:
    """This rank's calibration windows: its contiguous share of the scored windows
    ``[0, n_scored)`` and its share of the others ``[n_scored, n_samples)``.

    The shares of each part differ by at most one window; the scored part's extra windows go to
    the first ranks and the others' extra to the last, so that every rank gets at least one
    window when there are at least as many windows as ranks, even where a rank scores nothing
    (fewer scored windows than ranks). Over all ranks the union is every window, each once, and
    the scored ones are exactly one process's. One process: ``[0, n_scored)`` and the rest.

    Raises:
        ValueError: fewer windows than ranks (:meth:`Parallel.share`'s refusal).
    """
    parallel.share(n_samples)  # every rank needs a window: refuse as data-parallel GPTQ does
    rank, world = parallel.rank, parallel.world_size
    base, extra = divmod(n_scored, world)
    start = rank * base + min(rank, extra)
    scored = slice(start, start + base + (1 if rank < extra else 0))
    base, extra = divmod(n_samples - n_scored, world)
    first_with_extra = world - extra
    start = n_scored + rank * base + max(0, rank - first_with_extra)
    others = slice(start, start + base + (1 if rank >= first_with_extra else 0))
    return scored, others


class AWQSmoother:
    """AWQ's search and folding, one block at a time, on its own stream of float block inputs.

    :meth:`start` catches the first block's inputs (the modules outside the blocks must be on the
    device); :meth:`process` then smooths and clips each block in order, in place, and replaces
    the stored inputs by that block's float outputs. Standalone (:func:`apply_awq`) or inside
    another method's block loop (GPTQ rounding: the block is smoothed as it is opened, then GPTQ
    solves it on its own, quantized, input stream).
    """

    def __init__(
        self,
        model: nn.Module,
        spec: ArchSpec,
        samples: torch.Tensor,
        config: AWQConfig,
        device: torch.device,
        batch_size: int | None = None,
        store: ActivationStore | None = None,
        parallel: Parallel | None = None,
        min_tokens: int = 0,
        coverage: list[GroupCoverage] | None = None,
    ) -> None:
        """``store``: where the float block outputs are kept between blocks (RAM up to a budget,
        then disk). ``parallel``: this rank of a multi-process run, which calibrates on its
        :func:`rank_windows` of ``samples`` (all of them in one process). A routed expert that
        fewer than ``min_tokens`` calibration tokens reach gets no scales and no clipping (plain
        rounding); ``coverage`` receives every input's token count.

        Raises:
            ValueError: fewer calibration windows than ranks.
        """
        self.model = model
        self.store = store
        self.spec = spec
        self.samples = samples
        self.config = config
        self.device = device
        self.parallel = parallel or Parallel.single()
        self.maps = smooth_maps_for(model, spec)
        self.scale_dtype = dtype_from_name(config.scale_dtype)
        n_samples = samples.shape[0]
        # The batch size and scored windows of one process, on every rank: the scored windows
        # are then the same whatever the number of ranks.
        self.per_batch = _first_batch_sizes(n_samples, batch_size, config.search_samples)
        n_scored = _scored_windows(n_samples, self.per_batch, config.search_samples)
        self.scored_windows, self.other_windows = rank_windows(n_samples, n_scored, self.parallel)
        # The scored windows are batched apart from the others, so the recorded batches are
        # exactly this rank's scored windows (none, where it has none).
        n_scored_here = self.scored_windows.stop - self.scored_windows.start
        self.record_batches = math.ceil(n_scored_here / self.per_batch)
        self.report = SmoothingReport()
        self.min_tokens = min_tokens
        self.coverage = coverage
        self.inputs: BlockInputs | None = None
        self.next_index = 0

    def start(self, blocks: nn.ModuleList) -> None:
        """Catch the first block's inputs (outside modules on the device)."""
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            # One process: the scored windows are whole batches, so this is the same batching as
            # one capture of every window.
            parts = [
                capture_block_inputs(
                    self.model,
                    blocks,
                    self.samples[windows],
                    self.per_batch,
                    self.device,
                    store=self.store,
                )
                for windows in (self.scored_windows, self.other_windows)
                if windows.stop > windows.start
            ]
            self.inputs = BlockInputs(
                hidden=[hidden for part in parts for hidden in part.hidden],
                kwargs=[kwargs for part in parts for kwargs in part.kwargs],
                store=self.store,
            )
        except Exception as failure:  # every rank stops with it before the first collective
            error = failure
        self.parallel.settle(error)
        self.next_index = 0
        self.report.seconds += time.perf_counter() - start

    def process(self, index: int, block: nn.Module) -> None:
        """Search, fold and clip block ``index`` (on the device); advance the input stream."""
        if self.inputs is None or index != self.next_index:
            raise RuntimeError(
                f"AWQ holds the inputs of block {self.next_index}, not of block {index}"
                if self.inputs is not None
                else "AWQSmoother.start() was not called"
            )
        start = time.perf_counter()
        hidden = _process_block(
            index,
            block,
            self.spec,
            self.maps,
            self.inputs,
            self.config,
            self.device,
            self.scale_dtype,
            self.record_batches,
            self.report,
            self.parallel,
            self.min_tokens,
            self.coverage,
        )
        self.inputs = self.inputs.with_hidden(hidden)
        self.next_index = index + 1
        self.report.seconds += time.perf_counter() - start

    def release(self) -> None:
        """Drop the stored activations."""
        self.inputs = None


@torch.no_grad()
def apply_awq(
    blocks: ModelBlocks,
    spec: ArchSpec,
    samples: torch.Tensor,
    config: AWQConfig,
    batch_size: int | None = None,
    on_block: Callable[[int, nn.Module], None] | None = None,
    progress: bool = True,
    parallel: Parallel | None = None,
    min_tokens: int = 0,
    coverage: list[GroupCoverage] | None = None,
) -> SmoothingReport:
    """Fold AWQ scales and apply AWQ clipping to every block, in place, as ``blocks`` brings them
    in (resident or streamed from the checkpoint).

    Args:
        samples: calibration token ids ``[S, L]``.
        batch_size: sequences per forward pass (bounded by ``config.search_samples`` so the
            scored sequences are whole batches).
        on_block: called with each block after its search, while it is open on the device (e.g.
            to round and pack its linears before a streamed block is written).
        parallel: this rank of a multi-process run (data-parallel statistics, the same
            decisions on every rank, weight-parallel clip search).

    Raises:
        UnsupportedArchitectureError: the architecture has no smoothing maps.
    """
    smoother = AWQSmoother(
        blocks.model, spec, samples, config, blocks.device, batch_size, blocks.activations,
        parallel, min_tokens, coverage,
    )  # fmt: skip
    with blocks.outside_on_device():
        smoother.start(blocks.blocks)
    for index in tqdm(range(len(blocks)), desc="awq", disable=not progress):
        with blocks.open(index) as block:
            smoother.process(index, block)
            if on_block is not None:
                on_block(index, block)
    smoother.release()
    return smoother.report


_NO_SCALES = "no AWQ scales or clipping (too few calibration tokens): plain rounding"


def _clip_skipped(name: str, spec: ArchSpec) -> bool:
    return name in spec.clip_skip


def _mean_over_ranks(
    parallel: Parallel, local_sse: Callable[[], tuple[float, int]]
) -> Callable[[], float]:
    """A scale-search loss on several ranks: the squared error summed over every rank's scored
    elements (in ascending rank order, from every rank's ``(sum, count)``) over their number.
    The same float on every rank, so every rank makes the same choice. The gather is also the
    agreement point of the local evaluation: a failure on any rank stops every rank."""

    def loss() -> float:
        error: BaseException | None = None
        sse, count = math.nan, 0
        try:
            sse, count = local_sse()
        except Exception as failure:
            error = failure
        parts = parallel.gather_floats([sse, float(count), 0.0 if error is None else 1.0])
        if any(failed for _, _, failed in parts):
            parallel.settle(error)  # every rank sees the flag, so every rank settles here
        n_elements = sum(n for _, n, _ in parts)
        if n_elements == 0:
            raise ValueError("no rank has a scored calibration window; cannot score scales")
        return sum(part_sse for part_sse, _, _ in parts) / n_elements  # in rank order

    return loss


def _scale_loss(
    parallel: Parallel, linears: list[nn.Linear], inspected: nn.Module, calls: list[ModuleCall]
) -> Callable[[], float]:
    """The loss :func:`search_scales` minimises for one smoothing map, scored on ``calls`` (this
    rank's recorded calls of ``inspected``)."""
    alone = len(linears) == 1 and inspected is linears[0]

    def recorded_inputs() -> torch.Tensor:
        return torch.cat([c.hidden.flatten(0, -2) for c in calls])

    def run_inspected() -> torch.Tensor:
        return torch.cat([c.replay(inspected).flatten(0, -2) for c in calls])

    if not parallel.active:
        # One process keeps its fp32 mean: the same losses, hence the same choices, bit for bit,
        # as before multi-process runs existed (a sum over a count rounds differently).
        if alone:
            return linear_output_mse(linears[0], recorded_inputs())
        return output_mse(run_inspected, run_inspected())

    def nothing_scored() -> tuple[float, int]:
        return 0.0, 0  # this rank has no scored window: no term in the sums

    error: BaseException | None = None
    local_sse: Callable[[], tuple[float, int]] = nothing_scored
    try:
        if calls and alone:
            local_sse = linear_output_sse(linears[0], recorded_inputs())
        elif calls:
            local_sse = output_sse(run_inspected, run_inspected())
    except Exception as failure:  # every rank stops with it at the agreement point
        error = failure
    parallel.settle(error)
    return _mean_over_ranks(parallel, local_sse)


def _process_block(
    index: int,
    block: nn.Module,
    spec: ArchSpec,
    maps: tuple[SmoothMap, ...],
    inputs: BlockInputs,
    config: AWQConfig,
    device: torch.device,
    scale_dtype: torch.dtype,
    record_batches: int,
    report: SmoothingReport,
    parallel: Parallel,
    min_tokens: int = 0,
    coverage: list[GroupCoverage] | None = None,
) -> list[torch.Tensor]:
    applicable = []
    for smooth in expand_smooth_maps(block, maps):
        if smooth_map_applies(block, smooth):
            applicable.append(smooth)
        else:
            report.skipped_maps.append(f"{spec.blocks}.{index}: {smooth.prev} -> {smooth.linears}")

    # One statistics accumulator per sequential group (members share their input), and one per
    # map statistic read elsewhere (a mixture's whole input, which every token reaches).
    stats: dict[str, ChannelStatsAccumulator] = {}
    group_of: dict[str, str] = {}
    groups = spec.groups_of(block)
    for group in groups:
        first = block.get_submodule(group[0])
        stats[group[0]] = ChannelStatsAccumulator(first.in_features, config.group_size, device)
        for name in group:
            group_of[name] = group[0]
    for smooth in applicable:
        if smooth.statistic and smooth.statistic not in stats:
            width = block.get_submodule(smooth.linears[0]).in_features
            stats[smooth.statistic] = ChannelStatsAccumulator(width, config.group_size, device)

    taps = {first: acc.add for first, acc in stats.items()}
    record = [smooth.inspect for smooth in applicable]
    error: BaseException | None = None
    calls: dict[str, list[ModuleCall]] = {}
    try:
        outs, calls = run_block_with_taps(block, inputs, device, taps, record, record_batches)
    except Exception as failure:  # every rank stops with it before the reductions
        error = failure
    parallel.settle(error)
    # Tokens over every rank: of each input, of the block, and of each inspected module's
    # recorded calls (one gather; every rank then makes the same decisions).
    heads = list(stats)
    local = [float(stats[h].n_tokens) for h in heads] + [float(inputs.n_tokens)]
    local += [float(sum(c.hidden.flatten(0, -2).shape[0] for c in calls[m])) for m in record]
    totals = (
        [sum(column) for column in zip(*parallel.gather_floats(local), strict=True)]
        if parallel.active
        else local
    )
    tokens = dict(zip(heads, totals, strict=False))
    block_tokens = totals[len(heads)]
    scored = dict(zip(record, totals[len(heads) + 1 :], strict=True))
    # A routed expert that (almost) no token reaches: no statistics to search or clip with.
    starved = {h for h in heads if tokens[h] < min(min_tokens, block_tokens) or tokens[h] == 0}
    if coverage is not None:
        for group in groups:
            white = group[0] in starved
            coverage.append(
                GroupCoverage(
                    index, tuple(group), int(tokens[group[0]]), int(block_tokens), white,
                    _NO_SCALES if white else "",
                )
            )  # fmt: skip
    error = None
    try:
        for head, acc in stats.items():
            if head not in starved:
                acc.check()
    except Exception as failure:
        error = failure
    parallel.settle(error)
    # The clip search is weight-parallel: each clipped linear has an owner rank (all rank 0 in
    # one process), which alone needs the Gram matrices of the input it reads.
    clipped = (
        {
            name: block.get_submodule(name)
            for name in spec.linears_of(block)
            if not _clip_skipped(name, spec) and group_of[name] not in starved
        }
        if config.apply_clip
        else {}
    )
    clip_owners = linear_owners(parallel, clipped, "awq")
    for head, acc in stats.items():
        if head in starved:
            continue
        acc.reduce_to_owners(
            parallel, [clip_owners[name] for name in clip_owners if group_of.get(name) == head]
        )

    folded: dict[str, torch.Tensor] = {}  # group head -> scales folded into its input
    for smooth in applicable:
        head = group_of[smooth.linears[0]]
        statistic = smooth.statistic or head
        if statistic in starved or scored[smooth.inspect] == 0:
            report.skipped_maps.append(
                f"{spec.blocks}.{index}: {smooth.prev} -> {smooth.linears} (no calibration "
                "token reaches it)"
            )
            continue
        linears = [block.get_submodule(name) for name in smooth.linears]
        inspected = block.get_submodule(smooth.inspect)
        loss_fn = _scale_loss(parallel, linears, inspected, calls[smooth.inspect])
        result = search_scales(
            linears,
            loss_fn,
            stats[statistic].abs_mean,
            config.bits,
            config.group_size,
            config.sym,
            n_grid=config.n_grid,
            modes=config.scale_modes,
            scale_dtype=scale_dtype,
            coarse_to_fine=config.coarse_to_fine,
        )
        del loss_fn
        report.maps.append(
            MapReport(index, smooth.prev, result.alpha, result.duo, result.loss, result.base_loss)
        )
        if result.alpha is not None:
            fold_smooth_map(block, smooth, result.scales, spec.norm_weight_offset)
            # Every group the map's linears read: a mixture's norm scales every expert's input.
            for name in smooth.linears:
                folded[group_of[name]] = result.scales.to(device)
    del calls

    def search(name: str, linear: nn.Linear) -> ClipThresholds:
        head = group_of[name]
        gram = stats[head].gram
        s = folded.get(head)
        if s is not None:
            # The linear now reads x / s: its Gram is D^-1 C D^-1 per group.
            inv = (1.0 / s).view(gram.shape[0], gram.shape[1])
            gram = gram * inv.unsqueeze(2) * inv.unsqueeze(1)
        max_val = search_clip(
            linear.weight,
            gram,
            config.bits,
            config.group_size,
            config.sym,
            max_shrink=config.max_shrink,
            scale_dtype=scale_dtype,
        )
        return ClipThresholds(max_val)

    # Each search reads only its own weight and the Gram taken before any clipping, so clipping
    # after all the searches gives what clipping after each one did.
    thresholds = solve_on_owners(parallel, clipped, clip_owners, search, ClipThresholds)
    for name, (result, _seconds) in thresholds.items():
        apply_clip(clipped[name], result.max_val)
        report.clipped.append(f"{spec.blocks}.{index}.{name}")
    return outs
