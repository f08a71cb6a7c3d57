"""The little-endian int32 bitstream: the one bit layout of quantlab's packed integers.

This module is the Python twin of ``csrc/common/bitstream.h`` (``packed_words``,
``extract_value``): the kernels read with that header exactly the streams written here. Every
packed integer tensor of quantlab is such a stream: the groupwise integer ``qweight`` and
``qzeros`` (one stream per output row, :mod:`quantlab.formats.groupwise_int`; the same stream GPTQ
uses along its packed dimension), the PVQ codes and rotation signs (one stream per layer,
:mod:`quantlab.formats.pvq`) and the words of the tensor-core kernel layout
(:mod:`quantlab.formats.groupwise_int_mma_layout`).

Layout: ``n`` unsigned ``bits``-wide values are laid out back to back. Value ``j`` occupies stream
bits ``[j * bits, (j + 1) * bits)``, least significant bit first; stream bit ``t`` is bit
``t % 32`` of int32 word ``t // 32`` (the bit pattern counts, not the sign). Unused high bits of
the last word are zero. For bits in {1, 2, 4, 8} no value straddles a word; for 3 bits, values 10
and 21 of every 32 straddle two words.

Worked example, 4 bits: values ``[1, 2, 3, 4, 5, 6, 7, 8, 9]`` take ``packed_words(9, 4) = 2``
words; value ``j`` is nibble ``j % 8`` of word ``j // 8``, counting from the least significant::

    word 0 = 0x87654321   (int32 -2023406815: the top bit is value 7's, not a sign)
    word 1 = 0x00000009   (value 8; the 28 unused high bits are 0)

Worked example, 3 bits (a straddle): values ``[1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 5]`` take 33 bits,
``packed_words(11, 3) = 2`` words; value 10 (``5 = 0b101``) has its low two bits in bits 30-31 of
word 0 and its high bit in bit 0 of word 1::

    word 0, bit 31 .. 0:  01 010 001 000 111 110 101 100 011 010 001   = 0x511F58D1
                          v10 v9  v8  v7  v6  v5  v4  v3  v2  v1  v0
                          (low)
    word 1, bit 31 .. 0:  0000000000000000000000000000000 1            = 0x00000001
                                                          v10 (high)

Two entry points write and read that one stream:

* :func:`pack_bitstream` / :func:`unpack_bitstream`: one stream per row along the last dim,
  widths 1..32, on the tensor's device (the groupwise integer tensors).
* :func:`pack_fields` / :func:`unpack_fields`: one stream over a whole tensor (flattened in
  order), widths 1..63 (PVQ codes and signs); the stream is built on the CPU.
"""

from __future__ import annotations

import torch

__all__ = [
    "MAX_FIELD_BITS",
    "field_words",
    "pack_bitstream",
    "pack_fields",
    "packed_words",
    "unpack_bitstream",
    "unpack_fields",
]

# Widest value one word-arithmetic step handles: a value of at most 32 bits touches at most two
# words. Wider fields are written as their low 32 bits plus the rest, 32 stream bits further on.
_WORD_BITS = 32
# Widest field of pack_fields: a field comes back as a non-negative int64.
MAX_FIELD_BITS = 63


def packed_words(n_values: int, bits: int) -> int:
    """Number of int32 words holding ``n_values`` values of ``bits`` bits."""
    return (n_values * bits + 31) // 32


# The PVQ code's name for the same count (fields = values).
field_words = packed_words


def _scatter_values(out: torch.Tensor, flat: torch.Tensor, start: torch.Tensor, bits: int) -> None:
    """Add ``bits``-wide values (``bits <= 32``) ``flat`` int64 ``[R, n]`` into the int64 words
    ``out`` ``[R, W]`` at stream bits ``start`` ``[n]`` (disjoint bits: the sum is an OR)."""
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


# Values packed per chunk of rows (int64 temporaries of a few times 8 bytes each: ~100 MB).
_PACK_CHUNK_VALUES = 1 << 22


def _pack_rows(flat: torch.Tensor, bits: int, words: int) -> torch.Tensor:
    """int64 ``[R, n]`` values in ``[0, 2**bits)`` -> int32 ``[R, words]``, one stream per row."""
    out = torch.zeros(flat.shape[0], words, dtype=torch.int64, device=flat.device)
    start = torch.arange(flat.shape[1], device=flat.device) * bits
    if bits <= _WORD_BITS:
        _scatter_values(out, flat, start, bits)
    else:
        _scatter_values(out, flat & 0xFFFFFFFF, start, _WORD_BITS)
        _scatter_values(out, flat >> _WORD_BITS, start + _WORD_BITS, bits - _WORD_BITS)
    # Reinterpret the uint32 bit patterns as int32.
    return torch.where(out >= (1 << 31), out - (1 << 32), out).to(torch.int32)


def _extract_values(u: torch.Tensor, start: torch.Tensor, bits: int, words: int) -> torch.Tensor:
    """The ``bits``-wide values (``bits <= 32``) at stream bits ``start`` ``[n]`` of the uint32
    words ``u`` int64 ``[..., words]``: int64 ``[..., n]`` (``extract_value`` of bitstream.h)."""
    word = start // 32
    shift = start % 32
    mask = (1 << bits) - 1
    lo = u[..., word] >> shift
    # A straddling value takes its high bits from the next word; guard the index at the end.
    nxt = torch.clamp(word + 1, max=words - 1)
    hi = torch.where((shift + bits) > 32, u[..., nxt] << (32 - shift), torch.zeros_like(lo))
    return (lo | hi) & mask


def _unpack_rows(packed: torch.Tensor, bits: int, n_values: int, words: int) -> torch.Tensor:
    """int32 ``[..., words]`` streams -> int64 ``[..., n_values]`` values."""
    u = packed.to(torch.int64) & 0xFFFFFFFF
    start = torch.arange(n_values, device=packed.device) * bits
    if bits <= _WORD_BITS:
        return _extract_values(u, start, bits, words)
    lo = _extract_values(u, start, _WORD_BITS, words)
    hi = _extract_values(u, start + _WORD_BITS, bits - _WORD_BITS, words)
    return lo | (hi << _WORD_BITS)


def _check_row_bits(bits: int) -> None:
    if not 1 <= bits <= _WORD_BITS:
        raise ValueError(f"bits must be in [1, {_WORD_BITS}], got {bits}")


def pack_bitstream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integers along the last dim into int32 words, one stream per row.

    Args:
        values: integer tensor ``[..., n]`` with entries in ``[0, 2**bits)``.
        bits: value width, 1..32 (the groupwise integer format stores 2, 3, 4 or 8; it checks
            its widths itself).

    Returns:
        int32 tensor ``[..., packed_words(n, bits)]``.
    """
    _check_row_bits(bits)
    if values.dtype.is_floating_point:
        raise TypeError(f"pack_bitstream expects an integer tensor, got {values.dtype}")
    if values.numel():
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= (1 << bits):
            raise ValueError(f"values out of range for {bits}-bit packing: [{low}, {high}]")
    n = values.shape[-1]
    words = packed_words(n, bits)
    lead = values.shape[:-1]
    flat = values.reshape(-1, n)
    out = torch.empty(flat.shape[0], words, dtype=torch.int32, device=values.device)
    # Rows in chunks: the int64 temporaries of a whole 28672 x 8192 layer would take ~4 GB.
    step = max(1, _PACK_CHUNK_VALUES // max(n, 1))
    for start in range(0, flat.shape[0], step):
        chunk = flat[start : start + step].to(torch.int64)
        out[start : start + step] = _pack_rows(chunk, bits, words)
    return out.reshape(*lead, words)


def unpack_bitstream(packed: torch.Tensor, bits: int, n_values: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitstream`.

    Args:
        packed: int32 tensor ``[..., packed_words(n_values, bits)]``.
        bits: value width, 1..32.
        n_values: number of values per row.

    Returns:
        int32 tensor ``[..., n_values]`` with entries in ``[0, 2**bits)`` (32-bit values come
        back as their int32 bit patterns).
    """
    _check_row_bits(bits)
    if packed.dtype != torch.int32:
        raise TypeError(f"packed tensor must be int32, got {packed.dtype}")
    words = packed_words(n_values, bits)
    if packed.shape[-1] != words:
        raise ValueError(
            f"packed last dim is {packed.shape[-1]}, expected {words} words for {n_values} "
            f"{bits}-bit values"
        )
    return _unpack_rows(packed, bits, n_values, words).to(torch.int32)


def _check_width(width: int) -> None:
    if not 1 <= width <= MAX_FIELD_BITS:
        raise ValueError(f"field width must be in [1, {MAX_FIELD_BITS}] bits, got {width}")


def pack_fields(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack non-negative integers (any shape, flattened in order) into one bitstream.

    Args:
        values: integer tensor, entries in ``[0, 2**width)``.
        width: bits per field, 1..63.

    Returns:
        int32 ``[field_words(values.numel(), width)]``, on the CPU.
    """
    _check_width(width)
    if values.dtype.is_floating_point:
        raise TypeError(f"pack_fields expects an integer tensor, got {values.dtype}")
    v = values.reshape(-1).to(torch.int64).cpu()
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << width)):
        raise ValueError(
            f"values out of range for {width}-bit fields: [{int(v.min())}, {int(v.max())}]"
        )
    n_words = field_words(v.numel(), width)
    return _pack_rows(v.unsqueeze(0), width, n_words).reshape(n_words)


def unpack_fields(words: torch.Tensor, width: int, n_fields: int) -> torch.Tensor:
    """Inverse of :func:`pack_fields`: int64 ``[n_fields]``."""
    _check_width(width)
    if words.dtype != torch.int32 or words.dim() != 1:
        raise TypeError(f"packed fields must be 1-D int32, got {words.dtype} {tuple(words.shape)}")
    need = field_words(n_fields, width)
    if words.numel() != need:
        raise ValueError(
            f"bitstream has {words.numel()} words, expected {need} for {n_fields} "
            f"{width}-bit fields"
        )
    return _unpack_rows(words, width, n_fields, need)
