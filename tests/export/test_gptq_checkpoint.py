from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import quantlab
from quantlab.export.gptq_checkpoint import save_gptq


@pytest.mark.parametrize(("sym", "fmt"), [(True, "gptq"), (False, "gptq_v2"), (False, "auto")])
def test_gptq_layout_round_trips_to_identical_logits(
    tiny_llama: nn.Module, tmp_path: Path, sym: bool, fmt: str
) -> None:
    report = quantlab.quantize(tiny_llama, "rtn", bits=4, group_size=32, sym=sym, progress=False)
    out, used = save_gptq(tiny_llama, tmp_path / "g", report.config, checkpoint_format=fmt)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == used
    assert cfg["desc_act"] is False and cfg["sym"] is sym and cfg["bits"] == 4
    assert used == (fmt if fmt != "auto" else "gptq_v2")
    loaded = quantlab.load(str(out))
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, tiny_llama(x).logits)


def test_gptq_tensor_layout_on_disk(tiny_llama: nn.Module, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    report = quantlab.quantize(tiny_llama, "rtn", bits=4, group_size=32, sym=True, progress=False)
    out, _ = save_gptq(tiny_llama, tmp_path / "g", report.config)
    state = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"  # in 256 -> out 128
    assert state[f"{name}.qweight"].shape == (256 * 4 // 32, 128)
    assert state[f"{name}.qzeros"].shape == (256 // 32, 128 * 4 // 32)
    assert state[f"{name}.scales"].shape == (256 // 32, 128)
    assert state[f"{name}.scales"].dtype == torch.float16
    assert torch.equal(state[f"{name}.g_idx"], torch.arange(256, dtype=torch.int32) // 32)
    # Symmetric 4-bit, v1: every zero point 8 is stored as 7 in each nibble.
    assert bool((state[f"{name}.qzeros"] == 0x77777777).all())
