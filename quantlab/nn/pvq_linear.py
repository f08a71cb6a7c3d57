"""``PVQLinear``: a drop-in ``nn.Linear`` whose weight is pyramid-vector-quantized in a rotated
input space."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from quantlab.formats.pvq import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PackedPVQ,
    PVQMeta,
    check_codes,
    unpack_signs,
)
from quantlab.nn.layer_spec import spec_int
from quantlab.nn.packed_linear import PackedLinear
from quantlab.ops import pvq as pvq_ops
from quantlab.transforms.rotation import rotate, unrotate

__all__ = ["PVQLinear"]


class PVQLinear(PackedLinear):
    """Linear layer ``y = W' (R x) + b`` with ``W'`` held as PVQ codes (format ``pvq``).

    ``R`` is the layer's randomized rotation (:mod:`quantlab.transforms.rotation`), applied to the
    input in
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
    spec_keys: ClassVar[frozenset[str]] = frozenset({"dim", "pulses", "levels"})

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
        super().__init__(
            PVQMeta(in_features, out_features, dim, pulses, levels), bias, device, dtype
        )
        # The decoded W' when cache_weight() is on (never saved).
        self.register_buffer("_dense", None, persistent=False)

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
    def layer_kwargs(cls, spec: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "dim": spec_int(spec, "dim"),
            "pulses": spec_int(spec, "pulses"),
            "levels": spec_int(spec, "levels"),
        }

    @classmethod
    def checkpoint_tensors(cls, spec: dict[str, Any]) -> dict[str, str | None]:
        return {"codes": "I32", "row_scales": "F16", "levels": "F16", "signs": "I32"}

    def after_load(self) -> None:
        super().after_load()
        # Every code is checked once, so a corrupt file fails here, not in a later forward.
        check_codes(self.packed(), "PVQLinear")
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

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        # The rotation runs in fp32 whatever the activation dtype (a bf16 Hadamard transform
        # would add its own rounding error on top of the quantization error).
        x_rot = rotate(x2.to(torch.float32), self.rotation_signs())
        if self._dense is not None:
            return torch.nn.functional.linear(x_rot, self._dense).to(x2.dtype)
        return pvq_ops.matmul(
            x_rot.to(x2.dtype),
            self.codes,
            self.row_scales,
            self.levels,
            self.meta.dim,
            self.meta.pulses,
        )

    def _repr_fields(self) -> dict[str, Any]:
        m = self.meta
        return {
            **self.module_spec(),
            "code_bits": m.code_bits,
            "bits_per_weight": f"{m.bits_per_weight():.3f}",
        }
