"""The lazy model (quantlab/export/lazy_model.py): parameters on the meta device until a
submodule is loaded from the memory-mapped checkpoint, released after; and the synthetic
checkpoints of real architectures' shapes (scripts/make_synthetic_checkpoint.py) it is measured
on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from quantlab.export.checkpoint_files import INDEX_FILE, CheckpointFiles, parse_size
from quantlab.export.errors import CheckpointError
from quantlab.export.lazy_model import LazyModel, empty_model
from scripts import make_synthetic_checkpoint as synthetic


def _lazy(path: Path, dtype: torch.dtype = torch.float32) -> LazyModel:
    model = empty_model(AutoConfig.from_pretrained(path), dtype)
    return LazyModel(model, CheckpointFiles(path))


def _ids(vocab: int = 1000) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 blocks of the tiny preset in bf16, ~0.6 MB shards: several blocks per shard and blocks
    split across shards."""
    out = tmp_path_factory.mktemp("synth") / "tiny"
    return synthetic.write_checkpoint(out, "tiny", 3, "bfloat16", 600_000, progress=False)


def test_bundled_model_loads_lazily_and_bit_identically(default_model_path: Path) -> None:
    lazy = _lazy(default_model_path)
    model = lazy.model
    assert lazy.loaded_bytes() == 0
    assert all(p.device.type == "meta" for p in model.parameters())
    # The constructor-made rotary table is real (not in the checkpoint, not released).
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"
    lazy.load()
    want = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, want(_ids()).logits)
    # Tied head: one tensor, loaded once and still shared.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert lazy.loaded_bytes() == sum(p.numel() * 4 for p in want.parameters())


def test_blocks_load_and_release_one_at_a_time(tiny_sharded: Path) -> None:
    lazy = _lazy(tiny_sharded)
    weights = lazy.weights
    assert len(weights.files) >= 3  # really sharded
    assert weights.dtype() == torch.bfloat16
    for index in range(3):
        prefix = f"model.layers.{index}"
        block = lazy.load(prefix)
        # In the compute dtype (fp32): twice the stored bf16 bytes, nothing else loaded.
        assert lazy.loaded_bytes() == 2 * weights.nbytes(prefix + ".")
        q = block.self_attn.q_proj.weight
        assert q.dtype == torch.float32
        assert torch.equal(q, weights.get(f"{prefix}.self_attn.q_proj.weight").float())
        lazy.release(prefix)
        assert lazy.loaded_bytes() == 0 and q.device.type == "meta"
    assert lazy.model.model.rotary_emb.inv_freq.device.type == "cpu"


def test_fully_loaded_synthetic_model_matches_transformers(tiny_sharded: Path) -> None:
    lazy = _lazy(tiny_sharded, torch.bfloat16)
    lazy.load()
    want = AutoModelForCausalLM.from_pretrained(tiny_sharded, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(lazy.model(_ids()).logits, want(_ids()).logits)


def test_tied_synthetic_checkpoint_loads_the_head_from_the_embedding(tmp_path: Path) -> None:
    path = synthetic.write_checkpoint(tmp_path / "t", "tiny-tied", 1, progress=False)
    lazy = _lazy(path)
    assert "lm_head.weight" not in lazy.weights
    head = lazy.load("lm_head")
    assert torch.equal(head.weight, lazy.weights.get("model.embed_tokens.weight").float())
    assert lazy.model.model.embed_tokens.weight.device.type == "cpu"  # the same tensor
    lazy.release("model.embed_tokens")
    assert head.weight.device.type == "meta"


def test_synthetic_weights_have_per_channel_scales_and_outlier_columns(tiny_sharded: Path) -> None:
    weights = CheckpointFiles(tiny_sharded)
    w = weights.get("model.layers.0.mlp.up_proj.weight").float()
    col = w.abs().mean(0)
    row = w.abs().mean(1)
    assert col.max() / col.median() > 8  # a few input channels 10-30x larger
    assert row.max() / row.min() > 1.5  # rows differ in scale
    config = json.loads((tiny_sharded / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["num_key_value_heads"] == 2
    assert (tiny_sharded / "tokenizer.json").is_file()
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1.5GiB") == 3 << 29


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_broken_checkpoints_are_named(tiny_sharded: Path, tmp_path: Path) -> None:
    index = json.loads((tiny_sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))

    missing = _copy(tiny_sharded, tmp_path / "missing")
    (missing / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=f"shard {shards[1]} .* is missing"):
        CheckpointFiles(missing)

    truncated = _copy(tiny_sharded, tmp_path / "truncated")
    data = (truncated / shards[0]).read_bytes()
    (truncated / shards[0]).write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        CheckpointFiles(truncated)

    misplaced = _copy(tiny_sharded, tmp_path / "misplaced")
    moved = dict(index)
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    moved["weight_map"] = {**index["weight_map"], name: shards[1]}
    (misplaced / "model.safetensors.index.json").write_text(json.dumps(moved))
    with pytest.raises(
        CheckpointError,
        match=f"tensors in this shard that it does not hold|tensors {INDEX_FILE} does not list",
    ):
        CheckpointFiles(misplaced)

    reshaped = _copy(tiny_sharded, tmp_path / "reshaped")
    config = json.loads((reshaped / "config.json").read_text())
    config["intermediate_size"] = 384
    (reshaped / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight is \[512, 256\] in the"):
        _lazy(reshaped)

    fewer = _copy(tiny_sharded, tmp_path / "fewer")
    config = json.loads((fewer / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (fewer / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="tensors the LlamaForCausalLM built from"):
        _lazy(fewer)

    more = _copy(tiny_sharded, tmp_path / "more")
    config["num_hidden_layers"] = 4
    (more / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no tensor for 'model.layers.3"):
        _lazy(more)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        CheckpointError, match="missing model.safetensors .*reads safetensors checkpoints only"
    ):
        CheckpointFiles(empty)


def test_single_file_checkpoint(tmp_path: Path) -> None:
    """A checkpoint within one shard is a single model.safetensors, as small models ship."""
    path = synthetic.write_checkpoint(tmp_path / "one", "tiny", 1, progress=False)
    assert (path / "model.safetensors").is_file()
    assert not (path / INDEX_FILE).exists()
    lazy = _lazy(path)
    lazy.load("model.layers.0")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        want = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert torch.equal(lazy.model.model.layers[0].mlp.down_proj.weight, want.float())


def test_a_synthetic_mixture_loads_lazily_into_per_expert_linears(tmp_path: Path) -> None:
    """The Qwen3-MoE presets (scripts/make_synthetic_checkpoint.py) store one tensor per expert
    projection, as real checkpoints do; they load into the per-expert linears, block by block,
    and compute what transformers' own (fused) model of the same checkpoint computes."""
    from quantlab.models.moe import RoutedExperts

    path = synthetic.write_checkpoint(tmp_path / "moe", "tiny-moe", 2, "float32", progress=False)
    lazy = _lazy(path)
    assert isinstance(lazy.model.model.layers[1].mlp.experts, RoutedExperts)
    block = lazy.load("model.layers.1")
    assert block.mlp.experts.expert(7).down_proj.weight.shape == (256, 128)
    assert lazy.loaded_bytes() == sum(p.numel() * 4 for p in block.parameters())
    lazy.release("model.layers.1")
    assert lazy.loaded_bytes() == 0
    whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = lazy.load()
    ids = _ids()
    with torch.no_grad():
        # Fused vs per-expert products: measured 2e-6 apart on logits of spread ~1.
        torch.testing.assert_close(model(ids).logits, whole(ids).logits, rtol=0, atol=1e-4)
