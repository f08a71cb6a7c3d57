"""BitStack's math on one weight: scales, the absolute-value decomposition, the global order."""

from __future__ import annotations

import pytest
import torch

from quantlab.solvers.bitstack import (
    activation_scales,
    decompose,
    output_error,
    stage_major_order,
)


def _weight(n: int = 48, k: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * (torch.rand(1, k, generator=g) + 0.2)


def test_each_block_is_a_sign_times_a_rank_r_magnitude_of_the_residual() -> None:
    w = _weight()
    res = decompose(w, n_blocks=3, rank=2, svd="full")
    residual = w.clone()
    for b in range(3):
        # S_b = sign(R_b) with 0 -> +1, and u_b v_b is the best rank-2 fit of |R_b| (to fp16).
        assert torch.equal(res.positive[b], residual >= 0)
        u, s, vh = torch.linalg.svd(residual.abs(), full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        got = res.u[b] @ res.v[b]
        # fp16 storage of both factors: at most 2 * 2^-11 relative (measured 2.9e-4).
        assert (got - best).norm() <= 2.0**-10 * best.norm()
        assert torch.equal(res.u[b], res.u[b].half().float())
        residual = residual - torch.where(res.positive[b], 1.0, -1.0) * got
    # The stored blocks reproduce the residual chain exactly (rounded factors are subtracted).
    # fp32 sums of three terms of |w| < 4: measured 2.4e-7 apart.
    assert torch.allclose(w - res.dequantize(), residual, rtol=0, atol=1e-6)


def test_error_falls_with_every_block_and_lowrank_matches_full_svd() -> None:
    w = _weight(96, 80, seed=1)
    x = torch.randn(500, 80)
    h = 2 * x.t() @ x / 500
    full = decompose(w, 5, 4, hessian=h, svd="full")
    fast = decompose(w, 5, 4, hessian=h, svd="lowrank")
    assert len(full.errors) == 6
    assert full.errors[0] == pytest.approx(output_error(w, h), rel=1e-5)
    assert all(a > b for a, b in zip(full.errors, full.errors[1:], strict=False))
    # Five blocks of rank 4 leave 0.54% of the output energy (measured).
    assert full.errors[-1] < 0.01 * full.errors[0]
    # The randomized SVD (3 power iterations) is within a few percent of the exact one (measured
    # 0.99x to 1.019x per prefix).
    for a, b in zip(full.errors[1:], fast.errors[1:], strict=True):
        assert b <= 1.04 * a
    e = w - full.dequantize(2)
    assert full.errors[2] == pytest.approx(float(((e @ h) * e).sum()), rel=1e-6)


def test_decompose_is_deterministic_and_prefixes_are_consistent() -> None:
    w = _weight(40, 56, seed=2)
    a, b = decompose(w, 4, 3, seed=7), decompose(w, 4, 3, seed=7)
    assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v) and torch.equal(a.positive, b.positive)
    short = decompose(w, 2, 3, seed=7)
    assert torch.equal(short.u, a.u[:2]) and torch.equal(short.positive, a.positive[:2])


def test_activation_scales_follow_the_rms_and_are_normalised() -> None:
    x = torch.randn(1000, 6) * torch.tensor([1.0, 2.0, 4.0, 8.0, 0.5, 0.0])
    h = 2 * x.t() @ x / 1000
    s = activation_scales(h)
    assert float(s.log().mean()) == pytest.approx(0.0, abs=1e-5)
    rms = x.pow(2).mean(0).sqrt()
    ratio = s[:5] / rms[:5]
    assert torch.allclose(ratio, ratio[0].expand(5), rtol=1e-4)
    # A dead channel gets the floor, 1e-3 of the mean rms (over all 6 channels), not zero.
    assert float(s[5]) == pytest.approx(float(ratio[0] * 1e-3 * rms.mean()), rel=1e-4)
    half = activation_scales(h, alpha=0.5)
    assert torch.allclose(half[:5] / rms[:5].sqrt(), (half[0] / rms[0].sqrt()).expand(5), rtol=1e-4)


def test_stage_major_order_keeps_layers_within_one_block() -> None:
    scores = {"a": [1.0, 0.1, 5.0], "b": [2.0, 0.2], "c": [0.5, 9.0, 0.0]}
    order = stage_major_order(scores)
    assert order == [
        ("b", 1), ("a", 1), ("c", 1),
        ("c", 2), ("b", 2), ("a", 2),
        ("a", 3), ("c", 3),
    ]  # fmt: skip
    # Stage-major: block b of any layer comes before block b + 1 of every layer.
    stages = [block for _, block in order]
    assert stages == sorted(stages)


def test_bad_inputs_are_named() -> None:
    w = _weight(8, 8)
    with pytest.raises(ValueError, match="rank must be in \\[1, 8\\]"):
        decompose(w, 2, 9, name="layer")
    with pytest.raises(ValueError, match="n_blocks must be >= 1"):
        decompose(w, 0, 2)
    with pytest.raises(ValueError, match="svd must be one of"):
        decompose(w, 1, 2, svd="qr")
    with pytest.raises(ValueError, match="hessian must be \\[8, 8\\]"):
        decompose(w, 1, 2, hessian=torch.eye(4))
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer: weight has 1 NaN/Inf"):
        decompose(bad, 1, 2, name="layer")
    with pytest.raises(ValueError, match="NaN/Inf"):
        activation_scales(torch.full((3, 3), float("inf")))
    with pytest.raises(ValueError, match="NaN block score"):
        stage_major_order({"a": [float("nan")]})


def _correlated_hessian(k: int, seed: int = 3) -> torch.Tensor:
    # Correlated inputs with unequal channel scales: where error feedback has something to exploit.
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 0.5 * torch.randn(k, k, generator=g) / k**0.5
    x = (torch.randn(2048, k, generator=g) @ mix) * torch.linspace(0.2, 3.0, k)
    return 2 * x.t() @ x / x.shape[0]


def _gptq_error_feedback_signs(
    target: torch.Tensor, m: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    # GPTQ's column loop written out naively (no act-order, no lazy batches) on the binary grid.
    k = h.shape[0]
    hd = h + 0.01 * torch.diagonal(h).mean() * torch.eye(k)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    w = target.clone()
    pos = torch.empty_like(w, dtype=torch.bool)
    for j in range(k):
        pos[:, j] = (w[:, j] >= 0) == (m[:, j] >= 0)
        err = (w[:, j] - torch.where(pos[:, j], m[:, j], -m[:, j])) / upper[j, j]
        w[:, j:] -= err.unsqueeze(1) * upper[j, j:].unsqueeze(0)
    return pos


def test_feedback_signs_are_gptq_on_the_binary_grid() -> None:
    from quantlab.solvers.bitstack import _feedback_signs

    w, h = _weight(24, 160, seed=4), _correlated_hessian(160)
    m = w.abs().mean(0, keepdim=True).expand_as(w).contiguous()
    hd = h + 0.01 * torch.diagonal(h).mean() * torch.eye(160)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    # Lazy batches of 128 columns (160 = one full batch and a partial one) change nothing.
    assert torch.equal(_feedback_signs(w, m, upper), _gptq_error_feedback_signs(w, m, h))


def test_error_feedback_lowers_the_output_error_of_short_prefixes() -> None:
    w, h = _weight(64, 96, seed=5), _correlated_hessian(96)
    plain = decompose(w, 4, 2, hessian=h, svd="full")
    aware = decompose(w, 4, 2, hessian=h, svd="full", error_feedback=True)
    assert aware.errors[0] == plain.errors[0]
    # The short prefixes, where the quality matters, must beat the Hessian-blind decomposition in
    # calibration-output error; deep ones converge to it (measured on this matrix: within 3% at 4
    # blocks, either side), since each greedy block only sees its own residual.
    for b in range(1, 4):
        assert aware.errors[b] < 0.95 * plain.errors[b], (b, aware.errors, plain.errors)
    # The recorded errors are those of the stored (fp16) blocks.
    e = w - aware.dequantize(2)
    assert aware.errors[2] == pytest.approx(float(((e @ h) * e).sum()), rel=1e-6)
    assert torch.equal(aware.u, aware.u.half().float())


def test_row_gains_are_the_least_squares_optimum() -> None:
    from quantlab.solvers.bitstack import _row_gains

    g = torch.Generator().manual_seed(8)
    r, q = (torch.randn(5, 12, generator=g) for _ in range(2))
    h = _correlated_hessian(12, seed=9)

    def loss(c: torch.Tensor) -> torch.Tensor:
        e = r - c.unsqueeze(1) * q
        return ((e @ h) * e).sum(1)

    c = _row_gains(r, q, h)
    for delta in (1e-2, -1e-2):
        assert bool((loss(c) <= loss(c + delta)).all())


def test_error_feedback_needs_a_hessian() -> None:
    with pytest.raises(ValueError, match="layer: error_feedback needs the layer's hessian"):
        decompose(_weight(8, 8), 2, 2, error_feedback=True, name="layer")
