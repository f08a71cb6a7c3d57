"""What several benchmark suites share: the commit a run measured, and timing one pass over
weight copies on a GPU as a CUDA graph."""

from __future__ import annotations

import os
import subprocess
import warnings
from collections.abc import Callable
from functools import cache

import torch

__all__ = ["cuda_rotation", "git_commit"]


@cache
def git_commit() -> str:
    """Short commit of the tree (``QUANTLAB_COMMIT`` where the copy has no ``.git``, as on a lent
    GPU machine), or ``"unknown"``."""
    if os.environ.get("QUANTLAB_COMMIT"):
        return os.environ["QUANTLAB_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def cuda_rotation(
    calls: list[Callable[[], torch.Tensor]], use_graphs: bool = True
) -> tuple[Callable[[], None], str]:
    """A callable that runs every call once (one pass over the weight copies), and its mode:
    ``"cuda-graph"`` (the pass captured once and replayed: at batch 1 a kernel takes a few
    microseconds, less than Python needs to launch it), ``"eager"``, or ``"eager (capture
    failed)"`` with a warning."""

    def eager() -> None:
        for call in calls:
            call()

    # Warm up off the default stream (cuBLAS handles, lazy module loading) before any capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager()
        eager()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if not use_graphs:
        return eager, "eager"
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            eager()
    except RuntimeError as exc:
        torch.cuda.synchronize()
        warnings.warn(f"CUDA graph capture failed, timing eagerly: {exc}", stacklevel=2)
        return eager, "eager (capture failed)"
    torch.cuda.synchronize()
    return graph.replay, "cuda-graph"
