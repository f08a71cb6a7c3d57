"""What a checkpoint layout is to the writers: per quantized layer, the tensors it stores; for the
model, the ``quantization_config`` describing them.

A layout (:class:`CheckpointLayout`) converts one layer at a time, so the same object serves a
model held in memory (:func:`layout_state`, then one write) and a model quantized block by block
from its checkpoint (:class:`quantlab.export.streaming.StreamingCheckpoint` converts each block
as it is done). The layouts: :class:`QuantlabLayout` (here), :class:`GPTQLayout`
(:mod:`quantlab.export.gptq_checkpoint`), :class:`AWQLayout`
(:mod:`quantlab.export.awq_checkpoint`). Every layout checks a layer's tensors against its spec
before converting it (:func:`validated_packed`): a layer edited in place or holding NaN scales
would make a checkpoint that refuses to load, so it is refused before it is written.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from quantlab.export.schema import quantization_config_of
from quantlab.nn.registry import is_quantized, quantized_modules

__all__ = [
    "CheckpointLayout",
    "QuantlabLayout",
    "float_linear_names",
    "layer_state",
    "layout_state",
    "state_dict_without_shared",
    "validated_packed",
]


class CheckpointLayout(Protocol):
    """One checkpoint layout, fed layer by layer."""

    def layer_tensors(self, name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors stored for quantized layer ``name`` (keys prefixed with ``name``); raises
        ``ValueError`` for a layer the layout cannot store."""
        ...

    def quantization_config(self, model: nn.Module) -> dict[str, Any]:
        """``config.json``'s ``quantization_config`` once every layer went through
        :meth:`layer_tensors` (``model`` may be a meta-device skeleton)."""
        ...

    def describe(self) -> str:
        """The layout written, for the summary (``"quantlab groupwise_int v1"``, ``"gptq_v2"``)."""
        ...


def float_linear_names(model: nn.Module) -> list[str]:
    """The linear maps a quantized ``model`` leaves in float, sorted: every ``nn.Linear`` (the
    head) and every module holding a 2-D weight like one (transformers' MoE routers such as
    ``MixtralTopKRouter``), embeddings and quantized layers excepted. What a layout's config
    lists as not converted, so a loader that quantizes by class converts none of them."""
    names = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) or (
            isinstance(weight, nn.Parameter)
            and weight.dim() == 2
            and not isinstance(module, nn.Embedding)
            and not is_quantized(module)
        ):
            names.append(name)
    return sorted(names)


def validated_packed(name: str, layer: nn.Module) -> Any:
    """``layer.packed()`` after its format's checks (a ``ValueError`` naming ``name``)."""
    packed = layer.packed()
    packed.validate(name)
    return packed


def layer_state(
    name: str, layer: nn.Module, replaced: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """``layer``'s state on the CPU, keys prefixed with ``name``, without the entries
    ``replaced`` (the ones a layout stores in its own form)."""
    return {
        f"{name}.{key}": tensor.detach().to("cpu").contiguous()
        for key, tensor in layer.state_dict().items()
        if key not in replaced
    }


def state_dict_without_shared(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors stored once (safetensors refuses shared storage)."""
    seen: dict[tuple[int, int, torch.dtype], str] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.dtype)
        if tensor.numel() and ident in seen:
            continue  # e.g. lm_head.weight tied to the embedding; transformers re-ties on load
        seen[ident] = key
        out[key] = tensor.detach().to("cpu").contiguous()
    return out


def layout_state(model: nn.Module, layout: CheckpointLayout) -> dict[str, torch.Tensor]:
    """``model``'s state for writing (tied tensors once) with every quantized layer's entries
    replaced by ``layout.layer_tensors``."""
    layers = dict(quantized_modules(model))
    if not layers:
        raise ValueError("the model has no quantized modules; quantize it before saving")
    state = state_dict_without_shared(model)
    for name, layer in layers.items():
        for key in [k for k in state if k.startswith(f"{name}.")]:
            del state[key]
        state.update(layout.layer_tensors(name, layer))
    return state


class QuantlabLayout:
    """quantlab's own layout: every quantized layer's tensors as its format defines them (checked
    by the format first), the per-module specs in ``quantization_config``."""

    def __init__(self, method: str, method_config: dict[str, Any]) -> None:
        self.method = method
        self.method_config = method_config
        self._config: dict[str, Any] | None = None

    def layer_tensors(self, name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
        if hasattr(layer, "packed"):
            validated_packed(name, layer)
        return layer_state(name, layer)

    def quantization_config(self, model: nn.Module) -> dict[str, Any]:
        self._config = quantization_config_of(model, self.method, self.method_config)
        return self._config

    def describe(self) -> str:
        if self._config is None:
            return "quantlab"
        return f"quantlab {self._config['format']} v{self._config['format_version']}"
