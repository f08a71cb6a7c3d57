from __future__ import annotations

import pytest
import torch

from quantlab.calib.stats import HessianAccumulator


def test_streaming_hessian_matches_direct_computation() -> None:
    torch.manual_seed(0)
    chunks = [torch.randn(3, 17, 24, dtype=torch.float64) for _ in range(5)]
    chunks.append(torch.randn(1, 5, 24, dtype=torch.float64))
    acc = HessianAccumulator(24)
    for c in chunks:
        acc.add(c.to(torch.bfloat16).float())  # any float dtype is accepted
    x = torch.cat([c.to(torch.bfloat16).double().reshape(-1, 24) for c in chunks])
    direct = 2 * x.t() @ x / x.shape[0]
    assert acc.n_tokens == x.shape[0]
    # fp32 accumulation of ~100 rows: relative error a few fp32 ulps of the entries' magnitude.
    torch.testing.assert_close(acc.hessian().double(), direct, rtol=1e-5, atol=1e-5)


def test_split_into_batches_does_not_change_the_result() -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 16)
    a, b = HessianAccumulator(16), HessianAccumulator(16)
    a.add(x)
    for part in x.split(7):
        b.add(part)
    torch.testing.assert_close(a.hessian(), b.hessian(), rtol=1e-5, atol=1e-6)


def test_wrong_width_and_empty_are_clear_errors() -> None:
    acc = HessianAccumulator(8)
    with pytest.raises(ValueError, match=r"expected inputs \[\.\.\., 8\]"):
        acc.add(torch.randn(2, 9))
    with pytest.raises(ValueError, match="no calibration tokens"):
        acc.hessian()


@pytest.mark.parametrize("group_size", [8, -1])
def test_channel_stats_match_direct_computation(group_size: int) -> None:
    from quantlab.calib.stats import ChannelStatsAccumulator

    torch.manual_seed(2)
    chunks = [torch.randn(2, 9, 24) * torch.linspace(0.1, 3, 24) for _ in range(4)]
    acc = ChannelStatsAccumulator(24, group_size)
    for c in chunks:
        acc.add(c)
    x = torch.cat([c.reshape(-1, 24) for c in chunks]).double()
    g = 24 if group_size == -1 else group_size
    assert acc.n_tokens == x.shape[0]
    torch.testing.assert_close(acc.abs_mean.double(), x.abs().mean(0), rtol=1e-5, atol=1e-6)
    for i in range(24 // g):
        xg = x[:, i * g : (i + 1) * g]
        # fp32 running averages of 72 rows: a few ulps of entries of size ~10.
        torch.testing.assert_close(
            acc.gram[i].double(), xg.t() @ xg / x.shape[0], rtol=1e-5, atol=1e-5
        )


def test_channel_stats_refuse_bad_input() -> None:
    from quantlab.calib.stats import ChannelStatsAccumulator

    with pytest.raises(ValueError, match="does not divide"):
        ChannelStatsAccumulator(24, 10)
    acc = ChannelStatsAccumulator(24, 8)
    with pytest.raises(ValueError, match="empty"):
        acc.check()
    with pytest.raises(ValueError, match=r"\[\.\.\., 24\]"):
        acc.add(torch.zeros(3, 16))
    acc.add(torch.full((2, 24), float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        acc.check()


def test_row_weights_count_a_row_as_often_as_its_weight() -> None:
    """Integer weights are exact repeats: weight 2 = the row twice, weight 0 = absent; the sum
    is normalised by the total weight and n_tokens still counts rows."""
    torch.manual_seed(2)
    x = torch.randn(9, 12)
    weights = torch.tensor([1.0, 2.0, 0.0, 3.0, 1.0, 0.0, 2.0, 1.0, 1.0])
    weighted = HessianAccumulator(12)
    weighted.add(x[:4], weights[:4])
    weighted.add(x[4:], weights[4:])
    repeated = HessianAccumulator(12)
    repeated.add(x.repeat_interleave(weights.long(), dim=0))
    assert weighted.n_tokens == 9 and weighted.weight == float(weights.sum())
    torch.testing.assert_close(weighted.hessian(), repeated.hessian(), rtol=1e-5, atol=1e-6)
    # A fractional weighting against the direct fp64 formula.
    w = torch.rand(9, dtype=torch.float64) + 0.1
    acc = HessianAccumulator(12)
    acc.add(x, w)
    direct = 2 * (x.double().t() * w) @ x.double() / w.sum()
    torch.testing.assert_close(acc.hessian().double(), direct, rtol=1e-5, atol=1e-6)


def test_bad_row_weights_are_clear_errors() -> None:
    acc = HessianAccumulator(4)
    with pytest.raises(ValueError, match="3 row weights for 2 input rows"):
        acc.add(torch.randn(2, 4), torch.ones(3))
    for bad in (torch.tensor([1.0, -0.5]), torch.tensor([1.0, float("nan")])):
        with pytest.raises(ValueError, match="finite and >= 0"):
            acc.add(torch.randn(2, 4), bad)
    acc.add(torch.randn(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="all 2 calibration rows of this layer had weight 0"):
        acc.hessian()
