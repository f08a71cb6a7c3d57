"""``BitStackLinear``: a drop-in ``nn.Linear`` whose weight is a stack of ~1-bit residual blocks
that can grow or shrink in place."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from quantlab.formats.bitstack import (
    FORMAT_NAME,
    FORMAT_VERSION,
    BitStackMeta,
    PackedBitStack,
)
from quantlab.nn.layer_spec import spec_int, spec_int_list
from quantlab.nn.packed_linear import PackedLinear
from quantlab.ops import bitstack as bs_ops

__all__ = ["BitStackLinear"]


class BitStackLinear(PackedLinear):
    """Linear layer ``y = x @ Ŵ^T + b`` with ``Ŵ = sum_b S_b ⊙ (u_b v_b)`` over its loaded blocks.

    Buffers (layout in :mod:`quantlab.formats.bitstack`): ``signs`` uint8 ``[B, N, ceil(K/8)]``,
    ``u`` fp16 ``[B, N, r]``, ``v`` fp16 ``[B, r, K]`` for the ``B`` blocks currently loaded
    (always a prefix of the decomposition). ``bias`` is a frozen parameter in the compute dtype.

    ``steps[i]`` is the position of block ``i + 1`` in the checkpoint's global loading order (block
    0 of every layer is part of the smallest configuration); :mod:`quantlab.export.
    bitstack_checkpoint` uses it to grow and shrink models to a memory budget.

    ``forward`` runs ``torch.ops.quantlab.bitstack_mm`` (compiled kernel where built, the PyTorch
    reference otherwise); neither forms the dense weight.
    """

    format_name: ClassVar[str] = FORMAT_NAME
    format_version: ClassVar[int] = FORMAT_VERSION
    # block_bytes is derived (the loader recomputes it from the tensors' shapes and refuses a
    # config that disagrees), the others are constructor arguments.
    spec_keys: ClassVar[frozenset[str]] = frozenset({"rank", "n_blocks", "steps", "block_bytes"})

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        rank: int = 16,
        n_blocks: int = 1,
        steps: list[int] | tuple[int, ...] = (),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if len(steps) > n_blocks - 1:
            raise ValueError(
                f"steps lists {len(steps)} blocks beyond the first, the layer has {n_blocks}"
            )
        meta = BitStackMeta(in_features, out_features, rank, n_blocks)
        super().__init__(meta, bias, device, dtype)
        self.steps = [int(s) for s in steps]

    @property
    def rank(self) -> int:
        return self.meta.rank

    @property
    def n_blocks(self) -> int:
        return int(self.signs.shape[0])

    @property
    def block_bytes(self) -> int:
        return self.meta.block_bytes

    @classmethod
    def layer_kwargs(cls, spec: Mapping[str, Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "rank": spec_int(spec, "rank"),
            "n_blocks": spec_int(spec, "n_blocks"),
        }
        if "steps" in spec:
            kwargs["steps"] = spec_int_list(spec, "steps")
        if "block_bytes" in spec:
            spec_int(spec, "block_bytes")
        return kwargs

    # -- registry protocol -------------------------------------------------------------------

    def module_spec(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "n_blocks": self.n_blocks,
            "steps": self.steps[: self.n_blocks - 1],
            "block_bytes": self.block_bytes,
        }

    @classmethod
    def checkpoint_tensors(cls, spec: dict[str, Any]) -> dict[str, str | None]:
        return {"signs": "U8", "u": "F16", "v": "F16"}

    def storage_bits(self) -> int:
        return self.meta.storage_bits(self.n_blocks)

    # -- resizing ------------------------------------------------------------------------------

    def truncate(self, n_blocks: int) -> None:
        """Keep only the first ``n_blocks`` blocks (>= 1), releasing the others' memory."""
        if not 1 <= n_blocks <= self.n_blocks:
            raise ValueError(f"n_blocks must be in [1, {self.n_blocks}], got {n_blocks}")
        if n_blocks == self.n_blocks:
            return
        # clone(): a slice would keep the whole old storage alive.
        self.signs = self.signs[:n_blocks].clone()
        self.u = self.u[:n_blocks].clone()
        self.v = self.v[:n_blocks].clone()

    def append_blocks(self, signs: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> None:
        """Add blocks ``[b, ...]`` after the loaded ones (the next blocks of the decomposition)."""
        b = signs.shape[0]
        want = self.meta.tensor_shapes(b)
        for suffix, t in (("signs", signs), ("u", u), ("v", v)):
            shape, dtype = want[suffix]
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(
                    f"append_blocks: {suffix} must be {list(shape)} {dtype}, got "
                    f"{list(t.shape)} {t.dtype}"
                )
        device = self.signs.device
        self.signs = torch.cat([self.signs, signs.to(device)])
        self.u = torch.cat([self.u, u.to(device)])
        self.v = torch.cat([self.v, v.to(device)])

    # -- compute -------------------------------------------------------------------------------

    def packed(self) -> PackedBitStack:
        meta = BitStackMeta(self.in_features, self.out_features, self.rank, self.n_blocks)
        return PackedBitStack(self.signs, self.u, self.v, meta)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``[N, K]`` weight of the loaded blocks (for inspection and tests)."""
        return bs_ops.dequant(self.signs, self.u, self.v, self.in_features, dtype)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return bs_ops.matmul(x2, self.signs, self.u, self.v)

    def _repr_fields(self) -> dict[str, Any]:
        return {"rank": self.rank, "blocks": self.n_blocks}
