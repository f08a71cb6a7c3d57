"""The packed tensors of a quantized layer keep the dtypes their format's spec records through a
module dtype change (``.half()``, ``.bfloat16()``, ``.float()``, ``.to(dtype)``), which only the
bias follows; so a converted model computes with the same weights and saves a checkpoint that
matches its spec. And a layer whose tensors disagree with its spec is refused before anything is
written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import quantlab
from quantlab.nn.packed_linear import PackedLinear
from quantlab.nn.registry import quantized_modules
from tests.nn.test_layer_autograd import ALL, Factory


def _packed(layer: PackedLinear) -> dict[str, torch.Tensor]:
    return {s: getattr(layer, s).clone() for s in layer.meta.tensor_shapes()}


@pytest.mark.parametrize("convert", ["half", "bfloat16", "float", "double", "to-bf16"])
@pytest.mark.parametrize("factory", ALL)
def test_dtype_changes_leave_the_packed_tensors_alone(factory: Factory, convert: str) -> None:
    layer = factory()
    before = _packed(layer)
    weight = layer.dequantized_weight()
    if convert == "to-bf16":
        layer.to(torch.bfloat16)
    else:
        getattr(layer, convert)()
    for suffix, tensor in before.items():
        now = getattr(layer, suffix)
        assert now.dtype == tensor.dtype and torch.equal(now, tensor), suffix
    assert torch.equal(layer.dequantized_weight(), weight)
    if layer.bias is not None:
        want = {"half": torch.float16, "float": torch.float32, "double": torch.float64}
        assert layer.bias.dtype == want.get(convert, torch.bfloat16)


@pytest.mark.parametrize("factory", ALL[:1])
def test_device_moves_still_move_the_packed_tensors(factory: Factory) -> None:
    layer = factory().to("meta")
    assert all(getattr(layer, s).device.type == "meta" for s in layer.meta.tensor_shapes())


def test_a_bf16_model_saves_a_checkpoint_that_loads(tiny_llama: nn.Module, tmp_path: Path) -> None:
    report = quantlab.quantize(tiny_llama, "rtn", bits=4, group_size=32, progress=False)
    scales = {n: m.scales.clone() for n, m in quantized_modules(tiny_llama)}
    tiny_llama.bfloat16()
    out = quantlab.save(tiny_llama, str(tmp_path / "ckpt"), report)
    loaded = quantlab.load(str(out))
    for name, layer in quantized_modules(loaded):
        assert torch.equal(layer.scales, scales[name])  # fp16, never rounded through bf16


def test_a_layer_inconsistent_with_its_spec_is_not_written(
    tiny_llama: nn.Module, tmp_path: Path
) -> None:
    report = quantlab.quantize(tiny_llama, "rtn", bits=4, group_size=32, progress=False)
    layer = tiny_llama.model.layers[1].mlp.up_proj
    layer.scales = layer.scales.float()  # assigned by hand: no longer the spec's fp16
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.scales: expected"):
        quantlab.save(tiny_llama, str(tmp_path / "a"), report)
    layer.scales = torch.full_like(layer.scales, float("nan")).half()
    with pytest.raises(ValueError, match="up_proj.scales: .* not finite and positive"):
        quantlab.save(tiny_llama, str(tmp_path / "b"), report)
    assert not any(tmp_path.iterdir())  # nothing written, no debris
