"""Wall time to quantize the bundled SmolLM2-135M (30 blocks) on this machine.

Peers on the same 2-core CPU with 32 x 512 calibration tokens (docs/benchmarks.md): GPTQModel
158 s, llm-compressor GPTQ 117 s, llm-compressor AWQ ~14-19 min. RTN is the in-run baseline.
One round each: these take tens of seconds.
"""

from __future__ import annotations

import pytest
import torch

import quantlab


@pytest.fixture(scope="module")
def model_dir():  # noqa: ANN201
    from quantlab.export.default_model import default_model_dir

    return default_model_dir()


def _fresh(model_dir):  # noqa: ANN001, ANN202
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_default_model(benchmark, model_dir, method: str) -> None:  # noqa: ANN001
    benchmark.group = "quantize SmolLM2-135M W4 g64 (32 x 512 calibration tokens)"

    def setup():  # noqa: ANN202
        model, tok = _fresh(model_dir)
        return (model, method), {"tokenizer": tok, "bits": 4, "group_size": 64, "progress": False}

    benchmark.pedantic(quantlab.quantize, setup=setup, rounds=1, iterations=1)
