"""BitStack's decomposition driver: every block linear of the model decomposed into ~1-bit
residual blocks and swapped for :class:`BitStackLinear` with every block loaded
(:func:`decompose_model`), optionally followed by the prefix distillation
(:mod:`quantlab.methods.bitstack.distill`) and the re-decomposition of the later blocks.

Orchestration only: statistics come from the spine (one float pass per decoder block,
:func:`~quantlab.calib.capture.run_block_with_taps` feeding
:class:`~quantlab.calib.stats.HessianAccumulator`), scales are folded with
:func:`quantlab.transforms.fold.fold_smooth_map` along the architecture's smoothing maps, the math
is in :mod:`quantlab.solvers.bitstack`, the packing in :mod:`quantlab.formats.bitstack`.

Each block is processed alone on the compute device: its Hessians are gathered on its float
inputs, its scales folded (output-preserving, so the next block's inputs are the float block
outputs either way), its linears decomposed and swapped for :class:`BitStackLinear` with every
block loaded. The loading order is computed afterwards (:mod:`quantlab.methods.bitstack.ordering`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantlab.calib.capture import (
    BlockInputs,
    capture_block_inputs,
    run_block,
    run_block_with_taps,
    settle_coverage,
)
from quantlab.calib.stats import HessianAccumulator
from quantlab.formats.bitstack import BitStackResult, pack
from quantlab.methods.base import (
    LayerReport,
    MethodContext,
    linear_owners,
    model_blocks,
    solve_on_owners,
)
from quantlab.methods.bitstack.config import BitStackConfig
from quantlab.methods.bitstack.distill import distill_prefix
from quantlab.models.arch import (
    ArchSpec,
    SmoothMap,
    excluded,
    expand_smooth_maps,
    get_submodule,
    resolve,
    smooth_maps_for,
)
from quantlab.nn.bitstack_linear import BitStackLinear
from quantlab.nn.swap import set_submodule
from quantlab.ops import bitstack as bs_ops
from quantlab.solvers.bitstack import activation_scales, decompose, output_error
from quantlab.transforms.fold import fold_smooth_map, smooth_map_applies

__all__ = [
    "Decomposition",
    "LayerRecord",
    "decompose_model",
    "fixed_bytes",
    "float_outputs",
    "head_inputs",
]


@dataclass
class LayerRecord:
    """One decomposed linear: its calibration output errors ``tr(R_b H R_b^T)`` after ``b = 0 ..
    n`` blocks (``errors[0]`` is the weight's own output energy), the bytes of one block and the
    seconds its SVDs took."""

    errors: list[float]
    block_bytes: int
    svd_seconds: float
    # Kept only for the prefix distillation, which decomposes the later blocks again.
    weight: torch.Tensor | None = None
    hessian: torch.Tensor | None = None


def fixed_bytes(model: nn.Module, element_bytes: int | None = None) -> int:
    """Bytes of every state-dict tensor of ``model`` outside its BitStack layers' packed blocks
    (embeddings, norms, biases, undecomposed linears; tied tensors once), at ``element_bytes``
    per float element (default: as held)."""
    packed: set[int] = set()
    for module in model.modules():
        if isinstance(module, BitStackLinear):
            packed.update(id(t) for t in (module.signs, module.u, module.v))
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in model.state_dict(keep_vars=True).values():
        if id(tensor) in packed:
            continue
        # A streamed model's skeleton is on the meta device (no storage): tied tensors there are
        # one object.
        ident = (
            (id(tensor), 0)
            if tensor.is_meta
            else (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        )
        if ident in seen:
            continue
        seen.add(ident)
        size = element_bytes if element_bytes and tensor.is_floating_point() else None
        total += tensor.numel() * (size or tensor.element_size())
    return total


@dataclass
class Decomposition:
    """What :func:`decompose_model` leaves besides the swapped layers: each layer's record, the
    smoothing maps it could not fold, the decomposition's seconds (the distillation's are in
    ``distill``) and the distillation's summary (empty without it)."""

    records: dict[str, LayerRecord]
    skipped_maps: list[str]
    seconds: float
    distill: dict[str, Any]


def decompose_model(model: nn.Module, config: BitStackConfig, ctx: MethodContext) -> Decomposition:
    """Decompose every block linear of ``model`` (not excluded by the config) in place, one
    decoder block at a time (streamed from the checkpoint when ``ctx.weights`` is set), then
    distil the prefix if ``config.distill_steps`` (a model in memory only)."""
    start = time.perf_counter()
    spec = resolve(model)
    maps = smooth_maps_for(model, spec) if config.scale_alpha > 0 else ()
    samples = ctx.samples("BitStack")
    if ctx.parallel.active:
        # Data-parallel calibration: this rank's share of the windows.
        samples = samples[ctx.parallel.share(samples.shape[0])]
    model_blocks_ = model_blocks(model, spec, ctx)
    blocks = model_blocks_.blocks
    batch = ctx.calib.batch_size or samples.shape[0]
    with model_blocks_.outside_on_device():
        inputs = capture_block_inputs(
            model, blocks, samples, batch, ctx.device, store=model_blocks_.activations
        )

    teacher = None
    if config.distill_steps and config.replay_blocks:
        # Replay feeds the loop compressed outputs, so the teacher needs its own float pass.
        teacher = head_inputs(model, spec, float_outputs(blocks, inputs, ctx.device), ctx.device)
    records: dict[str, LayerRecord] = {}
    skipped_maps: list[str] = []
    for index in tqdm(range(len(blocks)), desc="bitstack", disable=not ctx.progress):
        with model_blocks_.open(index) as block:
            outs = _decompose_block(
                index, block, spec, maps, inputs, config, ctx, records, skipped_maps
            )
        inputs = inputs.with_hidden(outs)
    decompose_seconds = time.perf_counter() - start
    distill: dict[str, Any] = {}
    if config.distill_steps:
        if teacher is None:  # without replay the loop's last outputs are the float model's
            teacher = head_inputs(model, spec, inputs, ctx.device)
        distill = _distill_and_redecompose(model, spec, samples, teacher, config, ctx, records)
    return Decomposition(records, skipped_maps, decompose_seconds, distill)


def _decompose_block(
    index: int,
    block: nn.Module,
    spec: ArchSpec,
    maps: Sequence[SmoothMap],
    inputs: BlockInputs,
    config: BitStackConfig,
    ctx: MethodContext,
    records: dict[str, LayerRecord],
    skipped_maps: list[str],
) -> list[torch.Tensor]:
    device = ctx.device
    stats: dict[str, HessianAccumulator] = {}
    group_of: dict[str, str] = {}
    groups = spec.groups_of(block)
    for group in groups:
        stats[group[0]] = HessianAccumulator(block.get_submodule(group[0]).in_features, device)
        for name in group:
            group_of[name] = group[0]
    block_maps = expand_smooth_maps(block, maps)
    # A map whose scales come from another input (a mixture's whole input, every token): its
    # own accumulator, for the diagonal.
    extra: dict[str, HessianAccumulator] = {}
    for smooth in block_maps:
        if smooth.statistic and smooth.statistic not in stats:
            width = block.get_submodule(smooth.linears[0]).in_features
            extra[smooth.statistic] = HessianAccumulator(width, device)
    taps = {head: acc.add for head, acc in (stats | extra).items()}
    outs, _ = run_block_with_taps(block, inputs, device, taps)
    parallel = ctx.parallel
    # Rarely routed experts: identity Hessians (unscaled, unweighted decomposition), reported.
    settle_coverage(
        index, groups, [stats] * len(groups), inputs.n_tokens, ctx.calib.expert_min_tokens,
        parallel, ctx.report.coverage,
    )  # fmt: skip

    folded: dict[str, torch.Tensor] = {}
    if config.scale_alpha > 0:
        for smooth in block_maps:
            if not smooth_map_applies(block, smooth):
                skipped_maps.append(f"{spec.blocks}.{index}: {smooth.prev} -> {smooth.linears}")
                continue
            head = group_of[smooth.linears[0]]
            source = extra[smooth.statistic] if smooth.statistic else stats[head]
            # The scales read the Hessian's diagonal only: over every rank's tokens, the same on
            # every rank, so every rank folds the same scales.
            diagonal = source.diagonal_over_ranks(parallel)
            scales = activation_scales(diagonal, config.scale_alpha)
            fold_smooth_map(block, smooth, scales, spec.norm_weight_offset)
            for name in smooth.linears:  # a mixture's norm scales every expert's input
                folded[group_of[name]] = scales.to(device)
    for accumulator in extra.values():
        accumulator.release()

    linears = {
        name: block.get_submodule(name)
        for name in spec.linears_of(block)
        if not excluded(f"{spec.blocks}.{index}.{name}", config.modules_to_not_convert)
    }
    # Weight-parallel: each linear's owner decomposes it on the Hessian of every rank's tokens.
    owners = linear_owners(parallel, linears, "bitstack")
    for head, accumulator in stats.items():
        readers = [owners[name] for name in linears if group_of[name] == head]
        if readers:
            accumulator.reduce_to_owners(parallel, readers)

    def solve(name: str, linear: nn.Linear) -> BitStackResult:
        head = group_of[name]
        h = stats[head].hessian()
        s = folded.get(head)
        if s is not None:
            # The linear now reads x / s: its Hessian is D^-1 H D^-1.
            h = h / s.unsqueeze(0) / s.unsqueeze(1)
        full = f"{spec.blocks}.{index}.{name}"
        result = decompose(
            linear.weight,
            config.n_blocks,
            config.rank,
            h,
            config.svd,
            config.seed,
            full,
            error_feedback=config.error_feedback,
            damp_percent=config.damp_percent,
        )
        if config.distill_steps:  # a single process only (the method refuses it on several)
            kept[full] = (linear.weight.detach().to(torch.float32).cpu().clone(), h.cpu().clone())
        return result

    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (result, _) in solve_on_owners(
        parallel, linears, owners, solve, BitStackResult
    ).items():
        full = f"{spec.blocks}.{index}.{name}"
        linear = linears[name]
        layer = BitStackLinear.from_packed(
            pack(result.positive, result.u, result.v), linear.bias, name=full
        )
        set_submodule(block, name, layer.to(linear.weight.device))
        records[full] = LayerRecord(result.errors, layer.block_bytes, result.svd_seconds)
        if full in kept:
            records[full].weight, records[full].hessian = kept.pop(full)
        ctx.report.layers.append(
            LayerReport(
                full,
                linear.out_features,
                linear.in_features,
                layer.storage_bits() / (linear.out_features * linear.in_features),
                None,
                result.errors[-1] / result.errors[0] if result.errors[0] > 0 else None,
                result.seconds,
            )
        )
    for accumulator in stats.values():
        accumulator.release()
    if config.replay_blocks:
        # The next block sees what a model of `replay_blocks` blocks per linear computes here.
        compressed = copy.deepcopy(block)
        for module in compressed.modules():
            if isinstance(module, BitStackLinear):
                module.truncate(config.replay_blocks)
        outs, _ = run_block_with_taps(compressed, inputs, device, {})
    return outs


@torch.no_grad()
def float_outputs(blocks: nn.ModuleList, inputs: BlockInputs, device: torch.device) -> BlockInputs:
    """The float decoder stack's outputs on ``inputs``, one block on the device at a time."""
    current = inputs
    for block in blocks:
        home = next(block.parameters()).device
        block.to(device)
        current = current.with_hidden(run_block(block, current, device))
        block.to(home)
    return current


@torch.no_grad()
def head_inputs(
    model: nn.Module, spec: ArchSpec, outputs: BlockInputs, device: torch.device
) -> torch.Tensor:
    """The head's inputs ``[S, L, hidden]`` (fp32, on ``device``) from the last decoder block's
    outputs: the distillation's teacher when those are the float model's."""
    norm = get_submodule(model, spec.final_norm)
    home = next(norm.parameters()).device
    norm.to(device)
    try:
        return torch.cat([norm(h.to(device)).to(torch.float32) for h, _ in outputs.batches()])
    finally:
        norm.to(home)


def _distill_and_redecompose(
    model: nn.Module,
    spec: ArchSpec,
    samples: torch.Tensor,
    teacher: torch.Tensor,
    config: BitStackConfig,
    ctx: MethodContext,
    records: dict[str, LayerRecord],
) -> dict[str, Any]:
    """Distil the first ``distill_blocks`` blocks of every linear, then decompose the blocks
    after them again from the tuned prefix's residual (with each layer's kept Hessian), so every
    budget above the prefix builds on it. Updates ``records``' errors; returns the losses."""

    start = time.perf_counter()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BitStackLinear)}
    for layer in layers.values():
        layer.truncate(min(config.distill_blocks, layer.n_blocks))
    home = next(model.parameters()).device
    model.to(ctx.device)
    try:
        losses = distill_prefix(
            model, spec, samples, teacher, config.distill_steps, config.distill_lr,
            config.distill_batch, ctx.device, config.seed, ctx.progress,
        )  # fmt: skip
    finally:
        model.to(home)
    for name, layer in tqdm(layers.items(), desc="bitstack re-decompose", disable=not ctx.progress):
        rec = records[name]
        assert rec.weight is not None and rec.hessian is not None
        device = layer.u.device
        weight, hessian = rec.weight.to(device), rec.hessian.to(device)
        errors = rec.errors[:1]  # the weight's own output energy; the weight did not change
        for b in range(1, layer.n_blocks + 1):
            prefix = bs_ops.dequant(layer.signs[:b], layer.u[:b], layer.v[:b], layer.in_features)
            errors.append(output_error(weight - prefix.to(torch.float32), hessian))
        if config.n_blocks > layer.n_blocks:
            tail = decompose(
                weight - prefix.to(torch.float32),
                config.n_blocks - layer.n_blocks,
                config.rank,
                hessian,
                config.svd,
                config.seed,
                name,
                error_feedback=config.error_feedback,
                damp_percent=config.damp_percent,
            )
            packed = pack(tail.positive, tail.u, tail.v)
            layer.append_blocks(packed.signs, packed.u, packed.v)
            errors.extend(tail.errors[1:])
        rec.errors, rec.weight, rec.hessian = errors, None, None
    return {
        "blocks": config.distill_blocks,
        "steps": config.distill_steps,
        "lr": config.distill_lr,
        "batch": config.distill_batch,
        "losses": losses,
        "seconds": time.perf_counter() - start,
    }
