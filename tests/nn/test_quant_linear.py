from __future__ import annotations

import pytest
import torch
from torch import nn

import quantlab
from quantlab.formats.groupwise_int import pack
from quantlab.nn import QuantLinear
from quantlab.solvers.rtn import rtn_quantize
from tests.tolerances import fp32_dot_bound


def _layer(
    out_f: int, in_f: int, bits: int, group: int, sym: bool, bias: bool
) -> tuple[QuantLinear, torch.Tensor]:
    torch.manual_seed(out_f + in_f + bits)
    w = torch.randn(out_f, in_f)
    b = torch.randn(out_f) if bias else None
    result = rtn_quantize(w, bits, group, sym)
    return QuantLinear.from_packed(pack(result), b), result.dequantize()


@pytest.mark.parametrize(
    ("out_f", "in_f", "bits", "group", "sym", "bias"),
    [
        (7, 64, 4, 32, False, True),
        (33, 192, 3, 64, True, False),
        (96, 576, 4, 64, False, True),
        (16, 128, 2, -1, False, False),
        (5, 96, 8, 32, True, True),
    ],
)
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5)])
def test_forward_matches_dense_reference(
    out_f: int, in_f: int, bits: int, group: int, sym: bool, bias: bool, lead: tuple[int, ...]
) -> None:
    layer, w = _layer(out_f, in_f, bits, group, sym, bias)
    x = torch.randn(*lead, in_f)
    ref = torch.nn.functional.linear(
        x.double(), w.double(), None if layer.bias is None else layer.bias.double()
    )
    y = layer(x)
    assert y.shape == (*lead, out_f) and y.dtype == torch.float32
    # fp32 accumulation over K terms, per output: K * eps32 * sum|x||w| (measured at most 0.75% of
    # it; the former single bound, 1e-5 of the largest sum, was 250x the measured error).
    bound = fp32_dot_bound(x.reshape(-1, in_f), w).view(y.shape)
    assert bool(((y.double() - ref).abs() <= bound).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations_keep_their_dtype(dtype: torch.dtype) -> None:
    layer, w = _layer(24, 128, 4, 64, False, True)
    x = torch.randn(4, 128).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    ref = torch.nn.functional.linear(x.double(), w.double(), layer.bias.double())
    same_dtype = torch.nn.functional.linear(x, w.to(dtype), layer.bias.to(dtype)).double()
    # At most 2x the error of the same matmul done densely in that dtype (flash-attention rule).
    assert float((y.double() - ref).abs().max()) <= 2 * float((same_dtype - ref).abs().max()) + 1e-2


def test_wrong_input_width_is_a_clear_error() -> None:
    layer, _ = _layer(8, 64, 4, 32, False, False)
    with pytest.raises(ValueError, match=r"expects input \[\.\.\., 64\]"):
        layer(torch.randn(2, 65))


def test_state_dict_round_trip_and_dequantized_weight() -> None:
    layer, w = _layer(12, 64, 4, 32, False, True)
    fresh = QuantLinear(64, 12, bias=True, bits=4, group_size=32, sym=False)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.dequantized_weight(), w)
    assert set(layer.state_dict()) == {"qweight", "scales", "qzeros", "bias"}
    assert set(QuantLinear(64, 12, bias=False, sym=True, group_size=32).state_dict()) == {
        "qweight",
        "scales",
    }


def test_replace_linear_on_any_torch_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    x = torch.randn(5, 64)
    ref = model(x)
    replaced = quantlab.replace_linear(model, bits=8, group_size=32, exclude=("4",))
    assert replaced == ["0", "2"]
    assert isinstance(model[0], QuantLinear) and isinstance(model[4], nn.Linear)
    # 8-bit RTN g32: outputs stay within a few tenths of a percent of the float model (measured
    # 0.33%).
    with torch.no_grad():
        assert float((model(x) - ref).norm() / ref.norm()) < 0.005


def test_replace_linear_names_the_layer_it_cannot_group() -> None:
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="does not divide in_features 8 of 1"):
        quantlab.replace_linear(model, bits=4, group_size=32)
