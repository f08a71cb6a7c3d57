"""``PVQLinear``: a drop-in ``nn.Linear`` whose weight is pyramid-vector-quantized in a rotated
input space."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from quantlab.formats.pvq import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PackedPVQ,
    PVQMeta,
    check_codes,
    unpack_signs,
)
from quantlab.nn.registry import register_layer_format
from quantlab.ops import pvq as pvq_ops
from quantlab.rotation import rotate, unrotate

__all__ = ["PVQLinear"]


@register_layer_format
class PVQLinear(nn.Module):
    """Linear layer ``y = W' (R x) + b`` with ``W'`` held as PVQ codes (format ``pvq``).

    ``R`` is the layer's randomized rotation (:mod:`quantlab.rotation`), applied to the input in
    ``forward`` (a fast Walsh-Hadamard transform plus a small DCT, ``O(K log K)`` per token), so
    ``W' R = W`` and the layer computes what the unquantized weight's layer would, up to the
    quantization error.

    Buffers (shapes from :class:`~quantlab.formats.pvq.PVQMeta`): ``codes`` int32 (the code
    bitstream), ``row_scales`` fp16 ``[N]``, ``levels`` fp16 ``[L]``, ``signs`` int32
    ``[ceil(K / 32)]``. ``bias`` is a frozen parameter in the layer's compute dtype.

    ``forward`` accepts any ``[..., K]`` input in fp32/fp16/bf16 and returns ``[..., N]`` in the
    input's dtype. The matmul runs ``torch.ops.quantlab.pvq_mm`` (decode-then-GEMV kernel on
    CPU/CUDA, the PyTorch reference elsewhere), which decodes every weight on every call; after
    :meth:`cache_weight` the layer keeps the decoded ``W'`` (fp32, 32 bits per weight in memory)
    and runs a dense matmul instead, which is what evaluation wants on a CPU.
    """

    format_name: ClassVar[str] = FORMAT_NAME
    format_version: ClassVar[int] = FORMAT_VERSION

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dim: int = 16,
        pulses: int = 28,
        levels: int = 6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.meta = PVQMeta(in_features, out_features, dim, pulses, levels)
        self.in_features = in_features
        self.out_features = out_features
        for suffix, (shape, tdtype) in self.meta.tensor_shapes().items():
            self.register_buffer(suffix, torch.zeros(shape, dtype=tdtype, device=device))
        # The decoded W' when cache_weight() is on (never saved).
        self.register_buffer("_dense", None, persistent=False)
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=dtype or torch.float32, device=device),
                requires_grad=False,
            )
        else:
            self.register_parameter("bias", None)

    @property
    def dim(self) -> int:
        return self.meta.dim

    @property
    def pulses(self) -> int:
        return self.meta.pulses

    @property
    def n_levels(self) -> int:
        return self.meta.levels

    @classmethod
    def from_packed(
        cls, packed: PackedPVQ, bias: torch.Tensor | None = None, name: str = "weight"
    ) -> PVQLinear:
        packed.validate(name)
        m = packed.meta
        layer = cls(
            m.in_features,
            m.out_features,
            bias=bias is not None,
            dim=m.dim,
            pulses=m.pulses,
            levels=m.levels,
            device=packed.codes.device,
            dtype=bias.dtype if bias is not None else None,
        )
        for suffix, tensor in packed.tensors().items():
            setattr(layer, suffix, tensor.contiguous())
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    # ---- registry protocol -------------------------------------------------------------------

    def module_spec(self) -> dict[str, Any]:
        m = self.meta
        return {"dim": m.dim, "pulses": m.pulses, "levels": m.levels}

    @classmethod
    def empty_like(cls, linear: nn.Linear, spec: dict[str, Any]) -> PVQLinear:
        return cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            dim=int(spec["dim"]),
            pulses=int(spec["pulses"]),
            levels=int(spec["levels"]),
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )

    @classmethod
    def checkpoint_tensors(cls, spec: dict[str, Any]) -> dict[str, str | None]:
        # row_scales and levels may have been cast to the model dtype by a loader (after_load
        # restores fp16), so any float dtype is accepted for them.
        return {"codes": "I32", "row_scales": None, "levels": None, "signs": "I32"}

    def storage_bits(self) -> int:
        return self.meta.storage_bits()

    def after_load(self) -> None:
        # transformers may cast floating tensors to the requested model dtype; the format's are
        # fp16. Then check every code once (a corrupt file fails here, not in a later forward).
        for suffix in ("row_scales", "levels"):
            tensor = getattr(self, suffix)
            if tensor.dtype != torch.float16:
                setattr(self, suffix, tensor.to(torch.float16))
        packed = self.packed()
        packed.validate("PVQLinear")
        check_codes(packed, "PVQLinear")
        self._dense = None

    # ---- compute -----------------------------------------------------------------------------

    def packed(self) -> PackedPVQ:
        return PackedPVQ(self.codes, self.row_scales, self.levels, self.signs, self.meta)

    def rotation_signs(self) -> torch.Tensor:
        """int8 ``[K]`` signs of the layer's rotation."""
        return unpack_signs(self.signs, self.in_features)

    def _decode(self, dtype: torch.dtype) -> torch.Tensor:
        return pvq_ops.decode(
            self.codes,
            self.row_scales,
            self.levels,
            self.meta.dim,
            self.meta.pulses,
            self.in_features,
            dtype,
        )

    def rotated_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``[N, K]`` ``W'`` (weight in the rotated input space)."""
        return self._decode(dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``[N, K]`` weight ``W = W' R`` in the original input space."""
        w = unrotate(self._decode(torch.float32), self.rotation_signs())
        return w.to(dtype)

    def cache_weight(self, enabled: bool = True) -> PVQLinear:
        """Keep the decoded fp32 ``W'`` for dense matmuls (``enabled``) or drop it (the default
        state: decode in every forward). Re-call after changing the buffers."""
        self._dense = self._decode(torch.float32) if enabled else None
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"PVQLinear expects input [..., {self.in_features}], got {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        # The rotation runs in fp32 whatever the activation dtype (a bf16 Hadamard transform
        # would add its own rounding error on top of the quantization error).
        x_rot = rotate(x.reshape(-1, self.in_features).to(torch.float32), self.rotation_signs())
        if self._dense is not None:
            y = torch.nn.functional.linear(x_rot, self._dense).to(x.dtype)
        else:
            y = pvq_ops.matmul(
                x_rot.to(x.dtype),
                self.codes,
                self.row_scales,
                self.levels,
                self.meta.dim,
                self.meta.pulses,
            )
        y = y.view(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        m = self.meta
        return (
            f"in_features={m.in_features}, out_features={m.out_features}, "
            f"bias={self.bias is not None}, dim={m.dim}, pulses={m.pulses}, levels={m.levels}, "
            f"code_bits={m.code_bits}, bits_per_weight={m.bits_per_weight():.3f}"
        )
