"""PVQ on the real bundled SmolLM2-135M-Instruct, plus its config and command-line options."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from torch import nn

import quantlab
from quantlab.config import CalibConfig, config_from_dict
from quantlab.formats.pvq_codebook import PVQParams
from quantlab.methods.pvq import PVQConfig, candidate_params, model_bits_per_weight
from quantlab.methods.registry import get_method
from quantlab.models.arch import resolve
from quantlab.nn.pvq_linear import PVQLinear
from quantlab.nn.swap import set_submodule
from quantlab.transforms.rotation import random_signs, rotate

# The quantization test runs on the first two blocks of the real model (its real weights, 14
# linears, embeddings and head; the other 28 blocks dropped): the whole model takes minutes, and
# its full-size figures are in docs/methods/pvq.md.
BLOCKS = 2
CALIB = CalibConfig(n_samples=8, seq_len=256)


def _first_blocks(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.model.layers = model.model.layers[:BLOCKS]
    model.config.num_hidden_layers = BLOCKS
    return model


class _RotatedLinear(nn.Module):
    """``y = (W R^T)(R x) + b`` in fp32: the rotation a PVQ layer applies, without quantization."""

    def __init__(self, linear: nn.Linear, seed: int) -> None:
        super().__init__()
        self.signs = random_signs(linear.in_features, seed)
        self.weight = rotate(linear.weight.detach(), self.signs)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(rotate(x, self.signs), self.weight, self.bias)


@pytest.mark.model
def test_rotation_alone_leaves_the_logits_unchanged(default_model, eval_tokens) -> None:  # noqa: ANN001
    ids = eval_tokens[:128].unsqueeze(0)
    with torch.no_grad():
        before = default_model(ids).logits
    spec = resolve(default_model)
    count = 0
    for i, block in enumerate(default_model.model.layers):
        for name in spec.block_linears:
            set_submodule(block, name, _RotatedLinear(block.get_submodule(name), 1000 * i + count))
            count += 1
    with torch.no_grad():
        after = default_model(ids).logits
    assert count == 210
    rel = float((after - before).norm() / before.norm())
    assert rel < 1e-5, rel


@pytest.mark.model
def test_pvq_beats_gptq_w3_on_the_same_layers_and_reloads_exactly(
    default_model_path: Path, default_tokenizer, eval_tokens, tmp_path: Path
) -> None:  # noqa: ANN001
    pvq = _first_blocks(default_model_path)
    report = quantlab.quantize(
        pvq,
        "pvq",
        tokenizer=default_tokenizer,
        calib=CALIB,
        bits_per_weight=3.25,
        progress=False,
    )
    details = report.details["pvq"]
    # The choice on this model's weights (docs/methods/pvq.md): D=16, 28 pulses, 6 levels.
    assert (details["dim"], details["pulses"], details["levels"]) == (16, 28, 6)
    assert details["bits_per_weight"] <= 3.25
    layers = [m for m in pvq.modules() if isinstance(m, PVQLinear)]
    assert len(layers) == len(report.layers) == 14

    gptq = _first_blocks(default_model_path)
    gptq_report = quantlab.quantize(
        gptq, "gptq", default_tokenizer, CALIB, bits=3, group_size=64, progress=False
    )
    pvq_loss = sum(layer.loss for layer in report.layers)
    gptq_loss = sum(layer.loss for layer in gptq_report.layers)
    # At 3.22 bits/weight PVQ's output error on these layers is ~0.55x that of GPTQ W3 g64 at
    # 3.31 bits/weight (measured; re-measured 16.25 vs 24.32, 0.668x); 0.8x still fails if the
    # rotation or the feedback breaks.
    assert pvq_loss < 0.8 * gptq_loss, (pvq_loss, gptq_loss)

    # The truncated model's perplexity means nothing; the error of its last hidden states
    # against the float model's, on held-out text, is what the quantization changed.
    ids = eval_tokens[:512].unsqueeze(0)
    with torch.no_grad():
        ref = _first_blocks(default_model_path).model(ids).last_hidden_state
        pvq_err = float((pvq.model(ids).last_hidden_state - ref).norm() / ref.norm())
        gptq_err = float((gptq.model(ids).last_hidden_state - ref).norm() / ref.norm())
    # Measured 0.115 vs 0.171 (0.673x).
    assert pvq_err < 0.8 * gptq_err, (pvq_err, gptq_err)

    out = quantlab.save(pvq, str(tmp_path / "pvq"), report, default_tokenizer)
    loaded = quantlab.load(str(out))
    ids = eval_tokens[:200].unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, pvq(ids).logits)
    assert sum(isinstance(m, PVQLinear) for m in loaded.modules()) == 14


def test_config_round_trip_and_validation() -> None:
    config = PVQConfig(bits_per_weight=3.0, dims=(8, 16), hessian_search=True, search_moves=2)
    assert config_from_dict(config.to_dict()) == config
    assert config.describe() == "pvq <= 3 bits/weight hessian"
    assert PVQConfig(dim=16, pulses=28, levels=6).describe() == "pvq D=16 P=28 L=6 hessian"
    with pytest.raises(ValueError, match="bits_per_weight must be in"):
        PVQConfig(bits_per_weight=0.1)
    with pytest.raises(ValueError, match="pulses needs dim"):
        PVQConfig(pulses=28)
    with pytest.raises(ValueError, match="at most 63"):
        PVQConfig(dim=32, pulses=64, levels=1)
    with pytest.raises(ValueError, match="damp_percent"):
        PVQConfig(damp_percent=0.0)
    with pytest.raises(ValueError, match="hessian_search needs"):
        PVQConfig(hessian_search=True)


def test_command_line_options() -> None:
    method = get_method("pvq")
    parser = argparse.ArgumentParser()
    parser.add_argument("--damp-percent", type=float, default=0.01)
    parser.add_argument("--no-true-sequential", action="store_true")
    method.add_arguments(parser.add_argument_group("pvq"))
    args = parser.parse_args(["--bits-per-weight", "2.5", "--pvq-dim", "8", "--pvq-no-hessian"])
    config = method.config_from_args(args)
    assert config == PVQConfig(bits_per_weight=2.5, dim=8, hessian=False)
    args = parser.parse_args(["--pvq-hessian-search"])
    assert method.config_from_args(args).search_moves == 2


def test_candidates_respect_the_rate() -> None:
    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
    cands = candidate_params(shapes, 3.25, (8, 16))
    assert cands and all(c.bits_per_weight <= 3.25 for c in cands)
    assert {c.dim for c in cands} == {8, 16}
    assert (16, 28, 6) in {(c.dim, c.pulses, c.levels) for c in cands}
    # One more bit of code would break the target.
    assert model_bits_per_weight(shapes, PVQParams(16, 29, 6)) > 3.25
    with pytest.raises(ValueError, match="no PVQ encoding"):
        from quantlab.methods.pvq import choose_params

        choose_params([torch.randn(4, 100)], 3.25, (16,))
