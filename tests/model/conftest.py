"""Fixtures shared by the real-model tests.

Quantizing SmolLM2 and evaluating it on 10 x 2048 tokens are the slow steps of the suite, so each
method's model is quantized once per module and the W4 RTN baseline once per session; the tests
only read them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantlab.calib.data import load_text, token_stream
from tests.model_helpers import QuantizedModel, quantize_default


@pytest.fixture(scope="session")
def eval_tokens(default_tokenizer) -> torch.Tensor:  # noqa: ANN001
    return token_stream(default_tokenizer, load_text("wiki-eval"))


@pytest.fixture(scope="session")
def rtn_w4(default_model_path: Path, eval_tokens: torch.Tensor) -> QuantizedModel:
    """RTN W4 g64: the baseline every W4 method must beat."""
    return quantize_default(default_model_path, None, eval_tokens, "rtn", bits=4, group_size=64)
