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

import contextlib
import dataclasses
import heapq
import json
import time
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["DistributedFailure", "Parallel", "Traffic", "assign_owners", "solve_cost"]

Record = TypeVar("Record")

# Solvers whose cost is linear in the weight (no Hessian to factor), by solve_cost's names.
FIRST_ORDER = frozenset({"rtn", "awq", "ternary-absmean", "ternary-mse", "pvq-no-hessian"})


class DistributedFailure(RuntimeError):
    """Raised on every rank but the failing one when another rank failed (its message is the
    failing rank's error)."""


@dataclass
class Traffic:
    """What this rank's collectives moved and how long they took, by kind: ``reduce``
    (statistics to their owners), ``broadcast`` (results from their owners), ``gather`` (small
    all-gathers: token counts, figures), ``settle`` (agreement points).

    Bytes are the logical payload: a sender counts its tensor once per receiver, a receiver once;
    the transport's own traffic (rings, trees) is not counted. Seconds include the wait for the
    slowest rank to reach the collective, so a rank that solved less waits there."""

    bytes_out: dict[str, int] = field(default_factory=dict)
    bytes_in: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, kind: str, bytes_out: int = 0, bytes_in: int = 0) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - start
            self.bytes_out[kind] = self.bytes_out.get(kind, 0) + bytes_out
            self.bytes_in[kind] = self.bytes_in.get(kind, 0) + bytes_in
            self.calls[kind] = self.calls.get(kind, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Parallel:
    """This process's place in the run: ``rank`` of ``world_size`` (1: a single process)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None  # the torch.distributed process group (None: the default one)
    traffic: Traffic = field(default_factory=Traffic, compare=False, repr=False)

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
        with self.traffic.timed("settle", 8, 8):
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
        size = partial.numel() * partial.element_size() + 8
        if self.rank != owner:
            with self.traffic.timed("reduce", bytes_out=size):
                coefficient = self._to_device(torch.tensor([weight], dtype=torch.float64))
                dist.send(coefficient, owner, group=self.group)
                dist.send(partial.contiguous(), owner, group=self.group)
            return None
        with self.traffic.timed("reduce", bytes_in=size * (self.world_size - 1)):
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
        size = buffer.numel() * buffer.element_size()
        if self.rank == first:
            assert total is not None
            with self.traffic.timed("reduce", bytes_out=size * (len(ranks) - 1)):
                for other in ranks[1:]:
                    dist.send(total, other, group=self.group)
            return total
        with self.traffic.timed("reduce", bytes_in=size):
            dist.recv(buffer, first, group=self.group)
        return buffer

    def broadcast(self, tensors: Sequence[torch.Tensor], owner: int) -> None:
        """Overwrite ``tensors`` on every rank with the owner's (same shapes and dtypes
        everywhere: the receivers allocate them from what they know of the result)."""
        if not self.active:
            return
        with self._timed_broadcast(sum(t.numel() * t.element_size() for t in tensors), owner):
            for tensor in tensors:
                dist.broadcast(tensor, owner, group=self.group)

    def broadcast_record(
        self, record: Record | None, owner: int, kind: type[Record], device: torch.device
    ) -> Record:
        """The owner's ``record`` (a dataclass of ``kind``: a solver's result) on every rank; the
        other ranks pass ``None``. Its tensors travel as tensors, received on ``device``; its
        other fields (numbers, strings, lists of them, ``None``, nested dataclasses such as an
        encoding's parameters) as JSON in a header sent first, so a receiver needs to know
        nothing of the shapes beforehand. Nothing is pickled. A single process returns
        ``record`` itself."""
        if not self.active:
            if record is None:
                raise ValueError("a single process has no owner to receive a record from")
            return record
        header = json.dumps(_describe(record)) if self.rank == owner else ""
        layout = json.loads(self._broadcast_text(header, owner))
        tensors: list[torch.Tensor] = []
        if self.rank == owner:
            assert record is not None
            _collect(record, tensors)
            tensors = [t.detach().to(device).contiguous() for t in tensors]
        else:
            record = _build(kind, layout, tensors, device)
        with self._timed_broadcast(sum(t.numel() * t.element_size() for t in tensors), owner):
            for tensor in tensors:
                if tensor.numel():
                    # As bytes: gloo has no int16 or bool collectives, and a copy is a copy.
                    dist.broadcast(tensor.reshape(-1).view(torch.uint8), owner, group=self.group)
        return record

    def _timed_broadcast(self, size: int, owner: int) -> contextlib.AbstractContextManager[None]:
        if self.rank == owner:
            return self.traffic.timed("broadcast", bytes_out=size * (self.world_size - 1))
        return self.traffic.timed("broadcast", bytes_in=size)

    def gather_floats(self, values: Sequence[float]) -> list[list[float]]:
        """Every rank's ``values`` (the same length everywhere), on every rank, by rank."""
        if not self.active:
            return [list(values)]
        mine = self._to_device(torch.tensor(list(values), dtype=torch.float64))
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        size = 8 * len(values) * (self.world_size - 1)
        with self.traffic.timed("gather", size, size):
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


def _describe(record: Any) -> dict[str, Any]:
    """A dataclass record's layout: per field, a tensor's dtype and shape, a nested record's
    layout, or the value itself (JSON: floats round-trip exactly, NaN included)."""
    layout: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if isinstance(value, torch.Tensor):
            dtype = str(value.dtype).removeprefix("torch.")
            layout[f.name] = {"tensor": [dtype, list(value.shape)]}
        elif dataclasses.is_dataclass(value):
            layout[f.name] = {"record": _describe(value)}
        else:
            layout[f.name] = {"value": value}
    return layout


def _collect(record: Any, into: list[torch.Tensor]) -> None:
    """A record's tensors in field order (nested records depth first), as :func:`_build`
    allocates them."""
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if isinstance(value, torch.Tensor):
            into.append(value)
        elif dataclasses.is_dataclass(value):
            _collect(value, into)


def _build(kind: type, layout: dict[str, Any], tensors: list[torch.Tensor], device: Any) -> Any:
    """A record of ``kind`` with empty tensors (appended to ``tensors``) where ``layout`` has
    tensors, ready to receive them."""
    hints = typing.get_type_hints(kind)
    values: dict[str, Any] = {}
    for name, spec in layout.items():
        if "tensor" in spec:
            dtype_name, shape = spec["tensor"]
            dtype = getattr(torch, dtype_name)
            values[name] = torch.empty(shape, dtype=dtype, device=device)
            tensors.append(values[name])
        elif "record" in spec:
            nested = [h for h in typing.get_args(hints[name]) or (hints[name],)]
            nested_kind = next(h for h in nested if dataclasses.is_dataclass(h))
            values[name] = _build(nested_kind, spec["record"], tensors, device)
        else:
            values[name] = spec["value"]
    return kind(**values)


def solve_cost(method: str, in_features: int, out_features: int) -> float:
    """Relative cost of solving one linear, for balancing owners.

    Second-order solvers (GPTQ and its variants, PVQ, ternary GPTQ) factor the ``K x K`` Hessian
    (``K^3 / 3`` each for the Cholesky, the inverse and the second Cholesky) and run the column
    loop (``N K^2``); first-order ones (RTN, the clip searches) are linear in the weight.
    """
    k, n = float(in_features), float(out_features)
    if method in FIRST_ORDER:
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
