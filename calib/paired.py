"""Paired-input capture for Fair-GPTQ: both sentences of each pair run in lockstep, block by block.

Both sentences of a pair sit in the same batch (rows ``2i`` and ``2i + 1``), right-padded to the
batch's longest sentence. In a causal decoder a token never attends to later positions, so the
padding cannot change the activations of real tokens and no attention mask is needed; padded
positions are simply never read.

Token alignment (:func:`align_positions`). The two sentences share a prefix and a suffix and differ
in a span (the group word: "he"/"she", "Emily"/"Lakisha"). Positions in the shared prefix have
identical activations in both sentences (same tokens, same causal context), so they are skipped:
they add nothing to ``D`` and are not counted in its normalisation. Three modes:

* ``span`` (default): the differing spans are compared position by position when they have the same
  number of tokens; otherwise only their last tokens are compared (the first token at which each
  group word is complete; a sub-word of a longer name has no counterpart). The shared suffix is
  aligned from the end, so every suffix token is compared with the *same* token in the other
  sentence: the difference is then exactly how the group word changed its representation.
* ``position``: the reference implementation's rule, position ``t`` against position ``t`` from the
  first difference up to the end of the shorter sentence. Past a length mismatch this compares
  different tokens.
* ``suffix``: only the shared suffix (aligned from the end), not the differing words themselves:
  the term then constrains how the difference is carried *downstream* (to where the next words
  are predicted) without also flattening the layers' response to the words themselves.

:class:`PairStream` carries the pair batches' block inputs beside the calibration batches of
:func:`quantlab.calib.capture.run_sequential`: for a group of linears it runs the current block
(earlier groups already quantized) up to the group's input and accumulates
``D = 2 (X0 - X1)^T (X0 - X1) / n`` in a :class:`~quantlab.calib.stats.PairDifferenceAccumulator`,
and once the block is quantized it replays the block to produce the next block's pair inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantlab.calib.capture import (
    BlockInputs,
    capture_block_inputs,
    run_block,
    run_block_until,
)
from quantlab.calib.pairs import SentencePair
from quantlab.calib.stats import HessianAccumulator, PairDifferenceAccumulator

__all__ = [
    "ALIGNMENTS",
    "PairBatch",
    "PairStream",
    "align_positions",
    "encode_sentence",
    "pair_batches",
    "scoring_prefix",
]

ALIGNMENTS = ("span", "position", "suffix")


def scoring_prefix(tokenizer: Any) -> int | None:
    """The token put before every sentence so that its first word is predicted too.

    The BOS token when the tokenizer has one, else EOS (the convention of lm-evaluation-harness's
    ``prefix_token_id``); ``None`` if it has neither.
    """
    for attr in ("bos_token_id", "eos_token_id"):
        token = getattr(tokenizer, attr, None)
        if token is not None:
            return int(token)
    return None


def encode_sentence(tokenizer: Any, text: str, prefix: int | None) -> list[int]:
    """Token ids of ``text`` (no special tokens), after ``prefix`` when given."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if not ids:
        raise ValueError(f"sentence {text!r} tokenizes to nothing")
    return ([prefix] if prefix is not None else []) + list(ids)


def align_positions(
    a: Sequence[int], b: Sequence[int], mode: str = "span"
) -> list[tuple[int, int]]:
    """Positions ``(i in a, j in b)`` whose layer inputs are compared (see the module docstring).

    Positions before the first differing token are never returned (their inputs are identical).
    """
    if mode not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {mode!r}")
    n = min(len(a), len(b))
    prefix = 0
    while prefix < n and a[prefix] == b[prefix]:
        prefix += 1
    if mode == "position":
        return [(t, t) for t in range(prefix, n)]
    suffix = 0
    while suffix < n - prefix and a[len(a) - 1 - suffix] == b[len(b) - 1 - suffix]:
        suffix += 1
    span_a, span_b = len(a) - suffix - prefix, len(b) - suffix - prefix
    if mode == "suffix":
        aligned = []
    elif span_a == span_b:
        aligned = [(prefix + t, prefix + t) for t in range(span_a)]
    elif span_a > 0 and span_b > 0:
        aligned = [(len(a) - suffix - 1, len(b) - suffix - 1)]
    else:
        aligned = []  # a pure insertion: nothing in the other sentence corresponds to it
    aligned += [(len(a) - suffix + t, len(b) - suffix + t) for t in range(suffix)]
    return aligned


@dataclass(frozen=True)
class PairBatch:
    """Several pairs as one right-padded batch of token ids.

    Attributes:
        ids: int64 ``[2P, L]``; row ``2i`` is pair ``i``'s stereotypical sentence, ``2i + 1`` the
            other; positions past a sentence's end hold ``pad_id``.
        lengths: int64 ``[2P]`` tokens of each row.
        stereo_index: int64 ``[m]`` flat indices into ``[2P * L]`` of the aligned positions in the
            stereotypical sentences.
        anti_index: int64 ``[m]`` the matching positions in the other sentences.
        valid_index: int64 flat indices of every real (non-padding) token.
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    stereo_index: torch.Tensor
    anti_index: torch.Tensor
    valid_index: torch.Tensor

    @property
    def n_pairs(self) -> int:
        return self.ids.shape[0] // 2


def pair_batches(
    tokenizer: Any,
    pairs: Sequence[SentencePair],
    batch_pairs: int = 64,
    alignment: str = "span",
    prefix: int | None | str = "auto",
) -> list[PairBatch]:
    """Encode and batch ``pairs`` for capture.

    Pairs are ordered by length (ties by their order in ``pairs``) so batches carry little padding.
    ``prefix="auto"`` uses :func:`scoring_prefix`, the same token the stereotype score puts first.
    """
    if batch_pairs < 1:
        raise ValueError(f"batch_pairs must be >= 1, got {batch_pairs}")
    if not pairs:
        raise ValueError("no sentence pairs to capture")
    first = scoring_prefix(tokenizer) if prefix == "auto" else prefix
    assert first is None or isinstance(first, int)
    encoded = []
    for p in pairs:
        a = encode_sentence(tokenizer, p.stereo, first)
        b = encode_sentence(tokenizer, p.anti, first)
        aligned = align_positions(a, b, alignment)
        if not aligned and alignment == "suffix":
            continue  # the words differ at the very end: nothing downstream to constrain
        if not aligned:
            raise ValueError(
                f"pair {p.pair_id!r}: the two sentences tokenize so that no position can be "
                f"compared ({p.stereo!r} / {p.anti!r})"
            )
        encoded.append((a, b, aligned))
    if not encoded:
        raise ValueError(f"no pair has a position to compare under alignment {alignment!r}")
    order = sorted(range(len(encoded)), key=lambda i: max(len(encoded[i][0]), len(encoded[i][1])))
    pad = first if first is not None else 0
    batches = []
    for start in range(0, len(order), batch_pairs):
        chunk = [encoded[i] for i in order[start : start + batch_pairs]]
        width = max(max(len(a), len(b)) for a, b, _ in chunk)
        ids = torch.full((2 * len(chunk), width), pad, dtype=torch.long)
        lengths = torch.empty(2 * len(chunk), dtype=torch.long)
        stereo_index: list[int] = []
        anti_index: list[int] = []
        valid_index: list[int] = []
        for i, (a, b, aligned) in enumerate(chunk):
            ids[2 * i, : len(a)] = torch.tensor(a)
            ids[2 * i + 1, : len(b)] = torch.tensor(b)
            lengths[2 * i], lengths[2 * i + 1] = len(a), len(b)
            row_a, row_b = 2 * i * width, (2 * i + 1) * width
            stereo_index += [row_a + s for s, _ in aligned]
            anti_index += [row_b + t for _, t in aligned]
            valid_index += [row_a + s for s in range(len(a))] + [row_b + t for t in range(len(b))]
        batches.append(
            PairBatch(
                ids=ids,
                lengths=lengths,
                stereo_index=torch.tensor(stereo_index, dtype=torch.long),
                anti_index=torch.tensor(anti_index, dtype=torch.long),
                valid_index=torch.tensor(valid_index, dtype=torch.long),
            )
        )
    return batches


class PairStream:
    """Pair batches carried block by block through a model, in lockstep with the quantization.

    Usage, beside :func:`~quantlab.calib.capture.run_sequential`: :meth:`start` once, then for each
    block :meth:`accumulate` for the groups that need ``D`` (from inside ``on_group``, before the
    group is quantized) and :meth:`advance` after the block is quantized.
    """

    def __init__(
        self, batches: Sequence[PairBatch], storage_device: torch.device | str = "cpu"
    ) -> None:
        if not batches:
            raise ValueError("PairStream needs at least one pair batch")
        self.batches = list(batches)
        self.storage_device = storage_device
        self.inputs: BlockInputs | None = None
        self.block_index = -1

    @property
    def n_pairs(self) -> int:
        return sum(b.n_pairs for b in self.batches)

    @torch.no_grad()
    def start(self, model: nn.Module, blocks: nn.ModuleList, device: torch.device | str) -> None:
        """Catch the first block's inputs for every pair batch; the modules outside the blocks
        must be on ``device`` (:meth:`quantlab.calib.blocks.ModelBlocks.outside_on_device`)."""
        inputs = BlockInputs()
        for batch in self.batches:
            caught = capture_block_inputs(
                model, blocks, batch.ids, batch.ids.shape[0], device, self.storage_device
            )
            inputs.hidden += caught.hidden
            inputs.kwargs += caught.kwargs
        self.inputs = inputs
        self.block_index = 0

    def _require(self, index: int) -> BlockInputs:
        if self.inputs is None:
            raise RuntimeError("PairStream.start() was not called")
        if index != self.block_index:
            raise RuntimeError(
                f"pair inputs are those of block {self.block_index}, not of block {index}; call "
                "advance() once after every block"
            )
        return self.inputs

    @torch.no_grad()
    def accumulate(
        self,
        index: int,
        block: nn.Module,
        name: str,
        device: torch.device | str,
        with_hessian: bool = False,
    ) -> tuple[PairDifferenceAccumulator, HessianAccumulator | None]:
        """``D`` (and, if asked, the ordinary Hessian of the pair tokens) of submodule ``name``'s
        input in block ``index`` as the block is now."""
        inputs = self._require(index)
        caught = run_block_until(block, inputs, device, name)
        width = caught[0].shape[-1]
        diff = PairDifferenceAccumulator(width, device)
        hess = HessianAccumulator(width, device) if with_hessian else None
        for x, batch in zip(caught, self.batches, strict=True):
            rows = x.reshape(-1, width)
            diff.add(
                rows[batch.stereo_index.to(rows.device)],
                rows[batch.anti_index.to(rows.device)],
                batch.n_pairs,
            )
            if hess is not None:
                hess.add(rows[batch.valid_index.to(rows.device)])
        return diff, hess

    @torch.no_grad()
    def advance(self, index: int, block: nn.Module, device: torch.device | str) -> None:
        """Replace block ``index``'s inputs by its outputs (run it after it is quantized)."""
        inputs = self._require(index)
        self.inputs = inputs.with_hidden(run_block(block, inputs, device))
        self.block_index = index + 1

    def release(self) -> None:
        """Drop the stored activations (once no later block needs them)."""
        self.inputs = None
