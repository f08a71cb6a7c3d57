from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import quantlab
from quantlab.export.awq_checkpoint import load_awq, save_awq
from quantlab.export.errors import CheckpointError


@pytest.mark.parametrize("sym", [False, True])
def test_awq_layout_round_trips_to_identical_logits(
    tiny_llama: nn.Module, tmp_path: Path, sym: bool
) -> None:
    report = quantlab.quantize(tiny_llama, "rtn", bits=4, group_size=32, sym=sym, progress=False)
    out = save_awq(tiny_llama, tmp_path / "a", report.config)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "awq" and cfg["version"] == "gemm" and cfg["zero_point"]
    assert cfg["modules_to_not_convert"] == ["lm_head"]
    loaded = quantlab.load(str(out))
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, tiny_llama(x).logits)


def test_awq_refuses_what_it_cannot_store(tiny_llama: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no quantized modules"):
        save_awq(tiny_llama, tmp_path / "a", {})
    report = quantlab.quantize(tiny_llama, "rtn", bits=3, group_size=32, progress=False)
    with pytest.raises(ValueError, match="only 4-bit"):
        save_awq(tiny_llama, tmp_path / "a", report.config)
    assert not (tmp_path / "a").exists()


def test_corrupt_awq_checkpoints_are_named(tiny_llama: nn.Module, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    report = quantlab.quantize(tiny_llama, "rtn", bits=4, group_size=32, progress=False)
    out = save_awq(tiny_llama, tmp_path / "a", report.config)
    state = load_file(out / "model.safetensors")
    name = "model.layers.1.mlp.up_proj"
    state[f"{name}.qzeros"] = state[f"{name}.qzeros"][:2].contiguous()
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"{name}: qzeros must be"):
        load_awq(out)
    del state[f"{name}.qzeros"]
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"{name} lacks"):
        load_awq(out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["version"] = "gemv_fast"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="GEMM layout only"):
        load_awq(out)
