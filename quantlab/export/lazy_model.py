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

Headers are checked up front (:class:`quantlab.export.checkpoint_files.CheckpointFiles`): a
missing shard, a truncated or corrupt file, a tensor the model does not have or a shape that
differs from the model's is a :class:`CheckpointError` naming it before any block runs.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from quantlab.export.checkpoint_files import CheckpointFiles
from quantlab.export.errors import CheckpointError

__all__ = ["LazyModel", "StoredWeight", "empty_model", "unused_source_tensors"]


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


def empty_model(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers causal LM of ``config`` with its parameters on the meta device in ``dtype``
    (the compute dtype :class:`LazyModel` loads them in), in eval mode, weights tied as the config
    says."""
    from transformers import AutoModelForCausalLM

    from quantlab.models.arch import linearize

    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        # Fused experts become one linear per expert projection, named as checkpoints store
        # them (model.layers.N.mlp.experts.E.gate_proj.weight), still on the meta device.
        linearize(model)
    model.eval()
    return model


def unused_source_tensors(model: nn.Module, names: Sequence[str]) -> list[str]:
    """The checkpoint tensors among ``names`` that ``model``'s transformers class drops when it
    loads them: those matching its ``_keys_to_ignore_on_load_unexpected`` and those of the
    multi-token-prediction layers a ``num_nextn_predict_layers`` config appends after the last
    decoder block (DeepSeek-V3's ``model.layers.61``: transformers has no module for them)."""
    ignored = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    patterns = [re.compile(p) for p in ignored]
    config = getattr(model, "config", None)
    extra_layers = int(getattr(config, "num_nextn_predict_layers", 0) or 0)
    blocks = int(getattr(config, "num_hidden_layers", 0) or 0)
    mtp = {str(i) for i in range(blocks, blocks + extra_layers)}
    layer = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    dropped = []
    for name in names:
        found = layer.search(name)
        if any(p.search(name) for p in patterns) or (found and found.group(1) in mtp):
            dropped.append(name)
    return dropped


class LazyModel:
    """A meta-device ``model`` and the checkpoint its weights come from.

    ``load(prefix)`` puts the checkpoint's tensors of submodule ``prefix`` (``""``: the whole
    model) on ``device``, each in the dtype of the model's meta tensor it fills (the skeleton
    says: float parameters in the compute dtype :func:`empty_model` was given, a quantized layer's
    scales and codes in their format's dtypes); ``release(prefix)`` returns them to the meta
    device. Parameters missing from the checkpoint are an error unless they are tied to one it
    holds; so is a float tensor stored for an integer one or the reverse.
    """

    def __init__(
        self,
        model: nn.Module,
        weights: CheckpointFiles,
        device: torch.device | str = "cpu",
        after_load: Callable[[nn.Module, str], None] | None = None,
    ) -> None:
        """``after_load(module, prefix)`` runs on each submodule once its tensors are in (a
        quantized checkpoint's value checks and kernel layouts)."""
        self.model = model
        self.weights = weights
        self.device = torch.device(device)
        self.after_load = after_load
        # Every name of every parameter and persistent buffer: the tied ones share one object,
        # loaded from whichever of its names the checkpoint holds.
        aliases: dict[int, list[str]] = {}
        tensors: dict[int, torch.Tensor] = {}
        for name, tensor in _named_state(model):
            aliases.setdefault(id(tensor), []).append(name)
            tensors[id(tensor)] = tensor
        known = {name for names in aliases.values() for name in names}
        extra = sorted(set(weights.tensors) - known)
        # What transformers itself drops on load (DeepSeek-V3's multi-token-prediction layer) is
        # dropped here too; callers report it.
        self.dropped = unused_source_tensors(model, extra)
        extra = sorted(set(extra) - set(self.dropped))
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
            info = weights.tensors[stored[0]]
            if tuple(info.shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{weights.path}: {stored[0]} is {list(info.shape)} in the checkpoint, "
                    f"{list(tensor.shape)} in the model its config.json describes"
                )
            if info.dtype != tensor.dtype and not (
                info.dtype.is_floating_point and tensor.dtype.is_floating_point
            ):
                raise CheckpointError(
                    f"{weights.path}: {stored[0]} is stored as {info.dtype}, the model expects "
                    f"{tensor.dtype}"
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
            value = self.weights.get(stored).to(tensor.dtype)
            _swap(tensor, value.to(self.device))
        # Unmap the files: pages of a mapping that stays open count in the process's resident
        # memory, so a run that kept them mapped would grow by each block it read.
        self.weights.close()
        module = self.model.get_submodule(prefix) if prefix else self.model
        if self.after_load is not None:
            self.after_load(module, prefix)
        return module

    def release(self, prefix: str = "") -> None:
        """Return the checkpoint's tensors of submodule ``prefix`` to the meta device."""
        for _, tensor in self._owned(prefix):
            if id(tensor) in self._stored and tensor.device.type != "meta":
                _swap(tensor, torch.empty_like(tensor, device="meta"))

    def stored_weight(self, name: str) -> StoredWeight:
        """Parameter ``name`` as rows read from the checkpoint on demand (its module stays on the
        meta device): for a method that samples a few rows of every weight before quantizing."""
        param = self.model.get_parameter(name)
        stored = self._stored.get(id(param))
        if stored is None:
            raise KeyError(f"{name} is not a parameter the checkpoint holds")
        return StoredWeight(self, stored, param.dtype)

    def loaded_bytes(self) -> int:
        """Bytes of checkpoint tensors currently materialised."""
        loaded = {
            id(t): t.numel() * t.element_size()
            for _, t in _named_state(self.model)
            if id(t) in self._stored and t.device.type != "meta"
        }
        return sum(loaded.values())


class StoredWeight:
    """One checkpoint tensor read row by row: ``weight[rows]`` (a 1-D index tensor) reads only
    those rows, converted as :meth:`LazyModel.load` would convert them (so sampled rows equal the
    loaded weight's rows bit for bit)."""

    def __init__(self, lazy: LazyModel, stored_name: str, dtype: torch.dtype) -> None:
        self.lazy = lazy
        self.name = stored_name
        self.dtype = dtype
        self.shape = lazy.weights.tensors[stored_name].shape

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        value = self.lazy.weights.get_rows(self.name, [int(r) for r in rows])
        self.lazy.weights.close()
        return value.to(self.dtype)


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
