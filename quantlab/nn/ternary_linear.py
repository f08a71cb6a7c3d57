"""``TernaryLinear``: a drop-in ``nn.Linear`` whose weight is ``s * t`` with trits ``t`` in
``{-1, 0, +1}`` (format ``ternary``; BitNet b1.58 layers and ternary PTQ)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from quantlab.formats.ternary import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PER_TENSOR,
    PackedTernary,
    TernaryMeta,
    dtype_from_name,
    granularity_name,
)
from quantlab.nn.registry import register_layer_format
from quantlab.ops import reference_ternary as reference
from quantlab.ops import ternary as ternary_ops

__all__ = ["TernaryLinear"]

# The CUDA kernel reads whole 16-byte chunks (64 trits) of a row.
_CUDA_ROW_ALIGN = 64


def _version(t: torch.Tensor) -> int | None:
    """In-place modification counter (inference tensors have none; they cannot be modified)."""
    try:
        return t._version
    except RuntimeError:
        return None


@register_layer_format
class TernaryLinear(nn.Module):
    """Linear layer ``y = A8(x) @ (s * t).T + b`` with ternary weights.

    ``A8`` is BitNet b1.58's per-token int8 absmax quantization of the activations (W1.58A8), the
    arithmetic every backend implements: exact integer sums per scale group, then the scales (see
    :mod:`quantlab.ops.reference_ternary`). Native BitNet checkpoints were trained with exactly
    this; for a post-training-quantized float model it adds a small error of its own.

    Buffers (shapes from :class:`TernaryMeta`): ``qweight`` uint8 ``[N, ceil(K/4)]`` (i2) or
    ``[N, ceil(K/5)]`` (tq1); ``scales`` ``[1, 1]`` / ``[N, 1]`` / ``[N, K/g]`` in the scale
    dtype. ``bias`` is a frozen parameter in the layer's compute dtype.

    The kernel layout is derived from ``qweight`` once per device (:meth:`prepare`, called after
    loading and again whenever ``qweight`` changed or moved): on the CPU the LUT layout of
    ``ternary_lut_mm`` (2 bits per weight more in memory), on CUDA i2 rows padded to 64 columns
    (no copy when the stored layout already is that), with the scales in fp32 (tile-major on the
    CPU). It is not part of the state dict.

    ``forward`` accepts any ``[..., K]`` input in fp32/fp16/bf16 and returns ``[..., N]`` in the
    input's dtype.
    """

    format_name: ClassVar[str] = FORMAT_NAME
    format_version: ClassVar[int] = FORMAT_VERSION

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        packing: str = "i2",
        group_size: int = PER_TENSOR,
        scale_dtype: str = "float16",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.meta = TernaryMeta(in_features, out_features, packing, group_size, scale_dtype)
        self.in_features = in_features
        self.out_features = out_features
        for suffix, (shape, tdtype) in self.meta.tensor_shapes().items():
            self.register_buffer(suffix, torch.zeros(shape, dtype=tdtype, device=device))
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=dtype or torch.float32, device=device),
                requires_grad=False,
            )
        else:
            self.register_parameter("bias", None)
        self._kernel_weight: torch.Tensor | None = None
        self._kernel_scales: torch.Tensor | None = None
        self._kernel_key: tuple[Any, ...] | None = None

    @property
    def packing(self) -> str:
        return self.meta.packing

    @property
    def group_size(self) -> int:
        return self.meta.group_size

    @classmethod
    def from_packed(
        cls, packed: PackedTernary, bias: torch.Tensor | None = None, name: str = "weight"
    ) -> TernaryLinear:
        packed.validate(name)
        m = packed.meta
        layer = cls(
            m.in_features,
            m.out_features,
            bias=bias is not None,
            packing=m.packing,
            group_size=m.group_size,
            scale_dtype=m.scale_dtype,
            device=packed.qweight.device,
            dtype=bias.dtype if bias is not None else None,
        )
        layer.qweight = packed.qweight.contiguous()
        layer.scales = packed.scales.contiguous()
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    # ---- registry protocol (quantlab.nn.registry) ----

    def module_spec(self) -> dict[str, Any]:
        m = self.meta
        return {"packing": m.packing, "group_size": m.group_size, "scale_dtype": m.scale_dtype}

    @classmethod
    def empty_like(cls, linear: nn.Linear, spec: dict[str, Any]) -> TernaryLinear:
        return cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            packing=str(spec.get("packing", "i2")),
            group_size=int(spec.get("group_size", PER_TENSOR)),
            scale_dtype=str(spec.get("scale_dtype", "float16")),
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )

    @classmethod
    def checkpoint_tensors(cls, spec: dict[str, Any]) -> dict[str, str | None]:
        return {"qweight": "U8", "scales": None}

    def storage_bits(self) -> int:
        return self.meta.storage_bits()

    def after_load(self) -> None:
        # transformers may cast floating tensors to the model dtype; scales keep theirs.
        want = dtype_from_name(self.meta.scale_dtype)
        if self.scales.dtype != want:
            self.scales = self.scales.to(want)
        self.packed().validate(self.__class__.__name__)
        self.prepare()

    # ---- kernel layout ----

    def _key(self) -> tuple[Any, ...]:
        q, s = self.qweight, self.scales
        return (q.device, q.data_ptr(), _version(q), s.data_ptr(), _version(s), s.dtype)

    def prepare(self) -> None:
        """Build the kernel layout for the device ``qweight`` is on (no-op when current)."""
        key = self._key()
        if self._kernel_key == key:
            return
        q, m = self.qweight, self.meta
        with torch.no_grad():
            if q.device.type == "cuda":
                if m.packing == "i2" and m.in_features % _CUDA_ROW_ALIGN == 0:
                    weight = q
                else:
                    t = reference.unpack_trits(q, m.packing, m.in_features)
                    pad = -m.in_features % _CUDA_ROW_ALIGN
                    weight = reference.pack_i2(nn.functional.pad(t, (0, pad)))
                scales = self.scales.to(torch.float32).contiguous()
            else:
                weight = ternary_ops.lut_pack(q, m.packing, m.out_features, m.in_features)
                scales = ternary_ops.lut_scales(
                    self.scales, m.out_features, m.in_features, m.group_size
                )
            self._kernel_weight = weight
            self._kernel_scales = scales
        self._kernel_key = key

    def packed(self) -> PackedTernary:
        return PackedTernary(self.qweight, self.scales, self.meta)

    def trits(self) -> torch.Tensor:
        """int8 ``[N, K]`` trits."""
        return reference.unpack_trits(self.qweight, self.meta.packing, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``[N, K]`` weight ``s * t`` this layer represents."""
        m = self.meta
        return ternary_ops.dequant(
            self.qweight, self.scales, m.packing, m.in_features, m.group_size, dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"TernaryLinear expects input [..., {self.in_features}], got {tuple(x.shape)}"
            )
        if x.device != self.qweight.device:
            raise ValueError(
                f"TernaryLinear: input on {x.device}, weights on {self.qweight.device}"
            )
        self.prepare()
        assert self._kernel_weight is not None and self._kernel_scales is not None
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        m = self.meta
        if x.device.type == "cuda":
            y = ternary_ops.matmul(
                x2, self._kernel_weight, self._kernel_scales, "i2", m.in_features, m.group_size
            )
        else:
            y = ternary_ops.lut_mm(
                x2,
                self._kernel_weight,
                self._kernel_scales,
                m.out_features,
                m.in_features,
                m.group_size,
            )
        y = y.view(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        m = self.meta
        bits = self.storage_bits() / (m.in_features * m.out_features)
        return (
            f"in_features={m.in_features}, out_features={m.out_features}, "
            f"bias={self.bias is not None}, packing={m.packing}, "
            f"scales={granularity_name(m.group_size)} {m.scale_dtype}, {bits:.3f} bits/weight"
        )
