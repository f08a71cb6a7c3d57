"""Fair-GPTQ's group-bias term in the GPTQ solver.

The shift is checked against its definition (the minimiser of the damped objective, in fp64), the
rounding against GPTQ on the shifted target, and the whole against plain GPTQ: same result bit for
bit without the term, a smaller group-bias term with it.
"""

from __future__ import annotations

import pytest
import torch

from quantlab.solvers.fair_gptq import (
    bias_subspace,
    debias_shift,
    fair_gptq_quantize,
    group_bias_term,
)
from quantlab.solvers.gptq import gptq_quantize
from quantlab.solvers.hessian import proxy_loss
from quantlab.solvers.rtn import group_params
from tests.tolerances import FAIR_SHIFT_RTOL

DAMP = 0.01


def _problem(n: int = 48, k: int = 128, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Weight, H = 2XX^T/t of correlated inputs, D = 2 DD^T/m of low-rank pair differences."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, 32, generator=g) @ torch.randn(32, 512, generator=g)
    x = x + 0.3 * torch.randn(k, 512, generator=g)
    h = (2.0 * x.double() @ x.double().t() / 512).float()
    # Pair differences live in a few directions (the group word's), as in real pair data.
    delta = torch.randn(k, 3, generator=g) @ torch.randn(3, 64, generator=g)
    d = (2.0 * delta.double() @ delta.double().t() / 64).float()
    w = torch.randn(n, k, generator=g) * 0.05
    return w, h, d


def _relative_error(v: torch.Tensor, want: torch.Tensor, w: torch.Tensor) -> float:
    """Error of the computed target, relative to the size of the shift itself."""
    return float((v.double() - want).norm() / (want - w.double()).norm())


def _damped(m: torch.Tensor) -> torch.Tensor:
    m = m.double().clone()
    m.diagonal().add_(DAMP * m.diagonal().mean())
    return m


@pytest.mark.parametrize("alpha", [0.1, 1.0, 10.0])
def test_shift_minimises_the_damped_objective(alpha: float) -> None:
    """V = W - W aD (H + aD + l)^-1 zeroes the gradient of
    tr((V - W) H (V - W)^T) + a tr(V D V^T) + l ||V - W||^2, with l the damping of H + aD."""
    w, h, d = _problem()
    v = debias_shift(w, h, d, alpha, DAMP).double()
    h2 = h.double() + alpha * d.double()
    lam = DAMP * float(h2.diagonal().mean())
    grad = (v - w.double()) @ h.double() + alpha * v @ d.double() + lam * (v - w.double())
    scale = (w.double() @ h2).abs().max()
    assert float(grad.abs().max() / scale) < FAIR_SHIFT_RTOL
    want = w.double() - w.double() @ (alpha * d.double()) @ torch.linalg.inv(_damped(h2))
    assert _relative_error(v, want, w) < FAIR_SHIFT_RTOL


def test_first_order_shift_inverts_h_only() -> None:
    w, h, d = _problem(seed=1)
    v = debias_shift(w, h, d, 1.0, DAMP, sum_hessians=False).double()
    want = w.double() - w.double() @ d.double() @ torch.linalg.inv(_damped(h.double()))
    assert _relative_error(v, want, w) < FAIR_SHIFT_RTOL


def test_shift_removes_the_pair_difference_as_alpha_grows() -> None:
    w, h, d = _problem(seed=2)
    terms = [group_bias_term(debias_shift(w, h, d, a, DAMP), d) for a in (0.0, 0.1, 1.0, 10.0)]
    assert terms == sorted(terms, reverse=True)
    # D is low rank, so the term falls ~(damping / alpha)^2: measured 2.1e-3, 2.6e-5 and 6.4e-7
    # of the undebiased term at alpha 0.1, 1 and 10.
    assert terms[1] < 4e-3 * terms[0] and terms[2] < 5e-5 * terms[0], terms
    assert terms[3] < 1.5e-6 * terms[0], terms
    assert group_bias_term(w, d) == pytest.approx(terms[0])


@pytest.mark.parametrize(
    ("act_order", "sym", "group_size"), [(True, False, 32), (False, True, 64), (False, False, -1)]
)
def test_without_the_term_gptq_is_bit_identical(
    act_order: bool, sym: bool, group_size: int
) -> None:
    w, h, d = _problem(seed=3)
    kw = dict(bits=4, group_size=group_size, sym=sym, act_order=act_order, clip_search=True)
    plain = gptq_quantize(w, h, **kw)
    for extra in ({"fair_hessian": d, "fair_alpha": 0.0}, {"fair_hessian": None}):
        other = fair_gptq_quantize(w, h, **kw, **extra)
        assert torch.equal(plain.q, other.q) and torch.equal(plain.scales, other.scales)
        assert (plain.zeros is None and other.zeros is None) or torch.equal(
            plain.zeros, other.zeros
        )
        assert plain.loss == other.loss


def test_fair_gptq_rounds_the_shifted_target() -> None:
    """With the term, GPTQ runs on V: same codes as plain GPTQ given V, grids fitted on V, and the
    reported loss is measured against the original weight."""
    w, h, d = _problem(seed=4)
    kw = dict(bits=4, group_size=32, act_order=True, clip_search=True)
    fair = fair_gptq_quantize(w, h, fair_hessian=d, fair_alpha=1.0, **kw)
    v = debias_shift(w, h, d, 1.0, DAMP)
    on_v = gptq_quantize(v, h, **kw)
    assert torch.equal(fair.q, on_v.q) and torch.equal(fair.scales, on_v.scales)
    s, _ = group_params(v.reshape(-1, 32), 4, False, torch.float16, True)
    assert torch.equal(fair.scales, s.view(w.shape[0], -1))
    assert fair.loss == pytest.approx(proxy_loss(w, fair.dequantize(), h))


def test_fair_gptq_lowers_the_bias_term_at_a_bounded_cost() -> None:
    w, h, d = _problem(seed=5)
    kw = dict(bits=4, group_size=32, act_order=True, clip_search=True)
    plain = gptq_quantize(w, h, **kw)
    fair = fair_gptq_quantize(w, h, fair_hessian=d, fair_alpha=1.0, **kw)
    bias_plain = group_bias_term(plain.dequantize(), d)
    bias_fair = group_bias_term(fair.dequantize(), d)
    # Measured: the bias term falls to 0.0126x plain GPTQ's, at 1.14x its proxy loss.
    assert bias_fair < 0.025 * bias_plain, bias_fair / bias_plain
    assert fair.loss < 1.3 * plain.loss, fair.loss / plain.loss
    # The joint objective is what Fair-GPTQ minimises: measured 0.024x plain GPTQ's.
    assert fair.loss + bias_fair < 0.05 * (plain.loss + bias_plain)


def test_dead_columns_stay_zero() -> None:
    w, h, d = _problem(seed=6)
    h[:, 5] = 0.0
    h[5, :] = 0.0
    d[5, :] += 0.1  # pair inputs reach a column the calibration text never did
    d[:, 5] += 0.1
    res = fair_gptq_quantize(w, h, bits=4, group_size=32, fair_hessian=d, fair_alpha=1.0)
    assert bool((res.dequantize()[:, 5] == 0).all())


def test_bad_fairness_arguments() -> None:
    w, h, d = _problem(seed=7)
    with pytest.raises(ValueError, match="needs a fair_hessian"):
        fair_gptq_quantize(w, h, 4, 32, fair_alpha=0.5)
    with pytest.raises(ValueError, match=r"fair_hessian must be \[K, K\] = \[128, 128\]"):
        fair_gptq_quantize(w, h, 4, 32, fair_hessian=d[:64, :64], fair_alpha=0.5)
    with pytest.raises(ValueError, match="fair_alpha must be a finite number >= 0"):
        fair_gptq_quantize(w, h, 4, 32, fair_hessian=d, fair_alpha=-1.0)
    with pytest.raises(ValueError, match="fair_alpha must be a finite number >= 0"):
        fair_gptq_quantize(w, h, 4, 32, fair_hessian=d, fair_alpha=float("nan"))
    bad = d.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="fair_hessian has NaN/Inf"):
        fair_gptq_quantize(w, h, 4, 32, fair_hessian=bad, fair_alpha=0.5)
    with pytest.raises(TypeError, match="fair_hessian must be floating point"):
        fair_gptq_quantize(w, h, 4, 32, fair_hessian=d.to(torch.int32), fair_alpha=0.5)


def test_bias_subspace_keeps_the_directions_cheapest_to_debias() -> None:
    # H weighs the second input 100x more: its pair difference is the costly one to remove.
    h = torch.diag(torch.tensor([1.0, 100.0, 10.0]))
    d = torch.eye(3)
    top = bias_subspace(d, h, 1, damp_percent=1e-9)
    torch.testing.assert_close(top, torch.diag(torch.tensor([1.0, 0.0, 0.0])), atol=1e-6, rtol=0)
    top2 = bias_subspace(d, h, 2, damp_percent=1e-9)
    torch.testing.assert_close(top2, torch.diag(torch.tensor([1.0, 0.0, 1.0])), atol=1e-6, rtol=0)
    # All directions: D itself; a rank-r D is returned whole by rank r.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=g)
    h = 2 * x.t() @ x / 64
    a = torch.randn(12, 3, generator=g)
    low = a @ a.t()
    for rank, want in ((12, low), (3, low)):
        got = bias_subspace(low, h, rank, damp_percent=1e-9)
        torch.testing.assert_close(got, want, atol=1e-4 * float(low.abs().max()), rtol=0)
    one = bias_subspace(low, h, 1)
    assert torch.linalg.matrix_rank(one.double(), rtol=1e-6) == 1
    assert bool((torch.linalg.eigvalsh(one.double()) > -1e-6).all())
    with pytest.raises(ValueError, match=r"fair rank must be in \[1, 12\]"):
        bias_subspace(low, h, 13)
    with pytest.raises(ValueError, match="hessian must be"):
        bias_subspace(low, h[:4, :4], 2)
