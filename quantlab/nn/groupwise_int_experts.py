"""A mixture's groupwise-integer experts through one grouped op per projection.

:class:`~quantlab.models.moe.RoutedExperts` runs its experts one by one: for each expert the
router picked, a gather, three matmuls and a scatter, i.e. about ten op calls per expert and, on
a GPU, three kernel launches each. At decode that is hundreds of tiny calls per block (a 128-expert
top-8 model: 24 launches per block per token). :class:`GroupwiseIntExperts` is the same module
(same experts as submodules, same state dict, same results) once every expert is a
:class:`~quantlab.nn.groupwise_int_linear.QuantLinear` of one encoding: the packed tensors of all
experts sit in one stacked storage per projection, ``[E, 2I, ...]`` for gate and up (their rows
concatenated: the format is per output row, so this is exact) and ``[E, H, ...]`` for down, and a
forward sorts the routed (token, expert) pairs by expert and runs
``torch.ops.quantlab.groupwise_int_grouped_mm`` twice: one CPU call or one CUDA launch per
projection for all experts (:func:`quantlab.ops.groupwise_int.grouped_matmul`).

Memory is not doubled: the experts' tensor-core copies (``QuantLinear``'s CUDA repack) are
dropped, and each expert's buffers keep their identity (a checkpoint loader, or
:class:`~quantlab.export.lazy_model.LazyModel`, tracks them by identity) and are re-pointed into the
stacked storage with ``Tensor.set_``; the module itself holds no reference to that storage, so
releasing the experts' tensors frees it. Each forward re-derives the stacked views from the first
and last expert's buffers and checks they still share one storage of the expected size; a module
move (``.to``) restacks on the new device. Replacing an expert's buffer by another tensor object
(rather than editing it in place) needs :meth:`GroupwiseIntExperts.restack`.

On CPU the result is bit for bit the per-expert one: rows are ordered within each expert as
``RoutedExperts`` orders them and the CPU op runs, per expert, the kernels ``groupwise_int_mm``
runs. The grouped path does not call the experts' linears, so forward hooks on them do not fire;
calibration (``calibrate_all``, ``weight_by_routing``) runs the per-expert path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantlab.models.moe import ExpertMLP, RoutedExperts
from quantlab.nn.groupwise_int_linear import QuantLinear
from quantlab.ops import groupwise_int as gw_ops
from quantlab.ops.kernel_policy import warn_once

__all__ = ["GroupwiseIntExperts", "stack_groupwise_experts", "stacking_refusal"]

_TENSORS = ("qweight", "scales", "qzeros")


def _projections(expert: ExpertMLP) -> tuple[nn.Module, nn.Module, nn.Module]:
    names = expert.names
    return (
        expert.get_submodule(names.gate),
        expert.get_submodule(names.up),
        expert.get_submodule(names.down),
    )


def _same_activation(a: Any, b: Any) -> bool:
    if a is b:
        return True
    return isinstance(a, nn.Module) and type(a) is type(b) and repr(a) == repr(b)


def stacking_refusal(routed: RoutedExperts) -> str | None:
    """Why ``routed``'s experts cannot share stacked tensors (``None`` when they can): every
    projection a :class:`QuantLinear` without bias, one encoding (bits, group size, symmetry,
    scale dtype) for all, gate and up of one shape, one activation, one device, none on meta."""
    first = routed.expert(0)
    gate0, up0, down0 = _projections(first)
    layers = [lin for i in range(routed.num_experts) for lin in _projections(routed.expert(i))]
    if not all(type(lin) is QuantLinear for lin in layers):
        kinds = sorted({type(lin).__name__ for lin in layers})
        return (
            f"not every expert projection is a groupwise-integer QuantLinear ({', '.join(kinds)})"
        )
    if any(lin.bias is not None for lin in layers):
        return "an expert projection has a bias"
    encodings = {(lin.bits, lin.group_size, lin.meta.sym, lin.scales.dtype) for lin in layers}
    if len(encodings) > 1:
        return f"the expert projections use {len(encodings)} encodings (bits, group, sym, scales)"
    if gate0.in_features != up0.in_features or gate0.out_features != up0.out_features:
        return "gate and up projections differ in shape"

    def shapes(gate: nn.Module, down: nn.Module) -> tuple:
        return (gate.out_features, gate.in_features, down.out_features, down.in_features)

    for i in range(routed.num_experts):
        gate, _up, down = _projections(routed.expert(i))
        if shapes(gate, down) != shapes(gate0, down0):
            return f"expert {i} has another shape than expert 0"
        if not _same_activation(routed.expert(i).act_fn, first.act_fn):
            return f"expert {i} has another activation than expert 0"
    devices = {lin.qweight.device for lin in layers}
    if len(devices) > 1:
        return f"the experts are on {len(devices)} devices"
    if next(iter(devices)).type == "meta":
        return "the experts' tensors are not loaded (meta device)"
    return None


def _stack_into(parts: list[list[QuantLinear]], name: str) -> None:
    """Copy buffer ``name`` of every expert's linears (``parts[e]``: the linears whose rows
    expert ``e``'s stacked weight concatenates) into one ``[E, rows, cols]`` storage and re-point
    each buffer at its slice (same tensor object, ``set_``)."""
    first = parts[0][0]._buffers[name]
    rows = [lin._buffers[name].shape[0] for lin in parts[0]]
    cols = first.shape[1]
    per_expert = sum(rows)
    stack = torch.empty((len(parts), per_expert, cols), dtype=first.dtype, device=first.device)
    storage = stack.untyped_storage()
    for e, linears in enumerate(parts):
        r0 = 0
        for lin, r in zip(linears, rows, strict=True):
            buf = lin._buffers[name]
            stack[e, r0 : r0 + r].copy_(buf)
            buf.set_(storage, (e * per_expert + r0) * cols, (r, cols), (cols, 1))
            r0 += r


def _stacked_view(
    first: torch.Tensor | None, last: torch.Tensor | None, shape: tuple[int, int, int]
) -> torch.Tensor | None:
    """The ``[E, rows, cols]`` stack the first and last expert's buffers are slices of, or
    ``None`` when they no longer are (released, reloaded, replaced or moved)."""
    if first is None or last is None or first.device.type == "meta":
        return None
    storage = first.untyped_storage()
    experts, rows, cols = shape
    nbytes = experts * rows * cols * first.element_size()
    last_offset = (experts - 1) * rows * cols + (rows - last.shape[0]) * cols
    if (
        first.storage_offset() != 0
        or storage.nbytes() != nbytes
        or last.untyped_storage().data_ptr() != storage.data_ptr()
        or last.storage_offset() != last_offset
    ):
        return None
    return first.new_empty(0).set_(storage, 0, shape, (rows * cols, cols, 1))


class GroupwiseIntExperts(RoutedExperts):
    """:class:`RoutedExperts` whose groupwise-integer experts run as one grouped op per
    projection (module docstring). Build it with :func:`stack_groupwise_experts`."""

    def __init__(self, routed: RoutedExperts) -> None:
        reason = stacking_refusal(routed)
        if reason is not None:
            raise ValueError(f"these experts cannot be stacked: {reason}")
        super().__init__([routed.expert(i) for i in range(routed.num_experts)])
        self.train(routed.training)
        self.calibrate_all = routed.calibrate_all
        self.weight_by_routing = routed.weight_by_routing
        self.counting = routed.counting
        self.routed_tokens = routed.routed_tokens
        gate, _up, down = _projections(self.expert(0))
        # False: run the experts one by one (RoutedExperts' path), e.g. to compare.
        self.grouped = True
        self.intermediate = gate.out_features
        self.hidden = down.out_features
        self.restack()

    def restack(self) -> bool:
        """Put every expert's packed tensors into the stacked storages again (after the experts'
        tensors were replaced or moved); ``False`` when they cannot be (unloaded, mixed)."""
        if stacking_refusal(self) is not None:
            return False
        experts = [_projections(self.expert(i)) for i in range(self.num_experts)]
        for linears in experts:
            for linear in linears:
                # The grouped op reads the exported layout: a tensor-core copy per expert (CUDA)
                # would double the experts' memory for a path they no longer take.
                linear.drop_kernel_layout()
        with torch.no_grad():
            for name in _TENSORS:
                if experts[0][0]._buffers.get(name) is None:
                    continue  # symmetric: no zero points
                _stack_into([[gate, up] for gate, up, _ in experts], name)
                _stack_into([[down] for _, _, down in experts], name)
        return True

    def _apply(self, fn: Any, recurse: bool = True) -> GroupwiseIntExperts:
        # Each expert's tensors move on their own (leaving separate storages); stack them again
        # where they landed.
        super()._apply(fn, recurse)
        self.restack()
        return self

    def _stacks(self) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]] | None:
        """The stacked ``(qweight, scales, qzeros)`` of gate+up and of down, or ``None``."""
        gate0, _, down0 = _projections(self.expert(0))
        gate_l, up_l, down_l = _projections(self.expert(self.num_experts - 1))
        gate_up: list[torch.Tensor | None] = []
        down: list[torch.Tensor | None] = []
        for name in _TENSORS:
            first = gate0._buffers.get(name)
            if first is None:
                gate_up.append(None)
                down.append(None)
                continue
            cols = first.shape[1]
            shape = (self.num_experts, 2 * self.intermediate, cols)
            gate_up.append(_stacked_view(first, up_l._buffers.get(name), shape))
            d_first = down0._buffers.get(name)
            d_shape = (self.num_experts, self.hidden, d_first.shape[1])
            down.append(_stacked_view(d_first, down_l._buffers.get(name), d_shape))
            if gate_up[-1] is None or down[-1] is None:
                return None
        # The first linear's gate must also sit where expert 0's stacked rows begin: true by the
        # checks above (offset 0 of a storage exactly the stack's size).
        return gate_up, down

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self.calibrate_all or self.weight_by_routing or not self.grouped:
            return super().forward(hidden_states, top_k_index, top_k_weights)
        stacks = self._stacks()
        if stacks is None and self.restack():
            stacks = self._stacks()
        if stacks is None:
            warn_once(
                "groupwise_int:experts-unstacked",
                "GroupwiseIntExperts: the experts' tensors no longer share their stacked storage "
                "and cannot be stacked again (unloaded or of mixed encodings); running the "
                f"experts one by one ({stacking_refusal(self)})",
            )
            return super().forward(hidden_states, top_k_index, top_k_weights)
        self.check_routing(top_k_index)
        tokens, k = top_k_index.shape
        # Pairs ordered by expert, then by top-k position, then by token: the order in which
        # RoutedExperts gathers each expert's rows (torch.where over its [k, T] mask), so every
        # expert sees the same rows in the same order and each token's outputs are summed in the
        # same (expert) order.
        flat = top_k_index.t().reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).to("cpu", torch.int64)
        if self.counting:
            self.routed_tokens += counts
        offsets = torch.zeros(self.num_experts + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=offsets[1:])
        token = order % tokens
        routing = top_k_weights.t().reshape(-1)[order]
        gate_up, down = stacks
        lin = _projections(self.expert(0))[0]
        bits, group = lin.bits, lin.group_size
        h = gw_ops.grouped_matmul(hidden_states[token], offsets, *gate_up, bits, group)
        act = self.expert(0).act_fn(h[:, : self.intermediate]) * h[:, self.intermediate :]
        y = gw_ops.grouped_matmul(act, offsets, *down, bits, group)
        y = (y * routing[:, None]).to(hidden_states.dtype)
        # Each token's k outputs summed in increasing expert order, one rounding per add, as
        # RoutedExperts' per-expert index_add_ sums them (one index_add_ over all pairs would
        # accumulate a token's rows in fp32 for bf16/fp16 and round once: not the same bits).
        # slot: the rank of the pair's expert among its token's choices (ties by position).
        lower = top_k_index.unsqueeze(1) < top_k_index.unsqueeze(2)  # [T, p, q]: e_q < e_p
        before = (top_k_index.unsqueeze(1) == top_k_index.unsqueeze(2)).tril(-1)
        slot = (lower | before).sum(-1).t().reshape(-1)[order]
        per_slot = hidden_states.new_empty((tokens, k, hidden_states.shape[1]))
        per_slot[token, slot] = y
        out = torch.zeros_like(hidden_states)
        for s in range(k):
            out = out + per_slot[:, s]
        return out


def stack_groupwise_experts(model: nn.Module) -> list[str]:
    """Give every :class:`RoutedExperts` of ``model`` whose experts are groupwise-integer
    :class:`QuantLinear` layers of one encoding the grouped path (in place: the module becomes a
    :class:`GroupwiseIntExperts` over the same experts; one already converted is restacked).
    Returns the paths now grouped. A mixture whose experts are all ``QuantLinear`` but cannot be
    stacked (mixed encodings) keeps the per-expert path with a one-time warning saying why."""
    grouped = []
    for path, module in list(model.named_modules()):
        if isinstance(module, GroupwiseIntExperts):
            if module.restack():
                grouped.append(path)
            continue
        if not isinstance(module, RoutedExperts) or not path:
            continue  # (the root itself cannot be replaced in place)
        reason = stacking_refusal(module)
        if reason is not None:
            linears = [
                lin for i in range(module.num_experts) for lin in _projections(module.expert(i))
            ]
            if all(isinstance(lin, QuantLinear) for lin in linears) and "meta" not in reason:
                warn_once(
                    f"groupwise_int:experts-not-stacked:{reason}",
                    f"{path}: the experts run one by one, not as one grouped op: {reason}",
                )
            continue
        replacement = GroupwiseIntExperts(module)
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, replacement)
        grouped.append(path)
    return grouped
