from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import nn

from quantlab.calib.blocks import ModelBlocks
from quantlab.calib.capture import capture_block_inputs, run_sequential, stage_parts
from quantlab.calib.stats import HessianAccumulator
from quantlab.models.arch import resolve
from quantlab.solvers.rtn import rtn_quantize


def _samples() -> torch.Tensor:
    return torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(0))


def test_captured_inputs_are_the_embedding_outputs(tiny_llama: nn.Module) -> None:
    x = _samples()
    inputs = capture_block_inputs(
        tiny_llama, tiny_llama.model.layers, x, batch_size=2, device="cpu"
    )
    assert len(inputs.hidden) == 2 and inputs.n_tokens == 3 * 24
    with torch.no_grad():
        ref = tiny_llama(x, output_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(torch.cat(inputs.hidden), ref, rtol=0, atol=0)


def _direct_hessians(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Hessians of every block linear, from hooks on one ordinary forward pass."""
    accs: dict[str, HessianAccumulator] = {}
    handles = []
    for name, module in model.model.layers.named_modules():
        if isinstance(module, nn.Linear):
            accs[name] = HessianAccumulator(module.in_features)
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: accs[n].add(a[0])))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return {k: v.hessian() for k, v in accs.items()}


@pytest.mark.parametrize("batch_size", [None, 1, 2])
def test_sequential_statistics_match_a_plain_forward(
    tiny_llama: nn.Module, batch_size: int | None
) -> None:
    """Without quantization, block-by-block replay must see exactly the model's own activations."""
    x = _samples()
    direct = _direct_hessians(tiny_llama, x)
    spec = resolve(tiny_llama)
    seen: dict[str, torch.Tensor] = {}

    def on_group(i: int, block: nn.Module, group: Sequence[str], stats: dict) -> None:
        for name in group:
            seen[f"{i}.{name}"] = stats[name].hessian()

    run_sequential(
        ModelBlocks(tiny_llama, spec.blocks, "cpu"),
        spec.sequential_groups,
        x,
        on_group,
        batch_size=batch_size,
        progress=False,
    )
    assert set(seen) == set(direct)
    # Other batchings of the same fp32 matmuls: measured at most 2.4e-6 apart (entries up to 5.3),
    # 0.43 of this tolerance.
    for key in direct:
        torch.testing.assert_close(seen[key], direct[key], rtol=1e-5, atol=1e-6)


def test_single_pass_and_staged_modes_agree_when_quantizing(tiny_llama: nn.Module) -> None:
    """Each group's statistics must come from inputs produced by the already-quantized groups."""
    x = _samples()
    spec = resolve(tiny_llama)
    results = []
    for batch_size in (None, 1):
        model = type(tiny_llama)(tiny_llama.config).eval()
        model.load_state_dict(tiny_llama.state_dict())
        seen: dict[str, torch.Tensor] = {}

        def on_group(
            i: int, block: nn.Module, group: Sequence[str], stats: dict, seen: dict = seen
        ) -> None:
            for name in group:
                seen[f"{i}.{name}"] = stats[name].hessian().clone()
                linear = block.get_submodule(name)
                linear.weight.data.copy_(rtn_quantize(linear.weight, 2, 32).dequantize())

        run_sequential(
            ModelBlocks(model, spec.blocks, "cpu"),
            spec.sequential_groups,
            x,
            on_group,
            batch_size=batch_size,
            progress=False,
        )
        results.append(seen)
    fp = _direct_hessians(tiny_llama, x)
    for key in fp:  # measured at 0.25 of this tolerance
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-5, atol=1e-6)
    # 2-bit quantization of block 0 changes what block 1's down_proj sees.
    assert not torch.allclose(results[0]["1.mlp.down_proj"], fp["1.mlp.down_proj"], rtol=1e-2)


@pytest.mark.parametrize("batch_size", [None, 1])
def test_each_groups_hessian_is_freed_once_solved(
    tiny_llama: nn.Module, batch_size: int | None
) -> None:
    """Memory: when a group is solved, no earlier group of the block still holds its K x K matrix
    and no later one has one yet (the down projection's solve is the peak of a block)."""
    spec = resolve(tiny_llama)
    earlier: list[HessianAccumulator] = []
    widths: list[int] = []

    def on_group(i: int, block: nn.Module, group: Sequence[str], stats: dict) -> None:
        accumulator = stats[group[0]]
        for old in earlier:
            with pytest.raises(RuntimeError, match="released after its solve"):
                old.hessian()
        widths.append(accumulator.hessian().shape[0])
        earlier.append(accumulator)

    run_sequential(
        ModelBlocks(tiny_llama, spec.blocks, "cpu"),
        spec.sequential_groups,
        _samples(),
        on_group,
        batch_size=batch_size,
        progress=False,
    )
    assert len(earlier) == len(spec.sequential_groups) * len(tiny_llama.model.layers)
    with pytest.raises(RuntimeError, match="takes no more inputs"):
        earlier[-1].add(torch.zeros(1, widths[-1]))


def test_stage_parts_fit_the_limit_in_order_and_never_split_a_group() -> None:
    widths = [4, 4, 4, 8, 2]
    assert stage_parts(widths, None) == [[0, 1, 2, 3, 4]]
    # 4 * 4^2 = 64 bytes each for the 4-wide, 256 for the 8-wide (over any limit below: alone).
    assert stage_parts(widths, 128) == [[0, 1], [2], [3], [4]]
    assert stage_parts(widths, 192) == [[0, 1, 2], [3], [4]]
    assert stage_parts(widths, 10_000) == [[0, 1, 2, 3, 4]]
    assert stage_parts(widths, 1) == [[0], [1], [2], [3], [4]]
