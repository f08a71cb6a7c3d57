"""Pure-PyTorch reference implementations of every quantlab op.

These functions are the specification of the packed layouts (see docs/formats.md). They are written
for reading, compute in fp32, and serve three roles: the CPU/CUDA fallback when the compiled
extension is absent, the oracle that kernel tests compare against, and the documentation of the
byte layout.

Bitstream convention (shared by ``qweight`` and ``qzeros``): a row of ``n`` unsigned ``bits``-wide
integers is laid out as a little-endian bit stream. Value ``j`` occupies stream bits
``[j * bits, (j + 1) * bits)``; stream bit ``t`` is bit ``t % 32`` of int32 word ``t // 32``.
Unused high bits of the last word are zero. For bits in {2, 4, 8} no value straddles a word; for
3-bit, values 10 and 21 of every 32 straddle (this is the same stream GPTQ uses along its packed
dimension).
"""

from __future__ import annotations

import torch

__all__ = [
    "SUPPORTED_BITS",
    "packed_words",
    "pack_bitstream",
    "unpack_bitstream",
    "groupwise_int_dequant",
    "groupwise_int_mm",
]

SUPPORTED_BITS = (2, 3, 4, 8)


def packed_words(n_values: int, bits: int) -> int:
    """Number of int32 words holding ``n_values`` values of ``bits`` bits."""
    return (n_values * bits + 31) // 32


def pack_bitstream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integers along the last dim into int32 words.

    Args:
        values: integer tensor ``[..., n]`` with entries in ``[0, 2**bits)``.
        bits: one of ``SUPPORTED_BITS``.

    Returns:
        int32 tensor ``[..., packed_words(n, bits)]``.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if values.dtype.is_floating_point:
        raise TypeError(f"pack_bitstream expects an integer tensor, got {values.dtype}")
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise ValueError(
            f"values out of range for {bits}-bit packing: [{int(v.min())}, {int(v.max())}]"
        )
    n = v.shape[-1]
    words = packed_words(n, bits)
    lead = v.shape[:-1]
    flat = v.reshape(-1, n)
    out = torch.zeros(flat.shape[0], words, dtype=torch.int64, device=v.device)
    start = torch.arange(n, device=v.device) * bits
    word = start // 32
    shift = start % 32
    # Low part: the bits that land in the value's first word.
    out.scatter_add_(1, word.expand_as(flat), (flat << shift) & 0xFFFFFFFF)
    # High part: the bits that spill into the next word (only when a value straddles).
    spill = (shift + bits) > 32
    if bool(spill.any()):
        idx = spill.nonzero().squeeze(1)
        out.scatter_add_(
            1, (word[idx] + 1).expand(flat.shape[0], -1), flat[:, idx] >> (32 - shift[idx])
        )
    # Reinterpret the uint32 bit patterns as int32.
    out = torch.where(out >= (1 << 31), out - (1 << 32), out).to(torch.int32)
    return out.reshape(*lead, words)


def unpack_bitstream(packed: torch.Tensor, bits: int, n_values: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitstream`.

    Args:
        packed: int32 tensor ``[..., packed_words(n_values, bits)]``.
        bits: one of ``SUPPORTED_BITS``.
        n_values: number of values per row.

    Returns:
        int32 tensor ``[..., n_values]`` with entries in ``[0, 2**bits)``.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if packed.dtype != torch.int32:
        raise TypeError(f"packed tensor must be int32, got {packed.dtype}")
    words = packed_words(n_values, bits)
    if packed.shape[-1] != words:
        raise ValueError(
            f"packed last dim is {packed.shape[-1]}, expected {words} words for {n_values} "
            f"{bits}-bit values"
        )
    u = packed.to(torch.int64) & 0xFFFFFFFF
    start = torch.arange(n_values, device=packed.device) * bits
    word = start // 32
    shift = start % 32
    mask = (1 << bits) - 1
    lo = u[..., word] >> shift
    # A straddling value takes its high bits from the next word; guard the index at the end.
    nxt = torch.clamp(word + 1, max=words - 1)
    hi = torch.where((shift + bits) > 32, u[..., nxt] << (32 - shift), torch.zeros_like(lo))
    return ((lo | hi) & mask).to(torch.int32)


def _group_count(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else in_features // group_size


def groupwise_int_dequant(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dequantize a groupwise integer weight.

    Args:
        qweight: int32 ``[N, packed_words(K, bits)]``, one bitstream per output row.
        scales: float ``[N, G]`` with ``G = K // group_size`` (``1`` when ``group_size == -1``).
        qzeros: int32 ``[N, packed_words(G, bits)]``, or ``None`` for symmetric weights
            (zero point ``2**(bits-1)``).
        bits: weight bit width.
        group_size: input columns per group, or ``-1`` for one group per row.
        in_features: ``K``.
        out_dtype: dtype of the result (default ``scales.dtype``).

    Returns:
        ``[N, K]`` tensor ``(q - z) * s`` computed in fp32 and cast to ``out_dtype``.
    """
    n_groups = _group_count(in_features, group_size)
    gsize = in_features if group_size == -1 else group_size
    q = unpack_bitstream(qweight, bits, in_features).to(torch.float32)
    if qzeros is None:
        z = torch.full((q.shape[0], n_groups), float(1 << (bits - 1)), device=q.device)
    else:
        z = unpack_bitstream(qzeros, bits, n_groups).to(torch.float32)
    s = scales.to(torch.float32)
    w = (q.view(q.shape[0], n_groups, gsize) - z.unsqueeze(-1)) * s.unsqueeze(-1)
    return w.reshape(q.shape[0], in_features).to(out_dtype or scales.dtype)


def groupwise_int_mm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """``x @ dequant(W).T`` with fp32 accumulation.

    Args:
        x: ``[M, K]`` activations (fp32, fp16 or bf16).
        qweight, scales, qzeros, bits, group_size: as in :func:`groupwise_int_dequant`.

    Returns:
        ``[M, N]`` in ``x.dtype``.
    """
    w = groupwise_int_dequant(qweight, scales, qzeros, bits, group_size, x.shape[-1], torch.float32)
    return (x.to(torch.float32) @ w.t()).to(x.dtype)
