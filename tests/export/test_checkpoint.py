from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import quantlab
from quantlab.export.atomic import atomic_directory
from quantlab.export.errors import CheckpointError
from quantlab.export.quantlab_checkpoint import validate_checkpoint


@pytest.fixture
def tiny_checkpoint(tiny_llama: nn.Module, tmp_path: Path) -> tuple[Path, nn.Module]:
    report = quantlab.quantize(tiny_llama, "rtn", bits=4, group_size=32, progress=False)
    out = quantlab.save(tiny_llama, str(tmp_path / "ckpt"), report)
    return out, tiny_llama


def test_round_trip_gives_identical_logits(tiny_checkpoint: tuple[Path, nn.Module]) -> None:
    path, model = tiny_checkpoint
    loaded = quantlab.load(str(path))
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    q = loaded.model.layers[1].mlp.down_proj
    assert isinstance(q, quantlab.QuantLinear) and q.scales.dtype == torch.float16
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "quantlab" and cfg["format_version"] == 1
    assert len(cfg["modules"]) == 2 * 7


def test_transformers_from_pretrained_loads_it(tiny_checkpoint: tuple[Path, nn.Module]) -> None:
    from transformers import AutoModelForCausalLM

    from quantlab.integrations.transformers import register

    path, model = tiny_checkpoint
    register()
    loaded = AutoModelForCausalLM.from_pretrained(path)
    x = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_truncated_weights_are_reported(tiny_checkpoint: tuple[Path, nn.Module]) -> None:
    path, _ = tiny_checkpoint
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        quantlab.load(str(path))
    weights.write_bytes(b"\x05")
    with pytest.raises(CheckpointError, match="truncated"):
        validate_checkpoint(path)
    weights.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        validate_checkpoint(path)


def test_missing_files_and_foreign_configs_are_reported(
    tiny_checkpoint: tuple[Path, nn.Module], tmp_path: Path
) -> None:
    path, _ = tiny_checkpoint
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        quantlab.load(str(tmp_path / "nope"))
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        quantlab.load(str(path))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="v99 is not readable"):
        validate_checkpoint(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        validate_checkpoint(path)


def test_missing_tensor_is_named(tiny_checkpoint: tuple[Path, nn.Module]) -> None:
    from safetensors.torch import load_file, save_file

    path, _ = tiny_checkpoint
    state = load_file(path / "model.safetensors")
    del state["model.layers.0.self_attn.k_proj.qzeros"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"missing 1 tensor\(s\): model\.layers\.0\.self_attn\.k_proj\.qzeros"
    ):
        validate_checkpoint(path)


def test_interrupted_save_keeps_the_previous_output(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("second, half written")
        raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary debris left
    shutil.rmtree(target)
