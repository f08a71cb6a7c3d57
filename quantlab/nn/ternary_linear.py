"""``TernaryLinear``: a drop-in ``nn.Linear`` whose weight is ``s * t`` with trits ``t`` in
``{-1, 0, +1}`` (format ``ternary``; BitNet b1.58 layers and ternary PTQ)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from quantlab.formats import ternary_packing
from quantlab.formats.tensor_layout import dtype_from_name, dtype_name
from quantlab.formats.ternary import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PackedTernary,
    TernaryMeta,
    granularity_name,
)
from quantlab.formats.ternary_packing import PER_TENSOR
from quantlab.nn.layer_spec import spec_int, spec_str
from quantlab.nn.packed_linear import PackedLinear
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


class TernaryLinear(PackedLinear):
    """Linear layer ``y = A8(x) @ (s * t).T + b`` with ternary weights.

    ``A8`` is BitNet b1.58's per-token int8 absmax quantization of the activations (W1.58A8), the
    arithmetic every backend implements: exact integer sums per scale group, then the scales (see
    :mod:`quantlab.ops.ternary_reference`). Native BitNet checkpoints were trained with exactly
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

    The input gradient (:class:`~quantlab.nn.packed_linear.PackedLinear`'s backward) is
    ``grad_out @ (s * t)``: the straight-through estimator through the int8 rounding of ``A8``,
    which has zero derivative almost everywhere and so would give no training signal otherwise.
    That is the estimator BitNet trains with.
    """

    format_name: ClassVar[str] = FORMAT_NAME
    format_version: ClassVar[int] = FORMAT_VERSION
    spec_keys: ClassVar[frozenset[str]] = frozenset({"packing", "group_size", "scale_dtype"})

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
        meta = TernaryMeta(in_features, out_features, packing, group_size, scale_dtype)
        super().__init__(meta, bias, device, dtype)
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
    def layer_kwargs(cls, spec: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "packing": spec_str(spec, "packing", "i2"),
            "group_size": spec_int(spec, "group_size", PER_TENSOR),
            "scale_dtype": spec_str(spec, "scale_dtype", "float16"),
        }

    @classmethod
    def checkpoint_tensors(cls, spec: dict[str, Any]) -> dict[str, str | None]:
        scale_dtype = dtype_from_name(cls.layer_kwargs(spec)["scale_dtype"])
        return {"qweight": "U8", "scales": dtype_name(scale_dtype)}

    def after_load(self) -> None:
        super().after_load()
        self.trits()  # raises ValueError on an invalid code (a damaged file)
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
                    t = ternary_packing.unpack_trits(q, m.packing, m.in_features)
                    pad = -m.in_features % _CUDA_ROW_ALIGN
                    weight = ternary_packing.pack_i2(nn.functional.pad(t, (0, pad)))
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
        return ternary_packing.unpack_trits(self.qweight, self.meta.packing, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``[N, K]`` weight ``s * t`` this layer represents."""
        m = self.meta
        return ternary_ops.dequant(
            self.qweight, self.scales, m.packing, m.in_features, m.group_size, dtype
        )

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.device != self.qweight.device:
            raise ValueError(
                f"TernaryLinear: input on {x2.device}, weights on {self.qweight.device}"
            )
        self.prepare()
        assert self._kernel_weight is not None and self._kernel_scales is not None
        m = self.meta
        if x2.device.type == "cuda":
            return ternary_ops.matmul(
                x2, self._kernel_weight, self._kernel_scales, "i2", m.in_features, m.group_size
            )
        return ternary_ops.lut_mm(
            x2,
            self._kernel_weight,
            self._kernel_scales,
            m.out_features,
            m.in_features,
            m.group_size,
        )

    def _repr_fields(self) -> dict[str, Any]:
        m = self.meta
        bits = self.storage_bits() / (m.in_features * m.out_features)
        return {
            "packing": m.packing,
            "scales": f"{granularity_name(m.group_size)} {m.scale_dtype}",
            "bits_per_weight": f"{bits:.3f}",
        }
