"""BitStack checkpoints loaded to a memory budget, and resized in place at run time.

A BitStack checkpoint is an ordinary quantlab checkpoint (:mod:`quantlab.export.checkpoint`)
whose decomposed linears are ``bitstack`` modules. Each module's spec records ``block_bytes`` (the
exact bytes of one of its residual blocks) and ``steps``: ``steps[i]`` is the position of its block
``i + 1`` in the global loading order. The order and its byte costs are therefore in
``config.json``:

* configuration 0: every decomposed linear holds its first block;
* configuration ``t + 1``: configuration ``t`` plus the block at position ``t`` of the order,
  costing that module's ``block_bytes``.

Memory convention: the bytes of every tensor the loaded model holds -- packed signs (uint8) and
fp16 factors as stored, everything else (embeddings, norms, biases, undecomposed linears) at the
load dtype's element size; a tied head is counted once (it shares the embedding's storage).
``quantlab.load(path, memory_budget=...)`` picks the largest configuration that fits and reads only
its tensors (safetensors slices of the stacked blocks); ``model.resize(budget)`` (or
:func:`resize`) then moves to another configuration in place, reading only the added blocks.
"""

from __future__ import annotations

import json
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from quantlab.export.checkpoint import (
    WEIGHTS_NAME,
    CheckpointError,
    instantiate_quantized,
    module_defaults,
    read_safetensors_header,
    validate_checkpoint,
)
from quantlab.formats.bitstack import FORMAT_NAME
from quantlab.nn.bitstack_linear import BitStackLinear

__all__ = [
    "BudgetError",
    "checkpoint_memory_bytes",
    "BitStackPlan",
    "is_bitstack_checkpoint",
    "load_bitstack",
    "memory_bytes",
    "parse_memory",
    "plan_from_checkpoint",
    "resize",
]

_BLOCK_TENSORS = ("signs", "u", "v")
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


class BudgetError(ValueError):
    """A memory budget below the smallest configuration of a checkpoint."""


def parse_memory(budget: str | int | float) -> int:
    """Bytes of a budget: a number of bytes, or a string such as ``"350MB"``, ``"1.5 GiB"``.

    ``kB``/``MB``/``GB`` are decimal (10^3, 10^6, 10^9); ``KiB``/``MiB``/``GiB`` binary.
    """
    if isinstance(budget, bool):
        raise ValueError(f"memory budget must be bytes or a size string, got {budget!r}")
    if isinstance(budget, int | float):
        value = float(budget)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(budget))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"memory budget {budget!r}: expected a number with an optional unit "
                f"({', '.join(u for u in ('B', 'kB', 'MB', 'GB', 'KiB', 'MiB', 'GiB'))})"
            )
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not value > 0:
        raise ValueError(f"memory budget must be positive, got {budget!r}")
    return int(value)


@dataclass
class BitStackPlan:
    """The configurations of one checkpoint.

    Attributes:
        path: the checkpoint directory.
        fixed_bytes: bytes of everything outside the packed blocks, at ``element_bytes``.
        modules: ``{name: spec}`` of every BitStack module (``n_blocks``, ``block_bytes``, ...).
        order: ``[(name, block)]``, the global loading order of blocks ``>= 1``.
        element_bytes: bytes per float element assumed for the fixed tensors.
    """

    path: Path
    fixed_bytes: int
    modules: dict[str, dict[str, Any]]
    order: list[tuple[str, int]]
    element_bytes: int
    other_specs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def base_bytes(self) -> int:
        """Configuration 0: every module with one block."""
        return self.fixed_bytes + sum(int(s["block_bytes"]) for s in self.modules.values())

    @property
    def total_bytes(self) -> int:
        return self.config_bytes(len(self.order))

    def config_bytes(self, steps: int) -> int:
        """Bytes of configuration ``steps`` (the first ``steps`` blocks of the order added)."""
        return self.base_bytes + sum(
            int(self.modules[name]["block_bytes"]) for name, _ in self.order[:steps]
        )

    def steps_for(self, budget_bytes: int) -> int:
        """The largest configuration within ``budget_bytes``."""
        if budget_bytes < self.base_bytes:
            raise BudgetError(
                f"memory budget {budget_bytes / 1e6:.2f} MB is below the smallest configuration "
                f"of {self.path} ({self.base_bytes / 1e6:.2f} MB = {self.base_bytes} bytes: one "
                f"block per layer plus {self.fixed_bytes / 1e6:.2f} MB of embeddings, norms and "
                "other undecomposed tensors)"
            )
        used, steps = self.base_bytes, 0
        for name, _ in self.order:
            cost = int(self.modules[name]["block_bytes"])
            if used + cost > budget_bytes:
                break
            used += cost
            steps += 1
        return steps

    def blocks_at(self, steps: int) -> dict[str, int]:
        """Blocks each module holds in configuration ``steps``."""
        counts = dict.fromkeys(self.modules, 1)
        for name, _ in self.order[:steps]:
            counts[name] += 1
        return counts


def checkpoint_memory_bytes(path: str | os.PathLike[str], float_bytes: int = 2) -> int:
    """Bytes of a (any method's) checkpoint's tensors with every float tensor at ``float_bytes``
    per element and integer tensors as stored: the convention of the ppl-vs-memory comparison
    (fp16 deployment; the tied head is stored once)."""
    header = read_safetensors_header(Path(path) / WEIGHTS_NAME)
    total = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        numel = 1
        for s in info["shape"]:
            numel *= s
        is_float = info["dtype"] in ("F64", "F32", "F16", "BF16")
        total += numel * (float_bytes if is_float else _DTYPE_BYTES.get(info["dtype"], 1))
    return total


def is_bitstack_checkpoint(path: str | os.PathLike[str]) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        qcfg = json.loads(cfg.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    if qcfg.get("quant_method") != "quantlab":
        return False
    defaults = module_defaults(qcfg)
    modules = qcfg.get("modules") or {}
    return any({**defaults, **spec}.get("format") == FORMAT_NAME for spec in modules.values())


def _element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan_from_checkpoint(path: str | os.PathLike[str], dtype: torch.dtype) -> BitStackPlan:
    """Read a BitStack checkpoint's configurations (config.json and the safetensors header)."""
    root = Path(path)
    qcfg = validate_checkpoint(root)
    defaults = module_defaults(qcfg)
    specs = {name: {**defaults, **spec} for name, spec in qcfg["modules"].items()}
    modules = {n: s for n, s in specs.items() if s.get("format") == FORMAT_NAME}
    if not modules:
        raise CheckpointError(f"{root}: no bitstack modules; not a BitStack checkpoint")
    header = read_safetensors_header(root / WEIGHTS_NAME)
    for name, spec in modules.items():
        shape = header[f"{name}.signs"]["shape"]
        if shape[0] != int(spec["n_blocks"]):
            raise CheckpointError(
                f"{root / WEIGHTS_NAME}: {name}.signs holds {shape[0]} blocks, config.json says "
                f"{spec['n_blocks']}"
            )
    order: list[tuple[int, str, int]] = []
    for name, spec in modules.items():
        steps = [int(s) for s in spec.get("steps", [])]
        if len(steps) != int(spec["n_blocks"]) - 1:
            raise CheckpointError(
                f"{root / 'config.json'}: {name} has {spec['n_blocks']} blocks but "
                f"{len(steps)} order steps"
            )
        if steps != sorted(steps):
            raise CheckpointError(f"{root / 'config.json'}: {name}: order steps are not increasing")
        order.extend((step, name, block) for block, step in enumerate(steps, start=1))
    positions = sorted(step for step, _, _ in order)
    if len(set(positions)) != len(positions):
        raise CheckpointError(f"{root / 'config.json'}: two blocks share an order position")
    order.sort()
    element = _element_bytes(dtype)
    packed = {f"{n}.{t}" for n in modules for t in _BLOCK_TENSORS}
    fixed = 0
    for key, info in header.items():
        if key == "__metadata__" or key in packed:
            continue
        numel = 1
        for s in info["shape"]:
            numel *= s
        is_float = info["dtype"] in ("F64", "F32", "F16", "BF16")
        fixed += numel * (element if is_float else _DTYPE_BYTES.get(info["dtype"], 1))
    others = {n: s for n, s in specs.items() if n not in modules}
    return BitStackPlan(
        root, fixed, modules, [(n, b) for _, n, b in order], element, other_specs=others
    )


@dataclass
class _Source:
    """Where a loaded BitStack model gets more blocks from."""

    plan: BitStackPlan
    steps: int


def _read_blocks(
    plan: BitStackPlan, want: dict[str, tuple[int, int]]
) -> dict[str, dict[str, torch.Tensor]]:
    """Blocks ``[start, stop)`` of each module's stacked tensors, read as safetensors slices."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(plan.path / WEIGHTS_NAME), framework="pt", device="cpu") as f:
        for name, (start, stop) in want.items():
            out[name] = {t: f.get_slice(f"{name}.{t}")[start:stop] for t in _BLOCK_TENSORS}
    return out


def load_bitstack(
    path: str | os.PathLike[str],
    memory_budget: str | int | float | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    accounting_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load a BitStack checkpoint within ``memory_budget`` (``None``: every block).

    Reads only the tensors of the chosen configuration. The model gets ``model.resize(budget)``
    and ``model.memory_bytes()``. ``accounting_dtype`` (default ``dtype``) is the element size the
    budget assumes for the undecomposed float tensors: e.g. compute in fp32 but budget as if they
    were held in fp16 (how docs/methods/bitstack.md compares methods).

    Raises:
        BudgetError: the budget is below the smallest configuration (the message names it).
        CheckpointError: missing, truncated or inconsistent files.
    """
    plan = plan_from_checkpoint(path, accounting_dtype or dtype)
    steps = (
        len(plan.order) if memory_budget is None else plan.steps_for(parse_memory(memory_budget))
    )
    counts = plan.blocks_at(steps)
    blocks = _read_blocks(plan, {name: (0, b) for name, b in counts.items()})
    packed = {f"{n}.{t}" for n in plan.modules for t in _BLOCK_TENSORS}
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(plan.path / WEIGHTS_NAME), framework="pt", device="cpu") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open handles have no __iter__
            if key not in packed:
                state[key] = f.get_tensor(key)
    for name, tensors in blocks.items():
        for t, value in tensors.items():
            state[f"{name}.{t}"] = value
    specs = dict(plan.other_specs)
    for name, spec in plan.modules.items():
        b = counts[name]
        specs[name] = {**spec, "n_blocks": b, "steps": list(spec.get("steps", []))[: b - 1]}
    model = instantiate_quantized(plan.path, state, specs, dtype)
    model.to(device)
    _attach(model, _Source(plan, steps))
    return model


def _attach(model: nn.Module, source: _Source) -> None:
    model.bitstack_source = source
    model.resize = types.MethodType(resize, model)
    model.memory_bytes = types.MethodType(memory_bytes, model)


def _bitstack_layers(model: nn.Module) -> dict[str, BitStackLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BitStackLinear)}


def memory_bytes(model: nn.Module) -> int:
    """Bytes of every tensor ``model`` holds (tied tensors once): the budget's convention."""
    seen: set[tuple[int, int]] = set()
    total = 0
    # state_dict, not buffers(): non-persistent buffers (rotary tables) are derived, not weights.
    for tensor in model.state_dict().values():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident in seen:
            continue
        seen.add(ident)
        total += tensor.numel() * tensor.element_size()
    return total


@torch.no_grad()
def resize(model: nn.Module, memory_budget: str | int | float) -> int:
    """Grow or shrink a model loaded by :func:`load_bitstack` to the largest configuration within
    ``memory_budget``, in place: dropped blocks are released, added ones are read from the
    checkpoint file (only those). Returns the configuration's bytes.

    Raises:
        BudgetError: the budget is below the smallest configuration.
        ValueError: the model was not loaded from a BitStack checkpoint.
    """
    source = getattr(model, "bitstack_source", None)
    if not isinstance(source, _Source):
        raise ValueError(
            "resize needs a model loaded by quantlab.load(path, memory_budget=...) from a "
            "BitStack checkpoint (it reads added blocks from that file)"
        )
    plan = source.plan
    steps = plan.steps_for(parse_memory(memory_budget))
    counts = plan.blocks_at(steps)
    layers = _bitstack_layers(model)
    missing = set(counts) - set(layers)
    if missing:
        raise ValueError(f"the model lacks BitStack layers {sorted(missing)[:3]} of its checkpoint")
    grow = {n: (layers[n].n_blocks, b) for n, b in counts.items() if b > layers[n].n_blocks}
    for name, b in counts.items():
        if b < layers[name].n_blocks:
            layers[name].truncate(b)
    if grow:
        for name, tensors in _read_blocks(plan, grow).items():
            layer = layers[name]
            layer.append_blocks(tensors["signs"], tensors["u"], tensors["v"])
    for name, layer in layers.items():
        layer.steps = [int(s) for s in plan.modules[name].get("steps", [])][: layer.n_blocks - 1]
    source.steps = steps
    return plan.config_bytes(steps)
