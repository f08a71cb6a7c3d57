"""BitStackLinear: forward, growing and shrinking in place, the registry protocol, and a whole
checkpoint cycle (quantize, save, budgeted load, resize) on a tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import quantlab
from quantlab.export.bitstack_checkpoint import (
    BudgetError,
    load_bitstack,
    parse_memory,
    plan_from_checkpoint,
)
from quantlab.export.quantlab_checkpoint import save_quantized
from quantlab.formats.bitstack import pack
from quantlab.methods.bitstack.config import BitStackConfig
from quantlab.nn.bitstack_linear import BitStackLinear
from quantlab.nn.registry import module_spec, quantized_modules
from quantlab.pipeline import quantize_model
from quantlab.solvers.bitstack import decompose
from tests.tolerances import fp32_dot_bound


def _layer(n: int = 24, k: int = 40, r: int = 3, b: int = 4, bias: bool = True) -> BitStackLinear:
    torch.manual_seed(0)
    res = decompose(torch.randn(n, k), b, r)
    return BitStackLinear.from_packed(
        pack(res.positive, res.u, res.v), torch.randn(n) if bias else None, steps=[5, 9, 11]
    )


def test_forward_is_x_times_the_stacked_weight_plus_bias() -> None:
    layer = _layer()
    x = torch.randn(2, 3, 40)
    w = layer.dequantized_weight()
    want = x.double() @ w.double().t() + layer.bias.double()
    # fp32 accumulation only (measured: equal to the fp32 dense product).
    bound = fp32_dot_bound(x.reshape(-1, 40), w).view(2, 3, 24)
    assert bool(((layer(x).double() - want).abs() <= bound).all())
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"expects input \[\.\.\., 40\]"):
        layer(torch.randn(2, 39))


def test_truncate_and_append_are_exact_inverses() -> None:
    layer = _layer()
    x = torch.randn(5, 40)
    full = layer(x)
    signs, u, v = layer.signs.clone(), layer.u.clone(), layer.v.clone()
    layer.truncate(1)
    assert layer.n_blocks == 1 and layer.storage_bits() == 8 * layer.block_bytes
    one = layer(x)
    assert not torch.equal(one, full)
    layer.append_blocks(signs[1:], u[1:], v[1:])
    assert torch.equal(layer(x), full)
    with pytest.raises(ValueError, match=r"n_blocks must be in \[1, 4\]"):
        layer.truncate(0)
    with pytest.raises(ValueError, match=r"append_blocks: u must be \[1, 24, 3\]"):
        layer.append_blocks(signs[:1], u[:1, :, :2], v[:1])


def test_registry_protocol() -> None:
    layer = _layer(bias=False)
    spec = module_spec(layer)
    assert spec == {"format": "bitstack", "format_version": 1, "rank": 3, "n_blocks": 4,
                    "steps": [5, 9, 11], "block_bytes": 24 * 5 + 2 * 3 * 64}  # fmt: skip
    empty = BitStackLinear.empty_like(nn.Linear(40, 24, bias=False), spec)
    assert {k: tuple(t.shape) for k, t in empty.state_dict().items()} == {
        k: tuple(t.shape) for k, t in layer.state_dict().items()
    }
    assert BitStackLinear.checkpoint_tensors(spec) == {"signs": "U8", "u": "F16", "v": "F16"}
    with pytest.raises(ValueError, match="steps lists 2 blocks"):
        BitStackLinear(40, 24, rank=3, n_blocks=2, steps=[1, 2])


def test_parse_memory_units() -> None:
    assert parse_memory("350MB") == 350_000_000
    assert parse_memory("1.5 GiB") == int(1.5 * 2**30)
    assert parse_memory(1024) == 1024
    for bad in ("12 parsecs", "-5MB", 0, True):
        with pytest.raises(ValueError, match="memory budget"):
            parse_memory(bad)


@pytest.fixture
def tiny_checkpoint(tiny_llama: nn.Module, tmp_path: Path) -> Path:
    samples = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    config = BitStackConfig(n_blocks=3, rank=2)
    report = quantize_model(tiny_llama, config, samples=samples, progress=False)
    layers = dict(quantized_modules(tiny_llama))
    assert len(layers) == 14 and all(m.n_blocks == 3 for m in layers.values())
    assert len(report.details["bitstack"]["order"]) == 14 * 2
    return save_quantized(tiny_llama, tmp_path / "bs", "bitstack", report.config)


def test_budgeted_load_and_resize_both_ways(tiny_checkpoint: Path) -> None:
    plan = plan_from_checkpoint(tiny_checkpoint, torch.float32)
    qcfg = json.loads((tiny_checkpoint / "config.json").read_text())["quantization_config"]
    positions = sorted(s for spec in qcfg["modules"].values() for s in spec["steps"])
    assert positions == list(range(28))  # the global order, stored in config.json
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    small_budget = plan.config_bytes(5)
    big_budget = plan.config_bytes(20) + 10  # a few bytes more do not buy a block
    small = quantlab.load(str(tiny_checkpoint), memory_budget=small_budget)
    big = load_bitstack(tiny_checkpoint, big_budget)
    assert small.bitstack_source.steps == 5 and big.bitstack_source.steps == 20
    # The budget convention is the model's real tensor bytes.
    assert small.memory_bytes() == plan.config_bytes(5)
    assert big.memory_bytes() == plan.config_bytes(20)
    counts = [m.n_blocks for _, m in quantized_modules(big)]
    assert max(counts) - min(counts) <= 1  # stage-major order
    with torch.no_grad():
        want_small, want_big = small(ids).logits, big(ids).logits
        assert not torch.equal(want_small, want_big)
        assert small.resize(big_budget) == plan.config_bytes(20)
        assert torch.equal(small(ids).logits, want_big)
        assert quantlab.resize(small, small_budget) == plan.config_bytes(5)
        assert torch.equal(small(ids).logits, want_small)
        assert small.memory_bytes() == plan.config_bytes(5)
    full = quantlab.load(str(tiny_checkpoint))
    assert all(m.n_blocks == 3 for _, m in quantized_modules(full))
    with pytest.raises(BudgetError, match=f"smallest configuration .*{plan.base_bytes} bytes"):
        quantlab.load(str(tiny_checkpoint), memory_budget=plan.base_bytes - 1)
    with pytest.raises(ValueError, match="resize needs a model loaded"):
        quantlab.resize(nn.Linear(2, 2), "1MB")


def test_fp16_accounting_and_foreign_budget(tiny_checkpoint: Path, tmp_path: Path) -> None:
    fp16 = plan_from_checkpoint(tiny_checkpoint, torch.float16)
    fp32 = plan_from_checkpoint(tiny_checkpoint, torch.float32)
    embed = 512 * 128  # the only large undecomposed tensor (tied head stored once)
    assert fp32.fixed_bytes - fp16.fixed_bytes >= 2 * embed
    model = load_bitstack(tiny_checkpoint, fp16.config_bytes(7), accounting_dtype=torch.float16)
    assert model.bitstack_source.steps == 7
    with pytest.raises(ValueError, match="BitStack checkpoints only"):
        quantlab.load(str(tmp_path), memory_budget="1MB")


def test_replay_feeds_later_blocks_the_compressed_outputs(tiny_llama: nn.Module) -> None:
    import copy

    samples = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    decomposed = {}
    for replay in (0, 1):
        model = copy.deepcopy(tiny_llama)
        quantize_model(
            model, BitStackConfig(n_blocks=2, replay_blocks=replay), samples=samples, progress=False
        )
        decomposed[replay] = {n: m.dequantized_weight() for n, m in quantized_modules(model)}
    # Block 0 sees the same (embedding) inputs either way; block 1 is calibrated on what the
    # one-block-per-linear block 0 computes, so its decomposition changes.
    first = [n for n in decomposed[0] if ".layers.0." in n]
    later = [n for n in decomposed[0] if ".layers.1." in n]
    assert all(torch.equal(decomposed[0][n], decomposed[1][n]) for n in first)
    assert not any(torch.equal(decomposed[0][n], decomposed[1][n]) for n in later)
    with pytest.raises(ValueError, match=r"replay_blocks must be in \[0, n_blocks=2\]"):
        BitStackConfig(n_blocks=2, replay_blocks=3)
