"""A mixture of experts with real weights: the bundled SmolLM2 split into 8 experts per MLP
(scripts/moefy.py), which computes the dense model's function; quantized like the dense model,
it must give the same weights where the arithmetic is the same.

The perplexity figures of RTN, GPTQ and AWQ on it against the dense model are in
docs/results.md (bench/moe/moefied_quality.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantlab.export.model_source import load_model
from quantlab.methods.rtn import RTNConfig
from quantlab.models.moe import RoutedExperts
from quantlab.pipeline import quantize_model
from scripts.moefy import expert_output_norms, fit_routers, mixtral_config, moefy, moefy_state

pytestmark = pytest.mark.model

EXPERTS = 8


@pytest.fixture(scope="module")
def moefied(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return moefy(default_model_path, tmp_path_factory.mktemp("moefied"), EXPERTS)


def _windows(eval_tokens: torch.Tensor) -> torch.Tensor:
    return eval_tokens[: 2 * 256].view(2, 256)


def test_the_moefied_model_computes_the_dense_models_function(
    default_model_path: Path, moefied: Path, eval_tokens: torch.Tensor
) -> None:
    from safetensors import safe_open

    with safe_open(moefied / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert not any(".mlp." in key for key in keys)
    dense = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    moe = load_model(str(moefied)).model
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert isinstance(moe.model.layers[5].block_sparse_moe.experts, RoutedExperts)
    ids = _windows(eval_tokens)
    with torch.no_grad():
        want = dense(ids).logits
        got = moe(ids).logits
    # The same products; only the order of the sum over the 1536 intermediate neurons may
    # change (measured: identical here). Logits span about +-30.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)


def test_rtn_quantizes_each_expert_as_the_dense_rows_it_came_from(
    default_model_path: Path, moefied: Path, eval_tokens: torch.Tensor
) -> None:
    """RTN W4 g64: an expert's gate/up rows are dense rows; its down columns are 3 whole groups
    of the dense rows, times 8 (a power of two: the same codes and zero points, scales times 8
    exactly). So every dequantized expert weight is the dense one's slice, bit for bit."""
    config = RTNConfig(bits=4, group_size=64)
    dense = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    moe = load_model(str(moefied)).model
    quantize_model(dense, config, progress=False)
    report = quantize_model(moe, config, progress=False)
    assert len(report.layers) == 30 * (4 + 3 * EXPERTS)
    width = 1536 // EXPERTS
    for d, m in zip(dense.model.layers, moe.model.layers, strict=True):
        gate = d.mlp.gate_proj.dequantized_weight()
        up = d.mlp.up_proj.dequantized_weight()
        down = d.mlp.down_proj.dequantized_weight()
        for e in range(EXPERTS):
            expert = m.block_sparse_moe.experts.expert(e)
            rows = slice(e * width, (e + 1) * width)
            assert torch.equal(expert.w1.dequantized_weight(), gate[rows])
            assert torch.equal(expert.w3.dequantized_weight(), up[rows])
            assert torch.equal(expert.w2.dequantized_weight() / EXPERTS, down[:, rows])
    ids = _windows(eval_tokens)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=0, atol=1e-3)


def test_a_routed_moefied_models_routers_fit_the_experts_output_norms(
    default_model_path: Path, eval_tokens: torch.Tensor
) -> None:
    """scripts/moefy.py --top-k K --fit-router (the model routing-weighted Hessians are measured
    on): each router is the least-squares fit, on wiki-calib, of the experts' centred log output
    norms from the MLP input, so on wiki-eval tokens it explains part of them (a transposed or
    misaligned fit explains nothing), and the state scales the down projections by K."""
    routers = fit_routers(default_model_path, EXPERTS, windows=4, seq_len=512)
    dense = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    ids = _windows(eval_tokens)
    layers = (0, 29)
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        dense.model.layers[i].mlp.register_forward_pre_hook(
            lambda _m, args, i=i: seen.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]))
        )
        for i in layers
    ]
    with torch.no_grad():
        dense(ids)
        for hook in hooks:
            hook.remove()
        for i in layers:
            target = expert_output_norms(dense.model.layers[i].mlp, seen[i], EXPERTS).log()
            target -= target.mean(dim=1, keepdim=True)
            predicted = seen[i] @ routers[i].t()
            explained = 1 - float((predicted - target).pow(2).sum() / target.pow(2).sum())
            # Measured 0.76 / 0.53 (the middle layers' norms are harder: 0.2 at layer 15); a
            # zero router explains 0, a transposed or misaligned one less.
            assert explained > 0.4, (i, explained)
    state = dict(dense.state_dict())
    routed = moefy_state(state, 30, EXPERTS, top_k=2, routers=routers)
    moe = "model.layers.3.block_sparse_moe"
    assert torch.equal(routed[f"{moe}.gate.weight"], routers[3])
    down = state["model.layers.3.mlp.down_proj.weight"]
    assert torch.equal(routed[f"{moe}.experts.1.w2.weight"], down[:, 192:384] * 2)
    config = mixtral_config(json.loads((default_model_path / "config.json").read_text()), 8, 2)
    assert config["num_experts_per_tok"] == 2 and config["num_local_experts"] == 8
    with pytest.raises(ValueError, match="zero router routes every token alike"):
        moefy(default_model_path, Path("unused"), EXPERTS, top_k=2)
    with pytest.raises(ValueError, match="router_scale scales a fitted router"):
        moefy(default_model_path, Path("unused"), EXPERTS, router_scale=0.25)
