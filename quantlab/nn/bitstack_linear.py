"""``BitStackLinear``: a drop-in ``nn.Linear`` whose weight is a stack of ~1-bit residual blocks
that can grow or shrink in place."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from quantlab.formats.bitstack import (
    FACTOR_DTYPE,
    FORMAT_NAME,
    FORMAT_VERSION,
    BitStackMeta,
    PackedBitStack,
)
from quantlab.nn.registry import register_layer_format
from quantlab.ops import bitstack as bs_ops

__all__ = ["BitStackLinear"]


@register_layer_format
class BitStackLinear(nn.Module):
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
        super().__init__()
        self.meta = BitStackMeta(in_features, out_features, rank, n_blocks)
        self.in_features = in_features
        self.out_features = out_features
        self.steps = [int(s) for s in steps]
        if len(self.steps) > n_blocks - 1:
            raise ValueError(
                f"steps lists {len(self.steps)} blocks beyond the first, the layer has {n_blocks}"
            )
        for suffix, (shape, tdtype) in self.meta.tensor_shapes().items():
            self.register_buffer(suffix, torch.zeros(shape, dtype=tdtype, device=device))
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=dtype or torch.float32, device=device),
                requires_grad=False,
            )
        else:
            self.register_parameter("bias", None)

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
    def from_packed(
        cls,
        packed: PackedBitStack,
        bias: torch.Tensor | None = None,
        steps: list[int] | tuple[int, ...] = (),
        name: str = "weight",
    ) -> BitStackLinear:
        packed.validate(name)
        m = packed.meta
        layer = cls(
            m.in_features,
            m.out_features,
            bias=bias is not None,
            rank=m.rank,
            n_blocks=m.n_blocks,
            steps=steps,
            device=packed.signs.device,
            dtype=bias.dtype if bias is not None else None,
        )
        layer.signs, layer.u, layer.v = packed.signs, packed.u, packed.v
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    # -- registry protocol -------------------------------------------------------------------

    def module_spec(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "n_blocks": self.n_blocks,
            "steps": self.steps[: self.n_blocks - 1],
            "block_bytes": self.block_bytes,
        }

    @classmethod
    def empty_like(cls, linear: nn.Linear, spec: dict[str, Any]) -> BitStackLinear:
        return cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            rank=int(spec["rank"]),
            n_blocks=int(spec["n_blocks"]),
            steps=list(spec.get("steps", ())),
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )

    @classmethod
    def checkpoint_tensors(cls, spec: dict[str, Any]) -> dict[str, str | None]:
        return {"signs": "U8", "u": "F16", "v": "F16"}

    def storage_bits(self) -> int:
        return self.meta.storage_bits(self.n_blocks)

    def after_load(self) -> None:
        # transformers may cast floating buffers to the model dtype; the factors stay fp16.
        if self.u.dtype != FACTOR_DTYPE:
            self.u = self.u.to(FACTOR_DTYPE)
        if self.v.dtype != FACTOR_DTYPE:
            self.v = self.v.to(FACTOR_DTYPE)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"BitStackLinear expects input [..., {self.in_features}], got {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        y = bs_ops.matmul(x.reshape(-1, self.in_features), self.signs, self.u, self.v)
        y = y.view(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, rank={self.rank}, blocks={self.n_blocks}"
        )
