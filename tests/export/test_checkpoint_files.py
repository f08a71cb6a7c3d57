"""Sharded safetensors checkpoints (quantlab/export/checkpoint_files.py): the streaming writer's
files read back with the safetensors library itself, tensors aligned to their element size,
shards cut at the size limit, an index only when there are several files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from quantlab.export.checkpoint_files import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointFiles,
    ShardedWriter,
    parse_size,
)


def _tensors() -> dict[str, torch.Tensor]:
    """Every element size, odd element counts (so a naive layout would misalign what follows)."""
    gen = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(7, 3, generator=gen).to(torch.bfloat16),
        "b.u8": torch.randint(0, 255, (13,), generator=gen).to(torch.uint8),
        "c.f32": torch.randn(5, 9, generator=gen),
        "d.i64": torch.randint(-(2**40), 2**40, (3,), generator=gen),
        "e.bool": torch.rand(11, generator=gen) > 0.5,
        "f.f16": torch.randn(33, generator=gen).half(),
        "g.i32": torch.randint(-(2**31), 2**31 - 1, (4, 4), generator=gen, dtype=torch.int32),
        "h.f64": torch.randn(2, generator=gen, dtype=torch.float64),
        "i.empty": torch.zeros(0, 4),
        "j.strided": torch.randn(6, 4, generator=gen).t(),  # not contiguous
    }


def _offsets(path: Path) -> dict[str, tuple[str, int]]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0  # data starts 8-byte aligned
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__")
    return {k: (v["dtype"], v["data_offsets"][0]) for k, v in header.items()}


_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}


@pytest.mark.parametrize("max_bytes", [10**9, 200, 1])
def test_written_files_read_back_with_safetensors_and_are_aligned(
    tmp_path: Path, max_bytes: int
) -> None:
    tensors = _tensors()
    with ShardedWriter(tmp_path, max_bytes) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        files = writer.close()
    if max_bytes == 10**9:
        assert files == [SINGLE_FILE] and not (tmp_path / INDEX_FILE).exists()
    else:
        assert files[-1] == INDEX_FILE and len(files) > 2
        index = json.loads((tmp_path / INDEX_FILE).read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for t in tensors.values()
        )
    shard_files = [tmp_path / f for f in files if f != INDEX_FILE]
    seen = {}
    for shard in shard_files:
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                seen[name] = f.get_tensor(name)
        for name, (dtype, offset) in _offsets(shard).items():
            assert offset % _SIZES[dtype] == 0, (name, offset)
        # Shards hold whole tensors and stay under the limit unless one tensor alone exceeds it.
        sizes = [seen[n].numel() * seen[n].element_size() for n in _offsets(shard)]
        assert sum(sizes) <= max_bytes or len(sizes) == 1
    assert set(seen) == set(tensors)
    for name, tensor in tensors.items():
        assert seen[name].dtype == tensor.dtype and torch.equal(seen[name], tensor), name
    # Our reader agrees, and no spill or partial file is left behind.
    with CheckpointFiles(tmp_path) as files_in:
        assert set(files_in.tensors) == set(tensors)
        assert all(torch.equal(files_in.get(n), t) for n, t in tensors.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)


def test_writer_refuses_duplicates_and_cleans_up_on_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="added twice"), ShardedWriter(tmp_path, 100) as writer:
        writer.add("x", torch.zeros(30))
        writer.add("y", torch.zeros(30))  # a second shard
        writer.add("x", torch.zeros(1))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="no tensors were written"):
        ShardedWriter(tmp_path).close()


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("2kib") == 2048
    assert parse_size("1000") == 1000 and parse_size("1000B") == 1000
    assert parse_size(7) == 7
    for bad in ("", "GB", "five GB", "0", "-1MB"):
        with pytest.raises(ValueError):
            parse_size(bad)
