"""Perplexity over fixed, non-overlapping windows of a token stream: of a model in memory
(:func:`perplexity`), or block by block (:func:`blockwise_perplexity`) for a model streamed from
its checkpoint that never fits in memory whole. Both give the same numbers (tests/model)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantlab.calib.activations import ActivationStore
from quantlab.calib.blocks import ModelBlocks
from quantlab.calib.capture import BlockInputs, capture_block_inputs, run_block

__all__ = ["PerplexityResult", "WindowStream", "blockwise_perplexity", "perplexity"]


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
    windows = _windows(tokens, seq_len, max_windows)
    device = next(model.parameters()).device
    start = time.perf_counter()
    total_nll = 0.0
    was_training = model.training
    model.eval()
    for w in tqdm(range(windows.shape[0]), desc="perplexity", disable=not progress, leave=False):
        ids = windows[w : w + 1].to(device)
        total_nll += _window_nll(model(ids, use_cache=False).logits, ids, w)
    model.train(was_training)
    return _result(total_nll, windows, time.perf_counter() - start)


class WindowStream:
    """Evaluation windows carried through a model one decoder block at a time, so perplexity can
    be measured alongside another block-by-block pass (a streamed quantization pushes its
    baseline windows through each float block as it is opened and its result windows through
    each quantized block as it is done: the weights are read once for all three).

    :meth:`start` catches every window's inputs to the first block (the modules outside the
    blocks on the device, head not needed); :meth:`advance` runs one block on all windows, in
    order; :meth:`finish` (the head on the device) runs the model once more per window with every
    block's forward replaced by the stored result, so the final norm, head and whatever the
    architecture does after the blocks (logit soft-capping, scaling) run as in the model's own
    forward. Each window goes through each block alone, as in :func:`perplexity`, so the numbers
    are the same. Memory: the hidden states of every window (``windows x seq_len x hidden`` in
    the compute dtype), in ``store`` when given (RAM up to its budget, the rest spilled to disk,
    like the calibration activations of the same run), else on ``storage_device``.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        seq_len: int = 2048,
        max_windows: int | None = 10,
        storage_device: torch.device | str = "cpu",
        store: ActivationStore | None = None,
    ) -> None:
        self.windows = _windows(tokens, seq_len, max_windows)
        self.storage_device = storage_device
        self.store = store
        self.inputs: BlockInputs | None = None
        self.next_index = 0
        # Whether a block returns a tuple headed by the hidden states (transformers 4.x) rather
        # than the tensor itself (5.x): the replayed forward must return the same.
        self.returns_tuple = False
        self.seconds = 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of the stored hidden states."""
        return 0 if self.inputs is None else sum(h.nbytes for h in self.inputs.hidden)

    @torch.no_grad()
    def start(self, model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
        start = time.perf_counter()
        self.inputs = capture_block_inputs(
            model, blocks, self.windows, 1, device, self.storage_device, self.store
        )
        self.next_index = 0
        self.seconds += time.perf_counter() - start

    @torch.no_grad()
    def advance(self, index: int, block: nn.Module, device: torch.device) -> None:
        if self.inputs is None or index != self.next_index:
            raise RuntimeError(
                "WindowStream.start() was not called"
                if self.inputs is None
                else f"the windows are at block {self.next_index}, not {index}"
            )
        start = time.perf_counter()
        seen: list[bool] = []

        def note_type(_module: nn.Module, _args: Any, output: Any) -> None:
            seen.append(isinstance(output, tuple))

        was_training = block.training
        block.eval()
        handle = block.register_forward_hook(note_type)
        try:
            hidden = run_block(block, self.inputs, device)
        finally:
            handle.remove()
            block.train(was_training)
        self.returns_tuple = seen[-1]
        self.inputs = self.inputs.with_hidden(hidden)
        self.next_index = index + 1
        self.seconds += time.perf_counter() - start

    @torch.no_grad()
    def finish(
        self, model: nn.Module, blocks: nn.ModuleList, device: torch.device
    ) -> PerplexityResult:
        if self.inputs is None or self.next_index != len(blocks):
            raise RuntimeError(
                f"the windows went through {self.next_index} of {len(blocks)} blocks"
            )
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        total_nll = 0.0
        try:
            for w in range(self.windows.shape[0]):
                ids = self.windows[w : w + 1].to(device)
                final = self.inputs.batch(w).to(device)
                with _replayed_blocks(blocks, final, self.returns_tuple):
                    logits = model(ids, use_cache=False).logits
                total_nll += _window_nll(logits, ids, w)
        finally:
            model.train(was_training)
        self.inputs = None
        self.seconds += time.perf_counter() - start
        return _result(total_nll, self.windows, self.seconds)


def blockwise_perplexity(
    blocks: ModelBlocks,
    tokens: torch.Tensor,
    seq_len: int = 2048,
    max_windows: int | None = 10,
    progress: bool = True,
    storage_device: torch.device | str = "cpu",
) -> PerplexityResult:
    """:func:`perplexity` of ``blocks.model`` computed one decoder block at a time
    (:class:`WindowStream`): for a model streamed from its checkpoint, one block in memory plus
    the windows' hidden states."""
    stream = WindowStream(tokens, seq_len, max_windows, storage_device)
    with blocks.outside_on_device():
        stream.start(blocks.model, blocks.blocks, blocks.device)
    for index in tqdm(range(len(blocks)), desc="perplexity", disable=not progress, leave=False):
        with blocks.open(index) as block:
            stream.advance(index, block, blocks.device)
    with blocks.outside_on_device(with_head=True):
        return stream.finish(blocks.model, blocks.blocks, blocks.device)


def _windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """The first non-overlapping windows of ``tokens`` as ``[W, seq_len]`` (ragged tail dropped)."""
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    n_windows = tokens.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"text has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    return tokens[: n_windows * seq_len].view(n_windows, seq_len)


def _window_nll(logits: torch.Tensor, ids: torch.Tensor, window: int) -> float:
    """Summed NLL of tokens 1.. of the window ``ids`` ``[1, L]`` under ``logits`` ``[1, L, V]``."""
    logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    nll = -logp.gather(1, ids[0, 1:].unsqueeze(1)).sum()
    if not torch.isfinite(nll):
        raise FloatingPointError(f"non-finite loss in perplexity window {window}")
    return float(nll)


def _result(total_nll: float, windows: torch.Tensor, seconds: float) -> PerplexityResult:
    n_windows, seq_len = windows.shape
    mean = total_nll / (n_windows * (seq_len - 1))
    return PerplexityResult(
        ppl=math.exp(mean),
        nll=mean,
        windows=n_windows,
        seq_len=seq_len,
        tokens=n_windows * seq_len,
        seconds=seconds,
    )


@contextlib.contextmanager
def _replayed_blocks(
    blocks: nn.ModuleList, final: torch.Tensor, returns_tuple: bool
) -> Iterator[None]:
    """Every block's forward replaced: the last returns ``final`` (the stored output of the whole
    stack for this window), the others pass their input through. The modules stay (the model's
    loop may read their attributes, such as an attention type); their weights are not touched."""

    def make(last: bool) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            out = final if last else (args[0] if args else kwargs["hidden_states"])
            return (out,) if returns_tuple else out

        return forward

    for i, block in enumerate(blocks):
        block.forward = make(i == len(blocks) - 1)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward
