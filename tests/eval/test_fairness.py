"""Stereotype score: batched log-likelihoods equal single runs, the score, paired statistics."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from quantlab.calib.pairs import SentencePair
from quantlab.eval.fairness import (
    compare_scores,
    sentence_logprobs,
    stereotype_score,
    wilson_interval,
)
from tests.fairness_helpers import WordTokenizer
from tests.tolerances import FP32_BATCHING_ATOL, FP32_BATCHING_RTOL

SENTENCES = [
    "the nurse said she was late",
    "a b",
    "we hired Lakisha yesterday afternoon",
    "one",
    "the carpenter said he was tired after work",
]


def _alone(model: nn.Module, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[t - 1, ids[t]] for t in range(1, len(ids))))


def test_batched_log_likelihoods_equal_single_unpadded_runs(tiny_llama: nn.Module) -> None:
    tok = WordTokenizer()
    got = sentence_logprobs(tiny_llama, tok, SENTENCES, batch_size=3)
    for text, (value, n) in zip(SENTENCES, got, strict=True):
        ids = [tok.bos_token_id] + tok(text)["input_ids"]
        assert n == len(ids) - 1  # every word token is scored, the first one after BOS
        assert value == pytest.approx(
            _alone(tiny_llama, ids), rel=FP32_BATCHING_RTOL, abs=FP32_BATCHING_ATOL * len(ids)
        )


class _FavouringModel(nn.Module):
    """Uniform next-token distribution except a bonus of ``bonus`` nats for one token id."""

    def __init__(self, favoured: int, vocab: int = 512, bonus: float = 2.0) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.favoured, self.vocab, self.bonus = favoured, vocab, bonus

    def forward(self, ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        logits = torch.zeros(*ids.shape, self.vocab)
        logits[..., self.favoured] = self.bonus
        return SimpleNamespace(logits=logits)


def test_score_counts_pairs_whose_stereotypical_sentence_is_likelier() -> None:
    tok = WordTokenizer()
    she = tok("she")["input_ids"][0]
    model = _FavouringModel(she)
    pairs = [
        SentencePair("the nurse said she left", "the nurse said he left", "gender", "t0", "0"),
        SentencePair("the clerk said she left", "the clerk said he left", "gender", "t0", "1"),
        SentencePair("the chef said he left", "the chef said she left", "gender", "t1", "2"),
        SentencePair("she is a Sikh", "he is a Sikh", "religion", "t2", "3"),
    ]
    result = stereotype_score(model, tok, pairs, batch_size=2)
    # Only sentences with "she" get the bonus: pairs 0, 1 and 3 prefer their stereotype.
    assert result.preferences() == [True, True, False, True]
    assert result.score == 0.75 and result.n_pairs == 4
    assert result.by_category == {
        "gender": {"score": 2 / 3, "n_pairs": 3},
        "religion": {"score": 1.0, "n_pairs": 1},
    }
    # log p(she) - log p(he) under the model: bonus - 0 nats.
    assert result.pairs[0].margin() == pytest.approx(2.0, abs=1e-5)
    assert result.ci95 == wilson_interval(3, 4)
    assert result.by_order == {}  # these pairs carry no template order
    mean = stereotype_score(model, tok, pairs, normalization="mean")
    assert mean.pairs[0].margin("mean") == pytest.approx(2.0 / 5, abs=1e-5)
    assert set(result.to_dict()) >= {"score", "n_pairs", "ci95", "by_category", "mean_margin"}
    assert len(result.to_dict(include_pairs=True)["pairs"]) == 4
    with pytest.raises(ValueError, match="normalization must be one of"):
        stereotype_score(model, tok, pairs, normalization="max")
    with pytest.raises(ValueError, match="no sentence pairs"):
        stereotype_score(model, tok, [])


def test_wilson_interval() -> None:
    lo, hi = wilson_interval(50, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)


def _result(prefs: list[bool], templates: list[str]) -> object:
    from quantlab.eval.fairness import PairScore, StereotypeResult

    pairs = [
        PairScore(str(i), t, "gender", "", 0.0 if p else -1.0, -0.5, 3, 3)
        for i, (p, t) in enumerate(zip(prefs, templates, strict=True))
    ]
    return StereotypeResult(
        score=sum(prefs) / len(prefs),
        n_pairs=len(prefs),
        ci95=wilson_interval(sum(prefs), len(prefs)),
        by_category={},
        by_order={},
        mean_margin=0.0,
        normalization="sum",
        seconds=0.0,
        pairs=pairs,
    )


def test_paired_comparison() -> None:
    templates = [f"t{i % 4}" for i in range(12)]
    a = _result([True] * 8 + [False] * 4, templates)
    b = _result([True] * 3 + [False] * 9, templates)
    cmp = compare_scores(a, b, n_boot=500)
    assert (cmp.a_only, cmp.b_only) == (5, 0)
    assert cmp.difference == pytest.approx(-5 / 12)
    # Exact McNemar: 5 discordant pairs all one way, p = 2 / 2^5.
    assert cmp.mcnemar_p == pytest.approx(2 / 32)
    assert cmp.ci95[0] <= cmp.difference <= cmp.ci95[1] < 0
    assert cmp.margin_difference == pytest.approx(-5 / 12 * 0.5 * 2)
    same = compare_scores(a, a, n_boot=100)
    assert (same.difference, same.mcnemar_p, same.ci95) == (0.0, 1.0, (0.0, 0.0))
    with pytest.raises(ValueError, match="different pairs"):
        compare_scores(a, _result([True] * 3, ["t0"] * 3))
    assert math.isclose(cmp.to_dict()["difference"], cmp.difference)
