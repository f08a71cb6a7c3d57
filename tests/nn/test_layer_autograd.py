"""The input gradient of every quantized layer (PackedLinear's backward): against a dense
``F.linear`` with the dequantized weight, against finite differences of the layer itself, through
a small model, in low precision; and that inference (no grad) is unchanged."""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import pytest
import torch
from torch import nn

from quantlab.formats import bitstack, groupwise_int, pvq, ternary
from quantlab.formats.pvq_codebook import PVQParams
from quantlab.formats.ternary import PER_ROW, PER_TENSOR
from quantlab.nn.bitstack_linear import BitStackLinear
from quantlab.nn.groupwise_int_linear import QuantLinear
from quantlab.nn.packed_linear import PackedLinear
from quantlab.nn.pvq_linear import PVQLinear
from quantlab.nn.ternary_linear import TernaryLinear
from quantlab.solvers.bitstack import decompose
from quantlab.solvers.pvq import pvq_quantize
from quantlab.solvers.rtn import rtn_quantize
from quantlab.solvers.ternary import mse_ternarize
from quantlab.transforms.rotation import random_signs

N = 17  # odd on purpose: no kernel tile divides it

# Our backward and F.linear's both compute grad_out @ W in fp32, maybe with other blockings: a few
# eps32 of the largest entry. One wrong weight moves the gradient by orders of magnitude more
# (checked by test_input_grad_matches_dense_linear on a perturbed weight).
FP32_RTOL = 1e-5


def _weight(k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return torch.randn(N, k), torch.randn(N)


def _groupwise(
    bits: int, group: int, sym: bool, scale_dtype: torch.dtype, k: int, bias: bool
) -> PackedLinear:
    w, b = _weight(k, bits + group + 3 * sym)
    result = rtn_quantize(w, bits, group, sym, scale_dtype=scale_dtype)
    packed = groupwise_int.pack(result, str(scale_dtype).removeprefix("torch."))
    return QuantLinear.from_packed(packed, b if bias else None)


def _ternary(
    packing: str, group: int, scale_dtype: torch.dtype, k: int, bias: bool
) -> PackedLinear:
    w, b = _weight(k, 5 + group)
    result = mse_ternarize(w, group, scale_dtype=scale_dtype)
    packed = ternary.pack(result, packing, str(scale_dtype).removeprefix("torch."))
    return TernaryLinear.from_packed(packed, b if bias else None)


def _bitstack(blocks: int, k: int, bias: bool) -> PackedLinear:
    w, b = _weight(k, 7 + blocks)
    res = decompose(w, blocks, 3)
    return BitStackLinear.from_packed(
        bitstack.pack(res.positive, res.u, res.v), b if bias else None
    )


def _pvq(params: PVQParams, k: int, bias: bool) -> PackedLinear:
    w, b = _weight(k, 11)
    result = pvq_quantize(w, params, random_signs(k, 0))
    return PVQLinear.from_packed(pvq.pack(result), b if bias else None)


Factory = Callable[[], PackedLinear]

# Everything whose forward is linear in x (the finite-difference check applies).
LINEAR = [
    pytest.param(partial(_groupwise, 4, 32, False, torch.float16, 96, True), id="gw4-g32-asym-f16"),
    pytest.param(
        partial(_groupwise, 3, 32, True, torch.bfloat16, 96, False), id="gw3-g32-sym-bf16"
    ),
    pytest.param(partial(_groupwise, 2, -1, False, torch.float32, 40, True), id="gw2-row-asym-f32"),
    pytest.param(partial(_groupwise, 8, 32, True, torch.float16, 96, False), id="gw8-g32-sym-f16"),
    pytest.param(partial(_groupwise, 4, -1, True, torch.float32, 40, True), id="gw4-row-sym-f32"),
    pytest.param(partial(_bitstack, 1, 40, True), id="bitstack-1"),
    pytest.param(partial(_bitstack, 2, 96, False), id="bitstack-2"),
    pytest.param(partial(_bitstack, 3, 40, False), id="bitstack-3"),
    pytest.param(partial(_pvq, PVQParams(16, 28, 6), 96, True), id="pvq-d16"),
    pytest.param(partial(_pvq, PVQParams(4, 9, 3), 40, False), id="pvq-d4"),
]
TERNARY = [
    pytest.param(partial(_ternary, "i2", 32, torch.float16, 96, True), id="tern-i2-g32-f16"),
    pytest.param(partial(_ternary, "tq1", PER_ROW, torch.bfloat16, 40, False), id="tern-tq1-row"),
    pytest.param(partial(_ternary, "i2", PER_TENSOR, torch.float32, 40, True), id="tern-i2-tensor"),
    pytest.param(partial(_ternary, "tq1", 32, torch.float16, 96, False), id="tern-tq1-g32"),
]
ALL = LINEAR + TERNARY
SHAPES = [pytest.param((3, 5), id="3x5xK"), pytest.param((), id="K")]


def _input_grad(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad_out: torch.Tensor
) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    fn(x).backward(grad_out)
    assert x.grad is not None
    return x.grad


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs error relative to the largest entry of ``want``."""
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.mark.parametrize("lead", SHAPES)
@pytest.mark.parametrize("factory", ALL)
def test_input_grad_matches_dense_linear(factory: Factory, lead: tuple[int, ...]) -> None:
    """grad_x = g @ W with W the dequantized weight (for ternary the straight-through estimator
    through the activation rounding); a dense weight off in one entry is caught; the bias gets
    its ordinary gradient when a user unfreezes it."""
    layer = factory()
    k = layer.in_features
    x, g = torch.randn(*lead, k), torch.randn(*lead, N)
    w = layer.dequantized_weight()

    def dense_err(weight: torch.Tensor) -> float:
        dense = _input_grad(lambda t: nn.functional.linear(t, weight, layer.bias), x, g)
        return _rel_err(got, dense)

    got = _input_grad(layer, x, g)
    assert got.shape == x.shape and got.dtype == torch.float32
    assert dense_err(w) <= FP32_RTOL
    i, j = int(g.reshape(-1, N).abs().sum(0).argmax()), k // 2
    wrong = w.clone()
    wrong[i, j] += 0.1 * w.abs().max()
    assert dense_err(wrong) > 100 * FP32_RTOL

    if layer.bias is not None:
        layer.bias.requires_grad_(True)
        layer(x).backward(g)
        assert layer.bias.grad is not None
        torch.testing.assert_close(layer.bias.grad, g.reshape(-1, N).sum(0))


@pytest.mark.parametrize("lead", SHAPES)
@pytest.mark.parametrize("factory", LINEAR)
def test_input_grad_matches_finite_differences(factory: Factory, lead: tuple[int, ...]) -> None:
    """Central differences of L(x) = <g, layer(x)> on the K coordinates of the last token (so
    every column of W is probed; the ops compute in fp32 even for fp64 inputs, so fp32 it is):
    the gradient agrees with the forward, not only with our own dequantization."""
    layer = factory()
    k = layer.in_features
    torch.manual_seed(1)
    x, g = torch.randn(*lead, k), torch.randn(*lead, N)
    grad = _input_grad(layer, x, g).reshape(-1)

    def loss(t: torch.Tensor) -> float:
        with torch.no_grad():
            return float((layer(t).double() * g.double()).sum())

    # The layer is linear in x, so the difference quotient is exact for any step; a large one
    # keeps the fp32 rounding of the outputs (~K * eps32 * sum |x w| each) small against it:
    # observed <= 1e-6 of the largest gradient entry, while one weight off by 10% of the largest
    # moves an entry by a few 1e-2 of it.
    h = 1.0
    tol = 2e-5 * float(grad.abs().max())
    for idx in range(x.numel() - k, x.numel()):
        e = torch.zeros(x.numel())
        e[idx] = h
        e = e.view_as(x)
        fd = (loss(x + e) - loss(x - e)) / (2 * h)
        assert abs(fd - float(grad[idx])) <= tol, (idx, fd, float(grad[idx]))


@pytest.mark.parametrize("factory", ALL)
def test_gradient_flows_to_upstream_layers(factory: Factory) -> None:
    """nn.Linear -> quantized layer trains the first Linear like nn.Linear -> dense copy would
    (same upstream gradient g: the loss is linear in the output, so ternary's A8 rounding of the
    forward does not change it)."""
    layer = factory()
    k = layer.in_features
    torch.manual_seed(2)
    first = nn.Linear(8, k)
    dense = nn.Linear(k, N, bias=layer.bias is not None)
    with torch.no_grad():
        dense.weight.copy_(layer.dequantized_weight())
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
    model = nn.Sequential(first, layer)
    ref_model = nn.Sequential(copy.deepcopy(first), dense)
    x, g = torch.randn(4, 8), torch.randn(4, N)
    model(x).backward(g)
    ref_model(x).backward(g)
    got, want = model[0].weight.grad, ref_model[0].weight.grad
    assert got is not None and want is not None and bool(got.abs().sum() > 0)
    assert _rel_err(got, want) <= FP32_RTOL
    assert model[0].bias.grad is not None and ref_model[0].bias.grad is not None
    assert _rel_err(model[0].bias.grad, ref_model[0].bias.grad) <= FP32_RTOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("factory", ALL)
def test_low_precision_inputs_get_grads_in_their_dtype(
    factory: Factory, dtype: torch.dtype
) -> None:
    layer = factory()
    torch.manual_seed(3)
    x = torch.randn(3, 5, layer.in_features).to(dtype)
    g = torch.randn(3, 5, N).to(dtype)
    got = _input_grad(layer, x, g)
    assert got.dtype == dtype and got.shape == x.shape
    w = layer.dequantized_weight().double()
    want = g.double() @ w
    # W rounded to dtype (eps relative per entry), then an N-term product, each term and the sum
    # rounded in dtype at worst: (N + 2) * eps * (|g| @ |W|).
    eps = torch.finfo(dtype).eps
    bound = (N + 2) * eps * (g.double().abs() @ w.abs()) + 1e-6
    assert bool(((got.double() - want).abs() <= bound).all())


@pytest.mark.parametrize("factory", ALL)
def test_inference_is_the_bare_op(factory: Factory) -> None:
    """no_grad, inference_mode and inputs without requires_grad run _matmul as before: bit-identical
    outputs without grad_fn. The grad path's forward values are bit-identical too."""
    layer = factory()
    torch.manual_seed(4)
    x = torch.randn(3, 5, layer.in_features)
    want = layer._matmul(x.reshape(-1, layer.in_features)).view(3, 5, N)
    if layer.bias is not None:
        want = want + layer.bias
    with torch.no_grad():
        y_no_grad = layer(x.clone().requires_grad_(True))
    with torch.inference_mode():
        y_inference = layer(x)
    for y in (y_no_grad, y_inference, layer(x)):
        assert torch.equal(y, want) and y.grad_fn is None and not y.requires_grad
    y_grad = layer(x.clone().requires_grad_(True))
    assert y_grad.grad_fn is not None and torch.equal(y_grad.detach(), want)


@pytest.mark.parametrize("factory", ALL)
def test_packed_buffers_get_no_grad_and_stay_unchanged(factory: Factory) -> None:
    layer = factory()
    before = {name: t.clone() for name, t in layer.named_buffers()}
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    after = dict(layer.named_buffers())
    assert after.keys() == before.keys()
    for name, t in after.items():
        assert not t.requires_grad and t.grad is None, name
        assert t.dtype == before[name].dtype and torch.equal(t, before[name]), name
    assert layer.bias is None or layer.bias.grad is None


@pytest.mark.parametrize("factory", ALL)
def test_second_order_gradient_is_a_clear_error(factory: Factory) -> None:
    layer = factory()
    x = torch.randn(2, layer.in_features, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


@pytest.mark.parametrize("factory", [LINEAR[0], LINEAR[5], LINEAR[8], TERNARY[0]])
def test_zero_dim_input_is_a_clear_error(factory: Factory) -> None:
    layer = factory()
    name, k = type(layer).__name__, layer.in_features
    with pytest.raises(ValueError, match=rf"{name} expects input \[\.\.\., {k}\], got \(\)"):
        layer(torch.tensor(1.0))
