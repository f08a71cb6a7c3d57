"""Helpers of the real-model tests (tests/model): the shared evaluations and a fresh model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import quantlab
from quantlab.eval.perplexity import perplexity
from quantlab.pipeline import QuantizationReport


@dataclass
class QuantizedModel:
    """A quantized default model, its report, and its short-evaluation ppl."""

    model: torch.nn.Module
    report: QuantizationReport
    short_ppl: float


def short_ppl(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    """ppl on the first 2 x 512 evaluation tokens: enough to separate methods by a few percent."""
    return perplexity(model, tokens, seq_len=512, max_windows=2, progress=False).ppl


def full_ppl(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    """The project's headline evaluation: 10 x 2048 tokens of wiki-eval (docs/results.md)."""
    return perplexity(model, tokens, seq_len=2048, max_windows=10, progress=False).ppl


def fresh_default_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def quantize_default(
    path: Path, tokenizer: object, tokens: torch.Tensor, method: str, **options: object
) -> QuantizedModel:
    """A fresh default model quantized with ``method`` (default 32 x 512 calibration), with its
    report and short-evaluation ppl."""
    model = fresh_default_model(path)
    report = quantlab.quantize(model, method, tokenizer=tokenizer, progress=False, **options)
    return QuantizedModel(model, report, short_ppl(model, tokens))


@torch.no_grad()
def kl_to(teacher: torch.nn.Module, student: torch.nn.Module, ids: torch.Tensor) -> float:
    """Mean per-token ``KL(teacher || student)`` of the next-token distributions on ``ids``."""
    import torch.nn.functional as F

    target = F.log_softmax(teacher(ids).logits, -1)
    got = F.log_softmax(student(ids).logits, -1)
    return float(F.kl_div(got, target, log_target=True, reduction="none").sum(-1).mean())
