"""One mixture-of-experts layer on the CPU: float experts vs W4 experts run one by one
(``RoutedExperts``' loop) vs the same W4 experts as one grouped op per projection
(``GroupwiseIntExperts``), in the same process.

Shapes: Qwen3-30B-A3B's (128 experts, hidden 2048, expert intermediate 768, top-8; W4 g128:
604 M expert weights, 0.3 GB packed, 2.4 GB in fp32) and the MoEfied SmolLM2's (8 experts of 192
over hidden 576, top-8, W4 g64). Random weights and routing: the work per call depends on the
shapes and on how many experts the tokens reach, not on the values. Each call takes the next of
16 routings (softmax top-k of random logits), so successive calls reach other experts, as
successive decode steps do. ``tokens`` is the number of tokens in the call (batch 1 and 4 decode,
then small prefill chunks); every token goes to k experts.

Run: ``pytest bench/moe/test_grouped_experts.py --benchmark-only`` (about 2 minutes on 2 cores,
most of it building the 128-expert layer). Nothing here asserts a speed.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import TYPE_CHECKING, Any

import pytest
import torch
from torch import nn

import quantlab
from bench.timing import git_commit
from quantlab.models.moe import ExpertMLP, ExpertNames, RoutedExperts
from quantlab.nn.groupwise_int_experts import GroupwiseIntExperts

if TYPE_CHECKING:
    from pytest_benchmark.fixture import BenchmarkFixture

# name: (experts, hidden, intermediate, top_k, group)
LAYERS = {
    "qwen3-30b-a3b-128x2048x768-top8-g128": (128, 2048, 768, 8, 128),
    "moefied-smollm2-8x576x192-top8-g64": (8, 576, 192, 8, 64),
}
TOKENS = (1, 4, 16, 64)
VARIANTS = ("float", "w4-per-expert", "w4-grouped")
ROUTINGS = 16


@cache
def _layers(name: str) -> dict[str, nn.Module]:
    experts, hidden, inter, _k, group = LAYERS[name]
    torch.manual_seed(0)
    names = ExpertNames()
    mlps = []
    for _ in range(experts):
        mlp = ExpertMLP(hidden, inter, nn.functional.silu, names, torch.float32, "cpu")
        for linear in mlp.children():
            nn.init.normal_(linear.weight, std=0.02)
        mlps.append(mlp)
    float_layer = RoutedExperts(mlps).eval()
    holder = nn.Sequential(copy.deepcopy(float_layer))
    quantlab.replace_linear(holder, bits=4, group_size=group)
    grouped = holder[0]
    assert isinstance(grouped, GroupwiseIntExperts)
    return {"float": float_layer, "w4": grouped}


def _routings(name: str, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    experts, hidden, _inter, k, _group = LAYERS[name]
    gen = torch.Generator().manual_seed(tokens)
    out = []
    for _ in range(ROUTINGS):
        logits = torch.randn(tokens, experts, generator=gen)
        weights, index = torch.softmax(logits, -1).topk(k, dim=-1)
        out.append((torch.randn(tokens, hidden, generator=gen), index, weights))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_experts_layer(benchmark: BenchmarkFixture, layer: str, tokens: int, variant: str) -> None:
    layers = _layers(layer)
    module = layers["float" if variant == "float" else "w4"]
    if isinstance(module, GroupwiseIntExperts):
        module.grouped = variant == "w4-grouped"
    calls = _routings(layer, tokens)
    state = {"i": 0}

    @torch.inference_mode()
    def step() -> Any:
        hidden, index, weights = calls[state["i"] % ROUTINGS]
        state["i"] += 1
        return module(hidden, index, weights)

    for _ in range(2):  # first-call costs
        step()
    benchmark.group = f"moe layer {layer} tokens={tokens}"
    benchmark.pedantic(step, rounds=20 if tokens <= 4 else 8, iterations=1)
    experts, _hidden, _inter, k, _group = LAYERS[layer]
    reached = len({int(e) for _, index, _ in calls for e in index.flatten()}) / ROUTINGS
    benchmark.extra_info.update(
        suite="moe-layer",
        layer=layer,
        variant=variant,
        tokens=tokens,
        experts=experts,
        top_k=k,
        experts_reached_per_call=round(reached, 1),
        threads=torch.get_num_threads(),
        commit=git_commit(),
        ms=1e3 * benchmark.stats.stats.median,
    )
