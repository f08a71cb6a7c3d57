"""BitStack's options (:class:`BitStackConfig`): the decomposition, ordering, replay and
distillation settings with their validation, and the loading orders it accepts (:data:`ORDERS`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from quantlab.formats.bitstack import block_bytes
from quantlab.solvers.bitstack import SVD_METHODS

__all__ = ["ORDERS", "BitStackConfig"]

ORDERS = ("hessian", "ppl")
_NORMALIZE = ("relative", "absolute")


@dataclass(frozen=True)
class BitStackConfig:
    """BitStack decomposition and ordering options.

    Attributes:
        n_blocks: residual blocks per linear (the most that can ever be loaded).
        rank: rank of each block's magnitude factors.
        scale_alpha: exponent of the activation scales (``s = rms^alpha``; 0 disables scaling).
        svd: ``"lowrank"`` (randomized) or ``"full"``.
        order: ``"hessian"`` or ``"ppl"`` (see :mod:`quantlab.methods.bitstack.ordering`).
        order_normalize: Hessian score ``"relative"`` (error removed / layer output energy, per
            byte) or ``"absolute"`` (error removed per byte).
        order_samples: validation sequences for ``order="ppl"``.
        order_seq_len: their length in tokens.
        order_max_stage: measure perplexities up to this stage (``None``: all).
        error_feedback: choose each block's signs with GPTQ's error feedback on the layer's
            Hessian and refit its rows' gains (quantlab's default), instead of ``sign(residual)``
            (the paper's rule); same format. On the default model it cuts the two-block ppl
            ~100x (docs/methods/bitstack.md).
        damp_percent: Hessian damping of the feedback, relative to the mean diagonal.
        replay_blocks: calibration inputs of each decoder block come from the earlier blocks
            *compressed to this many residual blocks per linear* (GPTQ's quantized replay, aimed
            at one budget); 0 (the paper's choice) feeds the float outputs.
        distill_steps: optimizer steps of the prefix distillation
            (:mod:`quantlab.methods.bitstack.distill`); 0 (the paper's choice) skips it.
        distill_blocks: the prefix it tunes: the first ``distill_blocks`` blocks of every linear;
            the later blocks are then decomposed again from the tuned prefix's residual.
        distill_lr: Adam's peak learning rate for it.
        distill_batch: calibration windows per distillation step.
        seed: seed of the randomized SVD, of the validation windows (``calib.seed + 1 + seed``)
            and of the distillation's window draws.
        modules_to_not_convert: module names (or shell patterns) left in full precision.
    """

    method: ClassVar[str] = "bitstack"
    version: ClassVar[int] = 1
    needs_calibration: ClassVar[bool] = True

    n_blocks: int = 16
    rank: int = 2
    scale_alpha: float = 0.5
    svd: str = "lowrank"
    order: str = "hessian"
    order_normalize: str = "relative"
    order_samples: int = 4
    order_seq_len: int = 256
    order_max_stage: int | None = None
    error_feedback: bool = True
    damp_percent: float = 0.01
    replay_blocks: int = 0
    distill_steps: int = 0
    distill_blocks: int = 2
    distill_lr: float = 5e-4
    distill_batch: int = 1
    seed: int = 0
    modules_to_not_convert: tuple[str, ...] = field(default=("lm_head",))

    def __post_init__(self) -> None:
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"damp_percent must be in (0, 1), got {self.damp_percent}")
        if self.n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {self.n_blocks}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0 <= self.replay_blocks <= self.n_blocks:
            raise ValueError(
                f"replay_blocks must be in [0, n_blocks={self.n_blocks}], got {self.replay_blocks}"
            )
        if self.distill_steps < 0 or self.distill_batch < 1 or not self.distill_lr > 0:
            raise ValueError(
                f"need distill_steps >= 0, distill_batch >= 1, distill_lr > 0; got "
                f"{self.distill_steps}, {self.distill_batch}, {self.distill_lr}"
            )
        if self.distill_steps and not 1 <= self.distill_blocks <= self.n_blocks:
            raise ValueError(
                f"distill_blocks must be in [1, n_blocks={self.n_blocks}], "
                f"got {self.distill_blocks}"
            )
        if not (self.scale_alpha >= 0 and math.isfinite(self.scale_alpha)):
            raise ValueError(f"scale_alpha must be finite and >= 0, got {self.scale_alpha}")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"svd must be one of {SVD_METHODS}, got {self.svd!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.order_normalize not in _NORMALIZE:
            raise ValueError(
                f"order_normalize must be one of {_NORMALIZE}, got {self.order_normalize!r}"
            )
        if self.order_samples < 1 or self.order_seq_len < 2:
            raise ValueError(
                f"order_samples must be >= 1 and order_seq_len >= 2, got {self.order_samples}, "
                f"{self.order_seq_len}"
            )
        if self.order_max_stage is not None and self.order_max_stage < 0:
            raise ValueError(f"order_max_stage must be >= 0 or None, got {self.order_max_stage}")
        object.__setattr__(self, "modules_to_not_convert", tuple(self.modules_to_not_convert))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["modules_to_not_convert"] = list(self.modules_to_not_convert)
        return {"method": self.method, "version": self.version, **d}

    def describe(self) -> str:
        tuned = f", {self.distill_blocks}-block prefix distilled" if self.distill_steps else ""
        return f"bitstack {self.n_blocks} blocks x rank {self.rank}, {self.order} order{tuned}"

    def max_linear_bits(self, out_features: int, in_features: int) -> int:
        """Stored bits of one linear: ``n_blocks`` residual blocks of one sign bit per weight
        plus their factors (16 blocks exceed 16 bits per weight, so this is exact)."""
        return 8 * self.n_blocks * block_bytes(out_features, in_features, self.rank)
