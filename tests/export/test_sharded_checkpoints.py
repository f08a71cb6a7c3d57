"""Checkpoints beyond ``--max-shard-size``: every layout quantlab writes (quantlab, GPTQ, AWQ)
is split into shards with an index, and loads back -- through quantlab and through transformers
-- exactly as the single-file checkpoint does; a damaged shard set is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import quantlab
from quantlab.export.awq_checkpoint import save_awq
from quantlab.export.checkpoint_files import INDEX_FILE, SINGLE_FILE
from quantlab.export.checksums import verify_checksums
from quantlab.export.errors import CheckpointError
from quantlab.export.gptq_checkpoint import save_gptq

SHARD = 60_000  # bytes: the tiny Llama's ~0.5 MB checkpoint in about ten shards


def _shards(path: Path) -> list[str]:
    index = json.loads((path / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and not (path / SINGLE_FILE).exists()
    assert files == sorted(p.name for p in path.glob("model-*-of-*.safetensors"))
    return files


def _logits(model: nn.Module) -> torch.Tensor:
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("layout", ["quantlab", "gptq", "awq"])
def test_sharded_checkpoints_load_exactly(
    tiny_llama: nn.Module, tmp_path: Path, layout: str
) -> None:
    report = quantlab.quantize(tiny_llama, "rtn", bits=4, group_size=32, progress=False)
    if layout == "quantlab":
        one = quantlab.save(tiny_llama, str(tmp_path / "one"), report)
        many = quantlab.save(tiny_llama, str(tmp_path / "many"), report, max_shard_size=SHARD)
    elif layout == "gptq":
        one, _ = save_gptq(tiny_llama, tmp_path / "one", report.config)
        many, _ = save_gptq(tiny_llama, tmp_path / "many", report.config, max_shard_bytes=SHARD)
    else:
        one = save_awq(tiny_llama, tmp_path / "one", report.config)
        many = save_awq(tiny_llama, tmp_path / "many", report.config, max_shard_bytes=SHARD)
    files = _shards(many)
    # Every shard and the index are in the checksum manifest, and verify.
    manifest = verify_checksums(many)
    assert {*files, INDEX_FILE} <= set(manifest["files"])
    want = _logits(quantlab.load(str(one)))
    assert torch.equal(_logits(quantlab.load(str(many))), want)
    assert torch.equal(want, _logits(tiny_llama))


def test_transformers_loads_a_sharded_quantlab_checkpoint(
    tiny_llama: nn.Module, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from quantlab.integrations.transformers import register

    report = quantlab.quantize(tiny_llama, "rtn", bits=4, group_size=32, progress=False)
    path = quantlab.save(tiny_llama, str(tmp_path / "many"), report, max_shard_size=SHARD)
    _shards(path)
    register()
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(path)), _logits(tiny_llama))


def test_damaged_shard_sets_are_named(tiny_llama: nn.Module, tmp_path: Path) -> None:
    report = quantlab.quantize(tiny_llama, "rtn", bits=4, group_size=32, progress=False)
    path = quantlab.save(tiny_llama, str(tmp_path / "many"), report, max_shard_size=SHARD)
    files = _shards(path)
    # A shard whose bytes changed: the checksum manifest catches it even though it parses.
    shard = path / files[2]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=files[2]):
        quantlab.load(str(path))
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    quantlab.load(str(path))
    # A missing shard is named before any tensor is read.
    shard.rename(path / "elsewhere")
    with pytest.raises(CheckpointError, match=f"shard {files[2]} .*is missing"):
        quantlab.load(str(path))


def test_bad_shard_size_is_refused(tiny_llama: nn.Module, tmp_path: Path) -> None:
    report = quantlab.quantize(tiny_llama, "rtn", bits=4, group_size=32, progress=False)
    with pytest.raises(ValueError, match="size 'lots': expected a number with an optional unit"):
        quantlab.save(tiny_llama, str(tmp_path / "x"), report, max_shard_size="lots")
    assert not (tmp_path / "x").exists()
