"""Helpers of the real-model tests (tests/model): the shared evaluations and a fresh model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import quantlab
from quantlab.eval.perplexity import perplexity
from quantlab.export.checkpoint_files import CheckpointFiles
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


@torch.no_grad()
def first_q_proj_loss(
    float_model: torch.nn.Module, quantized: torch.nn.Module, samples: torch.Tensor
) -> float:
    """Oracle of the solver loss reported for ``model.layers.0.self_attn.q_proj``: its inputs are
    the float model's (nothing is quantized before it), the embedding of ``samples`` through block
    0's input norm, so ``H = 2 X X^T / n`` and ``tr((W - Q) H (W - Q)^T) / 2`` are computed here
    directly, in fp64."""
    block = float_model.model.layers[0]
    x = block.input_layernorm(float_model.model.embed_tokens(samples)).double()
    x = x.reshape(-1, x.shape[-1])
    h = 2.0 * x.t() @ x / x.shape[0]
    w = block.self_attn.q_proj.weight.double()
    q = quantized.model.layers[0].self_attn.q_proj.dequantized_weight().double()
    e = w - q
    return float(torch.trace(e @ h @ e.t())) / 2.0


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory (one file or shards), by name."""
    with CheckpointFiles(path) as files:
        return {name: files.get(name) for name in files.tensors}
