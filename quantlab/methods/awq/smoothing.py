"""AWQ applied to a float model, block by block: search and fold input scales, then clip.

For each decoder block (alone on the compute device): one float forward over every calibration
batch records each linear group's input statistics (mean ``|x|``, per-group Gram matrices) and the
inspected modules' calls on the first ``search_samples`` sequences, and yields the block's output,
which is the next block's input. Then, in forward order, every smoothing map of the architecture
gets its scales searched (:func:`quantlab.solvers.awq.search_scales`) and folded
(:func:`quantlab.transforms.fold.fold_smooth_map`); then every linear except the architecture's
``clip_skip``
ones gets its clipping thresholds. The model stays float and computes the same function up to the
clipping; a rounding solver runs afterwards (or per block through ``on_block``).

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

from quantlab.calib.blocks import move_outside_blocks
from quantlab.calib.capture import (
    BlockInputs,
    ModuleCall,
    capture_block_inputs,
    run_block_with_taps,
)
from quantlab.calib.stats import ChannelStatsAccumulator
from quantlab.formats.tensor_layout import dtype_from_name
from quantlab.methods.awq.config import AWQConfig
from quantlab.models.arch import ArchSpec, SmoothMap, get_submodule, smooth_maps_for
from quantlab.solvers.awq import (
    apply_clip,
    linear_output_mse,
    output_mse,
    search_clip,
    search_scales,
)
from quantlab.transforms.fold import fold_smooth_map, smooth_map_applies

__all__ = ["MapReport", "SmoothingReport", "apply_awq"]


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


@torch.no_grad()
def apply_awq(
    model: nn.Module,
    spec: ArchSpec,
    samples: torch.Tensor,
    config: AWQConfig,
    device: torch.device,
    batch_size: int | None = None,
    on_block: Callable[[int, nn.Module], None] | None = None,
    progress: bool = True,
) -> SmoothingReport:
    """Fold AWQ scales and apply AWQ clipping to every block of ``model``, in place.

    Args:
        samples: calibration token ids ``[S, L]``.
        batch_size: sequences per forward pass (bounded by ``config.search_samples`` so the
            scored sequences are whole batches).
        on_block: called with each block after its search, while it is on ``device`` (e.g. to
            round and pack its linears).

    Raises:
        UnsupportedArchitectureError: the architecture has no smoothing maps.
    """
    start = time.perf_counter()
    maps = smooth_maps_for(model, spec)
    blocks = get_submodule(model, spec.blocks)
    scale_dtype = dtype_from_name(config.scale_dtype)
    report = SmoothingReport()
    per_batch = _first_batch_sizes(samples.shape[0], batch_size, config.search_samples)
    record_batches = -(-min(config.search_samples, samples.shape[0]) // per_batch)

    outside_home = next(model.parameters()).device
    move_outside_blocks(model, blocks, device)
    try:
        inputs = capture_block_inputs(model, blocks, samples, per_batch, device)
    finally:
        move_outside_blocks(model, blocks, outside_home)

    for index in tqdm(range(len(blocks)), desc="awq", disable=not progress):
        block = blocks[index]
        home = next(block.parameters()).device
        block.to(device)
        inputs = BlockInputs(
            hidden=_process_block(
                index,
                block,
                spec,
                maps,
                inputs,
                config,
                device,
                scale_dtype,
                record_batches,
                report,
            ),
            kwargs=inputs.kwargs,
        )
        if on_block is not None:
            on_block(index, block)
        block.to(home)
    report.seconds = time.perf_counter() - start
    return report


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
