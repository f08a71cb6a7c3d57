"""``torch.ops.quantlab.groupwise_int_*``: compiled kernels where built, the PyTorch reference
elsewhere.

The op schemas are defined by the compiled extension when it is present; otherwise (and for any
device the build has no kernel for, e.g. CUDA tensors with a CPU-only build) the reference
implementations in :mod:`quantlab.ops.groupwise_int_reference` are registered under the same
names, so callers always go through one op. Fake (meta) implementations make the ops traceable
by ``torch.compile``.
"""

from __future__ import annotations

import torch

from quantlab.formats.groupwise_int_mma_layout import (
    RepackedWeight,
    fast_path_reason,
    mma_layout,
    repack,
)
from quantlab.ops import groupwise_int_reference as reference
from quantlab.ops._extension import compiled_kernel, register_ops
from quantlab.ops.groupwise_int_mma_reference import mma_mm_reference
from quantlab.ops.kernel_policy import decide, use_kernel

__all__ = [
    "backend",
    "compiled",
    "dequant",
    "grouped_matmul",
    "has_mma_kernel",
    "matmul",
    "mma_kernel_enabled",
    "mma_matmul",
    "mma_repack",
]

_SCHEMAS = {
    "groupwise_int_dequant": (
        "groupwise_int_dequant(Tensor qweight, Tensor scales, Tensor? qzeros, int bits, "
        "int group_size, int in_features, ScalarType out_dtype) -> Tensor"
    ),
    "groupwise_int_mm": (
        "groupwise_int_mm(Tensor x, Tensor qweight, Tensor scales, Tensor? qzeros, int bits, "
        "int group_size) -> Tensor"
    ),
    # A mixture's experts: rows offsets[e]..offsets[e+1] of x through expert e (offsets: CPU int64
    # [E + 1]; qweight/scales/qzeros stacked [E, N, ...]).
    "groupwise_int_grouped_mm": (
        "groupwise_int_grouped_mm(Tensor x, Tensor offsets, Tensor qweight, Tensor scales, "
        "Tensor? qzeros, int bits, int group_size) -> Tensor"
    ),
    # The tensor-core kernel on weights repacked by groupwise_int_mma_repack (CUDA builds define
    # it with its kernel; elsewhere it runs the reference of
    # quantlab.ops.groupwise_int_mma_reference).
    "groupwise_int_mma_mm": (
        "groupwise_int_mma_mm(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int bits, "
        "int group_size, int in_features, int out_features, int split_k) -> Tensor"
    ),
    # The repack into that kernel's layout (csrc/groupwise_int/mma_repack.h: the kernel's own
    # index maps); zeros is an empty int32 tensor for symmetric weights.
    "groupwise_int_mma_repack": (
        "groupwise_int_mma_repack(Tensor qweight, Tensor scales, Tensor? qzeros, int bits, "
        "int group_size, int in_features) -> (Tensor, Tensor, Tensor)"
    ),
}


def _mma_repack_reference(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rep = repack(qweight, scales, qzeros, bits, group_size, in_features)
    zeros = rep.zeros if rep.zeros is not None else qweight.new_empty(0)
    return rep.qweight, rep.scales, zeros


_REFERENCES = {
    "groupwise_int_dequant": reference.groupwise_int_dequant,
    "groupwise_int_mm": reference.groupwise_int_mm,
    "groupwise_int_grouped_mm": reference.groupwise_int_grouped_mm,
    "groupwise_int_mma_mm": mma_mm_reference,
    "groupwise_int_mma_repack": _mma_repack_reference,
}
FAMILY = "groupwise_int"
_KERNELS: dict[tuple[str, str], bool] = {}


def _register() -> None:
    _KERNELS.update(register_ops(FAMILY, _SCHEMAS, _REFERENCES))

    @torch.library.register_fake("quantlab::groupwise_int_dequant")
    def _dequant_fake(
        qweight: torch.Tensor,
        scales: torch.Tensor,
        qzeros: torch.Tensor | None,
        bits: int,
        group_size: int,
        in_features: int,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        return qweight.new_empty((qweight.shape[0], in_features), dtype=out_dtype)

    @torch.library.register_fake("quantlab::groupwise_int_mm")
    def _mm_fake(
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        qzeros: torch.Tensor | None,
        bits: int,
        group_size: int,
    ) -> torch.Tensor:
        return x.new_empty((x.shape[0], qweight.shape[0]))

    @torch.library.register_fake("quantlab::groupwise_int_grouped_mm")
    def _grouped_mm_fake(
        x: torch.Tensor,
        offsets: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        qzeros: torch.Tensor | None,
        bits: int,
        group_size: int,
    ) -> torch.Tensor:
        return x.new_empty((x.shape[0], qweight.shape[1]))

    @torch.library.register_fake("quantlab::groupwise_int_mma_mm")
    def _mma_mm_fake(
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        bits: int,
        group_size: int,
        in_features: int,
        out_features: int,
        split_k: int,
    ) -> torch.Tensor:
        return x.new_empty((x.shape[0], out_features))

    @torch.library.register_fake("quantlab::groupwise_int_mma_repack")
    def _mma_repack_fake(
        qweight: torch.Tensor,
        scales: torch.Tensor,
        qzeros: torch.Tensor | None,
        bits: int,
        group_size: int,
        in_features: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sym = qzeros is None
        shapes = mma_layout(bits, group_size, in_features, qweight.shape[0], sym).shapes()
        zeros = shapes.get("zeros", (0,))
        return (
            qweight.new_empty(shapes["qweight"]),
            scales.new_empty(shapes["scales"]),
            qweight.new_empty(zeros),
        )


_register()


def compiled(device_type: str, op: str = "groupwise_int_mm") -> bool:
    """Whether this build has a compiled kernel of ``op`` for ``device_type`` (whether the ops
    *use* it is :func:`backend`'s answer)."""
    return compiled_kernel(_KERNELS, op, device_type)


def backend(device_type: str) -> str:
    """Which implementation ``matmul`` runs on ``device_type`` (:mod:`quantlab.ops.kernel_policy`):
    ``"cpu-kernel"``, ``"cuda-kernel"`` or ``"torch"``."""
    return decide(FAMILY, device_type, compiled(device_type)).backend


def has_mma_kernel() -> bool:
    """Whether this build has the CUDA tensor-core kernel of ``groupwise_int_mma_mm``."""
    return compiled("cuda", "groupwise_int_mma_mm")


def mma_kernel_enabled() -> bool:
    """Whether layers may run the tensor-core kernel: built, and the CUDA kernels of this family
    are verified on a GPU or opted in to (:mod:`quantlab.ops.kernel_policy`)."""
    return has_mma_kernel() and use_kernel(FAMILY, "cuda", compiled("cuda"))


def _torch_mm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    if x.device.type != "cuda":
        return reference.groupwise_int_mm(x, qweight, scales, qzeros, bits, group_size)
    # Dequantize straight into the activations' dtype and let cuBLAS multiply: the weight is
    # rounded to x.dtype exactly as the kernels do before their tensor-core products.
    w = reference.groupwise_int_dequant(
        qweight, scales, qzeros, bits, group_size, x.shape[-1], x.dtype
    )
    return x @ w.T


def dequant(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense ``[N, K]`` weight; layout in
    :func:`quantlab.ops.groupwise_int_reference.groupwise_int_dequant`."""
    device = qweight.device.type
    if not use_kernel(FAMILY, device, compiled(device)):
        return reference.groupwise_int_dequant(
            qweight, scales, qzeros, bits, group_size, in_features, out_dtype
        )
    return torch.ops.quantlab.groupwise_int_dequant(
        qweight, scales, qzeros, bits, group_size, in_features, out_dtype
    )


def matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """``x [M, K] @ W.T`` -> ``[M, N]`` in ``x.dtype``; see
    :mod:`quantlab.ops.groupwise_int_reference`."""
    device = x.device.type
    if not use_kernel(FAMILY, device, compiled(device)):
        return _torch_mm(x, qweight, scales, qzeros, bits, group_size)
    return torch.ops.quantlab.groupwise_int_mm(x, qweight, scales, qzeros, bits, group_size)


def check_offsets(offsets: torch.Tensor, experts: int, rows: int) -> None:
    """``offsets`` is what :func:`grouped_matmul` takes: a CPU int64 ``[experts + 1]`` running
    from 0 to ``rows`` without decreasing; else a ``ValueError`` naming what is wrong."""
    if offsets.device.type != "cpu" or offsets.dtype != torch.int64 or offsets.dim() != 1:
        raise ValueError(
            f"offsets must be a 1-D CPU int64 tensor, got {offsets.dtype} "
            f"{list(offsets.shape)} on {offsets.device}"
        )
    if offsets.numel() != experts + 1:
        raise ValueError(
            f"offsets must hold experts + 1 = {experts + 1} entries, got {offsets.numel()}"
        )
    if int(offsets[0]) != 0 or int(offsets[-1]) != rows:
        raise ValueError(
            f"offsets must run from 0 to x's {rows} rows, "
            f"got {int(offsets[0])} .. {int(offsets[-1])}"
        )
    if experts and bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError("offsets must be nondecreasing (the rows sorted by expert)")


def grouped_matmul(
    x: torch.Tensor,
    offsets: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """A mixture's experts in one op: rows ``offsets[e] .. offsets[e + 1]`` of ``x [R, K]`` times
    expert ``e``'s weight, ``qweight``/``scales``/``qzeros`` stacked ``[E, N, ...]``, ``offsets``
    a CPU int64 ``[E + 1]`` (:func:`check_offsets`). Returns ``[R, N]`` in ``x.dtype``; see
    :func:`quantlab.ops.groupwise_int_reference.groupwise_int_grouped_mm`.

    The CPU kernel runs every expert in one call; the CUDA one in one launch when no expert has
    more than 8 rows, else each expert through :func:`matmul`'s kernels. Without a kernel the
    torch path loops over the experts (dequantize + cuBLAS on CUDA)."""
    check_offsets(offsets, qweight.shape[0], x.shape[0])
    device = x.device.type
    op = "groupwise_int_grouped_mm"
    if use_kernel(FAMILY, device, compiled(device, op)):
        return torch.ops.quantlab.groupwise_int_grouped_mm(
            x, offsets, qweight, scales, qzeros, bits, group_size
        )
    return reference.per_expert(
        x, offsets, qweight, scales, qzeros,
        lambda rows, q, sc, z: _torch_mm(rows, q, sc, z, bits, group_size),
    )  # fmt: skip


def mma_repack(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> RepackedWeight:
    """Exported tensors (``groupwise_int`` v1) -> the tensor-core kernel's layout, on their
    device: the compiled repack (csrc/groupwise_int/mma_repack.h, the kernel's own index maps)
    where this family's kernels run, else the PyTorch reference
    (:func:`quantlab.formats.groupwise_int_mma_layout.repack`), which gives the same tensors bit
    for bit. Raises ``ValueError`` when the layout does not take the weight."""
    device = qweight.device.type
    op = "groupwise_int_mma_repack"
    if not use_kernel(FAMILY, device, compiled(device, op)):
        return repack(qweight, scales, qzeros, bits, group_size, in_features)
    # The reference's refusal (a ValueError naming the reason) for the compiled op too.
    layout = mma_layout(bits, group_size, in_features, qweight.shape[0], qzeros is None)
    reason = fast_path_reason(bits, group_size, in_features, scales.dtype)
    if reason is not None:
        raise ValueError(f"the mma kernel layout does not take this weight: {reason}")
    q, s, z = torch.ops.quantlab.groupwise_int_mma_repack(
        qweight, scales, qzeros, bits, group_size, in_features
    )
    return RepackedWeight(q, s, z if qzeros is not None else None, layout)


def mma_matmul(x: torch.Tensor, rep: RepackedWeight, split_k: int = 0) -> torch.Tensor:
    """``x [M, K] @ W.T`` on a repacked weight (fp16/bf16 ``x``); ``split_k`` 0 lets the kernel
    choose, ``>= 1`` forces that many K ranges (clamped)."""
    lay = rep.layout
    op = (
        torch.ops.quantlab.groupwise_int_mma_mm
        if x.device.type != "cuda" or mma_kernel_enabled()
        else mma_mm_reference
    )
    return op(
        x,
        rep.qweight,
        rep.scales,
        rep.zeros,
        lay.bits,
        lay.group_size,
        lay.in_features,
        lay.out_features,
        split_k,
    )
