"""``QuantLinear``: a drop-in ``nn.Linear`` whose weight is stored in the groupwise integer
format."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from quantlab.formats.groupwise_int import (
    FORMAT_NAME,
    FORMAT_VERSION,
    GroupwiseIntMeta,
    PackedGroupwiseInt,
)
from quantlab.formats.groupwise_int_mma_layout import (
    MAX_ROWS,
    RepackedWeight,
    fast_path_reason,
    mma_layout,
)
from quantlab.formats.tensor_layout import dtype_from_name, dtype_name
from quantlab.nn.layer_spec import spec_bool, spec_int, spec_str
from quantlab.nn.packed_linear import PackedLinear
from quantlab.ops import groupwise_int as gw_ops
from quantlab.ops.kernel_policy import warn_once

__all__ = ["QuantLinear"]

# Non-persistent buffers holding the weight in the CUDA tensor-core kernel's layout
# (quantlab/formats/groupwise_int_mma_layout.py); never saved, always re-derived from the exported
# ones.
_KERNEL_BUFFERS = ("mma_qweight", "mma_scales", "mma_zeros")
_MMA_ACT_DTYPES = (torch.float16, torch.bfloat16)


def _mma_device_ok(device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and gw_ops.mma_kernel_enabled()
        and torch.cuda.get_device_capability(device)[0] >= 8
    )


def _refresh_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    module.prepare_kernel_layout()


class QuantLinear(PackedLinear):
    """Linear layer ``y = x @ W.T + b`` with ``W`` held as packed groupwise integers.

    Buffers (shapes from :class:`GroupwiseIntMeta`): ``qweight`` int32 ``[N, ceil(K*bits/32)]``,
    ``scales`` ``[N, G]`` in the scale dtype, ``qzeros`` int32 ``[N, ceil(G*bits/32)]`` (asymmetric
    only). ``bias`` is a frozen parameter in the layer's compute dtype.

    ``forward`` accepts any ``[..., K]`` input in fp32/fp16/bf16 and returns ``[..., N]`` in the
    input's dtype; the matmul runs through ``torch.ops.quantlab.groupwise_int_mm`` (a compiled
    kernel when one exists for the device, the PyTorch reference otherwise).

    On a CUDA device (sm_80+, CUDA build) a weight the tensor-core kernel takes
    (:func:`quantlab.formats.groupwise_int_mma_layout.fast_path_reason`) is also held repacked in
    that kernel's layout, in the non-persistent buffers ``mma_qweight``/``mma_scales``/``mma_zeros``
    (not in the state dict; checkpoints keep the exported layout). They are made once, outside
    ``forward``: whenever the layer's tensors move or change dtype (``.to``/``.cuda``), after a
    ``load_state_dict`` and in ``after_load``/``from_packed`` (:meth:`prepare_kernel_layout`), so
    a ``torch.compile(fullgraph=True)`` forward only reads them. fp16/bf16 batches of 1 to
    ``MAX_ROWS`` rows then run ``groupwise_int_mma_mm``; everything else ``groupwise_int_mm``.
    """

    format_name: ClassVar[str] = FORMAT_NAME
    format_version: ClassVar[int] = FORMAT_VERSION
    spec_keys: ClassVar[frozenset[str]] = frozenset({"bits", "group_size", "sym", "scale_dtype"})

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        group_size: int = 64,
        sym: bool = False,
        scale_dtype: str = "float16",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        meta = GroupwiseIntMeta(in_features, out_features, bits, group_size, sym, scale_dtype)
        super().__init__(meta, bias, device, dtype)
        if sym:
            self.register_buffer("qzeros", None)
        for name in _KERNEL_BUFFERS:
            self.register_buffer(name, None, persistent=False)
        self._mma_source: tuple | None = None
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @property
    def bits(self) -> int:
        return self.meta.bits

    @property
    def group_size(self) -> int:
        return self.meta.group_size

    @classmethod
    def layer_kwargs(cls, spec: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "bits": spec_int(spec, "bits"),
            "group_size": spec_int(spec, "group_size"),
            "sym": spec_bool(spec, "sym"),
            "scale_dtype": spec_str(spec, "scale_dtype", "float16"),
        }

    def after_from_packed(self) -> None:
        self.prepare_kernel_layout()

    @classmethod
    def checkpoint_tensors(cls, spec: dict[str, Any]) -> dict[str, str | None]:
        kwargs = cls.layer_kwargs(spec)
        names: dict[str, str | None] = {
            "qweight": "I32",
            "scales": dtype_name(dtype_from_name(kwargs["scale_dtype"])),
        }
        if not kwargs["sym"]:
            names["qzeros"] = "I32"
        return names

    def after_load(self) -> None:
        super().after_load()
        self.prepare_kernel_layout()

    # -- the tensor-core kernel's copy of the weight ------------------------------------------

    def _source_key(self) -> tuple:
        """Identity of the exported tensors the repacked copy was made from (storage, version,
        dtype), so an eager forward notices in-place edits or replaced buffers."""
        return tuple(
            None if t is None else (t.data_ptr(), t._version, t.dtype, t.device)
            for t in (self.qweight, self.scales, self.qzeros)
        )

    def prepare_kernel_layout(self) -> bool:
        """(Re)build the repacked copy for the CUDA tensor-core kernel, or drop it where that
        kernel does not apply (CPU tensors, no CUDA build, an encoding it does not take).
        Returns whether the layer now holds one."""
        self.drop_kernel_layout()
        device = self.qweight.device
        reason = fast_path_reason(self.bits, self.group_size, self.in_features, self.scales.dtype)
        if reason is not None or not _mma_device_ok(device):
            return False
        with torch.no_grad():
            rep = gw_ops.mma_repack(
                self.qweight, self.scales, self.qzeros, self.bits, self.group_size, self.in_features
            )
        self.mma_qweight, self.mma_scales, self.mma_zeros = rep.qweight, rep.scales, rep.zeros
        self._mma_source = self._source_key()
        return True

    def drop_kernel_layout(self) -> None:
        """Free the repacked copy (for an owner that runs this weight through another kernel,
        such as the grouped experts op); ``forward`` then takes ``groupwise_int_mm`` until
        :meth:`prepare_kernel_layout` (or a move) makes the copy again."""
        for name in _KERNEL_BUFFERS:
            setattr(self, name, None)
        self._mma_source = None

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        # Drop the repacked copy first (no point converting it), then derive it again from the
        # converted exported tensors.
        for name in _KERNEL_BUFFERS:
            self._buffers[name] = None
        super()._apply(fn, recurse)
        self.prepare_kernel_layout()
        return self

    def kernel_path(self, x: torch.Tensor) -> str:
        """``"mma"`` when ``forward(x)`` runs the tensor-core kernel on the repacked weight,
        ``"groupwise_int_mm"`` otherwise."""
        rows = x.numel() // self.in_features if self.in_features else 0
        use = (
            self.mma_qweight is not None
            and x.is_cuda
            and x.dtype in _MMA_ACT_DTYPES
            and 1 <= rows <= MAX_ROWS
        )
        return "mma" if use else "groupwise_int_mm"

    def repacked(self) -> RepackedWeight | None:
        """The repacked copy as a :class:`RepackedWeight` (``None`` when there is none)."""
        if self.mma_qweight is None:
            return None
        layout = mma_layout(
            self.bits, self.group_size, self.in_features, self.out_features, self.meta.sym
        )
        return RepackedWeight(self.mma_qweight, self.mma_scales, self.mma_zeros, layout)

    def packed(self) -> PackedGroupwiseInt:
        return PackedGroupwiseInt(self.qweight, self.scales, self.qzeros, self.meta)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``[N, K]`` weight this layer represents."""
        return gw_ops.dequant(
            self.qweight,
            self.scales,
            self.qzeros,
            self.bits,
            self.group_size,
            self.in_features,
            dtype,
        )

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        # Eager only: the exported tensors were edited in place or replaced since the repack.
        stale = self.kernel_path(x2) == "mma" and not torch.compiler.is_compiling()
        if stale and self._mma_source != self._source_key():
            self.prepare_kernel_layout()
        if (
            self.mma_qweight is not None
            and x2.is_cuda
            and x2.dtype == torch.float32
            and not torch.compiler.is_compiling()
        ):
            warn_once(
                "groupwise_int:fp32-activations",
                "QuantLinear: fp32 activations on CUDA run the generic groupwise kernel, not the "
                "tensor-core one (it takes fp16/bf16 activations); run the model in fp16 or bf16 "
                "(the packed weights are unchanged by a dtype change)",
            )
        if self.kernel_path(x2) == "mma":
            return torch.ops.quantlab.groupwise_int_mma_mm(
                x2,
                self.mma_qweight,
                self.mma_scales,
                self.mma_zeros,
                self.bits,
                self.group_size,
                self.in_features,
                self.out_features,
                0,
            )
        return gw_ops.matmul(x2, self.qweight, self.scales, self.qzeros, self.bits, self.group_size)

    def _repr_fields(self) -> dict[str, Any]:
        m = self.meta
        return {"bits": m.bits, "group_size": m.group_size, "sym": m.sym, "scales": m.scale_dtype}
