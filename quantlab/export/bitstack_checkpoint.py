"""BitStack checkpoints loaded to a memory budget, and resized in place at run time.

A BitStack checkpoint is an ordinary quantlab checkpoint
(:mod:`quantlab.export.quantlab_checkpoint`)
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

import math
import os
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.export.checkpoint_files import CheckpointFiles, parse_size
from quantlab.export.errors import CheckpointError
from quantlab.export.model_fill import fill_model
from quantlab.export.quantlab_checkpoint import check_checkpoint
from quantlab.export.safetensors_file import TensorInfo, file_sha256
from quantlab.export.schema import QUANT_METHOD, module_defaults, read_config_json
from quantlab.formats.bitstack import FORMAT_NAME, block_bytes
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


class BudgetError(ValueError):
    """A memory budget below the smallest configuration of a checkpoint."""


def parse_memory(budget: str | int | float) -> int:
    """Bytes of a budget: a number of bytes, or a string such as ``"350MB"``, ``"1.5 GiB"``
    (:func:`quantlab.export.checkpoint_files.parse_size`)."""
    return parse_size(budget, "memory budget")


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
    identity: _FileIdentity | None = None

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
    return _tensor_bytes(CheckpointFiles(path).tensors.values(), float_bytes)


def _tensor_bytes(infos: Iterable[TensorInfo], float_bytes: int) -> int:
    """Bytes of ``infos`` with float tensors at ``float_bytes`` per element, others as stored."""
    return sum(
        math.prod(info.shape)
        * (float_bytes if info.dtype.is_floating_point else _element_bytes(info.dtype))
        for info in infos
    )


def is_bitstack_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a quantlab checkpoint with at least one BitStack module (a damaged
    config answers False here; the loader then names the problem)."""
    root = Path(path)
    if not (root / "config.json").is_file():
        return False
    try:
        _, config = read_config_json(root)
    except CheckpointError:
        return False
    qcfg = config.get("quantization_config")
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != QUANT_METHOD:
        return False
    defaults = module_defaults(qcfg)
    modules = qcfg.get("modules")
    if not isinstance(modules, dict):
        return False
    return any(
        isinstance(spec, dict) and {**defaults, **spec}.get("format") == FORMAT_NAME
        for spec in modules.values()
    )


def _element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _stack_shape(tensors: dict[str, TensorInfo], name: str) -> tuple[int, int]:
    """``(out_features, in_features)`` of a BitStack module from its stored tensors (whose block
    counts check_checkpoint already matched with the spec's ``n_blocks``)."""
    signs, v = tensors[f"{name}.signs"].shape, tensors[f"{name}.v"].shape
    return signs[1], v[2]


def plan_from_checkpoint(
    path: str | os.PathLike[str], dtype: torch.dtype, verify: bool = True
) -> BitStackPlan:
    """Read a BitStack checkpoint's configurations (config.json and the safetensors header),
    after the checks of :func:`~quantlab.export.quantlab_checkpoint.check_checkpoint`.

    The bytes of each block are recomputed from the stored tensors' shapes (a ``block_bytes`` in
    config.json that disagrees is refused, not trusted), and the modules' ``steps`` must together
    be a permutation of ``0 .. len(order) - 1``.
    """
    checked = check_checkpoint(path, verify)
    root, tensors = checked.root, checked.tensors
    cfg_path = root / "config.json"
    modules = {n: s for n, s in checked.specs.items() if s.get("format") == FORMAT_NAME}
    if not modules:
        raise CheckpointError(f"{root}: no bitstack modules; not a BitStack checkpoint")
    order: list[tuple[int, str, int]] = []
    for name, spec in modules.items():
        out_features, in_features = _stack_shape(tensors, name)
        actual = block_bytes(out_features, in_features, spec["rank"])
        if spec.get("block_bytes", actual) != actual:
            raise CheckpointError(
                f"{cfg_path}: {name}: block_bytes {spec['block_bytes']} but its tensors "
                f"([{out_features}, {in_features}], rank {spec['rank']}) take {actual} bytes "
                "per block"
            )
        spec["block_bytes"] = actual
        steps = spec.get("steps", [])
        if len(steps) != spec["n_blocks"] - 1:
            raise CheckpointError(
                f"{cfg_path}: {name} has {spec['n_blocks']} blocks but {len(steps)} order steps"
            )
        if steps != sorted(steps):
            raise CheckpointError(f"{cfg_path}: {name}: order steps are not increasing")
        order.extend((step, name, block) for block, step in enumerate(steps, start=1))
    positions = sorted(step for step, _, _ in order)
    if positions != list(range(len(order))):
        raise CheckpointError(
            f"{cfg_path}: the modules' order steps are not a permutation of 0..{len(order) - 1} "
            "(a position is repeated or skipped); the loading order is damaged"
        )
    order.sort()
    packed = {f"{n}.{t}" for n in modules for t in _BLOCK_TENSORS}
    fixed = _tensor_bytes(
        (info for key, info in tensors.items() if key not in packed),
        _element_bytes(dtype),
    )
    others = {n: s for n, s in checked.specs.items() if n not in modules}
    return BitStackPlan(
        root,
        fixed,
        modules,
        [(n, b) for _, n, b in order],
        _element_bytes(dtype),
        other_specs=others,
        identity=_FileIdentity.of(root, checked.files.file_names(), checked.manifest),
    )


@dataclass(frozen=True)
class _FileIdentity:
    """Which files a model was loaded from (config.json and the weight files: the single file, or
    the shard index and every shard): stat identity (device, inode, size, mtime) and content
    hash, so a resize can refuse a replaced checkpoint."""

    names: tuple[str, ...]
    stats: tuple[tuple[int, int, int, int], ...]
    hashes: tuple[str, ...]

    @staticmethod
    def _stats(root: Path, names: tuple[str, ...]) -> tuple[tuple[int, int, int, int], ...]:
        out = []
        for name in names:
            st = (root / name).stat()
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    @classmethod
    def of(
        cls, root: Path, weight_files: list[str], manifest: dict[str, Any] | None = None
    ) -> _FileIdentity:
        """The identity of ``root``'s files now; the hashes come from ``manifest`` when the files
        were just verified against it (hashing the weights again would read them twice)."""
        names = ("config.json", *weight_files)
        stats = cls._stats(root, names)
        recorded = (manifest or {}).get("files", {})
        hashes = tuple(
            recorded[name]["sha256"] if name in recorded else file_sha256(root / name)
            for name in names
        )
        return cls(names, stats, hashes)

    def check(self, root: Path) -> None:
        """Raise :class:`CheckpointError` unless ``root`` still holds the same files (a stat
        change alone, e.g. a copy back, is accepted when the contents hash the same)."""
        try:
            if self._stats(root, self.names) == self.stats:
                return
            same = tuple(file_sha256(root / name) for name in self.names) == self.hashes
        except FileNotFoundError:
            same = False
        if not same:
            raise CheckpointError(
                f"{root}: the checkpoint was replaced or modified since this model was loaded "
                "from it; resizing would mix blocks of two checkpoints. Load it again with "
                "quantlab.load(path, memory_budget=...)"
            )


@dataclass
class _Source:
    """Where a loaded BitStack model gets more blocks from."""

    plan: BitStackPlan
    steps: int


def _read_blocks(
    plan: BitStackPlan, want: dict[str, tuple[int, int]]
) -> dict[str, dict[str, torch.Tensor]]:
    """Blocks ``[start, stop)`` of each module's stacked tensors, read as safetensors slices,
    from the file the plan was made from (refused if it was replaced since)."""
    plan.identity.check(plan.path)
    out: dict[str, dict[str, torch.Tensor]] = {}
    with CheckpointFiles(plan.path) as reader:
        for name, (start, stop) in want.items():
            out[name] = {t: reader.get_leading(f"{name}.{t}", stop)[start:] for t in _BLOCK_TENSORS}
    return out


def load_bitstack(
    path: str | os.PathLike[str],
    memory_budget: str | int | float | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    accounting_dtype: torch.dtype | None = None,
    verify: bool = True,
) -> nn.Module:
    """Load a BitStack checkpoint within ``memory_budget`` (``None``: every block).

    Reads only the tensors of the chosen configuration (``verify`` hashes the whole files once
    against the checksums recorded at export). The model gets ``model.resize(budget)`` and
    ``model.memory_bytes()``. ``accounting_dtype`` (default ``dtype``) is the element size the
    budget assumes for the undecomposed float tensors: e.g. compute in fp32 but budget as if they
    were held in fp16 (how docs/methods/bitstack.md compares methods).

    Raises:
        BudgetError: the budget is below the smallest configuration (the message names it).
        CheckpointError: missing, truncated or inconsistent files.
    """
    plan = plan_from_checkpoint(path, accounting_dtype or dtype, verify)
    steps = (
        len(plan.order) if memory_budget is None else plan.steps_for(parse_memory(memory_budget))
    )
    counts = plan.blocks_at(steps)
    specs = dict(plan.other_specs)
    files = CheckpointFiles(plan.path)
    found = dict(files.tensors)
    for name, spec in plan.modules.items():
        b = counts[name]
        specs[name] = {**spec, "n_blocks": b, "steps": list(spec.get("steps", []))[: b - 1]}
        for t in _BLOCK_TENSORS:
            info = found[f"{name}.{t}"]
            found[f"{name}.{t}"] = TensorInfo((b, *info.shape[1:]), info.dtype)

    plan.identity.check(plan.path)
    with files as reader:

        def get(key: str) -> torch.Tensor:
            name, _, suffix = key.rpartition(".")
            if name in counts and suffix in _BLOCK_TENSORS:
                return reader.get_leading(key, counts[name])
            return reader.get(key)

        model = fill_model(plan.path, found, get, specs, dtype, files.source)
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
        CheckpointError: growing needs blocks, and the checkpoint's files are no longer the ones
            the model was loaded from (replaced or modified: :class:`_FileIdentity`).
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
    # Read before changing anything: a replaced checkpoint (or a read error) leaves the model as
    # it was.
    added = _read_blocks(plan, grow) if grow else {}
    for name, b in counts.items():
        if b < layers[name].n_blocks:
            layers[name].truncate(b)
    for name, tensors in added.items():
        layers[name].append_blocks(tensors["signs"], tensors["u"], tensors["v"])
    for name, layer in layers.items():
        layer.steps = [int(s) for s in plan.modules[name].get("steps", [])][: layer.n_blocks - 1]
    source.steps = steps
    return plan.config_bytes(steps)
