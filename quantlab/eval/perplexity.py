"""Perplexity over fixed, non-overlapping windows of a token stream."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

__all__ = ["PerplexityResult", "perplexity"]


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float
    windows: int
    seq_len: int
    tokens: int  # windows * seq_len tokens read; (seq_len - 1) per window are predicted
    seconds: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    seq_len: int = 2048,
    max_windows: int | None = 10,
    progress: bool = True,
) -> PerplexityResult:
    """Mean token negative log-likelihood over the first windows of ``tokens``.

    The stream is cut into non-overlapping windows of ``seq_len`` tokens (the ragged tail is
    dropped); each window is scored independently from its first token, and the perplexity is
    ``exp`` of the mean NLL over every predicted token.

    Args:
        model: a causal LM returning ``.logits`` ``[1, seq_len, vocab]``.
        tokens: 1-D int64 token ids.
        seq_len: window length.
        max_windows: cap on windows (``None`` = all).
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    n_windows = tokens.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"text has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    device = next(model.parameters()).device
    start = time.perf_counter()
    total_nll = 0.0
    count = 0
    was_training = model.training
    model.eval()
    for w in tqdm(range(n_windows), desc="perplexity", disable=not progress, leave=False):
        ids = tokens[w * seq_len : (w + 1) * seq_len].unsqueeze(0).to(device)
        logits: Any = model(ids, use_cache=False).logits
        logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
        nll = -logp.gather(1, ids[0, 1:].unsqueeze(1)).sum()
        if not torch.isfinite(nll):
            raise FloatingPointError(f"non-finite loss in perplexity window {w}")
        total_nll += float(nll)
        count += seq_len - 1
    model.train(was_training)
    mean = total_nll / count
    return PerplexityResult(
        ppl=math.exp(mean),
        nll=mean,
        windows=n_windows,
        seq_len=seq_len,
        tokens=n_windows * seq_len,
        seconds=time.perf_counter() - start,
    )
