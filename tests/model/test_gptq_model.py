"""GPTQ on the real bundled SmolLM2-135M-Instruct."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import quantlab
from quantlab.calib.data import load_text, token_stream
from quantlab.config import CalibConfig
from quantlab.eval.perplexity import perplexity
from quantlab.export.gptq_checkpoint import save_gptq

pytestmark = pytest.mark.model

# A small calibration set keeps this test near half a minute on 2 cores.
CALIB = CalibConfig(n_samples=8, seq_len=256)


@pytest.fixture(scope="module")
def eval_tokens(default_tokenizer) -> torch.Tensor:  # noqa: ANN001
    return token_stream(default_tokenizer, load_text("wiki-eval"))


def _ppl(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    return perplexity(model, tokens, seq_len=512, max_windows=2, progress=False).ppl


def test_gptq_w3_beats_rtn_w3_and_exports_in_gptq_layout(
    default_model_path: Path, default_tokenizer, eval_tokens, tmp_path: Path
) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    def fresh() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()

    rtn = fresh()
    quantlab.quantize(rtn, "rtn", bits=3, group_size=64, progress=False)
    gptq = fresh()
    report = quantlab.quantize(
        gptq,
        "gptq",
        tokenizer=default_tokenizer,
        calib=CALIB,
        bits=3,
        group_size=64,
        progress=False,
    )
    assert all(layer.loss is not None and layer.loss >= 0 for layer in report.layers)
    rtn_ppl, gptq_ppl = _ppl(rtn, eval_tokens), _ppl(gptq, eval_tokens)
    # 3-bit RTN collapses on this model. With the full 16k-token calibration GPTQ reaches 0.62x
    # RTN's ppl (38.4 vs 62.3, docs/results.md); this 2k-token calibration measured 0.63x, so 0.75x
    # leaves room for platform noise while still failing if the error feedback stops working.
    assert gptq_ppl < 0.75 * rtn_ppl, (gptq_ppl, rtn_ppl)

    out, fmt = save_gptq(gptq, tmp_path / "gptq", report.config, default_tokenizer)
    loaded = quantlab.load(str(out))
    ids = eval_tokens[:200].unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, gptq(ids).logits)


@pytest.mark.slow
def test_gptq_w4_g64_full_eval_beats_the_peers(
    default_model, default_tokenizer, eval_tokens
) -> None:  # noqa: ANN001
    """Issue #3's acceptance figure: ppl <= 23.9 on 10 x 2048 eval tokens with the default
    32 x 512 calibration (peers: llm-compressor 24.03, GPTQModel 24.25; quantlab measured 23.19)."""
    quantlab.quantize(
        default_model, "gptq", tokenizer=default_tokenizer, bits=4, group_size=64, progress=False
    )
    ppl = perplexity(default_model, eval_tokens, seq_len=2048, max_windows=10, progress=False).ppl
    assert ppl <= 23.9
