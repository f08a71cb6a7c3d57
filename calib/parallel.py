"""The collectives of a multi-process run: data-parallel calibration, weight-parallel solving.

quantlab runs under ``torchrun`` (or any launcher that calls
``torch.distributed.init_process_group``) with the same block-by-block pipeline as a single
process. What differs is owned here, on top of ``torch.distributed`` (NCCL on GPUs, gloo on
CPUs; no transport, scheduler or launcher of our own):

- **data-parallel calibration**: each rank takes a contiguous share of the calibration windows
  (:meth:`Parallel.share`) and accumulates partial statistics over its tokens only;
- **weight-parallel solving**: every linear of a block gets one owner rank, balanced by solve
  cost (:func:`assign_owners`: longest-cost-first onto the least-loaded rank, from a cost model,
  not round robin); the partial statistics of a linear go to its owner only, in a fixed order
  (:meth:`Parallel.reduce_to`), the owner solves, and the result is broadcast from it
  (:meth:`Parallel.broadcast`) so that every rank runs the next group on quantized inputs;
- **failures**: a rank's error is caught at the next agreement point (:meth:`Parallel.settle`)
  and every rank stops with it, naming the failing rank; no rank is left waiting in a collective.

The reduction order is fixed (the owner's own part first, then the other ranks in ascending
order), so a run with N ranks gives the same statistics, hence the same packed weights, on every
rank and on every repetition. Against a single process the sums are formed in another order, so
the statistics agree to fp32 rounding rather than bit for bit (the methods' tests state what
follows from that for each).

A single process is the same code with :meth:`Parallel.single`: every collective is a no-op and
:meth:`Parallel.settle` re-raises the error itself.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistributedFailure", "Parallel", "assign_owners", "solve_cost"]


class DistributedFailure(RuntimeError):
    """Raised on every rank but the failing one when another rank failed (its message is the
    failing rank's error)."""


@dataclass(frozen=True)
class Parallel:
    """This process's place in the run: ``rank`` of ``world_size`` (1: a single process)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None  # the torch.distributed process group (None: the default one)

    @classmethod
    def single(cls) -> Parallel:
        return cls()

    @classmethod
    def current(cls) -> Parallel:
        """The initialised default process group's rank and size, else a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls.single()

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the checkpoint, prints progress and the summary."""
        return self.rank == 0

    def share(self, n_windows: int) -> slice:
        """This rank's contiguous share of ``n_windows`` calibration windows: the first
        ``n_windows % world_size`` ranks take one more, so the shares differ by at most one.

        Raises:
            ValueError: fewer windows than ranks (a rank would calibrate on nothing).
        """
        if n_windows < self.world_size:
            raise ValueError(
                f"{n_windows} calibration windows for {self.world_size} ranks: every rank needs at "
                "least one; use more calibration samples or fewer ranks"
            )
        base, extra = divmod(n_windows, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def settle(self, error: BaseException | None) -> None:
        """An agreement point: every rank calls it with the exception its local work raised (or
        ``None``). If any rank failed, all raise: the failing rank (the lowest, if several) its
        own exception, the others :class:`DistributedFailure` with its message. A single process
        re-raises its own error."""
        if not self.active:
            if error is not None:
                raise error
            return
        failed = torch.tensor([self.rank if error is not None else self.world_size])
        failed = self._to_device(failed)
        dist.all_reduce(failed, op=dist.ReduceOp.MIN, group=self.group)
        first = int(failed)
        if first == self.world_size:
            return
        text = f"{type(error).__name__}: {error}" if error is not None else ""
        message = self._broadcast_text(text, first)
        if self.rank == first:
            assert error is not None
            raise error
        raise DistributedFailure(f"rank {first} of {self.world_size} failed: {message}")

    def reduce_to(self, owner: int, partial: torch.Tensor, weight: float) -> torch.Tensor | None:
        """The weighted sum ``sum_r weight_r * partial_r`` over all ranks, formed on ``owner``
        only and in a fixed order (the owner's own term first, then the other ranks ascending);
        ``None`` on the other ranks. ``partial`` has the same shape and dtype on every rank;
        ``weight`` is this rank's coefficient (e.g. its share of the tokens).

        Memory: on the owner ``partial`` becomes the sum (scaled and added to in place) and one
        receive buffer of its size is used; a sender's ``partial`` is left as it was.
        """
        if not self.active:
            return partial.mul_(weight) if weight != 1.0 else partial
        if self.rank != owner:
            coefficient = self._to_device(torch.tensor([weight], dtype=torch.float64))
            dist.send(coefficient, owner, group=self.group)
            dist.send(partial.contiguous(), owner, group=self.group)
            return None
        total = partial.mul_(weight)
        buffer = torch.empty_like(total)
        coefficient = self._to_device(torch.empty(1, dtype=torch.float64))
        for source in range(self.world_size):
            if source == owner:
                continue
            dist.recv(coefficient, source, group=self.group)
            dist.recv(buffer, source, group=self.group)
            total.add_(buffer, alpha=float(coefficient))
        return total

    def pass_on(
        self, total: torch.Tensor | None, ranks: Sequence[int], buffer: torch.Tensor
    ) -> torch.Tensor:
        """After :meth:`reduce_to` onto ``ranks[0]``: send its ``total`` to the other ``ranks``,
        which receive it into ``buffer``; returns the total on each of ``ranks`` (call it on
        those ranks only)."""
        first = ranks[0]
        if self.rank == first:
            assert total is not None
            for other in ranks[1:]:
                dist.send(total, other, group=self.group)
            return total
        dist.recv(buffer, first, group=self.group)
        return buffer

    def broadcast(self, tensors: Sequence[torch.Tensor], owner: int) -> None:
        """Overwrite ``tensors`` on every rank with the owner's (same shapes and dtypes
        everywhere: the receivers allocate them from what they know of the result)."""
        if not self.active:
            return
        for tensor in tensors:
            dist.broadcast(tensor, owner, group=self.group)

    def gather_floats(self, values: Sequence[float]) -> list[list[float]]:
        """Every rank's ``values`` (the same length everywhere), on every rank, by rank."""
        if not self.active:
            return [list(values)]
        mine = self._to_device(torch.tensor(list(values), dtype=torch.float64))
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine, group=self.group)
        return [part.tolist() for part in parts]

    def _broadcast_text(self, text: str, source: int) -> str:
        # UTF-8 bytes in a tensor: broadcast_object_list would pickle, and nothing is unpickled.
        data = text.encode() if self.rank == source else b""
        length = self._to_device(torch.tensor([len(data)], dtype=torch.int64))
        dist.broadcast(length, source, group=self.group)
        buffer = self._to_device(torch.zeros(int(length), dtype=torch.uint8))
        if self.rank == source and data:
            buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buffer, source, group=self.group)
        return bytes(buffer.cpu().tolist()).decode(errors="replace")

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        # NCCL moves CUDA tensors only; gloo moves CPU tensors.
        if dist.get_backend(self.group) == "nccl":
            return tensor.to(torch.device("cuda", torch.cuda.current_device()))
        return tensor


def solve_cost(method: str, in_features: int, out_features: int) -> float:
    """Relative cost of solving one linear, for balancing owners.

    Second-order solvers (GPTQ and its variants, PVQ, ternary GPTQ) factor the ``K x K`` Hessian
    (``K^3 / 3`` each for the Cholesky, the inverse and the second Cholesky) and run the column
    loop (``N K^2``); first-order ones (RTN, the clip searches) are linear in the weight.
    """
    k, n = float(in_features), float(out_features)
    if method in ("rtn", "awq"):
        return n * k
    return k**3 + n * k * k


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """An owner rank per item, balancing the summed cost per rank: items in decreasing cost
    (ties: the earlier item first) each go to the least-loaded rank (ties: the lower rank).
    Deterministic, so every rank computes the same assignment."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    owners = [0] * len(costs)
    loads = [(0.0, rank) for rank in range(world_size)]
    heapq.heapify(loads)
    for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owners[item] = rank
        heapq.heappush(loads, (load + costs[item], rank))
    return owners
