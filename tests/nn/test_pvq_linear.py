"""PVQLinear: forward against the dense weight it stands for, caching, dtypes, state dicts and the
layer-registry protocol."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantlab.formats.pvq import pack
from quantlab.formats.pvq_codebook import PVQParams
from quantlab.nn.pvq_linear import PVQLinear
from quantlab.nn.registry import layer_class, module_spec, registered_formats
from quantlab.solvers.pvq import pvq_quantize
from quantlab.transforms.rotation import random_signs


def _layer(
    out_f: int, in_f: int, params: PVQParams, bias: bool, seed: int = 0
) -> tuple[PVQLinear, torch.Tensor]:
    torch.manual_seed(seed + out_f + in_f)
    w = torch.randn(out_f, in_f)
    b = torch.randn(out_f) if bias else None
    result = pvq_quantize(w, params, random_signs(in_f, seed))
    return PVQLinear.from_packed(pack(result), b), result.dequantize()


LAYERS = [
    (7, 96, PVQParams(16, 28, 6), True),
    (33, 576, PVQParams(16, 28, 6), False),
    (5, 100, PVQParams(4, 9, 3), True),
    (16, 1536, PVQParams(8, 14, 8), False),
]


@pytest.mark.parametrize(("out_f", "in_f", "params", "bias"), LAYERS)
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 9)])
def test_forward_matches_the_dense_weight(
    out_f: int, in_f: int, params: PVQParams, bias: bool, lead: tuple[int, ...]
) -> None:
    """The layer rotates its input and multiplies by W'; that equals x @ W.T with the weight
    W = W' R the solver reports, up to fp32 rounding of the rotation and the dot products."""
    layer, w = _layer(out_f, in_f, params, bias)
    x = torch.randn(*lead, in_f)
    ref = nn.functional.linear(
        x.double(), w.double(), None if layer.bias is None else layer.bias.double()
    )
    y = layer(x)
    assert y.shape == (*lead, out_f) and y.dtype == torch.float32
    # K-term fp32 dot products after a K-term fp32 rotation: a few K * eps32 relative.
    bound = 4 * in_f * torch.finfo(torch.float32).eps * (x.abs().double() @ w.abs().double().t())
    assert bool(((y.double() - ref).abs() <= bound + 1e-6).all())
    cached = layer.cache_weight()(x)
    assert bool(((cached.double() - ref).abs() <= bound + 1e-6).all())
    layer.cache_weight(False)
    assert layer._dense is None


def test_weights_and_rotation_accessors() -> None:
    layer, w = _layer(33, 576, PVQParams(16, 28, 6), True)
    assert torch.allclose(layer.dequantized_weight(), w, atol=1e-5)
    assert layer.rotated_weight().shape == (33, 576)
    assert set(layer.rotation_signs().tolist()) == {-1, 1}
    assert "code_bits=51" in repr(layer)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations_keep_their_dtype(dtype: torch.dtype) -> None:
    layer, w = _layer(24, 192, PVQParams(16, 28, 6), True)
    x = torch.randn(4, 192).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    ref = nn.functional.linear(x.double(), w.double(), layer.bias.double())
    same_dtype = nn.functional.linear(x, w.to(dtype), layer.bias.to(dtype)).double()
    assert float((y.double() - ref).abs().max()) <= 2 * float((same_dtype - ref).abs().max()) + 1e-2


def test_wrong_input_width_is_a_clear_error() -> None:
    layer, _ = _layer(8, 96, PVQParams(16, 28, 6), False)
    with pytest.raises(ValueError, match=r"expects input \[\.\.\., 96\]"):
        layer(torch.randn(2, 95))


def test_state_dict_round_trip() -> None:
    layer, _ = _layer(12, 96, PVQParams(16, 28, 6), True)
    fresh = PVQLinear(96, 12, bias=True, dim=16, pulses=28, levels=6)
    fresh.load_state_dict(layer.state_dict())
    fresh.after_load()
    x = torch.randn(3, 96)
    assert torch.equal(fresh(x), layer(x))
    assert set(layer.state_dict()) == {"codes", "row_scales", "levels", "signs", "bias"}
    layer.cache_weight()
    # The decoded weight is a cache, never part of the checkpoint.
    assert "_dense" not in layer.state_dict()


def test_registry_protocol() -> None:
    assert registered_formats()["pvq"] is PVQLinear
    layer, _ = _layer(12, 96, PVQParams(16, 28, 6), True)
    spec = module_spec(layer)
    assert spec == {"format": "pvq", "format_version": 1, "dim": 16, "pulses": 28, "levels": 6}
    assert layer_class(spec) is PVQLinear
    linear = nn.Linear(96, 12)
    empty = PVQLinear.empty_like(linear, spec)
    assert empty.meta == layer.meta and empty.bias is not None
    assert set(PVQLinear.checkpoint_tensors(spec)) == {"codes", "row_scales", "levels", "signs"}
    assert layer.storage_bits() == layer.meta.storage_bits()


def test_after_load_restores_dtypes_and_rejects_corrupt_codes() -> None:
    layer, _ = _layer(12, 96, PVQParams(16, 28, 6), True)
    layer.row_scales = layer.row_scales.float()  # as a loader casting to the model dtype would
    layer.after_load()
    assert layer.row_scales.dtype == torch.float16
    layer.codes = torch.full_like(layer.codes, -1)
    with pytest.raises(ValueError, match="damaged"):
        layer.after_load()
