"""Tool-independent perplexity for the peer comparison (needs only torch and numpy).

Every ``peer_<name>.py`` script imports this module, so every tool is measured the same way, and
it is the same definition as :func:`quantlab.eval.perplexity.perplexity` (checked by
``tests/test_peers_script.py``): each window of ``seq_len`` tokens is scored independently from its
first token, the logits are taken in fp32, and the perplexity is ``exp`` of the mean negative
log-likelihood over every predicted token (``windows * (seq_len - 1)`` tokens).

The shared data is written once by ``run_peers.py`` as plain numpy ``.npy`` files (int64, never
pickled): ``eval_windows.npy`` ``[windows, seq_len]`` and ``calib_ids.npy`` ``[samples, seq_len]``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["load_ids", "peak_rss_mb", "perplexity_windows", "emit"]


def load_ids(path: str | os.PathLike[str]) -> torch.Tensor:
    """An int64 ``[N, L]`` tensor from a ``.npy`` file written by ``run_peers.py`` (no pickle)."""
    arr = np.load(Path(path), allow_pickle=False)
    if arr.ndim != 2 or arr.dtype != np.int64:
        raise ValueError(f"{path}: expected a 2-D int64 array, got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr.copy())


@torch.no_grad()
def perplexity_windows(model: torch.nn.Module, windows: torch.Tensor) -> dict[str, float | int]:
    """Perplexity of ``model`` over the rows of ``windows`` (int64 ``[W, L]``), quantlab's way."""
    if windows.dim() != 2:
        raise ValueError(f"windows must be [W, L], got shape {tuple(windows.shape)}")
    n_windows, seq_len = windows.shape
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    total_nll = 0.0
    count = 0
    for w in range(n_windows):
        ids = windows[w].to(torch.long).unsqueeze(0).to(device)
        logits: Any = model(ids, use_cache=False).logits
        logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
        nll = -logp.gather(1, ids[0, 1:].unsqueeze(1)).sum()
        if not torch.isfinite(nll):
            raise FloatingPointError(f"non-finite loss in perplexity window {w}")
        total_nll += float(nll)
        count += seq_len - 1
    model.train(was_training)
    mean = total_nll / count
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "windows": int(n_windows),
        "seq_len": int(seq_len),
        "tokens": int(n_windows * seq_len),
        "eval_seconds": time.perf_counter() - start,
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(record: dict[str, Any]) -> None:
    """Print the one JSON result line ``run_peers.py`` reads (prefixed so logs can surround it)."""
    record = dict(record, peak_rss_mb=round(peak_rss_mb(), 1))
    sys.stdout.write("PEER_RESULT " + json.dumps(record) + "\n")
    sys.stdout.flush()
