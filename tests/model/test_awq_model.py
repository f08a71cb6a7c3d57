"""AWQ on the real bundled SmolLM2-135M-Instruct."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import quantlab
from quantlab.calib.data import load_text, token_stream
from quantlab.config import CalibConfig
from quantlab.eval.perplexity import perplexity
from quantlab.export.awq_checkpoint import save_awq

pytestmark = pytest.mark.model

CALIB = CalibConfig(n_samples=8, seq_len=256)


@pytest.fixture(scope="module")
def eval_tokens(default_tokenizer) -> torch.Tensor:  # noqa: ANN001
    return token_stream(default_tokenizer, load_text("wiki-eval"))


def _ppl(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    return perplexity(model, tokens, seq_len=512, max_windows=2, progress=False).ppl


def test_awq_w4_beats_rtn_and_round_trips_through_the_awq_layout(
    default_model_path: Path, default_tokenizer, eval_tokens, tmp_path: Path
) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    def fresh() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()

    rtn = fresh()
    quantlab.quantize(rtn, "rtn", bits=4, group_size=64, progress=False)
    awq = fresh()
    report = quantlab.quantize(
        awq,
        "awq",
        tokenizer=default_tokenizer,
        calib=CALIB,
        bits=4,
        group_size=64,
        search_samples=4,
        coarse_to_fine=True,
        progress=False,
    )
    maps = report.details["awq"]["maps"]
    # SmolLM2 uses grouped-query attention: v -> o cannot fold, the other 3 maps per block do.
    assert len(maps) == 30 * 3 and len(report.details["awq"]["skipped_maps"]) == 30
    assert all(m["loss"] <= m["base_loss"] for m in maps)
    rtn_ppl, awq_ppl = _ppl(rtn, eval_tokens), _ppl(awq, eval_tokens)
    # Full-size runs: RTN 25.66, AWQ 22.52 (docs/results.md), 0.88x. This 2k-token calibration and
    # 1k-token evaluation measured 29.80 vs 33.19 (0.90x); 0.96x still fails if scaling or
    # clipping stops helping.
    assert awq_ppl < 0.96 * rtn_ppl, (awq_ppl, rtn_ppl)

    out = save_awq(awq, tmp_path / "awq", report.config, default_tokenizer)
    loaded = quantlab.load(str(out))
    ids = eval_tokens[:200].unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, awq(ids).logits)


@pytest.mark.slow
def test_awq_w4_g64_full_eval_beats_llm_compressor(
    default_model, default_tokenizer, eval_tokens
) -> None:  # noqa: ANN001
    """Issue #4's acceptance figure: ppl <= 23.4 on 10 x 2048 eval tokens with the default
    32 x 512 calibration (llm-compressor AWQ 23.41)."""
    quantlab.quantize(
        default_model, "awq", tokenizer=default_tokenizer, bits=4, group_size=64, progress=False
    )
    ppl = perplexity(default_model, eval_tokens, seq_len=2048, max_windows=10, progress=False).ppl
    assert ppl <= 23.4
