from __future__ import annotations

import pytest
import torch
from torch import nn

from quantlab.models.arch import (
    UnsupportedArchitectureError,
    get_submodule,
    resolve,
    smooth_maps_for,
)
from quantlab.transforms.fold import fold_input_scales, fold_smooth_map, smooth_map_applies
from tests.families import FAMILIES, tiny_model


def _fold_everywhere(model: nn.Module, seed: int) -> int:
    spec = resolve(model)
    gen = torch.Generator().manual_seed(seed)
    folded = 0
    for block in get_submodule(model, spec.blocks):
        for smooth in spec.smooth_maps:
            if not smooth_map_applies(block, smooth):
                continue
            k = block.get_submodule(smooth.linears[0]).in_features
            # Log-normal scales spanning ~e^-1.5 .. e^1.5, like AWQ's.
            s = torch.exp(0.5 * torch.randn(k, generator=gen))
            fold_smooth_map(block, smooth, s, spec.norm_weight_offset)
            folded += 1
    return folded


def test_folding_preserves_the_tiny_model_including_linear_to_linear(tiny_llama: nn.Module) -> None:
    tiny_llama.config.num_key_value_heads = tiny_llama.config.num_attention_heads
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama.config).eval()  # no GQA: v_proj -> o_proj folds too
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        ref = model(x).logits
    assert _fold_everywhere(model, seed=1) == 2 * 4
    with torch.no_grad():
        out = model(x).logits
    # fp32 reassociation noise only: measured 4.8e-7 relative.
    assert float((out - ref).norm() / ref.norm()) < 1.5e-6


@pytest.mark.model
def test_folding_alone_keeps_the_real_model_within_1e_4(default_model: nn.Module) -> None:
    """Issue #4's requirement: folding changes logits by < 1e-4 relative (fp32)."""
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = default_model(ids).logits
    # SmolLM2 uses grouped-query attention (v_proj 192 wide, o_proj 576): that map is skipped.
    assert _fold_everywhere(default_model, seed=2) == 30 * 3
    with torch.no_grad():
        out = default_model(ids).logits
    assert float((out - ref).norm() / ref.norm()) < 1e-4


def test_bad_scales_are_refused() -> None:
    norm, lin = nn.LayerNorm(8), nn.Linear(8, 4)
    with pytest.raises(ValueError, match="finite and positive"):
        fold_input_scales(norm, [lin], torch.tensor([1.0] * 7 + [0.0]))
    with pytest.raises(ValueError, match="produces 8 channels, scales have 6"):
        fold_input_scales(norm, [lin], torch.ones(6))


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_family_folds_without_changing_its_output(model_type: str, gqa: bool) -> None:
    model = tiny_model(model_type, gqa)
    spec = resolve(model)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits
    folded = _fold_everywhere(model, seed=3)
    # Every map folds except v -> o (and Phi-3's fused qkv -> o) under grouped-query attention;
    # OPT has no GQA option.
    per_block = len(spec.smooth_maps) - (1 if gqa and model_type != "opt" else 0)
    assert folded == 2 * per_block
    with torch.no_grad():
        out = model(x).logits
    # fp32 forward of a 2-block model: reassociation noise, measured 1.4e-7 to 7.1e-7 relative
    # over the families (a wrongly folded channel is orders of magnitude more).
    assert float((out - ref).norm() / ref.norm()) < 1.5e-6


def test_post_norm_opt_has_no_smoothing_maps() -> None:
    model = tiny_model("opt")
    model.config.do_layer_norm_before = False
    with pytest.raises(UnsupportedArchitectureError, match="do_layer_norm_before"):
        smooth_maps_for(model, resolve(model))


def test_sliced_fold_scales_only_the_last_slice() -> None:
    prev, nxt = nn.Linear(8, 3 * 4), nn.Linear(4, 5)
    w_prev = prev.weight.detach().clone()
    fold_input_scales(prev, [nxt], torch.full((4,), 2.0), prev_slices=3)
    assert torch.equal(prev.weight[:8], w_prev[:8])
    torch.testing.assert_close(prev.weight[8:], w_prev[8:] / 2)
    with pytest.raises(ValueError, match="x 2 slices"):
        fold_input_scales(prev, [nxt], torch.ones(4), prev_slices=2)
