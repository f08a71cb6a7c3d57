"""A model whose weights stay on disk until a part of it is needed.

:func:`empty_model` builds a transformers model from its config with every parameter on the meta
device (no memory, no random initialisation) and every buffer real: the buffers a model computes
in its constructor (rotary ``inv_freq``) are not in checkpoints and are cheap. :class:`LazyModel`
then puts the checkpoint's tensors into one submodule at a time -- a decoder block, the
embedding, the final norm and head -- memory-mapped from the safetensors files (single file or
shards with ``model.safetensors.index.json``) and converted to the compute dtype, and puts them
back on the meta device when that part is done. Parameters keep their identity while they are
loaded and released (:func:`torch.utils.swap_tensors`), so tied weights (an embedding shared with
the head) stay tied and a checkpoint that stores them once loads them once.

Headers are checked up front (:func:`quantlab.export.safetensors_file.read_header`): a missing
shard, a truncated or corrupt file, a tensor the model does not have or a shape that differs
from the model's is a :class:`CheckpointError` naming it before any block runs.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.export.errors import CheckpointError
from quantlab.export.safetensors_file import SafetensorsReader, TensorInfo, read_header

__all__ = ["CheckpointWeights", "LazyModel", "empty_model"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointWeights:
    """The tensors of a checkpoint directory by name, read one at a time from the memory-mapped
    safetensors files; every header is checked when this object is made."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file_of: dict[str, Path] = {}
        self.infos: dict[str, TensorInfo] = {}
        index = self.path / INDEX_FILE
        if index.is_file():
            files = self._read_index(index)
        elif (self.path / SINGLE_FILE).is_file():
            files = {self.path / SINGLE_FILE: None}
        else:
            raise CheckpointError(
                f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}; quantlab reads safetensors "
                "checkpoints only (a pytorch_model.bin would have to be unpickled)"
            )
        for file, names in files.items():
            header = read_header(file)
            if names is not None:
                missing = sorted(names - set(header.tensors))
                if missing:
                    raise CheckpointError(
                        f"{file}: {INDEX_FILE} places {len(missing)} tensors in this shard that "
                        f"it does not hold (first: {missing[0]!r}); the checkpoint is incomplete"
                    )
            for name, info in header.tensors.items():
                if names is not None and name not in names:
                    continue  # the index is authoritative where a tensor appears in two files
                self.infos[name] = info
                self._file_of[name] = file
        self._readers: dict[Path, SafetensorsReader] = {}

    def _read_index(self, index: Path) -> dict[Path, set[str]]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: unreadable shard index ({exc})") from exc
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: weight_map must be a non-empty object")
        files: dict[Path, set[str]] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or Path(file).name != file:
                raise CheckpointError(f"{index}: {name!r} maps to {file!r}, not a file name")
            shard = self.path / file
            if not shard.is_file():
                raise CheckpointError(f"{index}: shard {file} (holding {name!r}) is missing")
            files.setdefault(shard, set()).add(name)
        return files

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def dtype(self) -> torch.dtype:
        """The checkpoint's floating-point dtype (the most common one by bytes)."""
        counts: Counter[torch.dtype] = Counter()
        for info in self.infos.values():
            if info.dtype.is_floating_point:
                counts[info.dtype] += _numel(info.shape) * _itemsize(info.dtype)
        if not counts:
            raise CheckpointError(f"{self.path}: no floating-point tensors")
        return counts.most_common(1)[0][0]

    def nbytes(self, prefix: str = "") -> int:
        """Bytes stored for the tensors whose names start with ``prefix``."""
        return sum(
            _numel(info.shape) * _itemsize(info.dtype)
            for name, info in self.infos.items()
            if name.startswith(prefix)
        )

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` on the CPU in its stored dtype."""
        file = self._file_of.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in the checkpoint")
        reader = self._readers.get(file)
        if reader is None:
            reader = SafetensorsReader(file).__enter__()
            self._readers[file] = reader
        return reader.get(name)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.__exit__(None, None, None)
        self._readers.clear()

    def __enter__(self) -> CheckpointWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device as it is registered, so the
    constructors' ``torch.empty`` allocations are never touched and their initialisation runs on
    meta tensors (free); buffers are made where they would be."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(
                param.to("meta"), requires_grad=param.requires_grad
            )

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def empty_model(config: Any) -> nn.Module:
    """A transformers causal LM of ``config`` with its parameters on the meta device, in eval
    mode, weights tied as the config says."""
    from transformers import AutoModelForCausalLM

    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model


class LazyModel:
    """A meta-device ``model`` and the checkpoint its weights come from.

    ``load(prefix)`` puts the checkpoint's tensors of submodule ``prefix`` (``""``: the whole
    model) on ``device`` in ``dtype`` (floating-point tensors only; integer tensors keep theirs);
    ``release(prefix)`` returns them to the meta device. Parameters missing from the checkpoint
    are an error unless they are tied to one it holds.
    """

    def __init__(
        self,
        model: nn.Module,
        weights: CheckpointWeights,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model
        self.weights = weights
        self.dtype = dtype
        self.device = torch.device(device)
        # Every name of every parameter and persistent buffer: the tied ones share one object,
        # loaded from whichever of its names the checkpoint holds.
        aliases: dict[int, list[str]] = {}
        tensors: dict[int, torch.Tensor] = {}
        for name, tensor in _named_state(model):
            aliases.setdefault(id(tensor), []).append(name)
            tensors[id(tensor)] = tensor
        known = {name for names in aliases.values() for name in names}
        extra = sorted(set(weights.infos) - known)
        if extra:
            raise CheckpointError(
                f"{weights.path}: {len(extra)} tensors the {type(model).__name__} built from its "
                f"config.json does not have (first: {extra[0]!r}); config and weights do not "
                "belong together"
            )
        # id -> the checkpoint name it loads from. A parameter must have one; a buffer the
        # checkpoint does not hold keeps the value its constructor computed.
        self._stored: dict[int, str] = {}
        for key, names in aliases.items():
            tensor = tensors[key]
            stored = [n for n in names if n in weights]
            if not stored:
                if isinstance(tensor, nn.Parameter):
                    raise CheckpointError(
                        f"{weights.path}: no tensor for {names[0]!r} (nor for a weight tied to "
                        "it); the checkpoint is incomplete"
                    )
                continue
            got = weights.infos[stored[0]].shape
            if tuple(got) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{weights.path}: {stored[0]} is {list(got)} in the checkpoint, "
                    f"{list(tensor.shape)} in the model its config.json describes"
                )
            self._stored[key] = stored[0]
            if tensor.device.type != "meta":
                _swap(tensor, torch.empty_like(tensor, device="meta"))

    def _owned(self, prefix: str) -> list[tuple[str, torch.Tensor]]:
        root = self.model.get_submodule(prefix) if prefix else self.model
        base = f"{prefix}." if prefix else ""
        return [(base + name, tensor) for name, tensor in _named_state(root)]

    def load(self, prefix: str = "") -> nn.Module:
        """Materialise submodule ``prefix`` from the checkpoint; returns it."""
        for _, tensor in self._owned(prefix):
            stored = self._stored.get(id(tensor))
            if stored is None or tensor.device.type != "meta":
                continue  # a constructor-made buffer, or a tied weight loaded before
            value = self.weights.get(stored)
            if value.is_floating_point():
                value = value.to(self.dtype)
            _swap(tensor, value.to(self.device))
        return self.model.get_submodule(prefix) if prefix else self.model

    def release(self, prefix: str = "") -> None:
        """Return the checkpoint's tensors of submodule ``prefix`` to the meta device."""
        for _, tensor in self._owned(prefix):
            if id(tensor) in self._stored and tensor.device.type != "meta":
                _swap(tensor, torch.empty_like(tensor, device="meta"))

    def loaded_bytes(self) -> int:
        """Bytes of checkpoint tensors currently materialised."""
        loaded = {
            id(t): t.numel() * t.element_size()
            for _, t in _named_state(self.model)
            if id(t) in self._stored and t.device.type != "meta"
        }
        return sum(loaded.values())


def _named_state(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers, every name of a shared tensor included."""
    yield from module.named_parameters(remove_duplicate=False)
    for owner_name, owner in module.named_modules(remove_duplicate=False):
        for leaf, buf in owner._buffers.items():
            if buf is not None and leaf not in owner._non_persistent_buffers_set:
                yield (f"{owner_name}.{leaf}" if owner_name else leaf), buf


def _swap(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """Give ``tensor`` (a Parameter or buffer object) ``value``'s data, keeping its identity."""
    if isinstance(tensor, nn.Parameter):
        value = nn.Parameter(value, requires_grad=tensor.requires_grad)
    torch.utils.swap_tensors(tensor, value)
