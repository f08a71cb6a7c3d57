"""Module swapping by dotted path, shared by quantization and every checkpoint loader."""

from __future__ import annotations

from typing import Any

from torch import nn

from quantlab.formats.groupwise_int import FORMAT_NAME
from quantlab.nn.groupwise_int_linear import QuantLinear
from quantlab.nn.registry import empty_layer_like

__all__ = ["set_submodule", "swap_in_empty", "swap_in_quant_linear"]


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` of ``root`` with ``module``."""
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


def swap_in_empty(model: nn.Module, name: str, spec: dict[str, Any]) -> nn.Module:
    """Replace the ``nn.Linear`` at ``name`` by an empty layer of ``spec``'s format with the same
    shape, bias, device and dtype (its buffers are filled by a state-dict load afterwards)."""
    try:
        linear = model.get_submodule(name)
    except AttributeError as exc:
        raise ValueError(f"the checkpoint lists {name!r}, which the model lacks") from exc
    layer = empty_layer_like(linear, spec, name)
    set_submodule(model, name, layer)
    return layer


def swap_in_quant_linear(
    model: nn.Module, name: str, bits: int, group_size: int, sym: bool, scale_dtype: str = "float16"
) -> QuantLinear:
    """:func:`swap_in_empty` for a groupwise-integer :class:`QuantLinear`."""
    spec = {
        "format": FORMAT_NAME,
        "bits": bits,
        "group_size": group_size,
        "sym": sym,
        "scale_dtype": scale_dtype,
    }
    layer = swap_in_empty(model, name, spec)
    assert isinstance(layer, QuantLinear)
    return layer
