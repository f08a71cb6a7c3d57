"""AWQ's scale and clip searches against direct (token-by-token) computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantlab.solvers.awq import (
    apply_clip,
    fake_quantize,
    linear_output_mse,
    output_mse,
    scale_candidates,
    search_clip,
    search_scales,
    weight_channel_mean,
)


def _outlier_inputs(tokens: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen)
    x[:, :: max(1, k // 8)] *= 20.0  # a few salient channels, as in LLM activations
    return x


def test_scale_candidates_are_centred_and_finite() -> None:
    x = torch.tensor([0.0, 1e-3, 1.0, 50.0])
    w = torch.tensor([0.5, 0.1, 0.9, 0.2])
    for alpha in (0.0, 0.35, 0.95):
        for wm in (None, w):
            s = scale_candidates(x, wm, alpha)
            assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
            torch.testing.assert_close(float((s.max() * s.min()).sqrt()), 1.0, rtol=1e-5, atol=0)
    assert torch.equal(scale_candidates(x, None, 0.0), torch.ones(4))


def test_weight_channel_mean_is_relative_to_each_group() -> None:
    w = torch.tensor([[1.0, -2.0, 4.0, 8.0]])
    # Groups of 2: [1, 2] / 2 and [4, 8] / 8 (up to the 1e-6 guard).
    torch.testing.assert_close(
        weight_channel_mean([w], 2), torch.tensor([0.5, 1.0, 0.5, 1.0]), rtol=1e-5, atol=0
    )


def test_linear_output_mse_equals_the_output_mse() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = _outlier_inputs(200, 64, 1)
    with torch.no_grad():
        reference = lin(x)
        fast = linear_output_mse(lin, x)
        slow = output_mse(lambda: lin(x), reference)
        lin.weight.copy_(fake_quantize(lin.weight, 3, 32))
        a, b = fast(), slow()
    # Both are fp32 means of the same squared errors, one through a Gram matrix (measured equal;
    # fp32 rounding allows a few 1e-7).
    assert a > 0 and abs(a - b) / b < 1e-5


@pytest.mark.parametrize("modes", [("duo",), ("plain",), ("plain", "duo")])
def test_scale_search_beats_plain_rounding_and_restores_weights(modes: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    lins = [nn.Linear(128, 96, bias=False), nn.Linear(128, 32, bias=False)]
    before = [lin.weight.detach().clone() for lin in lins]
    x = _outlier_inputs(512, 128, 2)
    with torch.no_grad():
        reference = torch.cat([lin(x) for lin in lins], dim=1)
    loss = output_mse(lambda: torch.cat([lin(x) for lin in lins], dim=1), reference)
    result = search_scales(lins, loss, x.abs().mean(0), 4, 64, n_grid=10, modes=modes)
    for lin, w in zip(lins, before, strict=True):
        assert torch.equal(lin.weight, w)
    assert result.alpha is not None and result.alpha > 0
    if len(modes) == 1:
        assert result.duo == (modes[0] == "duo")
    # Salient channels are protected by scaling: the loss must drop clearly (measured 0.56-0.57x).
    assert result.loss < 0.7 * result.base_loss, result.loss / result.base_loss
    # The result's loss is what the chosen scales give.
    s = result.scales
    with torch.no_grad():
        for lin, w in zip(lins, before, strict=True):
            lin.weight.copy_(fake_quantize(w * s, 4, 64) / s)
    torch.testing.assert_close(loss(), result.loss, rtol=1e-5, atol=0)


def test_coarse_to_fine_finds_the_full_grid_optimum_on_a_unimodal_loss() -> None:
    torch.manual_seed(3)
    lin = nn.Linear(128, 64, bias=False)
    x = _outlier_inputs(512, 128, 4)
    w0 = lin.weight.detach().clone()
    full = search_scales([lin], linear_output_mse(lin, x), x.abs().mean(0), 4, 64)
    lin.weight.data.copy_(w0)
    fast = search_scales(
        [lin], linear_output_mse(lin, x), x.abs().mean(0), 4, 64, coarse_to_fine=True
    )
    assert fast.alpha == full.alpha


def test_scale_search_refuses_bad_arguments() -> None:
    lin = nn.Linear(64, 8)
    x = torch.randn(16, 64)
    loss = linear_output_mse(lin, x)
    with pytest.raises(ValueError, match="modes"):
        search_scales([lin], loss, x.abs().mean(0), 4, 32, modes=("fancy",))
    with pytest.raises(ValueError, match=r"x_mean must be \[64\]"):
        search_scales([lin], loss, torch.ones(32), 4, 32)
    with pytest.raises(ValueError, match="bits"):
        search_scales([lin], loss, x.abs().mean(0), 5, 32)
    with pytest.raises(ValueError, match="does not divide"):
        search_scales([lin], loss, x.abs().mean(0), 4, 128)
    with pytest.raises(ValueError, match="NaN"):
        output_mse(lambda: x, torch.full((2, 2), float("nan")))


def _clip_reference(
    w: torch.Tensor, x: torch.Tensor, bits: int, g: int, max_shrink: float, n_grid: int
) -> torch.Tensor:
    """llm-awq's auto_clip, written out token by token: per row and group, the threshold whose
    clamped-and-rounded group gives the smallest mean squared partial dot product error."""
    n, k = w.shape
    best = torch.empty(n, k // g)
    for r in range(n):
        for j in range(k // g):
            wg = w[r, j * g : (j + 1) * g]
            xg = x[:, j * g : (j + 1) * g]
            org = wg.abs().max()
            errs = []
            for i in range(int(max_shrink * n_grid)):
                m = org * (1 - i / n_grid)
                q = fake_quantize(wg.clamp(-m, m).view(1, -1), bits, g).view(-1)
                errs.append(((xg @ q - xg @ wg) ** 2).mean().item())
            i_best = min(range(len(errs)), key=errs.__getitem__)
            best[r, j] = org * (1 - i_best / n_grid)
    return best


@pytest.mark.parametrize(("n", "k", "g", "bits"), [(8, 64, 32, 4), (5, 96, 32, 3), (3, 64, -1, 4)])
def test_clip_search_matches_the_token_by_token_definition(
    n: int, k: int, g: int, bits: int
) -> None:
    from quantlab.calib.stats import ChannelStatsAccumulator

    torch.manual_seed(n + k)
    w = torch.randn(n, k)
    w[:, 3] *= 6  # an outlier weight that clipping should trade away
    x = _outlier_inputs(300, k, 5)
    acc = ChannelStatsAccumulator(k, g)
    acc.add(x)
    got = search_clip(w, acc.gram, bits, g, rows_per_chunk=2)
    want = _clip_reference(w, x, bits, k if g == -1 else g, 0.5, 20)
    # Same candidates and the same objective in another summation order: ties between two
    # candidates within fp32 noise could flip, so require agreement on nearly all groups.
    agree = torch.isclose(got, want, rtol=1e-6).float().mean()
    assert agree >= 0.95
    assert bool((got < w.view(n, -1, k if g == -1 else g).abs().amax(-1) + 1e-6).all())


def test_apply_clip_clamps_each_group() -> None:
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, -3.0, 1.0, -1.0], [0.5, 2.0, -2.0, 0.1]]))
    apply_clip(lin, torch.tensor([[2.0, 0.5], [1.0, 1.5]]))
    expected = torch.tensor([[2.0, -2.0, 0.5, -0.5], [0.5, 1.0, -1.5, 0.1]])
    assert torch.equal(lin.weight.detach(), expected)
    with pytest.raises(ValueError, match="does not fit"):
        apply_clip(lin, torch.ones(3, 2))


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize(("bits", "g"), [(4, 64), (3, 32), (2, -1), (8, 128)])
def test_fake_quantize_is_exactly_rtn(bits: int, g: int, sym: bool) -> None:
    from quantlab.solvers.rtn import rtn_quantize

    torch.manual_seed(bits)
    w = torch.randn(48, 256) * torch.rand(48, 1) * 3
    w[0] = 0.0  # an all-zero row takes the [-1, 1] range
    w[1, :128] = w[1, :128].abs()  # all-positive groups: the range still includes 0
    for dtype in (torch.float16, torch.bfloat16):
        expected = rtn_quantize(w, bits, g, sym, dtype).dequantize()
        assert torch.equal(fake_quantize(w, bits, g, sym, dtype), expected)
