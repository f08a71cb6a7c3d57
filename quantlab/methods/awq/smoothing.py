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
"""

from __future__ import annotations

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
    ModuleCall,
    capture_block_inputs,
    run_block_with_taps,
)
from quantlab.calib.stats import ChannelStatsAccumulator
from quantlab.formats.tensor_layout import dtype_from_name
from quantlab.methods.awq.config import AWQConfig
from quantlab.models.arch import ArchSpec, SmoothMap, smooth_maps_for
from quantlab.solvers.awq import (
    apply_clip,
    linear_output_mse,
    output_mse,
    search_clip,
    search_scales,
)
from quantlab.transforms.fold import fold_smooth_map, smooth_map_applies

__all__ = ["AWQSmoother", "MapReport", "SmoothingReport", "apply_awq"]


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


def _first_batch_sizes(n_samples: int, batch_size: int | None, search_samples: int) -> int:
    """Calibration batch size: the scored sequences form the first batch(es) exactly."""
    size = min(search_samples, n_samples)
    if batch_size is not None:
        size = min(size, batch_size)
    return max(1, size)


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
    ) -> None:
        """``store``: where the float block outputs are kept between blocks (RAM up to a budget,
        then disk)."""
        self.model = model
        self.store = store
        self.spec = spec
        self.samples = samples
        self.config = config
        self.device = device
        self.maps = smooth_maps_for(model, spec)
        self.scale_dtype = dtype_from_name(config.scale_dtype)
        self.per_batch = _first_batch_sizes(samples.shape[0], batch_size, config.search_samples)
        self.record_batches = -(-min(config.search_samples, samples.shape[0]) // self.per_batch)
        self.report = SmoothingReport()
        self.inputs: BlockInputs | None = None
        self.next_index = 0

    def start(self, blocks: nn.ModuleList) -> None:
        """Catch the first block's inputs (outside modules on the device)."""
        start = time.perf_counter()
        self.inputs = capture_block_inputs(
            self.model, blocks, self.samples, self.per_batch, self.device, store=self.store
        )
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
) -> SmoothingReport:
    """Fold AWQ scales and apply AWQ clipping to every block, in place, as ``blocks`` brings them
    in (resident or streamed from the checkpoint).

    Args:
        samples: calibration token ids ``[S, L]``.
        batch_size: sequences per forward pass (bounded by ``config.search_samples`` so the
            scored sequences are whole batches).
        on_block: called with each block after its search, while it is open on the device (e.g.
            to round and pack its linears before a streamed block is written).

    Raises:
        UnsupportedArchitectureError: the architecture has no smoothing maps.
    """
    smoother = AWQSmoother(
        blocks.model, spec, samples, config, blocks.device, batch_size, blocks.activations
    )
    with blocks.outside_on_device():
        smoother.start(blocks.blocks)
    for index in tqdm(range(len(blocks)), desc="awq", disable=not progress):
        with blocks.open(index) as block:
            smoother.process(index, block)
            if on_block is not None:
                on_block(index, block)
    smoother.release()
    return smoother.report


def _clip_skipped(name: str, spec: ArchSpec) -> bool:
    return name in spec.clip_skip


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
) -> list[torch.Tensor]:
    applicable = []
    for smooth in maps:
        if smooth_map_applies(block, smooth):
            applicable.append(smooth)
        else:
            report.skipped_maps.append(f"{spec.blocks}.{index}: {smooth.prev} -> {smooth.linears}")

    # One statistics accumulator per sequential group (members share their input).
    stats: dict[str, ChannelStatsAccumulator] = {}
    group_of: dict[str, str] = {}
    for group in spec.sequential_groups:
        first = block.get_submodule(group[0])
        stats[group[0]] = ChannelStatsAccumulator(first.in_features, config.group_size, device)
        for name in group:
            group_of[name] = group[0]
    taps = {first: acc.add for first, acc in stats.items()}
    record = [smooth.inspect for smooth in applicable]
    outs, calls = run_block_with_taps(block, inputs, device, taps, record, record_batches)
    for acc in stats.values():
        acc.check()

    folded: dict[str, torch.Tensor] = {}  # group head -> scales folded into its input
    for smooth in applicable:
        linears = [block.get_submodule(name) for name in smooth.linears]
        inspected = block.get_submodule(smooth.inspect)
        module_calls = calls[smooth.inspect]

        if len(linears) == 1 and inspected is linears[0]:
            loss_fn = linear_output_mse(
                linears[0], torch.cat([c.hidden.flatten(0, -2) for c in module_calls])
            )
        else:

            def run_inspected(
                inspected: nn.Module = inspected, module_calls: list[ModuleCall] = module_calls
            ) -> torch.Tensor:
                return torch.cat([c.replay(inspected).flatten(0, -2) for c in module_calls])

            loss_fn = output_mse(run_inspected, run_inspected())
        head = group_of[smooth.linears[0]]
        result = search_scales(
            linears,
            loss_fn,
            stats[head].abs_mean,
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
            folded[head] = result.scales.to(device)
    del calls

    if config.apply_clip:
        for name in spec.block_linears:
            if _clip_skipped(name, spec):
                continue
            linear = block.get_submodule(name)
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
            apply_clip(linear, max_val)
            report.clipped.append(f"{spec.blocks}.{index}.{name}")
    return outs
