from __future__ import annotations

import pytest
import torch

from quantlab.solvers.rtn import group_params, rtn_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_error_is_at_most_half_a_step(bits: int, sym: bool) -> None:
    torch.manual_seed(bits)
    w = torch.randn(16, 128)
    r = rtn_quantize(w, bits, 32, sym)
    err = (r.dequantize() - w).view(16, 4, 32).abs()
    step = r.scales.unsqueeze(-1)
    maxq = (1 << bits) - 1
    assert int(r.q.min()) >= 0 and int(r.q.max()) <= maxq
    if sym:
        # The symmetric grid [-2^(b-1), 2^(b-1)-1] clips +amax by up to one step.
        assert bool((err <= step * 1.0 + 1e-6).all())
    else:
        # The fp16-rounded scale (relative error <= 2^-11) can move the grid's far end by up to
        # maxq * 2^-11 steps, so the extreme weight may sit that much past half a step.
        assert bool((err <= step * (0.5 + maxq * 2.0**-11) + 1e-6).all())


def test_asymmetric_zero_point_keeps_zero_exact() -> None:
    w = torch.tensor([[0.0, 0.3, 0.7, 1.0] * 8])
    r = rtn_quantize(w, 4, 32, sym=False)
    assert float(r.dequantize()[0, 0]) == 0.0


def test_all_zero_group_does_not_divide_by_zero() -> None:
    scale, zero = group_params(torch.zeros(3, 32), 4, sym=False)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    assert torch.equal(rtn_quantize(torch.zeros(2, 32), 4, 32).dequantize(), torch.zeros(2, 32))


def test_symmetric_zero_point_is_half_range() -> None:
    w = torch.randn(4, 64)
    r = rtn_quantize(w, 4, 64, sym=True)
    assert r.zeros is None
    manual = (r.q.float() - 8) * r.scales  # one group per row: scales [4, 1]
    assert torch.equal(r.dequantize(), manual)
    amax = w.abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(r.scales, (2 * amax / 15).half().float())


def test_scales_are_fp16_representable() -> None:
    r = rtn_quantize(torch.randn(8, 64) * 3, 4, 32)
    assert torch.equal(r.scales, r.scales.half().float())


def test_nan_weight_is_refused_with_the_layer_name() -> None:
    w = torch.randn(4, 64)
    w[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.3\.q_proj: weight has 1 NaN/Inf"):
        rtn_quantize(w, 4, 32, name="blocks.3.q_proj")


def test_group_size_that_does_not_divide_is_refused() -> None:
    match = "group_size 128 does not divide in_features 576 of l0.*\\[-1, 32, 64\\]"
    with pytest.raises(ValueError, match=match):
        rtn_quantize(torch.randn(4, 576), 4, 128, name="l0")


def test_fp16_scale_overflow_is_reported() -> None:
    with pytest.raises(ValueError, match="overflows"):
        rtn_quantize(torch.full((1, 32), 1e7), 2, 32)


@pytest.mark.parametrize(("group", "sym", "clip"), [(32, False, False), (-1, True, True)])
def test_row_chunks_give_the_whole_layer_result(
    monkeypatch: pytest.MonkeyPatch, group: int, sym: bool, clip: bool
) -> None:
    """A large layer is quantized a chunk of rows at a time (bounded temporaries); chunks of 3
    rows (ragged last chunk) must give exactly the one-chunk result."""
    from quantlab.solvers import rtn

    w = torch.randn(10, 64, generator=torch.Generator().manual_seed(5)) * 3
    whole = rtn_quantize(w, 4, group, sym, clip_search=clip)
    monkeypatch.setattr(rtn, "_RTN_CHUNK_WEIGHTS", 3 * 64)
    chunked = rtn_quantize(w, 4, group, sym, clip_search=clip)
    assert torch.equal(chunked.q, whole.q) and torch.equal(chunked.scales, whole.scales)
    assert (chunked.zeros is None) == sym
    if not sym:
        assert torch.equal(chunked.zeros, whole.zeros)
