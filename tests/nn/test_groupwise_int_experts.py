"""``GroupwiseIntExperts``: a mixture's groupwise-integer experts as one grouped op per projection,
the same results as running them one by one, in the same memory."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from quantlab.formats.groupwise_int import pack
from quantlab.models.moe import ExpertMLP, ExpertNames, RoutedExperts
from quantlab.nn.groupwise_int_experts import (
    GroupwiseIntExperts,
    stack_groupwise_experts,
    stacking_refusal,
)
from quantlab.nn.groupwise_int_linear import QuantLinear
from quantlab.ops.kernel_policy import KernelPathWarning, reset
from quantlab.solvers.rtn import rtn_quantize

HIDDEN, INTER = 64, 96


def quantized_experts(
    experts: int = 6,
    bits: int = 4,
    group: int = 32,
    sym: bool = False,
    bits_of: dict[int, int] | None = None,
    seed: int = 0,
) -> RoutedExperts:
    """``experts`` SiLU experts whose three projections are RTN-quantized ``QuantLinear``s
    (``bits_of``: another bit width for some experts' down projection)."""
    torch.manual_seed(seed)
    names = ExpertNames()
    mlps = []
    for e in range(experts):
        mlp = ExpertMLP(HIDDEN, INTER, nn.functional.silu, names, torch.float32, "cpu")
        for name in (names.gate, names.up, names.down):
            linear = mlp.get_submodule(name)
            b = (bits_of or {}).get(e, bits) if name == names.down else bits
            r = rtn_quantize(torch.randn_like(linear.weight), b, group, sym)
            setattr(mlp, name, QuantLinear.from_packed(pack(r)))
        mlps.append(mlp)
    return RoutedExperts(mlps).eval()


def routing(tokens: int, experts: int, k: int, seed: int, skip: tuple[int, ...] = ()) -> tuple:
    """Hidden states and a top-k routing that never picks the experts in ``skip``."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN, generator=gen)
    logits = torch.randn(tokens, experts, generator=gen)
    logits[:, list(skip)] = -torch.inf
    weights, index = torch.softmax(logits, -1).topk(k, dim=-1)
    return hidden, index, weights


def storages(module: GroupwiseIntExperts, tensor: str) -> set[int]:
    return {
        buf.untyped_storage().data_ptr()
        for name, buf in module.named_buffers()
        if name.endswith(f".{tensor}")
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("tokens", "k", "sym"),
    [(1, 2, False), (4, 3, True), (40, 2, False)],  # decode, small batch, >8 rows an expert
)
def test_grouped_is_the_per_expert_result_bit_for_bit(
    tokens: int, k: int, sym: bool, dtype: torch.dtype
) -> None:
    """Same rows in the same order per expert, same kernels, same summation order: equal to the
    last bit (expert 2 gets no token)."""
    grouped = GroupwiseIntExperts(quantized_experts(sym=sym)).to(dtype)
    hidden, index, weights = routing(tokens, 6, k, seed=tokens, skip=(2,))
    hidden, weights = hidden.to(dtype), weights.to(dtype)
    with torch.no_grad():
        want = RoutedExperts.forward(grouped, hidden, index, weights)
        got = grouped(hidden, index, weights)
    assert got.dtype == dtype
    assert torch.equal(got, want)
    assert grouped._stacks() is not None  # it did take the grouped path


def test_stacking_shares_storage_and_keeps_names_and_identities() -> None:
    """One storage per projection and tensor (no second copy), the state dict's names and the
    buffers' Python objects unchanged (loaders track them by identity), values unchanged."""
    routed = quantized_experts()
    before = {name: buf for name, buf in routed.named_buffers()}
    values = {name: buf.clone() for name, buf in before.items()}
    model = nn.Sequential(nn.Identity(), routed)
    assert stack_groupwise_experts(model) == ["1"]
    grouped = model[1]
    assert isinstance(grouped, GroupwiseIntExperts)
    after = dict(grouped.named_buffers())
    assert set(after) == set(before)
    for name, buf in after.items():
        assert buf is before[name], name
        assert torch.equal(buf, values[name]), name
    for tensor in ("qweight", "scales", "qzeros"):
        assert len(storages(grouped, tensor)) == 2  # gate+up, down
    total = sum(buf.numel() * buf.element_size() for buf in after.values())
    stacked = {
        buf.untyped_storage().data_ptr(): buf.untyped_storage().nbytes() for buf in after.values()
    }
    assert sum(stacked.values()) == total
    # The module holds no tensor of its own: releasing the experts' tensors frees the stacks.
    held = [v for v in vars(grouped).values() if isinstance(v, torch.Tensor)]
    assert not [v for v in held if v.untyped_storage().data_ptr() in stacked]


def test_replaced_tensors_are_stacked_again_before_use() -> None:
    """A loader that swaps new tensors into the experts (LazyModel's release and load) leaves the
    stacks stale: the next forward notices, stacks again and computes with the new values."""
    grouped = GroupwiseIntExperts(quantized_experts())
    hidden, index, weights = routing(5, 6, 2, seed=3)
    other = quantized_experts(seed=1)
    for (name, buf), (_, new) in zip(grouped.named_buffers(), other.named_buffers(), strict=True):
        torch.utils.swap_tensors(buf, new.clone())
        assert not name.endswith("qweight") or buf.untyped_storage().nbytes() < 10_000
    assert grouped._stacks() is None
    with torch.no_grad():
        got = grouped(hidden, index, weights)
        want = other(hidden, index, weights)
    assert torch.equal(got, want)
    assert grouped._stacks() is not None and len(storages(grouped, "qweight")) == 2


def test_counting_and_bad_routing() -> None:
    grouped = GroupwiseIntExperts(quantized_experts())
    plain = quantized_experts()
    hidden, index, weights = routing(7, 6, 2, seed=4)
    for module in (grouped, plain):
        module.counting = True
        with torch.no_grad():
            module(hidden, index, weights)
    assert torch.equal(grouped.routed_tokens, plain.routed_tokens)
    assert int(grouped.routed_tokens.sum()) == 14
    with pytest.raises(ValueError, match="the router chose expert 6"):
        grouped(hidden, torch.full_like(index, 6), weights)


def test_what_cannot_be_stacked_says_why() -> None:
    """Mixed encodings keep the per-expert path, with a warning naming the reason; float experts
    are left alone silently (nothing to group)."""
    mixed = quantized_experts(bits_of={3: 8})
    assert "encodings" in (stacking_refusal(mixed) or "")
    with pytest.raises(ValueError, match="encodings"):
        GroupwiseIntExperts(mixed)
    reset()
    model = nn.Sequential(nn.Identity(), mixed)
    with pytest.warns(KernelPathWarning, match="experts run one by one"):
        assert stack_groupwise_experts(model) == []
    names = ExpertNames()
    floats = RoutedExperts(
        [ExpertMLP(8, 4, nn.functional.silu, names, torch.float32, "cpu") for _ in range(2)]
    )
    assert "QuantLinear" in (stacking_refusal(floats) or "")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stack_groupwise_experts(nn.Sequential(nn.Identity(), floats)) == []


def test_calibration_modes_take_the_per_expert_path() -> None:
    """calibrate_all and weight_by_routing need the experts' own linears (their hooks)."""
    grouped = GroupwiseIntExperts(quantized_experts())
    hidden, index, weights = routing(3, 6, 2, seed=5)
    seen: list[int] = []
    linear = grouped.expert(0).get_submodule("gate_proj")
    handle = linear.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            grouped(hidden, index, weights)
            assert seen == []  # grouped: the linears are not called
            grouped.calibrate_all = True
            grouped(hidden, index, weights)
    finally:
        handle.remove()
    assert seen == [3]
