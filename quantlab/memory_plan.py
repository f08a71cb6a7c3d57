"""The memory a block-by-block run will need, estimated before it starts from the model's shapes
and the run's options, so that a run that cannot fit fails at once with the figure instead of
after an hour.

What a streamed run holds at its peak (:func:`plan_memory`, each term an upper bound):

* the process itself (interpreter, torch, tokenizer): a fixed allowance;
* one decoder block's weights in the compute dtype, plus the solver's fp32 working copies of its
  largest linear (weight, its transposed working copy, the result);
* the per-layer statistics of calibrated methods: for GPTQ the fp32 ``in x in`` Hessian of the
  group being solved (each is freed once solved) and one more for its solver (damped, factored
  and inverted in place); for the other second-order solvers one per sequential group of the
  block and 3.5 more of the widest (damped copy, Cholesky factor, inverse);
* one calibration batch's intermediates inside a block forward (``batch x seq_len`` tokens times
  three of the widest projection plus six of the hidden size, in the compute dtype);
* the activations between blocks, in RAM up to the activation budget, the rest spilled to
  ``--offload-dir``: the calibration batches' (the block's inputs and its outputs: two copies of
  ``samples x seq_len x hidden``; AWQ rounded by GPTQ carries a second, float stream) and the
  evaluation windows' (baseline and result, inputs and outputs);
* the embedding in the compute dtype while the first block's inputs are caught, and with an
  evaluation the embedding, an untied head and one window's logits at the end.

The activations and the process are held throughout; the block (with its solver and forward),
the embedding at the start and the head at the end are held one after the other, so the plan
counts the largest of those three.

On a GPU the block, its solver and forward, and the embedding/head are in device memory (planned
against what the device has free), while the host holds the process, the activations between
blocks (they are kept on the host) and one part's tensors as they are read from the checkpoint
on their way to the device.

The activation budget defaults to what the memory available now leaves after everything else
(:func:`plan_memory` with ``activation_budget=None``), so activations spill only when they must.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from quantlab.calib.capture import stage_parts
from quantlab.models.arch import ArchSpec, get_submodule

__all__ = ["MemoryPlan", "plan_memory"]

# Interpreter, torch, transformers, tokenizer: measured 0.4-0.6 GiB RSS before any weight.
PROCESS_BYTES = 3 << 29  # 1.5 GiB
# Spare room the automatic activation budget leaves unplanned.
_MARGIN = 0.9


@dataclass
class MemoryPlan:
    """Estimated peak host memory of a run, by part (bytes)."""

    process: int
    block_weights: int
    solver: int
    forward: int
    activations: int  # all activations between blocks: calibration and evaluation windows
    activations_in_ram: int  # the part kept in RAM (the rest spills to the offload directory)
    evaluation: int  # the evaluation windows' part of ``activations``
    outside: int
    available: int | None  # host memory available when the run was planned
    activation_budget: int | None
    device: str = "cpu"  # where the blocks are computed
    device_available: int | None = None  # free device memory when the run was planned (GPU)

    @property
    def on_device(self) -> bool:
        return self.device != "cpu"

    @property
    def total(self) -> int:
        """Host memory."""
        held = self.process + self.activations_in_ram
        if self.on_device:
            # Only the tensors read on their way to the device: a block's or the embedding/head.
            return held + max(self.block_weights, self.outside)
        return held + max(self.block_weights + self.solver + self.forward, self.outside)

    @property
    def device_total(self) -> int:
        """Device memory (0 on the CPU)."""
        if not self.on_device:
            return 0
        return max(self.block_weights + self.solver + self.forward, self.outside)

    @property
    def spilled(self) -> int:
        return self.activations - self.activations_in_ram

    def fits(self) -> bool:
        host = self.available is None or self.total <= self.available
        device = self.device_available is None or self.device_total <= self.device_available
        return host and device

    def describe(self) -> str:
        """One line: the total and its parts."""
        parts = [
            ("block", self.block_weights),
            ("solver", self.solver),
            ("forward", self.forward),
            ("activations", self.activations_in_ram),
            ("embedding/head", self.outside),
            ("process", self.process),
        ]
        text = ", ".join(f"{name} {_gib(size)}" for name, size in parts if size)
        if self.evaluation:
            text += f"; activations include {_gib(self.evaluation)} of evaluation windows"
        line = f"needs about {_gib(self.total)} of host memory ({text})"
        if self.spilled:
            line += f"; {_gib(self.spilled)} of activations spill to the offload directory"
        if self.available is not None:
            line += f"; {_gib(self.available)} available"
        if self.on_device:
            line += f"; on {self.device} about {_gib(self.device_total)}"
            if self.device_available is not None:
                line += f" ({_gib(self.device_available)} free)"
        return line

    def to_dict(self) -> dict[str, Any]:
        extra = {"total": self.total, "device_total": self.device_total, "spilled": self.spilled}
        return asdict(self) | extra


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan_memory(
    model: nn.Module,
    spec: ArchSpec,
    config: Any,
    n_samples: int,
    seq_len: int,
    batch_size: int | None,
    dtype: torch.dtype,
    eval_windows: int = 0,
    eval_seq_len: int = 0,
    activation_budget: int | None = None,
    offload: bool = False,
    available: int | None = None,
    device: str = "cpu",
    device_available: int | None = None,
    max_stage_bytes: int | None = None,
) -> MemoryPlan:
    """The :class:`MemoryPlan` of quantizing ``model`` (a meta-device skeleton is enough: only
    shapes are read) with ``config`` on ``n_samples x seq_len`` calibration tokens in batches of
    ``batch_size`` (default: all), in ``dtype``, evaluating ``eval_windows x eval_seq_len`` tokens
    in the same pass. ``activation_budget``: bytes of activations kept in RAM (``None``: what
    ``available`` leaves, when ``offload`` lets the rest spill; else all of them). ``device``: the
    type of device the blocks are computed on (``"cuda"``: block, solver and forward are planned
    against ``device_available``). ``max_stage_bytes``: the calibration's limit on one pass's
    Hessians (:attr:`quantlab.methods.base.CalibConfig.max_stage_bytes`)."""
    elt = _element_size(dtype)
    blocks = get_submodule(model, spec.blocks)
    embedding = model.get_input_embeddings().weight
    vocab, hidden = embedding.shape
    block_weights = max(sum(p.numel() for p in block.parameters()) for block in blocks) * elt
    # Every distinct block layout (a family may mix dense and mixture-of-experts blocks).
    layouts: dict[tuple[tuple[tuple[str, ...], ...], ...], nn.Module] = {}
    for block in blocks:
        stages = tuple(tuple(stage) for stage in spec.stages_of(block))
        layouts.setdefault(stages, block)
    linears = [
        get_submodule(block, name)
        for stages, block in layouts.items()
        for stage in stages
        for group in stage
        for name in group
    ]
    largest = max(m.in_features * m.out_features for m in linears)
    widest = max(max(m.in_features, m.out_features) for m in linears)
    block_weights += 3 * 4 * largest  # the solver's fp32 working copies of the largest weight

    solver = 0
    calibrated = bool(getattr(config, "needs_calibration", False))
    if calibrated:
        # Per layout and stage, the input width of each group: a stage's groups (a mixture's
        # experts) gather their statistics in one pass, so their Hessians are alive together.
        stage_inputs = [
            [get_submodule(block, group[0]).in_features for group in stage]
            for stages, block in layouts.items()
            for stage in stages
        ]
        widest_input = max(k for stage in stage_inputs for k in stage)
        every_group = max(
            sum(k * k for stage in stages_inputs for k in stage)
            for stages_inputs in _per_layout(layouts, stage_inputs)
        )
        if getattr(config, "method", "") == "gptq":
            # GPTQ frees each group's Hessian once it is solved and allocates the next at its
            # first input, so with true-sequential groups one stage's are alive at a time; its
            # solver works in one more K x K (damped, factored and inverted in place; measured
            # in tests/test_memory_plan.py).
            # A stage over the calibration's stage limit is gathered in parts.
            largest_stage = max(
                sum(stage[i] ** 2 for i in part)
                for stage in stage_inputs
                for part in stage_parts(stage, max_stage_bytes)
            )
            live = largest_stage if config.true_sequential else every_group
            solver = 4 * live + 4 * widest_input**2
        else:
            # The other second-order solvers (Fair-GPTQ's group-bias matrix and its sums, PVQ,
            # ternary, BitStack) hold more: every group's Hessian and ~3.5 K x K of the widest.
            solver = 4 * every_group + 14 * widest_input**2

    forward = 0
    activations = 0
    if calibrated:
        batch = min(batch_size or n_samples, n_samples)
        forward = batch * seq_len * (3 * widest + 6 * hidden) * elt
        streams = 2
        if getattr(config, "method", "") == "awq" and getattr(config, "rounding", "") == "gptq":
            streams = 4
        activations = streams * n_samples * seq_len * hidden * elt

    evaluation = 0
    outside = embedding.numel() * elt
    if eval_windows:
        evaluation = 4 * eval_windows * eval_seq_len * hidden * elt
        activations += evaluation
        forward = max(forward, eval_seq_len * (3 * widest + 6 * hidden) * elt)
        head = model.get_output_embeddings()
        if head is not None and head.weight is not embedding:
            outside += head.weight.numel() * elt
        outside += 2 * eval_seq_len * vocab * 4  # one window's logits and log-probabilities

    if device == "cpu":
        others = PROCESS_BYTES + max(block_weights + solver + forward, outside)
    else:
        others = PROCESS_BYTES + max(block_weights, outside)
    if activation_budget is None:
        if offload and available is not None:
            activation_budget = max(0, int(_MARGIN * available) - others)
        in_ram = activations if activation_budget is None else min(activations, activation_budget)
    else:
        in_ram = min(activations, activation_budget) if offload else activations
    return MemoryPlan(
        process=PROCESS_BYTES,
        block_weights=block_weights,
        solver=solver,
        forward=forward,
        activations=activations,
        activations_in_ram=in_ram,
        evaluation=evaluation,
        outside=outside,
        available=available,
        activation_budget=activation_budget,
        device=device,
        device_available=device_available,
    )


def _per_layout(
    layouts: dict[tuple[tuple[tuple[str, ...], ...], ...], nn.Module], stage_inputs: list[list[int]]
) -> list[list[list[int]]]:
    """``stage_inputs`` (every layout's stages, concatenated) split back per layout."""
    out, start = [], 0
    for stages in layouts:
        out.append(stage_inputs[start : start + len(stages)])
        start += len(stages)
    return out
