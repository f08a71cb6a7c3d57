"""GPTQ on the real bundled SmolLM2-135M-Instruct."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import quantlab
from quantlab.config import CalibConfig
from quantlab.export.gptq_checkpoint import save_gptq
from quantlab.methods.base import calibration_samples_for
from tests.model_helpers import (
    QuantizedModel,
    first_q_proj_loss,
    fresh_default_model,
    full_ppl,
    quantize_default,
)

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def gptq_w4(default_model_path: Path, default_tokenizer, eval_tokens) -> QuantizedModel:  # noqa: ANN001
    """GPTQ W4 g64 with the default 32 x 512 calibration, shared by this module's tests."""
    return quantize_default(
        default_model_path, default_tokenizer, eval_tokens, "gptq", bits=4, group_size=64
    )


def test_gptq_w4_beats_rtn_and_exports_in_gptq_layout(
    gptq_w4: QuantizedModel,
    rtn_w4: QuantizedModel,
    default_model_path: Path,
    default_tokenizer,  # noqa: ANN001
    eval_tokens,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    layers = gptq_w4.report.layers
    assert len(layers) == 30 * 7 and all(layer.loss is not None for layer in layers)
    # The first layer's reported loss against the proxy loss recomputed here from its float
    # weight, its quantized weight and its inputs (the calibration windows through the embedding
    # and block 0's norm; fp32 Hessian accumulation in the solver).
    assert layers[0].name == "model.layers.0.self_attn.q_proj"
    float_model = fresh_default_model(default_model_path)
    samples = calibration_samples_for(default_tokenizer, CalibConfig(), "gptq", None)
    oracle = first_q_proj_loss(float_model, gptq_w4.model, samples)
    # Measured 6e-8 apart; one code of the 331,776 off by one step moves the loss by 1.3e-5
    # (median over positions).
    assert layers[0].loss == pytest.approx(oracle, rel=2e-6)
    # Full evaluation: GPTQ 23.19 vs RTN 25.66 (0.90x, docs/results.md); these 1k tokens measured
    # 30.47 vs 33.19 (0.918x; re-measured 31.04, 0.935x); 0.96x fails if the error feedback stops
    # helping (RTN is 1.0x).
    assert gptq_w4.short_ppl < 0.96 * rtn_w4.short_ppl, (gptq_w4.short_ppl, rtn_w4.short_ppl)

    out, _ = save_gptq(gptq_w4.model, tmp_path / "gptq", gptq_w4.report.config, default_tokenizer)
    loaded = quantlab.load(str(out))
    ids = eval_tokens[:200].unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, gptq_w4.model(ids).logits)


@pytest.mark.slow
def test_gptq_w4_g64_full_eval_beats_the_peers(gptq_w4: QuantizedModel, eval_tokens) -> None:  # noqa: ANN001
    """Below every peer on the same calibration ids and eval windows
    (scripts/peers/run_peers.py, 2026-12-05: llm-compressor GPTQ 23.80, HQQ 23.89, GPTQModel
    24.15; quantlab measured 23.19)."""
    assert full_ppl(gptq_w4.model, eval_tokens) < 23.79
