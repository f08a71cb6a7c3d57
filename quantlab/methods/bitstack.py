"""BitStack: activation-aware scaling, then every block linear decomposed into ~1-bit residual
blocks, then one global loading order so any memory budget maps to a prefix of the blocks.

Orchestration only: statistics come from the spine (one float pass per decoder block,
:func:`~quantlab.calib.capture.run_block_with_taps` feeding
:class:`~quantlab.calib.stats.HessianAccumulator`), scales are folded with
:func:`quantlab.fold.fold_smooth_map` along the architecture's smoothing maps, the math is in
:mod:`quantlab.solvers.bitstack`, the packing in :mod:`quantlab.formats.bitstack`.

Each block is processed alone on the compute device: its Hessians are gathered on its float
inputs, its scales folded (output-preserving, so the next block's inputs are the float block
outputs either way), its linears decomposed and swapped for :class:`BitStackLinear` with every
block loaded. Then the order is computed:

* ``order="hessian"`` (default): block ``b`` of a layer is scored by the calibration output error
  it removes per byte, ``(tr(R_b H R_b^T) - tr(R_{b+1} H R_{b+1}^T)) / bytes``, relative to the
  layer's output energy ``tr(W H W^T)`` (``order_normalize``); stage-major, so every layer holds
  ``b`` or ``b + 1`` blocks at any budget. Free: the errors come out of the decomposition.
* ``order="ppl"``: BitStack's own criterion. For each stage ``b``, with every layer at ``b``
  blocks, each layer alone gets its block ``b`` and the perplexity on a small validation set
  (calibration text, seed + 1) is measured; lower first. ``(blocks - 1) x layers`` evaluations,
  each re-running only the decoder blocks from the changed one on; ``order_max_stage`` caps the
  measured stages (later ones use the Hessian score).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from quantlab.calib.capture import (
    BlockInputs,
    capture_block_inputs,
    move_outside_blocks,
    move_to,
    run_block,
    run_block_with_taps,
)
from quantlab.calib.stats import HessianAccumulator
from quantlab.fold import fold_smooth_map, smooth_map_applies
from quantlab.formats.bitstack import pack
from quantlab.methods import Method, MethodContext, register_method
from quantlab.models.arch import (
    ARCHS,
    ArchSpec,
    SmoothMap,
    UnsupportedArchitectureError,
    get_submodule,
    resolve,
    smooth_maps_for,
)
from quantlab.nn.bitstack_linear import BitStackLinear
from quantlab.nn.swap import set_submodule
from quantlab.pipeline import LayerReport, excluded
from quantlab.solvers.bitstack import SVD_METHODS, activation_scales, decompose, stage_major_order

__all__ = ["ORDERS", "BitStackConfig", "assign_order", "fixed_bytes", "order_blocks"]

ORDERS = ("hessian", "ppl")
_NORMALIZE = ("relative", "absolute")


@dataclass(frozen=True)
class BitStackConfig:
    """BitStack decomposition and ordering options.

    Attributes:
        n_blocks: residual blocks per linear (the most that can ever be loaded).
        rank: rank of each block's magnitude factors.
        scale_alpha: exponent of the activation scales (``s = rms^alpha``; 0 disables scaling).
        svd: ``"lowrank"`` (randomized) or ``"full"``.
        order: ``"hessian"`` or ``"ppl"`` (see the module docstring).
        order_normalize: Hessian score ``"relative"`` (error removed / layer output energy, per
            byte) or ``"absolute"`` (error removed per byte).
        order_samples: validation sequences for ``order="ppl"``.
        order_seq_len: their length in tokens.
        order_max_stage: measure perplexities up to this stage (``None``: all).
        error_feedback: choose each block's signs with GPTQ's error feedback on the layer's
            Hessian and refit its rows' gains (quantlab's default), instead of ``sign(residual)``
            (the paper's rule); same format. On the default model it cuts the two-block ppl
            ~100x (docs/methods/bitstack.md).
        damp_percent: Hessian damping of the feedback, relative to the mean diagonal.
        replay_blocks: calibration inputs of each decoder block come from the earlier blocks
            *compressed to this many residual blocks per linear* (GPTQ's quantized replay, aimed
            at one budget); 0 (the paper's choice) feeds the float outputs.
        distill_steps: optimizer steps of the prefix distillation
            (:mod:`quantlab.methods.bitstack_distill`); 0 (the paper's choice) skips it.
        distill_blocks: the prefix it tunes: the first ``distill_blocks`` blocks of every linear;
            the later blocks are then decomposed again from the tuned prefix's residual.
        distill_lr: Adam's peak learning rate for it.
        distill_batch: calibration windows per distillation step.
        seed: seed of the randomized SVD, of the validation windows (``calib.seed + 1 + seed``)
            and of the distillation's window draws.
        modules_to_not_convert: module names (or shell patterns) left in full precision.
    """

    method: ClassVar[str] = "bitstack"
    version: ClassVar[int] = 1
    needs_calibration: ClassVar[bool] = True

    n_blocks: int = 16
    rank: int = 2
    scale_alpha: float = 0.5
    svd: str = "lowrank"
    order: str = "hessian"
    order_normalize: str = "relative"
    order_samples: int = 4
    order_seq_len: int = 256
    order_max_stage: int | None = None
    error_feedback: bool = True
    damp_percent: float = 0.01
    replay_blocks: int = 0
    distill_steps: int = 0
    distill_blocks: int = 2
    distill_lr: float = 5e-4
    distill_batch: int = 1
    seed: int = 0
    modules_to_not_convert: tuple[str, ...] = field(default=("lm_head",))

    def __post_init__(self) -> None:
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"damp_percent must be in (0, 1), got {self.damp_percent}")
        if self.n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {self.n_blocks}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0 <= self.replay_blocks <= self.n_blocks:
            raise ValueError(
                f"replay_blocks must be in [0, n_blocks={self.n_blocks}], got {self.replay_blocks}"
            )
        if self.distill_steps < 0 or self.distill_batch < 1 or not self.distill_lr > 0:
            raise ValueError(
                f"need distill_steps >= 0, distill_batch >= 1, distill_lr > 0; got "
                f"{self.distill_steps}, {self.distill_batch}, {self.distill_lr}"
            )
        if self.distill_steps and not 1 <= self.distill_blocks <= self.n_blocks:
            raise ValueError(
                f"distill_blocks must be in [1, n_blocks={self.n_blocks}], "
                f"got {self.distill_blocks}"
            )
        if not (self.scale_alpha >= 0 and math.isfinite(self.scale_alpha)):
            raise ValueError(f"scale_alpha must be finite and >= 0, got {self.scale_alpha}")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"svd must be one of {SVD_METHODS}, got {self.svd!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.order_normalize not in _NORMALIZE:
            raise ValueError(
                f"order_normalize must be one of {_NORMALIZE}, got {self.order_normalize!r}"
            )
        if self.order_samples < 1 or self.order_seq_len < 2:
            raise ValueError(
                f"order_samples must be >= 1 and order_seq_len >= 2, got {self.order_samples}, "
                f"{self.order_seq_len}"
            )
        if self.order_max_stage is not None and self.order_max_stage < 0:
            raise ValueError(f"order_max_stage must be >= 0 or None, got {self.order_max_stage}")
        object.__setattr__(self, "modules_to_not_convert", tuple(self.modules_to_not_convert))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["modules_to_not_convert"] = list(self.modules_to_not_convert)
        return {"method": self.method, "version": self.version, **d}

    def describe(self) -> str:
        tuned = f", {self.distill_blocks}-block prefix distilled" if self.distill_steps else ""
        return f"bitstack {self.n_blocks} blocks x rank {self.rank}, {self.order} order{tuned}"


@dataclass
class _LayerRecord:
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
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident in seen:
            continue
        seen.add(ident)
        size = element_bytes if element_bytes and tensor.is_floating_point() else None
        total += tensor.numel() * (size or tensor.element_size())
    return total


def _hessian_scores(records: dict[str, _LayerRecord], normalize: str) -> dict[str, list[float]]:
    scores = {}
    for name, rec in records.items():
        e = rec.errors
        energy = e[0] if normalize == "relative" and e[0] > 0 else 1.0
        scores[name] = [(e[b] - e[b + 1]) / energy / rec.block_bytes for b in range(1, len(e) - 1)]
    return scores


def assign_order(model: nn.Module, order: Sequence[tuple[str, int]]) -> None:
    """Record each layer's position in the global order (``BitStackLinear.steps``)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BitStackLinear)}
    steps: dict[str, dict[int, int]] = {name: {} for name in layers}
    for position, (name, block) in enumerate(order):
        steps[name][block] = position
    for name, layer in layers.items():
        want = list(range(1, layer.n_blocks))
        if sorted(steps[name]) != want:
            raise ValueError(f"{name}: the order lists blocks {sorted(steps[name])}, want {want}")
        layer.steps = [steps[name][b] for b in want]


def _decompose_block(
    index: int,
    block: nn.Module,
    spec: ArchSpec,
    maps: Sequence[SmoothMap],
    inputs: BlockInputs,
    config: BitStackConfig,
    ctx: MethodContext,
    records: dict[str, _LayerRecord],
    skipped_maps: list[str],
) -> list[torch.Tensor]:
    device = ctx.device
    stats: dict[str, HessianAccumulator] = {}
    group_of: dict[str, str] = {}
    for group in spec.sequential_groups:
        stats[group[0]] = HessianAccumulator(block.get_submodule(group[0]).in_features, device)
        for name in group:
            group_of[name] = group[0]
    taps = {head: acc.add for head, acc in stats.items()}
    outs, _ = run_block_with_taps(block, inputs, device, taps)
    hessians = {head: acc.hessian() for head, acc in stats.items()}

    folded: dict[str, torch.Tensor] = {}
    if config.scale_alpha > 0:
        for smooth in maps:
            if not smooth_map_applies(block, smooth):
                skipped_maps.append(f"{spec.blocks}.{index}: {smooth.prev} -> {smooth.linears}")
                continue
            head = group_of[smooth.linears[0]]
            scales = activation_scales(hessians[head], config.scale_alpha)
            fold_smooth_map(block, smooth, scales, spec.norm_weight_offset)
            folded[head] = scales.to(device)

    for name in spec.block_linears:
        full = f"{spec.blocks}.{index}.{name}"
        if excluded(full, config.modules_to_not_convert):
            continue
        linear = block.get_submodule(name)
        head = group_of[name]
        h = hessians[head]
        s = folded.get(head)
        if s is not None:
            # The linear now reads x / s: its Hessian is D^-1 H D^-1.
            h = h / s.unsqueeze(0) / s.unsqueeze(1)
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
        layer = BitStackLinear.from_packed(
            pack(result.positive, result.u, result.v), linear.bias, name=full
        )
        set_submodule(block, name, layer.to(linear.weight.device))
        records[full] = _LayerRecord(result.errors, layer.block_bytes, result.svd_seconds)
        if config.distill_steps:
            records[full].weight = linear.weight.detach().to(torch.float32).cpu().clone()
            records[full].hessian = h.detach().cpu().clone()
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
    if config.replay_blocks:
        # The next block sees what a model of `replay_blocks` blocks per linear computes here.
        compressed = copy.deepcopy(block)
        for module in compressed.modules():
            if isinstance(module, BitStackLinear):
                module.truncate(config.replay_blocks)
        outs, _ = run_block_with_taps(compressed, inputs, device, {})
    return outs


@torch.no_grad()
def _float_outputs(blocks: nn.ModuleList, inputs: BlockInputs, device: torch.device) -> BlockInputs:
    """The float decoder stack's outputs on ``inputs``, one block on the device at a time."""
    current = inputs
    for block in blocks:
        home = next(block.parameters()).device
        block.to(device)
        current = BlockInputs(hidden=run_block(block, current, device), kwargs=inputs.kwargs)
        block.to(home)
    return current


@torch.no_grad()
def _head_inputs(
    model: nn.Module, spec: ArchSpec, outputs: BlockInputs, device: torch.device
) -> torch.Tensor:
    """The head's inputs ``[S, L, hidden]`` (fp32, on ``device``) from the last decoder block's
    outputs: the distillation's teacher when those are the float model's."""
    norm = get_submodule(model, spec.final_norm)
    home = next(norm.parameters()).device
    norm.to(device)
    try:
        return torch.cat([norm(h.to(device)).to(torch.float32) for h in outputs.hidden])
    finally:
        norm.to(home)


def _distill_and_redecompose(
    model: nn.Module,
    spec: ArchSpec,
    samples: torch.Tensor,
    teacher: torch.Tensor,
    config: BitStackConfig,
    ctx: MethodContext,
    records: dict[str, _LayerRecord],
) -> dict[str, Any]:
    """Distil the first ``distill_blocks`` blocks of every linear, then decompose the blocks
    after them again from the tuned prefix's residual (with each layer's kept Hessian), so every
    budget above the prefix builds on it. Updates ``records``' errors; returns the losses."""
    from quantlab.methods.bitstack_distill import distill_prefix
    from quantlab.ops import bitstack as bs_ops
    from quantlab.solvers.bitstack import output_error

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


class _ValidationSet:
    """Cached inputs of every decoder block on the validation windows, for re-running the model
    from any block on."""

    def __init__(
        self, model: nn.Module, spec: ArchSpec, tokens: torch.Tensor, device: torch.device
    ):
        self.model, self.spec, self.device = model, spec, device
        self.blocks = get_submodule(model, spec.blocks)
        self.norm = get_submodule(model, spec.final_norm)
        self.head = get_submodule(model, spec.lm_head)
        self.tokens = tokens.to(device)
        self.hidden: list[torch.Tensor] = []
        self.kwargs: dict[str, Any] = {}

    @torch.no_grad()
    def refresh(self) -> float:
        """Re-capture every block's input with the current weights; return the loss."""
        hidden: list[torch.Tensor] = []

        def catch(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden.append(args[0] if args else kwargs["hidden_states"])
            if not self.kwargs:
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                kw["use_cache"], kw["past_key_values"] = False, None
                self.kwargs.update(kw)

        handles = [b.register_forward_pre_hook(catch, with_kwargs=True) for b in self.blocks]
        try:
            logits = self.model(input_ids=self.tokens, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        self.hidden = hidden
        return self._loss(logits)

    def _loss(self, logits: torch.Tensor) -> float:
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(2, self.tokens[:, 1:].unsqueeze(2)).mean()
        return float(nll)

    @torch.no_grad()
    def loss_from(self, index: int) -> float:
        """Loss of the model re-run from decoder block ``index`` on its cached input."""
        h = self.hidden[index]
        kwargs = move_to(self.kwargs, self.device)
        for block in self.blocks[index:]:
            out = block(h, **kwargs)
            h = out[0] if isinstance(out, tuple | list) else out
        return self._loss(self.head(self.norm(h)))


def _ppl_scores(
    model: nn.Module,
    spec: ArchSpec,
    config: BitStackConfig,
    ctx: MethodContext,
    n_blocks: int,
    max_stage: int,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Measured ppl scores for stages ``1 .. max_stage``: ``(scores, ppl)`` per layer, with
    ``score = -ppl`` (lower ppl is loaded first)."""
    from quantlab.calib.data import calibration_samples

    if ctx.tokenizer is None:
        raise ValueError("order='ppl' needs a tokenizer for its validation windows")
    tokens = calibration_samples(
        ctx.tokenizer,
        ctx.calib.source,
        config.order_samples,
        config.order_seq_len,
        ctx.calib.seed + 1 + config.seed,
    )
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BitStackLinear)}
    block_of = {name: int(name[len(spec.blocks) + 1 :].split(".")[0]) for name in layers}
    # Dense stand-ins: the probe only needs the weight of b and b + 1 blocks, so plain
    # nn.Linears with the reconstructed weight run the many forwards at BLAS speed.
    dense: dict[str, nn.Linear] = {}
    for name, layer in layers.items():
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        lin.to(ctx.device)
        with torch.no_grad():
            lin.weight.copy_(_block_weight(layer, 0))
            if layer.bias is not None:
                lin.bias.copy_(layer.bias)
        dense[name] = lin
        set_submodule(model, name, lin)
    scores: dict[str, list[float]] = {name: [] for name in layers}
    ppl: dict[str, list[float]] = {name: [] for name in layers}
    val = _ValidationSet(model, spec, tokens, ctx.device)
    bar = tqdm(total=max_stage * len(layers), desc="bitstack order (ppl)", disable=not ctx.progress)
    try:
        for stage in range(1, max_stage + 1):
            val.refresh()
            for name in sorted(layers, key=lambda n: block_of[n]):
                layer, lin = layers[name], dense[name]
                if layer.n_blocks <= stage:
                    continue
                before = lin.weight.detach().clone()
                with torch.no_grad():
                    lin.weight.add_(_block_weight(layer, stage))
                loss = val.loss_from(block_of[name])
                with torch.no_grad():
                    lin.weight.copy_(before)
                ppl[name].append(math.exp(loss))
                scores[name].append(-loss)
                bar.update()
            for name, lin in dense.items():
                if layers[name].n_blocks > stage:
                    with torch.no_grad():
                        lin.weight.add_(_block_weight(layers[name], stage))
    finally:
        bar.close()
        for name, layer in layers.items():
            set_submodule(model, name, layer)
    return scores, ppl


def _block_weight(layer: BitStackLinear, b: int) -> torch.Tensor:
    """Dense fp32 contribution ``S_b ⊙ (u_b v_b)`` of one block."""
    from quantlab.ops import bitstack as bs_ops

    return bs_ops.dequant(
        layer.signs[b : b + 1], layer.u[b : b + 1], layer.v[b : b + 1], layer.in_features
    )


def _decomposed_arch(model: nn.Module) -> ArchSpec:
    """The ArchSpec of a model whose linears are already BitStack layers (``resolve`` insists on
    ``nn.Linear``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for spec in ARCHS:
        if model_type in spec.model_types:
            return spec
    raise UnsupportedArchitectureError(f"unsupported architecture {model_type!r}")


def order_blocks(
    model: nn.Module,
    config: BitStackConfig,
    ctx: MethodContext,
    output_errors: dict[str, list[float]],
) -> tuple[list[tuple[str, int]], dict[str, list[float]]]:
    """The global order of ``model``'s BitStack blocks by ``config.order``, recorded in each
    layer's ``steps``; also returns the measured validation ppls (``order="ppl"``).

    Works on a freshly decomposed model or on one loaded with all its blocks (then
    ``output_errors`` come from the checkpoint's ``quantlab_report.json``), so an existing
    decomposition can be re-ordered without decomposing again.
    """
    spec = _decomposed_arch(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BitStackLinear)}
    missing = set(layers) - set(output_errors)
    if missing:
        raise ValueError(f"no output errors for {sorted(missing)[:3]}")
    records = {
        name: _LayerRecord(list(output_errors[name]), layers[name].block_bytes, 0.0)
        for name in layers
    }
    scores = _hessian_scores(records, config.order_normalize)
    measured: dict[str, list[float]] = {}
    if config.order == "ppl":
        n_blocks = max(m.n_blocks for m in layers.values())
        max_stage = n_blocks - 1
        if config.order_max_stage is not None:
            max_stage = min(max_stage, config.order_max_stage)
        if max_stage > 0:
            device_home = next(model.parameters()).device
            model.to(ctx.device)
            try:
                ppl_scores, measured = _ppl_scores(model, spec, config, ctx, n_blocks, max_stage)
            finally:
                model.to(device_home)
            # Stages are sorted separately, so measured stages (-loss) and later Hessian-scored
            # ones need no common scale.
            for name, values in ppl_scores.items():
                scores[name] = values + scores[name][len(values) :]
    order = stage_major_order(scores)
    assign_order(model, order)
    return order, measured


def _run(model: nn.Module, config: BitStackConfig, ctx: MethodContext) -> None:
    start = time.perf_counter()
    spec = resolve(model)
    maps = smooth_maps_for(model, spec) if config.scale_alpha > 0 else ()
    samples = ctx.samples("BitStack")
    blocks = get_submodule(model, spec.blocks)
    batch = ctx.calib.batch_size or samples.shape[0]
    outside_home = next(model.parameters()).device
    move_outside_blocks(model, blocks, ctx.device)
    try:
        inputs = capture_block_inputs(model, blocks, samples, batch, ctx.device)
    finally:
        move_outside_blocks(model, blocks, outside_home)

    teacher = None
    if config.distill_steps and config.replay_blocks:
        # Replay feeds the loop compressed outputs, so the teacher needs its own float pass.
        teacher = _head_inputs(model, spec, _float_outputs(blocks, inputs, ctx.device), ctx.device)
    records: dict[str, _LayerRecord] = {}
    skipped_maps: list[str] = []
    for index in tqdm(range(len(blocks)), desc="bitstack", disable=not ctx.progress):
        block = blocks[index]
        home = next(block.parameters()).device
        block.to(ctx.device)
        outs = _decompose_block(
            index, block, spec, maps, inputs, config, ctx, records, skipped_maps
        )
        block.to(home)
        inputs = BlockInputs(hidden=outs, kwargs=inputs.kwargs)
    decompose_seconds = time.perf_counter() - start
    distill: dict[str, Any] = {}
    if config.distill_steps:
        if teacher is None:  # without replay the loop's last outputs are the float model's
            teacher = _head_inputs(model, spec, inputs, ctx.device)
        distill = _distill_and_redecompose(model, spec, samples, teacher, config, ctx, records)

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


register_method(
    Method(
        name="bitstack",
        config_cls=BitStackConfig,
        run=_run,
        config_from_args=_config_from_args,
        add_arguments=_add_arguments,
        export_formats=("quantlab",),
        help="sign x low-rank residual blocks, loadable to any memory budget",
    )
)
