"""Fair-GPTQ on the real bundled SmolLM2-135M-Instruct, and the stereotype score from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantlab.calib.paired import PairStream, pair_batches
from quantlab.calib.pairs import load_pairs, split_pairs
from quantlab.cli import main
from quantlab.config import CalibConfig, GPTQConfig
from quantlab.eval.fairness import stereotype_score
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
    assert row["name"] == DEBIASED and row["bias_term_after"] < row["bias_term_before"]

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
    assert bias_fair < 0.5 * bias_gptq, (bias_fair, bias_gptq)

    # The debiased model still models text (one layer changed, mildly) and scores pairs.
    ids = torch.tensor(
        [default_tokenizer("The history of the city began in the year")["input_ids"]]
    )
    with torch.no_grad():
        loss_a = gptq(ids, labels=ids).loss.item()
        loss_b = fair(ids, labels=ids).loss.item()
    assert abs(loss_b - loss_a) < 0.05 * loss_a
    held = split_pairs(load_pairs(), "heldout")[:8]
    result = stereotype_score(fair, default_tokenizer, held)
    assert result.n_pairs == 8 and 0.0 <= result.score <= 1.0


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
    assert row["bias_term_after"] < row["bias_term_before"]
    assert _changed_modules(gptq_small, fair) == {DEBIASED}


def test_eval_reports_the_stereotype_score(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["eval", "--model", "default", "--prompt", "", "--fairness", "--fairness-max-pairs"]
    args += ["6", "--eval-windows", "1", "--eval-seq-len", "128", "--no-progress", "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    stereo = result["stereotype"]
    assert stereo["n_pairs"] == 6 and 0.0 <= stereo["score"] <= 1.0
    assert stereo["split"] == "heldout" and stereo["by_category"]
    assert "stereotype score" in captured.err
