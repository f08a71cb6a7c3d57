"""TernaryLinear: forward against the W1.58A8 oracle, state dicts, the registry protocol, and
save/load of a ternary model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import quantlab
from quantlab.formats.ternary import pack
from quantlab.nn.registry import layer_class, module_spec, registered_formats
from quantlab.nn.ternary_linear import TernaryLinear
from quantlab.ops import ternary_reference as ref
from quantlab.solvers.ternary import mse_ternarize
from tests.tolerances import ternary_epilogue_bound


def _layer(
    out_f: int, in_f: int, group: int, packing: str, bias: bool
) -> tuple[TernaryLinear, torch.Tensor]:
    torch.manual_seed(out_f + in_f + group)
    w = torch.randn(out_f, in_f)
    b = torch.randn(out_f) if bias else None
    result = mse_ternarize(w, group)
    return TernaryLinear.from_packed(pack(result, packing), b), result.dequantize()


def _oracle(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    x2 = x.reshape(-1, x.shape[-1])
    xq, inv = ref.quantize_activations(x2)
    y = (xq.double() @ w.double().t()) / inv.double().unsqueeze(1)
    abs_dot = (xq.double().abs() @ w.double().abs().t()) / inv.double().unsqueeze(1)
    if bias is not None:
        y = y + bias.double()
    return y.view(*x.shape[:-1], -1), abs_dot.view(*x.shape[:-1], -1)


@pytest.mark.parametrize(
    ("out_f", "in_f", "group", "packing", "bias"),
    [
        (7, 64, 32, "i2", True),
        (33, 192, 64, "tq1", False),
        (96, 576, 0, "i2", True),
        (16, 100, -1, "tq1", False),
        (5, 128, 128, "i2", True),
    ],
)
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5), (40,)])
def test_forward_matches_the_w158a8_oracle(
    out_f: int, in_f: int, group: int, packing: str, bias: bool, lead: tuple[int, ...]
) -> None:
    layer, w = _layer(out_f, in_f, group, packing, bias)
    x = torch.randn(*lead, in_f)
    y = layer(x)
    assert y.shape == (*lead, out_f) and y.dtype == torch.float32
    oracle, abs_dot = _oracle(x, w, layer.bias)
    # K products per output covers every path (LUT segments, the GEMM of large batches), plus
    # the bias addition.
    bound = ternary_epilogue_bound(abs_dot, in_f + 1) + 1e-6
    assert bool(((y.double() - oracle).abs() <= bound).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations_keep_their_dtype(dtype: torch.dtype) -> None:
    layer, w = _layer(24, 128, 64, "i2", True)
    x = torch.randn(4, 128).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    oracle, abs_dot = _oracle(x.float(), w, layer.bias)
    # Output rounding to the dtype and the bias added in it (two roundings).
    eps = torch.finfo(dtype).eps
    bound = ternary_epilogue_bound(abs_dot, 129) + 2 * eps * (oracle.abs() + layer.bias.abs())
    assert bool(((y.double() - oracle).abs() <= bound).all())


def test_wrong_input_width_is_a_clear_error() -> None:
    layer, _ = _layer(8, 64, 32, "i2", False)
    with pytest.raises(ValueError, match=r"expects input \[\.\.\., 64\]"):
        layer(torch.randn(2, 65))


def test_state_dict_round_trip_refreshes_the_kernel_layout() -> None:
    layer, w = _layer(12, 64, 32, "i2", True)
    fresh = TernaryLinear(64, 12, bias=True, packing="i2", group_size=32)
    x = torch.randn(3, 64)
    fresh(x)  # builds the kernel layout of the all-zero weight first
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.dequantized_weight(), w)
    assert torch.equal(fresh.trits(), layer.trits())
    assert set(layer.state_dict()) == {"qweight", "scales", "bias"}
    assert set(TernaryLinear(64, 12, bias=False).state_dict()) == {"qweight", "scales"}


def test_registry_protocol() -> None:
    assert registered_formats()["ternary"] is TernaryLinear
    layer, _ = _layer(33, 192, 64, "tq1", True)
    spec = module_spec(layer)
    assert spec == {
        "format": "ternary",
        "format_version": 1,
        "packing": "tq1",
        "group_size": 64,
        "scale_dtype": "float16",
    }
    assert layer_class(spec) is TernaryLinear
    empty = TernaryLinear.empty_like(nn.Linear(192, 33), spec)
    assert empty.qweight.shape == layer.qweight.shape and empty.scales.shape == (33, 3)
    assert TernaryLinear.checkpoint_tensors(spec) == {"qweight": "U8", "scales": "F16"}
    assert TernaryLinear.checkpoint_tensors({**spec, "scale_dtype": "float32"})["scales"] == "F32"
    assert layer.storage_bits() == 33 * 39 * 8 + 33 * 3 * 16
    assert "1.8" in repr(layer) and "packing=tq1" in repr(layer)


def test_scales_dtype_is_restored_after_load() -> None:
    layer, _ = _layer(8, 64, 32, "i2", False)
    layer.scales = layer.scales.float()  # as a dtype-casting loader would leave it
    layer.after_load()
    assert layer.scales.dtype == torch.float16


def test_quantize_save_load_round_trip(tiny_llama: nn.Module, tmp_path: Path) -> None:
    report = quantlab.quantize(
        tiny_llama, "ternary", solver="mse", group_size=32, packing="tq1", progress=False
    )
    assert len(report.layers) == 2 * 7
    assert all(isinstance(tiny_llama.get_submodule(r.name), TernaryLinear) for r in report.layers)
    # tq1: 5 trits per byte, rows of K = 128 or 256 padded to whole bytes (26 or 52 bytes, 1.625
    # bits per weight), plus one fp16 scale per 32 columns (0.5).
    assert all(r.bits == pytest.approx(1.625 + 0.5) for r in report.layers)
    # The L2-optimal ternary scale zeroes ~45% of Gaussian weights (measured 0.451 here).
    assert 0.40 < report.details["ternary"]["zero_fraction"] < 0.50
    out = quantlab.save(tiny_llama, str(tmp_path / "ternary"), report)
    loaded = quantlab.load(str(out))
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, tiny_llama(x).logits)
    from transformers import AutoModelForCausalLM

    from quantlab.integrations.transformers import register

    register()
    again = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(again(x).logits, tiny_llama(x).logits)
