"""Paired capture: alignment, the group-bias accumulator, lockstep batches equal to single runs."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import nn

from quantlab.calib.blocks import ModelBlocks
from quantlab.calib.capture import run_sequential
from quantlab.calib.paired import PairStream, align_positions, encode_sentence, pair_batches
from quantlab.calib.pairs import SentencePair
from quantlab.calib.stats import PairDifferenceAccumulator
from quantlab.models.arch import resolve
from tests.fairness_helpers import WordTokenizer
from tests.tolerances import FP32_BATCHING_ATOL, FP32_BATCHING_RTOL, FP32_GRAM_RTOL


def test_alignment_modes() -> None:
    # Same-length span: compared position by position from the first difference; prefix skipped.
    assert align_positions([1, 2, 3, 4, 5], [1, 2, 9, 4, 5]) == [(2, 2), (3, 3), (4, 4)]
    # Unequal spans (a 2-token word against a 1-token word): last tokens, then the suffix from the
    # end, so suffix tokens meet the same token.
    assert align_positions([1, 2, 3, 3, 4, 5], [1, 2, 9, 4, 5]) == [(3, 2), (4, 3), (5, 4)]
    # The reference's rule compares positions, whatever tokens sit there.
    assert align_positions([1, 2, 3, 3, 4, 5], [1, 2, 9, 4, 5], "position") == [
        (2, 2),
        (3, 3),
        (4, 4),
    ]
    # A pure insertion has no counterpart; only the shared suffix is compared.
    assert align_positions([1, 2, 4, 5], [1, 2, 9, 4, 5]) == [(2, 3), (3, 4)]
    # A difference in the last token only.
    assert align_positions([1, 2, 3], [1, 2, 4]) == [(2, 2)]
    # Suffix only: the differing words themselves are left out, the suffix aligned from the end.
    assert align_positions([1, 2, 3, 3, 4, 5], [1, 2, 9, 4, 5], "suffix") == [(4, 3), (5, 4)]
    assert align_positions([1, 2, 3], [1, 2, 4], "suffix") == []
    with pytest.raises(ValueError, match="alignment must be one of"):
        align_positions([1], [2], "greedy")


def test_pair_difference_accumulator_is_the_normalised_gram_of_differences() -> None:
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g)
    acc = PairDifferenceAccumulator(8)
    acc.add(x0[:10], x1[:10], n_pairs=2)
    acc.add(x0[10:].bfloat16().float(), x1[10:].bfloat16().float(), n_pairs=3)
    xb0 = torch.cat([x0[:10], x0[10:].bfloat16().float()])
    xb1 = torch.cat([x1[:10], x1[10:].bfloat16().float()])
    delta = (xb0 - xb1).double()
    want = 2 * delta.t() @ delta / 30
    bound = FP32_GRAM_RTOL * (2 * delta.abs().t() @ delta.abs() / 30)
    assert bool(((acc.matrix().double() - want).abs() <= bound).all())
    assert (acc.n_positions, acc.n_pairs) == (30, 5)
    with pytest.raises(ValueError, match="two aligned"):
        acc.add(x0[:3], x1[:4], n_pairs=1)
    with pytest.raises(ValueError, match="group-bias matrix is empty"):
        PairDifferenceAccumulator(8).matrix()


PAIRS = [
    SentencePair("the nurse said she was late", "the nurse said he was late", "gender", "t0", "a"),
    SentencePair("we hired Lakisha today", "we hired Ann today", "race-color", "t1", "b"),
    SentencePair("a quiet one", "a loud one", "x", "t2", "c"),
]


def test_pair_batches_layout() -> None:
    tok = WordTokenizer()
    batches = pair_batches(tok, PAIRS, batch_pairs=2)
    assert [b.n_pairs for b in batches] == [2, 1]
    # Ordered by length: the 3-word pair first.
    first = batches[0]
    stereo = encode_sentence(tok, "a quiet one", tok.bos_token_id)
    assert first.ids[0, : len(stereo)].tolist() == stereo
    flat = first.ids.flatten()
    # Every aligned suffix position holds the same token in both sentences, except the span.
    row_width = first.ids.shape[1]
    for s, a in zip(first.stereo_index.tolist(), first.anti_index.tolist(), strict=True):
        assert s // row_width % 2 == 0 and a // row_width % 2 == 1
    assert flat[first.valid_index].numel() == int(first.lengths.sum())
    # Exact positions, worked out by hand. Batch 0 (width 6): "a quiet one" / "a loud one" (rows
    # 0, 1: the differing word and the suffix, positions 2, 3) and the Lakisha pair (rows 2, 3:
    # "Laki sha" against "Ann", so the name's last token 4 meets 3, then the suffix 5 meets 4).
    # Batch 1 (width 7): the nurse pair, positions 4 ("she" / "he") to 6 in both rows.
    assert (first.stereo_index.tolist(), first.anti_index.tolist()) == (
        [2, 3, 2 * 6 + 4, 2 * 6 + 5],
        [6 + 2, 6 + 3, 3 * 6 + 3, 3 * 6 + 4],
    )
    assert first.lengths.tolist() == [4, 4, 6, 5]
    nurse = batches[1]
    assert (nurse.stereo_index.tolist(), nurse.anti_index.tolist()) == ([4, 5, 6], [11, 12, 13])
    with pytest.raises(ValueError, match="no sentence pairs"):
        pair_batches(tok, [])


def _block_inputs_alone(model: nn.Module, ids: list[int], layer: int, name: str) -> torch.Tensor:
    """Input of ``model.layers[layer].<name>`` for one unpadded sentence, from a plain forward."""
    caught: list[torch.Tensor] = []
    module = model.model.layers[layer].get_submodule(name)
    handle = module.register_forward_pre_hook(lambda m, a: caught.append(a[0][0]))
    with torch.no_grad():
        model(torch.tensor([ids]))
    handle.remove()
    return caught[0]


def test_lockstep_batches_match_sentences_run_alone(tiny_llama: nn.Module) -> None:
    """Padding, batching and block-by-block replay must not change what D sees."""
    tok = WordTokenizer()
    stream = PairStream(pair_batches(tok, PAIRS, batch_pairs=2))
    blocks = tiny_llama.model.layers
    stream.start(tiny_llama, blocks, "cpu")
    for layer in range(len(blocks)):
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            got, hess = stream.accumulate(layer, blocks[layer], name, "cpu", with_hessian=True)
            want = PairDifferenceAccumulator(got.in_features)
            tokens = []
            for p in PAIRS:
                a = encode_sentence(tok, p.stereo, tok.bos_token_id)
                b = encode_sentence(tok, p.anti, tok.bos_token_id)
                xa = _block_inputs_alone(tiny_llama, a, layer, name)
                xb = _block_inputs_alone(tiny_llama, b, layer, name)
                aligned = align_positions(a, b)
                want.add(xa[[i for i, _ in aligned]], xb[[j for _, j in aligned]], 1)
                tokens += [xa, xb]
            torch.testing.assert_close(
                got.matrix(), want.matrix(), rtol=FP32_BATCHING_RTOL, atol=FP32_BATCHING_ATOL
            )
            assert got.n_pairs == len(PAIRS) and got.n_positions == want.n_positions
            rows = torch.cat(tokens).double()
            torch.testing.assert_close(
                hess.hessian().double(),
                2 * rows.t() @ rows / rows.shape[0],
                rtol=FP32_BATCHING_RTOL,
                atol=FP32_BATCHING_ATOL,
            )
        stream.advance(layer, blocks[layer], "cpu")
    with pytest.raises(RuntimeError, match="not of block 0"):
        stream.accumulate(0, blocks[0], "mlp.down_proj", "cpu")


@pytest.mark.parametrize("batch_size", [None, 2])
def test_on_group_may_run_the_block_without_disturbing_the_statistics(
    tiny_llama: nn.Module, batch_size: int | None
) -> None:
    """In single-pass mode on_group runs inside a forward hook; a nested forward of the same block
    (what Fair-GPTQ does to get D) must neither feed nor trigger the capture hooks."""
    spec = resolve(tiny_llama)
    blocks = tiny_llama.model.layers
    x = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(0))

    def collect(nested: bool) -> dict[str, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}
        stream = PairStream(pair_batches(WordTokenizer(), PAIRS))
        stream.start(tiny_llama, blocks, "cpu")

        def on_group(i: int, block: nn.Module, group: Sequence[str], stats: dict) -> None:
            if nested:
                diff, _ = stream.accumulate(i, block, group[0], "cpu")
                seen[f"{i}.{group[0]}.D"] = diff.matrix().clone()
            for name in group:
                seen[f"{i}.{name}"] = stats[name].hessian().clone()

        def on_block_done(i: int, block: nn.Module) -> None:
            stream.advance(i, block, "cpu")

        run_sequential(
            ModelBlocks(tiny_llama, spec.blocks, "cpu"),
            spec.sequential_groups,
            x,
            on_group,
            on_block_done,
            batch_size=batch_size,
        )
        return seen

    plain, nested = collect(False), collect(True)
    assert len(nested) == len(plain) + 2 * len(spec.sequential_groups)
    for key in plain:
        assert torch.equal(plain[key], nested[key]), key
