"""The PVQ format: pyramid-vector-quantized weights in a rotated input space.

On-disk layout, version 1 (per quantized linear ``<name>`` of shape ``[N, K]``; byte-level details
in docs/formats.md; codes and signs are :mod:`quantlab.formats.bitstream` streams):

* ``<name>.codes``: int32 ``[ceil(N * K/D * F / 32)]``, one ``F``-bit code per vector of ``D``
  consecutive columns, row-major over (row, vector), as one little-endian bitstream;
  ``F = ceil(log2(N(D, P) * L))`` and code = ``level * N(D, P) + pyramid index``.
* ``<name>.row_scales``: float16 ``[N]``.
* ``<name>.levels``: float16 ``[L]``, the amplitude levels (ascending).
* ``<name>.signs``: int32 ``[ceil(K / 32)]``: bit ``k`` (bitstream order) set means the rotation
  flips the sign of input column ``k`` (:mod:`quantlab.transforms.rotation`).
* ``<name>.bias``: optional, in the model's dtype.

The layer computes ``y = W' (R x) + b``; ``W'`` is decoded from the codes.

The format also owns what the solver hands it: the unpacked :class:`PVQResult`. The encoding
(:class:`PVQParams`) and its decode arithmetic (:func:`reconstruct`) belong to the codebook,
:mod:`quantlab.formats.pvq_codebook`; they are re-exported here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from quantlab.formats import tensor_layout
from quantlab.formats.bitstream import field_words, pack_fields, unpack_fields
from quantlab.formats.pvq_codebook import (
    PVQParams,
    pyramid_size,
    rank_batch,
    reconstruct,
    unrank_batch,
)
from quantlab.transforms.rotation import unrotate

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PVQMeta",
    "PVQParams",
    "PVQResult",
    "PackedPVQ",
    "check_codes",
    "decode_codes",
    "pack",
    "pack_signs",
    "reconstruct",
    "unpack",
    "unpack_signs",
]

FORMAT_NAME = "pvq"
FORMAT_VERSION = 1


@dataclass
class PVQResult:
    """An unpacked PVQ weight, as the PVQ solver (``pvq_quantize``) produces it.

    The weight it stands for is ``W = W' R`` (``R`` from ``signs``,
    :mod:`quantlab.transforms.rotation`), with
    ``W'[n, v*D:(v+1)*D] = row_scales[n] * levels[gain_codes[n, v]] * y / ||y||``,
    ``y = points[n, v*D:(v+1)*D]``.

    Attributes:
        points: int16 ``[N, K]`` pyramid points, vector ``v`` of row ``n`` in columns
            ``[v*D, (v+1)*D)`` (each with ``sum |y| = pulses``).
        gain_codes: int64 ``[N, K/D]`` amplitude level per vector.
        row_scales: fp32 ``[N]`` (fp16-representable).
        levels: fp32 ``[L]`` ascending (fp16-representable).
        signs: int8 ``[K]`` rotation signs.
        params: the encoding.
        loss: ``tr((W - Q) H (W - Q)^T) / 2`` with the given Hessian (GPTQ's proxy), or the squared
            Frobenius error ``||W - Q||^2`` without one.
    """

    points: torch.Tensor
    gain_codes: torch.Tensor
    row_scales: torch.Tensor
    levels: torch.Tensor
    signs: torch.Tensor
    params: PVQParams
    loss: float | None = None

    @property
    def out_features(self) -> int:
        return self.points.shape[0]

    @property
    def in_features(self) -> int:
        return self.points.shape[1]

    def rotated_weight(self) -> torch.Tensor:
        """fp32 ``[N, K]`` ``W'`` (the weight in the rotated input space)."""
        return reconstruct(self.points, self.gain_codes, self.row_scales, self.levels, self.params)

    def dequantize(self) -> torch.Tensor:
        """fp32 ``[N, K]`` weight in the original input space."""
        return unrotate(self.rotated_weight(), self.signs)


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """Rotation signs ``[K]`` in {-1, +1} -> int32 ``[ceil(K / 32)]`` (bit set = -1)."""
    if signs.dim() != 1:
        raise ValueError(f"signs must be 1-D [K], got shape {tuple(signs.shape)}")
    s = signs.to(torch.int64)
    if not bool(((s == 1) | (s == -1)).all()):
        raise ValueError("signs must all be +1 or -1")
    return pack_fields((s < 0).to(torch.int64), 1)


def unpack_signs(words: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: int8 ``[width]``."""
    bits = unpack_fields(words.cpu(), 1, width)
    return (1 - 2 * bits).to(device=words.device, dtype=torch.int8)


@dataclass(frozen=True)
class PVQMeta:
    """Shape and encoding of one packed PVQ weight."""

    in_features: int
    out_features: int
    dim: int
    pulses: int
    levels: int

    def __post_init__(self) -> None:
        if self.in_features < 1 or self.out_features < 1:
            raise ValueError(f"invalid weight shape [{self.out_features}, {self.in_features}]")
        PVQParams(self.dim, self.pulses, self.levels)  # validates dim, pulses, levels, code width
        if self.in_features % self.dim:
            raise ValueError(f"PVQ dim {self.dim} does not divide in_features {self.in_features}")

    @property
    def params(self) -> PVQParams:
        return PVQParams(self.dim, self.pulses, self.levels)

    @property
    def code_bits(self) -> int:
        return self.params.code_bits

    @property
    def n_codes(self) -> int:
        return self.out_features * (self.in_features // self.dim)

    def tensor_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Expected ``{suffix: (shape, dtype)}`` of the packed tensors (bias excluded)."""
        return {
            "codes": ((field_words(self.n_codes, self.code_bits),), torch.int32),
            "row_scales": ((self.out_features,), torch.float16),
            "levels": ((self.levels,), torch.float16),
            "signs": ((field_words(self.in_features, 1),), torch.int32),
        }

    def storage_bits(self) -> int:
        """Bits the packed tensors occupy on disk."""
        return tensor_layout.storage_bits(self.tensor_shapes())

    def bits_per_weight(self) -> float:
        return self.storage_bits() / (self.in_features * self.out_features)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class PackedPVQ:
    codes: torch.Tensor
    row_scales: torch.Tensor
    levels: torch.Tensor
    signs: torch.Tensor
    meta: PVQMeta

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "codes": self.codes,
            "row_scales": self.row_scales,
            "levels": self.levels,
            "signs": self.signs,
        }

    def validate(self, name: str = "weight") -> None:
        """Raise ``ValueError`` naming the tensor if any packed tensor has the wrong shape/dtype
        or the levels/scales are not finite."""
        tensors = self.tensors()
        tensor_layout.check_tensors(tensors, self.meta.tensor_shapes(), name)
        # The solver clamps row scales to >= the smallest fp16 normal.
        tensor_layout.check_positive(self.row_scales, f"{name}.row_scales")
        if not bool(torch.isfinite(self.levels).all()):
            raise ValueError(f"{name}.levels has NaN/Inf entries")


def decode_codes(
    codes: torch.Tensor, n_codes: int, dim: int, pulses: int, n_levels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack a code stream into (pyramid points int16 ``[n_codes, dim]``, levels int64
    ``[n_codes]``); raises ``ValueError`` on a code that no (level, index) pair has."""
    size = pyramid_size(dim, pulses)
    bits = (size * n_levels - 1).bit_length()
    c = unpack_fields(codes, bits, n_codes)
    if c.numel() and int(c.max()) >= size * n_levels:
        raise ValueError(
            f"pvq: corrupt code {int(c.max())} >= N({dim}, {pulses}) * {n_levels} levels"
        )
    level = torch.div(c, size, rounding_mode="floor")
    return unrank_batch(c - level * size, dim, pulses), level


def check_codes(packed: PackedPVQ, name: str = "weight") -> None:
    """Raise ``ValueError`` if a code names no (amplitude level, pyramid index) pair, i.e. is
    ``>= N(D, P) * L`` (a damaged file; every smaller value decodes to a valid point)."""
    m = packed.meta
    codes = unpack_fields(packed.codes.cpu(), m.code_bits, m.n_codes)
    limit = m.params.size * m.levels
    bad = int((codes >= limit).sum())
    if bad:
        raise ValueError(
            f"{name}.codes: {bad} of {m.n_codes} codes are >= N({m.dim}, {m.pulses}) * "
            f"{m.levels} = {limit}; the packed weight is damaged"
        )


def pack(result: PVQResult) -> PackedPVQ:
    """Pack a solver's unpacked result into the version-1 layout (exact)."""
    p = result.params
    n, k = result.points.shape
    meta = PVQMeta(k, n, p.dim, p.pulses, p.levels)
    if tuple(result.gain_codes.shape) != (n, k // p.dim):
        raise ValueError(f"gain_codes shape {tuple(result.gain_codes.shape)} != {(n, k // p.dim)}")
    if tuple(result.levels.shape) != (p.levels,):
        raise ValueError(f"levels shape {tuple(result.levels.shape)} != {(p.levels,)}")
    row_scales = result.row_scales.to(torch.float16)
    levels = result.levels.to(torch.float16)
    if not bool(torch.isfinite(row_scales).all() and torch.isfinite(levels).all()):
        raise ValueError("row scales or amplitude levels overflow float16")
    gain = result.gain_codes.reshape(-1).to(torch.int64).cpu()
    if gain.numel() and (int(gain.min()) < 0 or int(gain.max()) >= p.levels):
        raise ValueError(f"gain codes must lie in [0, {p.levels})")
    index = rank_batch(result.points.reshape(-1, p.dim).cpu(), p.pulses)
    codes = pack_fields(gain * p.size + index, meta.code_bits)
    device = result.points.device
    return PackedPVQ(
        codes=codes.to(device),
        row_scales=row_scales.contiguous(),
        levels=levels.contiguous(),
        signs=pack_signs(result.signs).to(device),
        meta=meta,
    )


def unpack(packed: PackedPVQ) -> PVQResult:
    """Exact inverse of :func:`pack` (scales and levels come back as fp32)."""
    m = packed.meta
    packed.validate()
    points, level = decode_codes(packed.codes.cpu(), m.n_codes, m.dim, m.pulses, m.levels)
    device = packed.codes.device
    per_row = m.in_features // m.dim
    return PVQResult(
        points=points.view(m.out_features, m.in_features).to(device),
        gain_codes=level.view(m.out_features, per_row).to(device),
        row_scales=packed.row_scales.to(torch.float32),
        levels=packed.levels.to(torch.float32),
        signs=unpack_signs(packed.signs, m.in_features),
        params=m.params,
    )
