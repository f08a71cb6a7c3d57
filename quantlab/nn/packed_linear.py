"""``PackedLinear``: what every quantized layer class shares (buffers laid out from its format's
meta, a frozen bias, the registry protocol, the forward's shape handling, the gradient with
respect to the input)."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable

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
    fp32 by default). It names its format's fields in :meth:`layer_kwargs`, computes the product
    in :meth:`_matmul` and gives the dense weight in :meth:`dequantized_weight`; this class
    derives ``from_packed``, ``empty_like``, ``module_spec``, the input checks of ``forward`` and
    its backward from them.

    Autograd: the packed weights are frozen buffers, so only the input (and the bias, should a
    user make it require grad) gets a gradient. When grad mode is on and the input requires grad,
    ``forward`` runs :meth:`_matmul` inside an autograd function whose backward is
    ``grad_out @ W`` with ``W = dequantized_weight(grad_out.dtype)``, formed in the backward (not
    kept from the forward), from the layer's buffers as they are then. That is the exact input
    gradient of the linear formats; for :class:`~quantlab.nn.ternary_linear.TernaryLinear`,
    whose forward rounds the activations to int8, it is the straight-through estimator through
    that rounding (what BitNet training uses). Second-order gradients are not supported. Without
    grad (``no_grad``, ``inference_mode``, inputs not requiring grad) ``forward`` calls
    :meth:`_matmul` directly, as before, so inference pays nothing and still compiles with
    ``torch.compile(fullgraph=True)``.
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

    @abc.abstractmethod
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``[N, K]`` weight ``W`` the layer represents (``forward(x) = x @ W.T + b``,
        for ternary up to the activation rounding); the backward multiplies by it."""

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

    def _apply(self, fn: Any, recurse: bool = True) -> PackedLinear:
        # A module dtype change (.half(), .bfloat16(), .to(dtype)) converts every floating
        # parameter and buffer. The packed tensors are the format's, in the dtypes its spec
        # records (fp16 scales stay fp16 whatever the activations are): they follow device moves
        # and same-dtype operations only, so a round trip through bf16 cannot re-round them and a
        # saved model always matches its spec. The bias does follow the module's dtype.
        packed = {
            suffix: self._buffers[suffix]
            for suffix in self.meta.tensor_shapes()
            if self._buffers.get(suffix) is not None
        }
        for suffix in packed:
            self._buffers[suffix] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for suffix, tensor in packed.items():
                target = fn(tensor.new_empty(0))  # where and in which dtype fn would put it
                keep = target.dtype == tensor.dtype
                self._buffers[suffix] = fn(tensor) if keep else tensor.to(target.device)
        return self

    @abc.abstractmethod
    def packed(self) -> _Packed:
        """The layer's tensors as its format's packed record (shares their storage)."""

    def after_load(self) -> None:
        """Give floating tensors back the dtype of the format (a transformers load may have cast
        them to the model's), then check them with the format's ``validate`` (shapes, dtypes and
        values: e.g. scales finite and positive), so a damaged file fails when it is loaded, not
        in a later forward. Raises ``ValueError``; loaders add the file and module name."""
        for suffix, (_, dtype) in self.meta.tensor_shapes().items():
            tensor = getattr(self, suffix)
            if tensor.dtype != dtype and dtype.is_floating_point:
                setattr(self, suffix, tensor.to(dtype))
        self.packed().validate(type(self).__name__)

    # ---- compute -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects input [..., {self.in_features}], "
                f"got {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        # The custom ops have no autograd formula; only a graph that needs the input's gradient
        # goes through _InputGrad, so inference runs (and compiles) the bare op.
        if torch.is_grad_enabled() and x2.requires_grad:
            y2 = _InputGrad.apply(x2, self)
        else:
            y2 = self._matmul(x2)
        y = y2.view(*lead, self.out_features)
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


class _InputGrad(torch.autograd.Function):
    """``layer._matmul(x2)`` with the input gradient ``grad_out @ layer.dequantized_weight()``
    (the weights are frozen buffers: no gradient for them)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x2: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
        # The layer, not its dense weight: W is formed only if backward runs, and only then
        # costs its [N, K] memory.
        ctx.layer = layer  # type: ignore[attr-defined]
        return layer._matmul(x2)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        w = ctx.layer.dequantized_weight(grad_out.dtype)  # type: ignore[attr-defined]
        return grad_out @ w, None
