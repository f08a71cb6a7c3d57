"""The layer-format registry: a format defined outside quantlab saves and loads like a built-in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import quantlab
from quantlab.export.errors import CheckpointError
from quantlab.export.quantlab_checkpoint import save_quantized
from quantlab.nn.layer_spec import FormatError
from quantlab.nn.registry import (
    layer_class,
    quantized_modules,
    register_layer_format,
    registered_formats,
)
from quantlab.nn.swap import set_submodule


@register_layer_format
class _Int8RowLinear(nn.Module):
    """A test-only format: int8 weights with one fp32 scale per row."""

    format_name: ClassVar[str] = "test_int8_row"
    format_version: ClassVar[int] = 3

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, 1))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.loaded = False

    @classmethod
    def quantize(cls, linear: nn.Linear) -> _Int8RowLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        w = linear.weight.detach()
        layer.scale = w.abs().amax(dim=1, keepdim=True) / 127
        layer.qweight = torch.round(w / layer.scale).to(torch.int8)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def module_spec(self) -> dict[str, Any]:
        return {"rows": self.out_features}

    @classmethod
    def empty_like(cls, linear: nn.Linear, spec: dict[str, Any]) -> _Int8RowLinear:
        assert spec["rows"] == linear.out_features
        return cls(linear.in_features, linear.out_features, linear.bias is not None)

    @classmethod
    def checkpoint_tensors(cls, spec: dict[str, Any]) -> dict[str, str | None]:
        return {"qweight": "I8", "scale": None}

    def storage_bits(self) -> int:
        return self.qweight.numel() * 8 + self.scale.numel() * 32

    def after_load(self) -> None:
        self.loaded = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ (self.qweight.to(x.dtype) * self.scale.to(x.dtype)).t()
        return y if self.bias is None else y + self.bias


def _quantize_all(model: nn.Module) -> None:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n]
    for name in names:
        set_submodule(model, name, _Int8RowLinear.quantize(model.get_submodule(name)))


def test_a_registered_format_round_trips_through_a_checkpoint(
    tiny_llama: nn.Module, tmp_path: Path
) -> None:
    _quantize_all(tiny_llama)
    x = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        ref = tiny_llama(x).logits
    out = save_quantized(tiny_llama, tmp_path / "ckpt", "test", {"method": "test"})
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "test_int8_row" and qcfg["format_version"] == 3
    spec = qcfg["modules"]["model.layers.0.mlp.up_proj"]
    assert spec == {"format": "test_int8_row", "format_version": 3, "rows": 256}

    loaded = quantlab.load(str(out))
    layers = dict(quantized_modules(loaded))
    assert len(layers) == 14 and all(isinstance(m, _Int8RowLinear) for m in layers.values())
    assert all(m.loaded for m in layers.values())  # after_load ran
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)


def test_unknown_formats_and_versions_are_named(tiny_llama: nn.Module, tmp_path: Path) -> None:
    assert "groupwise_int" in registered_formats() and "test_int8_row" in registered_formats()
    with pytest.raises(FormatError, match="unknown quantlab layer format 'nope'"):
        layer_class({"format": "nope"})
    with pytest.raises(FormatError, match="version 2 is not supported .* reads version 3"):
        layer_class({"format": "test_int8_row", "format_version": 2})

    _quantize_all(tiny_llama)
    out = save_quantized(tiny_llama, tmp_path / "ckpt", "test", {"method": "test"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["modules"]["model.layers.1.self_attn.o_proj"]["format"] = "nope"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.o_proj: unknown"):
        quantlab.load(str(out))


def test_checkpoint_tensor_dtypes_are_checked(tiny_llama: nn.Module, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _quantize_all(tiny_llama)
    out = save_quantized(tiny_llama, tmp_path / "ckpt", "test", {"method": "test"})
    state = load_file(str(out / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.qweight"] = state["model.layers.0.mlp.up_proj.qweight"].int()
    save_file(state, str(out / "model.safetensors"))
    want = r"up_proj\.qweight is I32 \[256, 128\], the format stores I8"
    with pytest.raises(CheckpointError, match=want):
        quantlab.load(str(out))


def test_registering_needs_the_whole_protocol() -> None:
    class Half(nn.Module):
        format_name: ClassVar[str] = "half"
        format_version: ClassVar[int] = 1

    with pytest.raises(TypeError, match="lacks"):
        register_layer_format(Half)
    with pytest.raises(ValueError, match="already registered"):
        register_layer_format(type("Other", (_Int8RowLinear,), {}))
