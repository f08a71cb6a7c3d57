"""Seeded fuzzing of a small checkpoint's safetensors header and config.json.

Every mutated checkpoint must either be refused with a :class:`CheckpointError` or load as a
model identical to the original (same tensors bit for bit, same architecture). Without the
checksum manifest (a hand-edited or older checkpoint) the promise is weaker, and said so: a
clear error or a model that loads, never another exception from deep inside. A failure prints
the seed and the mutations, so it can be replayed with ``QUANTLAB_FUZZ_SEED``.
"""

from __future__ import annotations

import copy
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import quantlab
from quantlab.export.errors import CheckpointError
from tests.checkpoint_mutations import (
    WEIGHTS,
    copy_checkpoint,
    drop_checksums,
    read_raw,
    same_model,
    write_checkpoint,
    write_raw,
)

CASES = int(os.environ.get("QUANTLAB_FUZZ_CASES", "150"))
BASE_SEED = int(os.environ.get("QUANTLAB_FUZZ_SEED", "19"))

_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 2, 7, 64, 2**40, 1.5, float("1e308"), "", "x", "false", "F16",
    "I32", "groupwise_int", [], [0], [0, 1], [-1, 2], [1, 2, 3], {}, {"a": 1},
]  # fmt: skip
_DTYPES = ["F16", "BF16", "F32", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "F8_E4M3", "Q4"]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (dict keys and list indices) into a JSON value."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _mutate_json(doc: Any, rng: random.Random) -> str:
    """Change ``doc`` in place at a random path; return what was done."""
    path = rng.choice(_paths(doc)[1:])
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    key = path[-1]
    old = parent[key]
    op = rng.choice(["delete", "replace", "nudge", "rename", "duplicate"])
    if op == "delete" and isinstance(parent, dict):
        del parent[key]
    elif op == "nudge" and type(old) is int:
        parent[key] = old + rng.choice([-8, -1, 1, 8, old])
    elif op == "nudge" and isinstance(old, str) and old in _DTYPES:
        parent[key] = rng.choice(_DTYPES)
    elif op == "rename" and isinstance(parent, dict) and isinstance(key, str):
        parent[key + rng.choice(["_", ".x", "s"])] = parent.pop(key)
    elif op == "duplicate" and isinstance(parent, dict) and isinstance(key, str):
        parent[key + ".copy"] = copy.deepcopy(old)
    else:
        op = "replace"
        parent[key] = copy.deepcopy(rng.choice(_VALUES))
    return f"{op} {'/'.join(map(str, path))}"


def _mutate_bytes(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    data = bytearray(raw)
    op = rng.choice(["flip", "truncate", "insert"])
    at = rng.randrange(len(data))
    if op == "flip":
        data[at] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        del data[at:]
    else:
        data[at:at] = bytes([rng.randrange(256)])
    return bytes(data), f"{op} byte {at}"


def _damage_header(root: Path, rng: random.Random) -> list[str]:
    header, data = read_raw(root / WEIGHTS)
    done = []
    if rng.random() < 0.25:
        text = json.dumps(header).encode()
        text, what = _mutate_bytes(text, rng)
        raw = len(text).to_bytes(8, "little") + text + data
        (root / WEIGHTS).write_bytes(raw)
        return [f"header {what}"]
    for _ in range(rng.randint(1, 3)):
        done.append("header " + _mutate_json(header, rng))
    write_raw(root / WEIGHTS, header, data)
    return done


def _damage_config(root: Path, rng: random.Random) -> list[str]:
    path = root / "config.json"
    if rng.random() < 0.25:
        raw, what = _mutate_bytes(path.read_bytes(), rng)
        path.write_bytes(raw)
        return [f"config.json {what}"]
    config = json.loads(path.read_text())
    # Half of the mutations go to quantization_config, the part quantlab interprets.
    target = config["quantization_config"] if rng.random() < 0.5 else config
    done = [f"config {_mutate_json(target, rng)}" for _ in range(rng.randint(1, 3))]
    path.write_text(json.dumps(config))
    return done


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    root = write_checkpoint("rtn", tmp_path_factory.mktemp("fuzz") / "rtn")
    return root, quantlab.load(str(root))


def _run(
    original: tuple[Path, Any],
    tmp_path: Path,
    damage: Callable[[Path, random.Random], list[str]],
    keep_manifest: bool,
    salt: int,
) -> None:
    source, model = original
    failures = []
    for case in range(CASES):
        seed = BASE_SEED * 1_000_003 + salt * 10_007 + case
        rng = random.Random(seed)
        root = copy_checkpoint(source, tmp_path / f"c{case}")
        if not keep_manifest:
            drop_checksums(root)
        done = damage(root, rng)
        try:
            loaded = quantlab.load(str(root))
        except CheckpointError:
            continue
        except Exception as exc:  # noqa: BLE001 - any other type is the defect under test
            failures.append(f"seed {seed} {done}: {type(exc).__name__}: {exc}")
            continue
        if keep_manifest and not same_model(loaded, model):
            failures.append(f"seed {seed} {done}: loaded a model that differs from the original")
    assert not failures, "\n".join(failures[:10])


@pytest.mark.parametrize("keep_manifest", [True, False], ids=["manifest", "no-manifest"])
def test_fuzzed_headers(original: tuple[Path, Any], tmp_path: Path, keep_manifest: bool) -> None:
    _run(original, tmp_path, _damage_header, keep_manifest, salt=1)


@pytest.mark.parametrize("keep_manifest", [True, False], ids=["manifest", "no-manifest"])
def test_fuzzed_configs(original: tuple[Path, Any], tmp_path: Path, keep_manifest: bool) -> None:
    _run(original, tmp_path, _damage_config, keep_manifest, salt=2)


def test_the_fuzzer_damages_something(original: tuple[Path, Any], tmp_path: Path) -> None:
    """Most fuzzed checkpoints must be refused (a fuzzer whose mutations never land would pass
    the tests above vacuously)."""
    source, _ = original
    refused = 0
    for case in range(20):
        rng = random.Random(case)
        root = copy_checkpoint(source, tmp_path / f"c{case}")
        (_damage_header if case % 2 else _damage_config)(root, rng)
        try:
            quantlab.load(str(root))
        except CheckpointError:
            refused += 1
    # The 20 cases are seeded: all 20 are refused (measured); one that stops being refused is a
    # mutation that no longer lands, or a check that no longer fires.
    assert refused == 20
