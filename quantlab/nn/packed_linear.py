"""``PackedLinear``: what every quantized layer class shares (buffers laid out from its format's
meta, a frozen bias, the registry protocol, the forward's shape handling)."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from torch import nn

from quantlab.formats.tensor_layout import TensorShapes

__all__ = ["PackedLinear"]

_Layer = TypeVar("_Layer", bound="PackedLinear")


class _Meta(Protocol):
    in_features: int
    out_features: int

    def tensor_shapes(self) -> TensorShapes: ...

    def storage_bits(self) -> int: ...

    def to_dict(self) -> dict[str, Any]: ...


class _Packed(Protocol):
    @property
    def meta(self) -> Any: ...

    def tensors(self) -> dict[str, torch.Tensor]: ...

    def validate(self, name: str = "weight") -> None: ...


class PackedLinear(nn.Module, abc.ABC):
    """Base of the layer classes in :mod:`quantlab.nn` (one per packed format).

    A subclass's constructor takes ``(in_features, out_features, bias, <its format's fields>,
    device, dtype)``, builds its format's meta and passes it here, which registers one zeroed
    buffer per entry of ``meta.tensor_shapes()`` and the bias (a frozen parameter in ``dtype``,
    fp32 by default). It names its format's fields in :meth:`layer_kwargs` and computes the
    product in :meth:`_matmul`; this class derives ``from_packed``, ``empty_like``,
    ``module_spec`` and the input checks of ``forward`` from them.
    """

    format_name: ClassVar[str]
    format_version: ClassVar[int]

    def __init__(
        self,
        meta: _Meta,
        bias: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        self.meta = meta
        self.in_features = meta.in_features
        self.out_features = meta.out_features
        for suffix, (shape, tdtype) in meta.tensor_shapes().items():
            self.register_buffer(suffix, torch.zeros(shape, dtype=tdtype, device=device))
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(meta.out_features, dtype=dtype or torch.float32, device=device),
                requires_grad=False,
            )
        else:
            self.register_parameter("bias", None)

    # ---- what a subclass provides --------------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def layer_kwargs(cls, spec: Mapping[str, Any]) -> dict[str, Any]:
        """The constructor's format fields from a module spec or a meta's ``to_dict()``."""

    @abc.abstractmethod
    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``[M, K] -> [M, N]`` without the bias, in ``x2``'s dtype."""

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_packed(
        cls: type[_Layer],
        packed: _Packed,
        bias: torch.Tensor | None = None,
        name: str = "weight",
        **layer_kwargs: Any,
    ) -> _Layer:
        """A layer holding ``packed``'s tensors (validated first; ``name`` is used in errors)
        and a copy of ``bias``; ``layer_kwargs`` adds constructor arguments the meta lacks."""
        packed.validate(name)
        meta = packed.meta
        tensors = packed.tensors()
        layer = cls(
            meta.in_features,
            meta.out_features,
            bias=bias is not None,
            **cls.layer_kwargs(meta.to_dict()),
            **layer_kwargs,
            device=next(iter(tensors.values())).device,
            dtype=bias.dtype if bias is not None else None,
        )
        for suffix, tensor in tensors.items():
            setattr(layer, suffix, tensor.contiguous())
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        layer.after_from_packed()
        return layer

    def after_from_packed(self) -> None:
        """Hook run once ``from_packed`` has set the tensors (kernel layouts)."""

    @classmethod
    def empty_like(cls: type[_Layer], linear: nn.Linear, spec: dict[str, Any]) -> _Layer:
        return cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            **cls.layer_kwargs(spec),
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )

    # ---- registry protocol (quantlab.nn.registry) ------------------------------------------

    def module_spec(self) -> dict[str, Any]:
        return self.layer_kwargs(self.meta.to_dict())

    def storage_bits(self) -> int:
        return self.meta.storage_bits()

    def after_load(self) -> None:
        """Give floating tensors back the dtype of the format (a transformers load may have cast
        them to the model's)."""
        for suffix, (_, dtype) in self.meta.tensor_shapes().items():
            tensor = getattr(self, suffix)
            if tensor.dtype != dtype and dtype.is_floating_point:
                setattr(self, suffix, tensor.to(dtype))

    # ---- compute -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects input [..., {self.in_features}], "
                f"got {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        y = self._matmul(x.reshape(-1, self.in_features)).view(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self._repr_fields().items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {fields}"
        )

    def _repr_fields(self) -> dict[str, Any]:
        return self.module_spec()
