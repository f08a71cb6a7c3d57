"""Fair-GPTQ on the real bundled SmolLM2-135M-Instruct, and the stereotype score from the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from quantlab.calib.data import load_text, token_stream
from quantlab.calib.paired import PairStream, pair_batches
from quantlab.calib.pairs import SentencePair, load_pairs, split_pairs
from quantlab.cli import main
from quantlab.config import CalibConfig, GPTQConfig
from quantlab.eval.fairness import StereotypeResult, stereotype_score
from quantlab.methods.fair_gptq import FairGPTQConfig
from quantlab.pipeline import quantize_model
from quantlab.solvers.fair_gptq import group_bias_term
from tests.model_helpers import fresh_default_model

pytestmark = pytest.mark.model

# Few calibration tokens and pairs keep the two quantizations near half a minute each on 2 cores.
CALIB = CalibConfig(n_samples=4, seq_len=128)
N_PAIRS = 16
LAST = 29
DEBIASED = f"model.layers.{LAST}.mlp.down_proj"
# A pair's log-likelihood from the library (right-padded batch, fp32 log-softmax) against the
# oracle below (one unpadded sentence, fp64 log-softmax): measured at most 7.9e-5 nats apart on the
# unquantized model's first 8 held-out pairs (sentences of ~50-60 nats).
ORACLE_ATOL = 2e-4


@pytest.fixture(scope="module")
def gptq_small(default_model_path: Path, default_tokenizer) -> torch.nn.Module:  # noqa: ANN001
    """Plain GPTQ W4 with this module's small calibration: what Fair-GPTQ is compared with."""
    model = fresh_default_model(default_model_path)
    quantize_model(model, GPTQConfig(), default_tokenizer, CALIB, progress=False)
    return model


def _changed_modules(a: torch.nn.Module, b: torch.nn.Module) -> set[str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return {k.rsplit(".", 1)[0] for k in sa if not torch.equal(sa[k], sb[k])}


@torch.no_grad()
def _oracle_logprob(model: torch.nn.Module, tokenizer: Any, text: str) -> float:
    """Log-likelihood of ``text`` from its definition, one unpadded sentence at a time in fp64:
    the sum over its tokens of log p(token | BOS and the tokens before it)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = [bos] + tokenizer(text, add_special_tokens=False)["input_ids"]
    logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())


def _assert_score_matches_oracle(
    result: StereotypeResult, model: torch.nn.Module, tokenizer: Any, pairs: list[SentencePair]
) -> None:
    """Every pair's two log-likelihoods against :func:`_oracle_logprob`, and the score and
    per-category breakdown recounted exactly from the oracle's preferences."""
    assert result.n_pairs == len(pairs) and result.normalization == "sum"
    prefers: list[bool] = []
    for pair, got in zip(pairs, result.pairs, strict=True):
        assert got.pair_id == pair.pair_id and got.bias_type == pair.bias_type
        stereo = _oracle_logprob(model, tokenizer, pair.stereo)
        anti = _oracle_logprob(model, tokenizer, pair.anti)
        assert got.stereo_logprob == pytest.approx(stereo, rel=0, abs=ORACLE_ATOL)
        assert got.anti_logprob == pytest.approx(anti, rel=0, abs=ORACLE_ATOL)
        if abs(stereo - anti) > 2 * ORACLE_ATOL:
            prefers.append(stereo > anti)
        else:  # a tie within rounding (none measured; the closest pair is 0.0023 nats apart)
            prefers.append(got.stereo_logprob > got.anti_logprob)
    assert result.score == sum(prefers) / len(prefers)
    by_category: dict[str, list[bool]] = {}
    for pair, pref in zip(pairs, prefers, strict=True):
        by_category.setdefault(pair.bias_type, []).append(pref)
    assert result.by_category == {
        k: {"score": sum(v) / len(v), "n_pairs": len(v)} for k, v in by_category.items()
    }


def test_fair_gptq_end_to_end_changes_only_the_debiased_module(
    default_model_path: Path, default_tokenizer, gptq_small: torch.nn.Module
) -> None:  # noqa: ANN001
    """Debiasing only the last block's down_proj: every other layer must be GPTQ's bit for bit
    (the pair stream runs beside all 30 blocks without disturbing them, i.e. alpha = 0 elsewhere
    is GPTQ), and that layer's group-bias term must drop well below GPTQ's."""
    gptq = gptq_small
    fair = fresh_default_model(default_model_path)
    config = FairGPTQConfig(
        fair_alpha=10.0,
        fair_layers=str(LAST),
        fair_modules=("mlp.down_proj",),
        fair_max_pairs=N_PAIRS,
    )
    report = quantize_model(fair, config, default_tokenizer, CALIB, progress=False)
    details = report.details["fair-gptq"]
    assert details["pairs"] == N_PAIRS and details["layers"] == [LAST]
    (row,) = details["debiased"]
    # alpha 10 removes nearly all of it: measured after / before = 0.024.
    assert row["name"] == DEBIASED
    assert row["bias_term_after"] < 0.05 * row["bias_term_before"], row

    assert _changed_modules(gptq, fair) == {DEBIASED}

    # D of that layer's input, as GPTQ's model sees it (identical up to it in both models).
    pairs = split_pairs(load_pairs(), "calib")[:N_PAIRS]
    stream = PairStream(pair_batches(default_tokenizer, pairs))
    blocks = gptq.model.layers
    stream.start(gptq, blocks, "cpu")
    for i in range(LAST):
        stream.advance(i, blocks[i], "cpu")
    diff, _ = stream.accumulate(LAST, blocks[LAST], "mlp.down_proj", "cpu")
    d = diff.matrix()
    bias_gptq = group_bias_term(blocks[LAST].mlp.down_proj.dequantized_weight(), d)
    bias_fair = group_bias_term(fair.model.layers[LAST].mlp.down_proj.dequantized_weight(), d)
    # Measured 0.024x (the report's own figure, recomputed here from the stored weights).
    assert bias_fair < 0.05 * bias_gptq, (bias_fair, bias_gptq)

    # The debiased model still models text (one layer changed, mildly) and scores pairs. On
    # 1024 wiki-eval tokens: one sentence's 10 tokens moved between 0.8 % and 2.6 % with the
    # machine's BLAS (GPTQ's error feedback carries last-bit differences on), too noisy to bound.
    ids = token_stream(default_tokenizer, load_text("wiki-eval"))[: 4 * 256].view(4, 256)
    with torch.no_grad():
        loss_a = gptq(ids, labels=ids).loss.item()
        loss_b = fair(ids, labels=ids).loss.item()
    # Measured 3.582 vs 3.623 nats (1.15 %), 2026-12-06.
    assert abs(loss_b - loss_a) < 0.03 * loss_a, (loss_a, loss_b)
    held = split_pairs(load_pairs(), "heldout")[:8]
    result = stereotype_score(fair, default_tokenizer, held)
    _assert_score_matches_oracle(result, fair, default_tokenizer, held)


def test_target_swapped_rank_one_term_on_the_real_model(
    default_model_path: Path, default_tokenizer, gptq_small: torch.nn.Module
) -> None:  # noqa: ANN001
    """The configuration that meets the issue's bar (docs/methods/fair_gptq.md: target-swapped
    pairs, one direction of D per layer, alpha 3), on the last block's down_proj only: nothing
    else changes, and that layer's group-bias term on the target-swapped pairs falls."""
    fair = fresh_default_model(default_model_path)
    config = FairGPTQConfig(
        fair_alpha=3.0,
        fair_layers=str(LAST),
        fair_modules=("mlp.down_proj",),
        fair_pair_kind="target",
        fair_rank=1,
        fair_max_pairs=N_PAIRS,
    )
    report = quantize_model(fair, config, default_tokenizer, CALIB, progress=False)
    details = report.details["fair-gptq"]
    assert details["pair_kind"] == "target" and details["pairs"] == N_PAIRS
    (row,) = details["debiased"]
    # One direction at alpha 3 takes a little off: measured after / before = 0.942.
    assert row["bias_term_after"] < 0.97 * row["bias_term_before"], row
    assert _changed_modules(gptq_small, fair) == {DEBIASED}


def test_eval_reports_the_stereotype_score(
    capsys: pytest.CaptureFixture[str], default_model_path: Path, default_tokenizer
) -> None:  # noqa: ANN001
    args = ["eval", "--model", "default", "--prompt", "", "--fairness", "--fairness-max-pairs"]
    args += ["6", "--eval-windows", "1", "--eval-seq-len", "128", "--no-progress", "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    stereo = result["stereotype"]
    assert stereo["split"] == "heldout" and stereo["pairs"] == "quantlab"
    assert "stereotype score" in captured.err

    # The library on the same model, pairs and settings (CLI defaults: sum, batch 32) is
    # deterministic, so the JSON must carry its numbers exactly; and those numbers are the oracle's.
    model = fresh_default_model(default_model_path)
    pairs = split_pairs(load_pairs(), "heldout")[:6]
    expected = stereotype_score(model, default_tokenizer, pairs, batch_size=32)
    _assert_score_matches_oracle(expected, model, default_tokenizer, pairs)
    want = expected.to_dict()
    for key in ("score", "n_pairs", "by_category", "by_order", "normalization"):
        assert stereo[key] == want[key], key
    assert stereo["ci95"] == pytest.approx(want["ci95"], rel=1e-12)
    assert stereo["mean_margin"] == pytest.approx(want["mean_margin"], rel=1e-9)
    # The breakdown adds up to the whole.
    cats = stereo["by_category"].values()
    assert sum(c["n_pairs"] for c in cats) == stereo["n_pairs"] == 6
    assert sum(c["score"] * c["n_pairs"] for c in cats) == pytest.approx(6 * stereo["score"])
