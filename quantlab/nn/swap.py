"""Module swapping by dotted path, shared by quantization and every checkpoint loader."""

from __future__ import annotations

from torch import nn

from quantlab.nn.linear import QuantLinear

__all__ = ["set_submodule", "swap_in_quant_linear"]


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` of ``root`` with ``module``."""
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


def swap_in_quant_linear(
    model: nn.Module, name: str, bits: int, group_size: int, sym: bool, scale_dtype: str = "float16"
) -> QuantLinear:
    """Replace the ``nn.Linear`` at ``name`` by an empty QuantLinear of the same shape, bias,
    device and dtype (its buffers are filled by a state-dict load afterwards)."""
    try:
        linear = model.get_submodule(name)
    except AttributeError as exc:
        raise ValueError(f"the checkpoint lists {name!r}, which the model lacks") from exc
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"{name} is {type(linear).__name__}, expected nn.Linear")
    layer = QuantLinear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        bits=bits,
        group_size=group_size,
        sym=sym,
        scale_dtype=scale_dtype,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    set_submodule(model, name, layer)
    return layer
