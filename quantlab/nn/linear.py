"""``QuantLinear``: a drop-in ``nn.Linear`` whose weight is stored in the groupwise integer
format."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from quantlab.formats.groupwise_int import (
    FORMAT_NAME,
    FORMAT_VERSION,
    GroupwiseIntMeta,
    PackedGroupwiseInt,
    dtype_from_name,
)
from quantlab.nn.registry import register_layer_format
from quantlab.ops import groupwise_int as gw_ops

__all__ = ["QuantLinear"]


@register_layer_format
class QuantLinear(nn.Module):
    """Linear layer ``y = x @ W.T + b`` with ``W`` held as packed groupwise integers.

    Buffers (shapes from :class:`GroupwiseIntMeta`): ``qweight`` int32 ``[N, ceil(K*bits/32)]``,
    ``scales`` ``[N, G]`` in the scale dtype, ``qzeros`` int32 ``[N, ceil(G*bits/32)]`` (asymmetric
    only). ``bias`` is a frozen parameter in the layer's compute dtype.

    ``forward`` accepts any ``[..., K]`` input in fp32/fp16/bf16 and returns ``[..., N]`` in the
    input's dtype; the matmul runs through ``torch.ops.quantlab.groupwise_int_mm`` (a compiled
    kernel when one exists for the device, the PyTorch reference otherwise).
    """

    format_name: ClassVar[str] = FORMAT_NAME
    format_version: ClassVar[int] = FORMAT_VERSION

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        group_size: int = 64,
        sym: bool = False,
        scale_dtype: str = "float16",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.meta = GroupwiseIntMeta(in_features, out_features, bits, group_size, sym, scale_dtype)
        self.in_features = in_features
        self.out_features = out_features
        for suffix, (shape, tdtype) in self.meta.tensor_shapes().items():
            self.register_buffer(suffix, torch.zeros(shape, dtype=tdtype, device=device))
        if sym:
            self.register_buffer("qzeros", None)
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=dtype or torch.float32, device=device),
                requires_grad=False,
            )
        else:
            self.register_parameter("bias", None)

    @property
    def bits(self) -> int:
        return self.meta.bits

    @property
    def group_size(self) -> int:
        return self.meta.group_size

    @classmethod
    def from_packed(
        cls, packed: PackedGroupwiseInt, bias: torch.Tensor | None = None, name: str = "weight"
    ) -> QuantLinear:
        packed.validate(name)
        m = packed.meta
        layer = cls(
            m.in_features,
            m.out_features,
            bias=bias is not None,
            bits=m.bits,
            group_size=m.group_size,
            sym=m.sym,
            scale_dtype=m.scale_dtype,
            device=packed.qweight.device,
            dtype=bias.dtype if bias is not None else None,
        )
        layer.qweight = packed.qweight.contiguous()
        layer.scales = packed.scales.contiguous()
        if packed.qzeros is not None:
            layer.qzeros = packed.qzeros.contiguous()
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def module_spec(self) -> dict[str, Any]:
        m = self.meta
        return {
            "bits": m.bits,
            "group_size": m.group_size,
            "sym": m.sym,
            "scale_dtype": m.scale_dtype,
        }

    @classmethod
    def empty_like(cls, linear: nn.Linear, spec: dict[str, Any]) -> QuantLinear:
        return cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            bits=int(spec["bits"]),
            group_size=int(spec["group_size"]),
            sym=bool(spec["sym"]),
            scale_dtype=str(spec.get("scale_dtype", "float16")),
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )

    @classmethod
    def checkpoint_tensors(cls, spec: dict[str, Any]) -> dict[str, str | None]:
        names: dict[str, str | None] = {"qweight": "I32", "scales": None}
        if not spec.get("sym"):
            names["qzeros"] = "I32"
        return names

    def storage_bits(self) -> int:
        return self.meta.storage_bits()

    def after_load(self) -> None:
        # transformers may cast floating tensors to the requested model dtype; scales keep theirs.
        want = dtype_from_name(self.meta.scale_dtype)
        if self.scales.dtype != want:
            self.scales = self.scales.to(want)

    def packed(self) -> PackedGroupwiseInt:
        return PackedGroupwiseInt(self.qweight, self.scales, self.qzeros, self.meta)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``[N, K]`` weight this layer represents."""
        return gw_ops.dequant(
            self.qweight,
            self.scales,
            self.qzeros,
            self.bits,
            self.group_size,
            self.in_features,
            dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"QuantLinear expects input [..., {self.in_features}], got {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        y = gw_ops.matmul(
            x.reshape(-1, self.in_features),
            self.qweight,
            self.scales,
            self.qzeros,
            self.bits,
            self.group_size,
        )
        y = y.view(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        m = self.meta
        return (
            f"in_features={m.in_features}, out_features={m.out_features}, "
            f"bias={self.bias is not None}, "
            f"bits={m.bits}, group_size={m.group_size}, sym={m.sym}, scales={m.scale_dtype}"
        )
