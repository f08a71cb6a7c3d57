from __future__ import annotations

import pytest
import torch
from torch import nn

from quantlab.fold import fold_input_scales, smooth_map_applies
from quantlab.models.arch import get_submodule, resolve


def _fold_everywhere(model: nn.Module, seed: int) -> int:
    spec = resolve(model)
    gen = torch.Generator().manual_seed(seed)
    folded = 0
    for block in get_submodule(model, spec.blocks):
        for smooth in spec.smooth_maps:
            if not smooth_map_applies(block, smooth):
                continue
            linears = [block.get_submodule(n) for n in smooth.linears]
            # Log-normal scales spanning ~e^-1.5 .. e^1.5, like AWQ's.
            s = torch.exp(0.5 * torch.randn(linears[0].in_features, generator=gen))
            fold_input_scales(block.get_submodule(smooth.prev), linears, s, spec.norm_weight_offset)
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
    assert float((out - ref).norm() / ref.norm()) < 1e-5


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
