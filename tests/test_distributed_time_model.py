"""The multi-rank time model of bench/distributed/ranks_vs_threads.py on a made-up one-rank run:
one rank reproduces the run; more ranks divide the forwards, keep each group's slowest owner, and
add the Hessians' traffic."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "distributed" / "ranks_vs_threads.py"


def _module():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("ranks_vs_threads", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ranks_vs_threads"] = module
    spec.loader.exec_module(module)
    return module


def test_the_time_model_from_a_one_rank_run() -> None:
    model = _module()
    groups = (("attn.q", "attn.k", "attn.v"), ("attn.o",), ("mlp.down",))
    # Two blocks of 10 s: 6 s of solves (q 2, k 1, v 1, o 1, down 1), 4 s of forwards.
    layers = []
    for b in range(2):
        for name, n, k, seconds in [
            ("attn.q", 64, 64, 2.0), ("attn.k", 16, 64, 1.0), ("attn.v", 16, 64, 1.0),
            ("attn.o", 64, 64, 1.0), ("mlp.down", 64, 256, 1.0),
        ]:  # fmt: skip
            layers.append([f"layers.{b}.{name}", n, k, seconds])
    run = {"block_seconds": [10.0, 10.0], "layers": layers}
    link = 1e6  # bytes per second
    one, two, four = model.predict(run, groups, [1, 2, 4], link)
    assert one["block_s"] == pytest.approx(10.0)  # one rank is the run itself
    assert one["communicate_s"] == 0.0
    # Two ranks: q (the costliest of its group) alone, k and v together: max 2 s; o 1 s; down 1 s.
    assert two["owned_solve_s"] == pytest.approx(4.0)
    hessians = 4 * (64 * 64 + 64 * 64 + 256 * 256)
    assert two["communicate_s"] == pytest.approx(hessians / link)
    assert two["block_s"] == pytest.approx(4.0 / 2 + 4.0 + hessians / link)
    # Four ranks: every linear of q/k/v on its own rank; the single-linear groups do not shrink.
    assert four["owned_solve_s"] == pytest.approx(4.0)
    assert four["block_s"] == pytest.approx(1.0 + 4.0 + 3 * hessians / link)
