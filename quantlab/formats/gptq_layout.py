"""Conversion between quantlab's unpacked groupwise integers and GPTQ checkpoint tensors.

The GPTQ layout (AutoGPTQ / GPTQModel / transformers / vLLM ``quant_method="gptq"``), per linear
with ``N`` outputs, ``K`` inputs and ``G`` groups:

- ``qweight`` int32 ``[K * bits / 32, N]``: column ``n`` is the little-endian bitstream of
  ``q[n, 0..K)`` (value ``k`` at stream bits ``[k * bits, (k + 1) * bits)``, stream bit ``t`` =
  bit ``t % 32`` of word ``t // 32``). For 3-bit, values 10 and 21 of every 32 straddle words.
  This is exactly :func:`quantlab.formats.bitstream.pack_bitstream` along ``K``.
- ``qzeros`` int32 ``[G, N * bits / 32]``: row ``g`` is the same bitstream of the zero points of
  group ``g`` along ``N``.
- ``scales`` fp16 ``[G, N]``; ``g_idx`` int32 ``[K]`` with ``g_idx[k] = k // group_size``.
- ``group_size = -1`` (per-channel) means ``G = 1`` and ``g_idx`` all zeros.

Zero-point convention (``checkpoint_format``):

- ``"gptq"`` (v1) stores ``zero - 1``. AutoGPTQ's ``pack()`` does ``zeros -= 1`` before packing,
  and every v1 kernel decodes ``(field & mask) + 1``: AutoGPTQ's torch path, and vLLM's
  exllama-derived ``q_gemm.cu`` (``MatrixView_q4_row::item4`` masks, then
  ``dequant_4bit_8_prep_zero(zeros[i] + 1, ...)``). So a true zero of 0 is *not representable*:
  storing ``-1`` as the ``bits``-wide field ``2**bits - 1`` decodes to ``2**bits``, not 0 (and
  AutoGPTQ's unmasked uint32 cast of ``-1`` even spills ones into the neighbouring fields).
  GPTQModel's v1->v2 loader adds ``0x11111111`` (4-bit) to the packed words, which turns such a
  field into 0 but carries 1 into its neighbour. No loader decodes it correctly, so
  :func:`to_gptq_tensors` refuses it and recommends ``gptq_v2`` (or ``sym=True``, whose zero
  ``2**(bits-1)`` is always representable: 4-bit v1 stores 7).
- ``"gptq_v2"`` stores the zero itself; vLLM's gptq kernels take ``use_v2_format`` (zero offset
  0) and GPTQModel uses v2 internally.

Symmetric weights still get explicit ``qzeros`` (GPTQ checkpoints always carry them).
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata
from typing import Any

import torch

from quantlab.formats.bitstream import pack_bitstream, unpack_bitstream
from quantlab.formats.groupwise_int import SUPPORTED_BITS
from quantlab.formats.tensor_layout import (
    explicit_zeros,
    packed_int32_tensors,
    scales_to_store,
    zeros_to_store,
)

__all__ = [
    "CHECKPOINT_FORMATS",
    "from_gptq_tensors",
    "gptq_quantization_config",
    "to_gptq_tensors",
]

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def _check_common(bits: int, checkpoint_format: str) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"checkpoint_format must be one of {CHECKPOINT_FORMATS} ('gptq' = v1, stores zero-1), "
            f"got {checkpoint_format!r}"
        )


def _n_groups(in_features: int, group_size: int) -> int:
    if group_size == -1:
        return 1
    if group_size <= 0 or in_features % group_size != 0:
        raise ValueError(
            f"group_size must be -1 or a positive divisor of in_features {in_features}, "
            f"got {group_size}"
        )
    return in_features // group_size


def _check_packable(count: int, bits: int, what: str) -> None:
    if (count * bits) % 32 != 0:
        raise ValueError(
            f"GPTQ packs {what} into whole int32 words, so {what} * bits must be a multiple of "
            f"32; {what}={count} with bits={bits} gives {count * bits} bits"
        )


def _trivial_g_idx(in_features: int, group_size: int, device: torch.device) -> torch.Tensor:
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32, device=device)
    return (torch.arange(in_features, device=device) // group_size).to(torch.int32)


def to_gptq_tensors(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    checkpoint_format: str = "gptq",
    scale_dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """Pack unpacked groupwise integers into the GPTQ checkpoint tensors of one linear.

    Args:
        q: integer ``[N, K]`` in ``[0, 2**bits)``.
        scales: float ``[N, G]`` (cast to ``scale_dtype``; solvers already round them to it).
        zeros: integer ``[N, G]`` in ``[0, 2**bits)``, or ``None`` for symmetric
            (zero ``2**(bits-1)``, written explicitly).
        bits: 2, 3, 4 or 8.
        group_size: input columns per group, ``-1`` for per-channel (``G = 1``).
        checkpoint_format: ``"gptq"`` (v1, stores ``zero - 1``) or ``"gptq_v2"`` (stores zero).
        scale_dtype: dtype of the stored ``scales``.

    Returns:
        ``{"qweight": int32 [K*bits/32, N], "qzeros": int32 [G, N*bits/32],
        "scales": scale_dtype [G, N], "g_idx": int32 [K]}``, all contiguous, on ``q``'s device.

    Raises:
        ValueError: on shape/range problems, ``K * bits`` or ``N * bits`` not a multiple of 32,
            or an asymmetric zero of 0 with v1 (not representable; use ``gptq_v2``).
    """
    _check_common(bits, checkpoint_format)
    if q.dim() != 2 or q.dtype.is_floating_point or q.dtype == torch.bool:
        raise ValueError(f"q must be a 2-D integer [N, K] tensor, got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape
    g = _n_groups(k, group_size)
    _check_packable(k, bits, "in_features (K)")
    _check_packable(n, bits, "out_features (N)")
    maxq = (1 << bits) - 1
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > maxq):
        raise ValueError(
            f"q values must lie in [0, {maxq}] for {bits}-bit, got [{int(q.min())}, {int(q.max())}]"
        )
    stored_scales = scales_to_store(
        scales, n, g, scale_dtype, "GPTQ", "; export with a wider scale_dtype"
    )
    z = zeros_to_store(zeros, n, g, bits, q.device)
    if checkpoint_format == "gptq":
        z = z - 1
        if z.numel() and int(z.min()) < 0:
            bad = int((z < 0).sum())
            raise ValueError(
                f"{bad} group(s) have zero point 0, which checkpoint_format='gptq' (v1, stores "
                "zero-1) cannot represent: GPTQ kernels decode the stored field as field+1, so it "
                "would load as 2**bits. Export with checkpoint_format='gptq_v2' (vLLM, "
                "transformers/GPTQModel read it) or quantize with sym=True"
            )

    return {
        # pack_bitstream packs along the last dim; GPTQ packs each output column along K.
        "qweight": pack_bitstream(q, bits).t().contiguous(),
        "qzeros": pack_bitstream(z.t().contiguous(), bits),
        "scales": stored_scales,
        "g_idx": _trivial_g_idx(k, group_size, q.device),
    }


def from_gptq_tensors(
    tensors: Mapping[str, torch.Tensor],
    bits: int,
    group_size: int,
    checkpoint_format: str = "gptq",
    *,
    sym: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Unpack one linear's GPTQ checkpoint tensors (inverse of :func:`to_gptq_tensors`).

    Args:
        tensors: must hold ``qweight`` int32 ``[K*bits/32, N]``, ``qzeros`` int32
            ``[G, N*bits/32]`` and ``scales`` float ``[G, N]``; ``g_idx`` int ``[K]`` is
            optional but, if present, must be the trivial ``k // group_size``.
        bits, group_size, checkpoint_format: as in the checkpoint's quantization config.
        sym: return ``zeros=None``, after checking every zero is ``2**(bits-1)``.

    Returns:
        ``(q int32 [N, K], scales fp32 [N, G], zeros int32 [N, G] or None)``.

    Raises:
        ValueError: missing tensors, inconsistent shapes, a permuted ``g_idx`` (dynamic act-order,
            which quantlab's layout cannot express), or a v1 field that decodes to ``2**bits``.
    """
    _check_common(bits, checkpoint_format)
    qweight, qzeros, scales = packed_int32_tensors(tensors, "GPTQ")
    words_k, n = qweight.shape
    if (words_k * 32) % bits != 0:
        raise ValueError(
            f"qweight has {words_k} rows, which is not a whole number of {bits}-bit values"
        )
    k = words_k * 32 // bits
    g = _n_groups(k, group_size)
    _check_packable(n, bits, "out_features (N)")
    if scales.dim() != 2 or tuple(scales.shape) != (g, n) or not scales.dtype.is_floating_point:
        raise ValueError(
            f"scales must be float [G, N] = [{g}, {n}] for K={k}, group_size={group_size}, got "
            f"{scales.dtype} {tuple(scales.shape)}"
        )
    if tuple(qzeros.shape) != (g, n * bits // 32):
        raise ValueError(
            f"qzeros must be [G, N*bits/32] = [{g}, {n * bits // 32}], got {tuple(qzeros.shape)}"
        )
    g_idx = tensors.get("g_idx")
    if g_idx is not None:
        trivial = _trivial_g_idx(k, group_size, g_idx.device)
        if tuple(g_idx.shape) != (k,) or not torch.equal(g_idx.to(torch.int32), trivial):
            raise ValueError(
                "g_idx is not k // group_size: this checkpoint uses act-order with dynamic "
                "groups (desc_act without static_groups), whose per-column group index "
                "quantlab's groupwise layout does not store"
            )

    q = unpack_bitstream(qweight.t().contiguous(), bits, k)
    z = unpack_bitstream(qzeros, bits, n).t().contiguous()
    if checkpoint_format == "gptq":
        z = z + 1
        maxq = (1 << bits) - 1
        if int(z.max()) > maxq:
            bad = int((z > maxq).sum())
            raise ValueError(
                f"{bad} v1 zero field(s) hold {maxq}, which GPTQ kernels decode as zero "
                f"{maxq + 1}, outside the {bits}-bit grid: the checkpoint was written with an "
                "underflowed zero point of 0 (asymmetric v1 export); re-export it as gptq_v2"
            )
    return q, scales.t().to(torch.float32).contiguous(), explicit_zeros(z, bits, sym)


def _quantizer_tag() -> str:
    try:
        return f"quantlab:{metadata.version('quantlab')}"
    except metadata.PackageNotFoundError:
        return "quantlab"


def gptq_quantization_config(
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool = False,
    checkpoint_format: str = "gptq",
    damp_percent: float = 0.01,
    true_sequential: bool = True,
    static_groups: bool = False,
) -> dict[str, Any]:
    """The ``quantization_config`` (``config.json``) / ``quantize_config.json`` of a GPTQ export.

    Keys are those transformers' ``GPTQConfig``, vLLM's ``GPTQConfig``/``GPTQMarlinConfig`` and
    GPTQModel read; ``checkpoint_format`` is always explicit so no loader has to guess the zero
    convention. The tuning knobs are repeated under ``meta`` where GPTQModel keeps them.

    With ``desc_act`` and ``static_groups`` quantlab's ``g_idx`` is trivial; the flag is still
    recorded as given (it describes how the weights were made, and loaders handle it).
    """
    _check_common(bits, checkpoint_format)
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size must be -1 or positive, got {group_size}")
    return {
        "quant_method": "gptq",
        "checkpoint_format": checkpoint_format,
        "bits": bits,
        "group_size": group_size,
        "sym": sym,
        "desc_act": desc_act,
        "static_groups": static_groups,
        "true_sequential": true_sequential,
        "damp_percent": damp_percent,
        "pack_dtype": "int32",
        "lm_head": False,
        "meta": {
            "quantizer": [_quantizer_tag()],
            "damp_percent": damp_percent,
            "static_groups": static_groups,
            "true_sequential": true_sequential,
        },
    }
