"""Streaming statistics of a linear layer's inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from quantlab.calib.parallel import Parallel

__all__ = [
    "ROW_WEIGHTS_ATTRIBUTE",
    "ChannelStatsAccumulator",
    "HessianAccumulator",
    "PairDifferenceAccumulator",
]

# The attribute under which a module holds one weight per row of the input it is being called with
# (or None): the capture hooks pass it to HessianAccumulator.add. quantlab.models.moe's routed
# experts set it on an expert's linears, with each routed token's routing weight, while the
# affinity-weighted calibration runs (calib cannot import models, so the name is spelled there too;
# tests/models/test_moe.py checks the two agree through a weighted Hessian).
ROW_WEIGHTS_ATTRIBUTE = "calibration_row_weights"


class HessianAccumulator:
    """Accumulate ``H = 2 X^T X / n`` over the rows of a stream of inputs, in fp32.

    ``X`` is every token's input vector (``[n, K]`` after flattening batch and sequence). The sum is
    kept as a running average (``H <- H * n / (n + m) + 2 x^T x / (n + m)``) so its magnitude does
    not grow with the token count, which keeps fp32 accurate over long calibration runs.

    Rows may carry weights (:meth:`add`'s ``row_weights``; a module's inputs announce theirs under
    :data:`ROW_WEIGHTS_ATTRIBUTE`): then ``H = 2 sum_i w_i x_i x_i^T / sum_i w_i``, the weighted
    average. A routed expert's rows weighted by their routing weights give MoEQuant's
    affinity-guided Hessian (Chen et al., ICML 2025).
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.in_features = in_features
        self.device = torch.device(device)
        # Allocated by the first batch and dropped by release(): a block's groups are created
        # together, but each K x K matrix (3.3 GB at K = 28672) lives only from its group's first
        # input to its solve.
        self._sum: torch.Tensor | None = None
        self._released = False
        self.n_tokens = 0
        # The rows' total weight (= n_tokens where no row carries a weight): each rank's share of
        # the reduced Hessian.
        self.weight = 0.0
        # Set by assume_white(): too few tokens reached this input to estimate X^T X.
        self.white = False

    def add(self, x: torch.Tensor, row_weights: torch.Tensor | None = None) -> None:
        """Add a batch of inputs ``[..., K]`` (any float dtype), each row weighted by
        ``row_weights`` (one finite weight >= 0 per row; ``None``: every row 1)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs [..., {self.in_features}], got {tuple(x.shape)}")
        if self._released:
            raise RuntimeError("this Hessian was released after its solve; it takes no more inputs")
        rows = x.reshape(-1, self.in_features).to(device=self.device, dtype=torch.float32)
        m = rows.shape[0]
        if m == 0:
            return
        if row_weights is None:
            added = float(m)
            weighted = rows
        else:
            weights = row_weights.reshape(-1).to(device=self.device, dtype=torch.float32)
            if weights.numel() != m:
                raise ValueError(f"{weights.numel()} row weights for {m} input rows")
            if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
                raise ValueError("row weights must be finite and >= 0")
            added = float(weights.sum())
            weighted = rows * weights[:, None]
        if self._sum is None:
            self._sum = torch.zeros(
                self.in_features, self.in_features, dtype=torch.float32, device=self.device
            )
        self.n_tokens += m
        if added == 0.0:
            return
        total = self.weight + added
        self._sum.mul_(self.weight / total)
        self._sum.addmm_(weighted.t(), rows, alpha=2.0 / total)
        self.weight = total

    def assume_white(self) -> None:
        """Too few tokens reached this input (an expert the router rarely picks) to estimate
        ``X^T X``: from now on the Hessian is the identity, as if the inputs were white noise, so
        a second-order solver falls back to its data-free rounding (GPTQ with ``H = I`` is
        round-to-nearest). Every rank must decide this from the same global token count; no
        collective is run for it afterwards."""
        self._sum = None
        self.white = True

    def hessian(self) -> torch.Tensor:
        """``2 X^T X / n`` as fp32 ``[K, K]`` (the identity after :meth:`assume_white`)."""
        if self._released:
            raise RuntimeError("this Hessian was released after its solve")
        if self.white:
            if self._sum is None:
                self._sum = torch.eye(self.in_features, dtype=torch.float32, device=self.device)
            return self._sum
        if self._sum is None:
            raise ValueError("no calibration tokens reached this layer; its Hessian is empty")
        if self.weight == 0.0:
            raise ValueError(
                f"all {self.n_tokens} calibration rows of this layer had weight 0; its Hessian "
                "is empty"
            )
        return self._sum

    def reduce_to_owners(self, parallel: Parallel, owners: Sequence[int]) -> None:
        """Data-parallel calibration: make this the Hessian over every rank's tokens on the
        ranks in ``owners`` (the ranks that solve a linear reading this input), and release it
        on the others (they no longer need it).

        Each rank's matrix is an average over its own tokens, so the total is
        ``sum_r (n_r / n) H_r`` (``n``: the rows' total weight where they carry weights), formed
        on the first owner in :meth:`Parallel.reduce_to`'s fixed order and sent on to the other
        owners. A single process keeps its matrix as it is.
        """
        if not parallel.active or self.white:
            return
        if self._released:
            raise RuntimeError("this Hessian was released after its solve")
        counts = parallel.gather_floats([float(self.n_tokens), self.weight])
        n_total = int(sum(c[0] for c in counts))
        weight_total = sum(c[1] for c in counts)
        if n_total == 0:
            raise ValueError("no calibration tokens reached this layer on any rank")
        if weight_total == 0.0:
            raise ValueError("every calibration row of this layer had weight 0 on every rank")
        if self._sum is None:  # this rank saw no token of it: its term is zero
            self._sum = torch.zeros(
                self.in_features, self.in_features, dtype=torch.float32, device=self.device
            )
        ranks = sorted(set(owners))
        total = parallel.reduce_to(ranks[0], self._sum, self.weight / weight_total)
        if parallel.rank in ranks:
            self._sum = parallel.pass_on(total, ranks, self._sum)
            self.n_tokens = n_total
            self.weight = weight_total
        else:
            self.release()

    def diagonal_over_ranks(self, parallel: Parallel) -> torch.Tensor:
        """The diagonal of the Hessian over every rank's tokens, the same on every rank: each
        rank's diagonal weighted by its share of the tokens, summed in rank order. What per-channel
        activation scales need, without moving the ``K x K`` matrix (call it before
        :meth:`reduce_to_owners`). A single process returns its own diagonal (a view)."""
        if not parallel.active or self.white:
            return torch.diagonal(self.hessian())
        local = (
            torch.diagonal(self.hessian())
            if self._sum is not None
            else torch.zeros(self.in_features, dtype=torch.float32, device=self.device)
        )
        counts = [c[0] for c in parallel.gather_floats([self.weight])]
        n_total = sum(counts)
        if n_total == 0:
            raise ValueError("no calibration tokens (of weight > 0) reached this layer on any rank")
        total = torch.zeros(self.in_features, dtype=torch.float32, device=self.device)
        for count, part in zip(counts, parallel.gather_floats(local.tolist()), strict=True):
            partial = torch.tensor(part, dtype=torch.float32, device=self.device)
            total.add_(partial, alpha=count / n_total)
        return total

    def release(self) -> None:
        """Drop the matrix (its group is solved); the memory returns at once unless the caller
        still holds :meth:`hessian`'s tensor."""
        self._sum = None
        self._released = True


class PairDifferenceAccumulator:
    """Accumulate Fair-GPTQ's group-bias matrix ``D = 2 (X0 - X1)^T (X0 - X1) / n``, in fp32.

    ``X0`` and ``X1`` are a layer's inputs at *aligned* token positions of the two sentences of
    stereotype / anti-stereotype pairs (row ``i`` of ``x0`` is compared with row ``i`` of ``x1``;
    :mod:`quantlab.calib.paired` decides which positions are aligned), and ``n`` counts those
    positions. It is a :class:`HessianAccumulator` of the differences, so ``D`` has the same
    normalisation as GPTQ's ``H`` and the two can be added.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.in_features = in_features
        self._differences = HessianAccumulator(in_features, device)
        self.n_pairs = 0

    @property
    def n_positions(self) -> int:
        return self._differences.n_tokens

    def add(self, x0: torch.Tensor, x1: torch.Tensor, n_pairs: int) -> None:
        """Add aligned inputs ``x0``, ``x1`` ``[m, K]`` (any float dtype) of ``n_pairs`` pairs."""
        if x0.shape != x1.shape or x0.dim() != 2 or x0.shape[-1] != self.in_features:
            raise ValueError(
                f"expected two aligned [m, {self.in_features}] inputs, got {tuple(x0.shape)} and "
                f"{tuple(x1.shape)}"
            )
        # Subtract in fp32: the two rows are close, so a low-precision difference loses digits.
        self._differences.add(x0.to(torch.float32) - x1.to(torch.float32))
        self.n_pairs += n_pairs

    def reduce_to_owners(self, parallel: Parallel, owners: Sequence[int]) -> None:
        """Data-parallel calibration on several ranks (each on its share of the pairs): make this
        ``D`` over every rank's pair positions on the ranks in ``owners``, released on the
        others (:meth:`HessianAccumulator.reduce_to_owners`, the same fixed order)."""
        counts = parallel.gather_floats([float(self.n_pairs)])
        self._differences.reduce_to_owners(parallel, owners)
        self.n_pairs = int(sum(c[0] for c in counts))

    def matrix(self) -> torch.Tensor:
        """``2 (X0 - X1)^T (X0 - X1) / n`` as fp32 ``[K, K]``."""
        if self.n_positions == 0:
            raise ValueError(
                "no aligned pair positions reached this layer; its group-bias matrix is empty"
            )
        return self._differences.hessian()


class ChannelStatsAccumulator:
    """Per-input-channel mean ``|x|`` and the diagonal ``group_size`` blocks of ``X^T X / n``.

    What AWQ needs from a linear's inputs: the activation magnitude that drives its scale search,
    and each quantization group's Gram matrix, which prices a group's rounding error on the
    calibration tokens for the clip search. Both are running averages in fp32; cost is
    ``n * K * group_size`` per batch rather than the full Hessian's ``n * K^2``.
    """

    def __init__(
        self, in_features: int, group_size: int, device: torch.device | str = "cpu"
    ) -> None:
        g = in_features if group_size == -1 else group_size
        if g <= 0 or in_features % g != 0:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        self.in_features = in_features
        self.group = g
        self.abs_mean = torch.zeros(in_features, dtype=torch.float32, device=device)
        self._gram: torch.Tensor | None = torch.zeros(
            in_features // g, g, g, dtype=torch.float32, device=device
        )
        self.n_tokens = 0
        # Set by reduce_to_owners: the statistics are now every rank's, so no more local inputs.
        self._reduced = False

    @property
    def gram(self) -> torch.Tensor:
        """fp32 ``[G, g, g]``: per group, ``X_g^T X_g / n`` over the tokens seen."""
        if self._gram is None:
            raise RuntimeError(
                "this rank owns no linear reading this input: its Gram matrices went to the "
                "owners in reduce_to_owners and were released here"
            )
        return self._gram

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``[..., K]``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs [..., {self.in_features}], got {tuple(x.shape)}")
        if self._reduced:
            raise RuntimeError("these statistics were reduced over the ranks; they take no inputs")
        gram = self.gram
        rows = x.reshape(-1, self.in_features).to(device=gram.device, dtype=torch.float32)
        m = rows.shape[0]
        if m == 0:
            return
        total = self.n_tokens + m
        keep = self.n_tokens / total
        self.abs_mean.mul_(keep).add_(rows.abs().sum(dim=0), alpha=1.0 / total)
        grouped = rows.view(m, -1, self.group).transpose(0, 1)  # [G, m, g]
        gram.mul_(keep).baddbmm_(grouped.transpose(1, 2), grouped, alpha=1.0 / total)
        self.n_tokens = total

    def reduce_to_owners(self, parallel: Parallel, owners: Sequence[int]) -> None:
        """Data-parallel calibration: make these the statistics over every rank's tokens.

        Each rank's figures are averages over its own tokens, so the totals are
        ``sum_r (n_r / n) s_r``. ``abs_mean`` drives the scale search, which every rank runs (and
        must decide identically), so it is formed on every rank, summed in ascending rank order
        from an all-gather of the ``[K]`` vectors: bit-identical everywhere. The Gram matrices
        serve only the clip search of the linears reading this input, so they go to the ranks in
        ``owners`` alone (:meth:`Parallel.reduce_to`'s fixed order, as
        :meth:`HessianAccumulator.reduce_to_owners`) and are released on the others (``owners``
        may be empty: nothing clips this input). A single process keeps its statistics as they
        are.

        Raises:
            ValueError: no rank saw a token of this input.
        """
        if not parallel.active:
            return
        if self._reduced:
            raise RuntimeError("these statistics were already reduced over the ranks")
        self._reduced = True
        counts = [c[0] for c in parallel.gather_floats([float(self.n_tokens)])]
        n_total = sum(counts)
        if n_total == 0:
            raise ValueError("no calibration tokens reached this layer on any rank")
        # K floats per rank: small enough to travel to everyone; the sum is in float64 and in
        # rank order, so every rank rounds the same total to fp32.
        partials = parallel.gather_floats(self.abs_mean.tolist())
        total_abs_mean = torch.zeros(self.in_features, dtype=torch.float64)
        for count, partial in zip(counts, partials, strict=True):
            total_abs_mean.add_(torch.tensor(partial, dtype=torch.float64), alpha=count / n_total)
        self.abs_mean.copy_(total_abs_mean)
        ranks = sorted(set(owners))
        gram = self.gram
        self._gram = None  # kept below on the owners only
        if ranks:
            total = parallel.reduce_to(ranks[0], gram, self.n_tokens / n_total)
            if parallel.rank in ranks:
                self._gram = parallel.pass_on(total, ranks, gram)
        self.n_tokens = int(n_total)

    def check(self) -> None:
        if self.n_tokens == 0:
            raise ValueError("no calibration tokens reached this layer; its statistics are empty")
        if not bool(torch.isfinite(self.abs_mean).all()):
            raise ValueError("calibration activations contain NaN/Inf")
