"""Conversion between quantlab's groupwise integers and compressed-tensors' ``pack-quantized``
tensors, the layout llm-compressor writes and vLLM serves natively (its Marlin/Machete W4A16
kernels), and its ``quantization_config``.

Per linear with ``N`` outputs, ``K`` inputs and ``G`` groups (read from compressed-tensors 0.19.0,
``compressors/pack_quantized``):

- ``weight_packed`` int32 ``[N, ceil(K * bits / 32)]``: each row one dense little-endian
  bitstream, value ``k`` at bits ``[k * bits, (k + 1) * bits)`` (3-bit values straddle words),
  each value the signed code plus ``2**(bits - 1)``. That is quantlab's ``qweight`` bit for bit:
  quantlab's unsigned code ``q`` is the signed code plus the same offset.
- ``weight_scale`` ``[N, G]`` in the scale dtype (``G = 1`` per channel).
- ``weight_zero_point`` int32 ``[ceil(N * bits / 32), G]`` (asymmetric only): the signed zero
  points plus ``2**(bits - 1)``, i.e. quantlab's unsigned ``z``, packed the same way but along
  the output dimension (one stream per group column).
- ``weight_shape`` int64 ``[2]``: ``(N, K)``.
- dequantization ``w = (q_s - z_s) * s = (q - z) * s``; symmetric weights have ``z_s = 0``, i.e.
  quantlab's symmetric zero ``2**(bits - 1)``.

quantlab's act-order keeps groups in the original column order (static groups), which the format
calls ``actorder: "weight"`` (it changes nothing in the tensors).
"""

from __future__ import annotations

from typing import Any

import torch

from quantlab.formats.bitstream import pack_bitstream, packed_words, unpack_bitstream
from quantlab.formats.groupwise_int import (
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    GroupwiseIntMeta,
    PackedGroupwiseInt,
)
from quantlab.formats.tensor_layout import SCALE_DTYPES, dtype_from_name

__all__ = [
    "CT_FORMAT",
    "CT_QUANT_METHOD",
    "CT_VERSION",
    "CtEncoding",
    "ct_quantization_config",
    "ct_weights_args",
    "encoding_from_weights_args",
    "from_ct_tensors",
    "to_ct_tensors",
]

CT_QUANT_METHOD = "compressed-tensors"
CT_FORMAT = "pack-quantized"
# The compressed-tensors release whose layout and config this module writes (and whose library
# checks it: scripts/check_compressed_tensors_interop.py).
CT_VERSION = "0.19.0"

# (bits, group_size (-1: per channel), symmetric)
CtEncoding = tuple[int, int, bool]


def to_ct_tensors(packed: PackedGroupwiseInt) -> dict[str, torch.Tensor]:
    """A quantlab groupwise layer's tensors in the ``pack-quantized`` layout (module docstring);
    the codes and scales are not copied or converted, only the zero points are re-packed."""
    meta = packed.meta
    out = {
        "weight_packed": packed.qweight,
        "weight_scale": packed.scales,
        "weight_shape": torch.tensor([meta.out_features, meta.in_features], dtype=torch.int64),
    }
    if packed.qzeros is not None:
        zeros = unpack_bitstream(packed.qzeros, meta.bits, meta.n_groups)  # [N, G], unsigned
        out["weight_zero_point"] = pack_bitstream(zeros.t().contiguous(), meta.bits).t()
    return out


def from_ct_tensors(
    tensors: dict[str, torch.Tensor], encoding: CtEncoding, scale_dtype: str | None = None
) -> PackedGroupwiseInt:
    """A ``pack-quantized`` module's tensors as quantlab's packed groupwise layer (checked:
    shapes, dtypes and the encoding quantlab supports); a ``ValueError`` names what is wrong."""
    bits, group_size, sym = encoding
    shape = tensors.get("weight_shape")
    if shape is None or shape.numel() != 2:
        raise ValueError("weight_shape must hold the 2 sizes (out_features, in_features)")
    n, k = (int(v) for v in shape.tolist())
    packed = tensors["weight_packed"]
    if packed.dtype != torch.int32 or tuple(packed.shape) != (n, packed_words(k, bits)):
        raise ValueError(
            f"weight_packed must be int32 [{n}, {packed_words(k, bits)}] for a {n} x {k} "
            f"{bits}-bit weight, got {packed.dtype} {list(packed.shape)}"
        )
    scales = tensors["weight_scale"]
    stored_dtype = next((name for name, d in SCALE_DTYPES.items() if d == scales.dtype), None)
    if stored_dtype is None:
        raise ValueError(f"weight_scale must be one of {sorted(SCALE_DTYPES)}, got {scales.dtype}")
    meta = GroupwiseIntMeta(k, n, bits, group_size, sym, scale_dtype or stored_dtype)
    if tuple(scales.shape) != (n, meta.n_groups):
        raise ValueError(f"weight_scale must be [{n}, {meta.n_groups}], got {list(scales.shape)}")
    qzeros = None
    if not sym:
        zp = tensors.get("weight_zero_point")
        want = (packed_words(n, bits), meta.n_groups)
        if zp is None or zp.dtype != torch.int32 or tuple(zp.shape) != want:
            got = None if zp is None else f"{zp.dtype} {list(zp.shape)}"
            raise ValueError(f"weight_zero_point must be int32 {list(want)}, got {got}")
        zeros = unpack_bitstream(zp.t().contiguous(), bits, n).t()  # [N, G] unsigned
        qzeros = pack_bitstream(zeros.contiguous(), bits)
    if scale_dtype is not None and scale_dtype != stored_dtype:
        scales = scales.to(dtype_from_name(scale_dtype))
    result = PackedGroupwiseInt(packed.contiguous(), scales.contiguous(), qzeros, meta)
    result.validate("weight")
    return result


def ct_weights_args(encoding: CtEncoding, act_order: bool) -> dict[str, Any]:
    """The ``weights`` QuantizationArgs of one config group, as compressed-tensors 0.19.0
    serializes them."""
    bits, group_size, sym = encoding
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": sym,
        "group_size": None if group_size == -1 else group_size,
        "strategy": "channel" if group_size == -1 else "group",
        "block_structure": None,
        "dynamic": False,
        "actorder": "weight" if act_order else None,
        "scale_dtype": None,
        "zp_dtype": None if sym else "torch.int8",
        "observer": "minmax",
        "observer_kwargs": {},
    }


def encoding_from_weights_args(args: Any, where: object) -> CtEncoding:
    """``(bits, group_size, sym)`` of a config group's ``weights`` that quantlab's groupwise
    layers hold; any other scheme is a ``ValueError`` naming it."""
    if not isinstance(args, dict):
        raise ValueError(f"{where}: weights must be an object, got {args!r}")
    bits, kind, strategy = args.get("num_bits"), args.get("type", "int"), args.get("strategy")
    sym, group = args.get("symmetric", True), args.get("group_size")
    if kind != "int" or bits not in SUPPORTED_BITS:
        raise ValueError(
            f"{where}: {kind} weights of {bits} bits; quantlab reads integer weights of "
            f"{SUPPORTED_BITS} bits"
        )
    if args.get("dynamic") not in (False, None) or args.get("block_structure") is not None:
        raise ValueError(f"{where}: dynamic or block-structured weights are not groupwise")
    if strategy == "channel" or (strategy is None and group == -1):
        group = -1
    elif strategy != "group" or group not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"{where}: strategy {strategy!r} with group_size {group!r}; quantlab reads group "
            f"sizes {[g for g in SUPPORTED_GROUP_SIZES if g > 0]} and per-channel weights"
        )
    if args.get("actorder") in ("group", "dynamic"):
        raise ValueError(f"{where}: actorder {args['actorder']!r} (a g_idx permutation)")
    if not isinstance(sym, bool):
        raise ValueError(f"{where}: symmetric must be true or false, got {sym!r}")
    return bits, group, sym


def ct_quantization_config(
    groups: dict[CtEncoding, list[str]],
    every_linear_quantized_alike: bool,
    ignore: list[str],
    act_order: bool,
) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` for a model whose quantized linears are
    ``groups`` (encoding -> module names). With one encoding for every quantized linear its group
    targets ``Linear`` and ``ignore`` names the linears left in float; otherwise each group lists
    its modules by name."""
    config_groups = {}
    for i, (encoding, names) in enumerate(sorted(groups.items())):
        targets = ["Linear"] if every_linear_quantized_alike else sorted(names)
        config_groups[f"group_{i}"] = {
            "targets": targets,
            "weights": ct_weights_args(encoding, act_order),
            "input_activations": None,
            "output_activations": None,
            "format": CT_FORMAT,
        }
    return {
        "config_groups": config_groups,
        "format": CT_FORMAT,
        "global_compression_ratio": None,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "quant_method": CT_QUANT_METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }
