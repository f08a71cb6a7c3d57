"""What the multi-rank tests share: running a function on gloo CPU ranks spawned by the test, and
running one process the way a rank runs."""

from __future__ import annotations

import contextlib
import json
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["one_thread", "spawn_ranks"]

RankWork = Callable[..., dict[str, Any]]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run as one rank does (one thread; the ranks share the cores): the forwards' float results
    then match a rank's, whose BLAS splits the work differently with another thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def spawn_ranks(work: RankWork, world: int, directory: Path, *args: Any) -> list[dict[str, Any]]:
    """Run ``work(rank, world, directory, *args)`` (a module-level function: it is pickled by
    name) on ``world`` gloo CPU ranks of one thread each, and return every rank's outcome by rank:
    ``{"rank": r, **what work returned}``, or ``{"rank": r, "error": [type, message], "trace":
    ...}`` where it raised (the test checks every rank's)."""
    mp.spawn(_rank_entry, args=(work, world, str(directory), args), nprocs=world, join=True)
    return [json.loads((directory / f"rank{r}.json").read_text()) for r in range(world)]


def _rank_entry(rank: int, work: RankWork, world: int, directory: str, args: tuple) -> None:
    torch.set_num_threads(1)  # the ranks share the cores, as under torchrun with OMP_NUM_THREADS=1
    dist.init_process_group(
        "gloo", init_method=f"file://{directory}/store", rank=rank, world_size=world
    )
    outcome: dict[str, Any] = {"rank": rank}
    try:
        outcome.update(work(rank, world, directory, *args))
    except Exception as error:  # reported to the test, which checks every rank's outcome
        outcome["error"] = [type(error).__name__, str(error)]
        outcome["trace"] = traceback.format_exc()
    finally:
        Path(directory, f"rank{rank}.json").write_text(json.dumps(outcome))
        dist.destroy_process_group()
