"""Mixture-of-experts layers as per-expert linears.

Recent transformers releases store a block's routed experts as two fused 3-D parameters
(``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``) and dispatch the routed tokens inside the
experts' own forward. A hook on ``nn.Linear`` sees nothing there, so a calibration that counts on
such hooks would "succeed" with empty statistics. :func:`linearize_experts` replaces each fused
experts module with :class:`RoutedExperts`: the same function (same routing, same weighted sum),
but every expert is an :class:`ExpertMLP` of three ``nn.Linear`` named as the family's
checkpoints name them (``mlp.experts.7.gate_proj``). Everything that works per linear then works
per expert: the hooks see exactly the tokens the router sends to that expert, each expert gets its
own Hessian, and the quantized layers swap in by name.

The router (``mlp.gate``) is not touched: it stays in float.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ExpertMLP",
    "ExpertNames",
    "RoutedExperts",
    "is_fused_experts",
    "linearize_experts",
    "routed_experts",
]


@dataclass(frozen=True)
class ExpertNames:
    """What a family's checkpoints call one expert's three projections (Mixtral: w1, w3, w2)."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, its linears registered under ``names``."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        names: ExpertNames,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.names = names
        self.act_fn = act_fn
        kwargs = {"bias": False, "dtype": dtype, "device": device}
        self.add_module(names.gate, nn.Linear(hidden, intermediate, **kwargs))
        self.add_module(names.up, nn.Linear(hidden, intermediate, **kwargs))
        self.add_module(names.down, nn.Linear(intermediate, hidden, **kwargs))

    def set_row_weights(self, weights: torch.Tensor | None) -> None:
        """Announce one weight per row of the input of the next call (``None``: none) to the
        calibration hooks on this expert's linears (``quantlab.calib.stats.ROW_WEIGHTS_ATTRIBUTE``:
        calib imports nothing of models, so the name is spelled here too)."""
        for name in (self.names.gate, self.names.up, self.names.down):
            self._modules[name].calibration_row_weights = weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self._modules[self.names.gate]
        up = self._modules[self.names.up]
        down = self._modules[self.names.down]
        return down(self.act_fn(gate(x)) * up(x))


class RoutedExperts(nn.Module):
    """A drop-in for transformers' fused experts: ``forward(hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]``, the sum over each token's chosen experts of the expert's
    output times its routing weight.

    The experts are submodules ``"0" .. "E-1"``. ``calibrate_all``: every expert also runs on the
    tokens it was not sent (so calibration statistics see every token), while the output still
    uses only the routed ones (llm-compressor's calibrate-all-experts). ``weight_by_routing``: each
    expert announces every routed token's routing weight to the calibration hooks on its linears
    (:meth:`ExpertMLP.set_row_weights`), so its Hessian weights the token by it (MoEQuant's
    affinity-guided Hessian). ``routed_tokens`` counts, per expert, the tokens routed to it since
    the last :meth:`reset_counts` (while ``counting``).
    """

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__()
        if not experts:
            raise ValueError("a mixture of experts needs at least one expert")
        for index, expert in enumerate(experts):
            self.add_module(str(index), expert)
        self.num_experts = len(experts)
        self.calibrate_all = False
        self.weight_by_routing = False
        self.counting = False
        self.routed_tokens = torch.zeros(self.num_experts, dtype=torch.int64)

    def expert(self, index: int) -> ExpertMLP:
        module = self._modules[str(index)]
        assert isinstance(module, ExpertMLP)
        return module

    def reset_counts(self) -> None:
        self.routed_tokens = torch.zeros(self.num_experts, dtype=torch.int64)

    def check_routing(self, top_k_index: torch.Tensor) -> None:
        """A ``ValueError`` when the router chose an expert this layer does not have."""
        if top_k_index.numel() and (
            int(top_k_index.min()) < 0 or int(top_k_index.max()) >= self.num_experts
        ):
            raise ValueError(
                f"the router chose expert {int(top_k_index.max())} or {int(top_k_index.min())}; "
                f"this layer has experts 0..{self.num_experts - 1}"
            )

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        self.check_routing(top_k_index)
        # [E, k, T]: the same mask and iteration order as transformers' eager experts, so the
        # sum over a token's experts is formed in the same order.
        mask = torch.nn.functional.one_hot(top_k_index, self.num_experts).permute(2, 1, 0)
        hit = mask.sum(dim=(1, 2)).to("cpu", torch.int64)  # one device sync, not one per expert
        if self.counting:
            self.routed_tokens += hit
        if self.calibrate_all and self.weight_by_routing:
            raise ValueError(
                "calibrate_all feeds every expert tokens the router did not send it, which have no "
                "routing weight to weight them by: use one of calibrate_all and weight_by_routing"
            )
        for index, count in enumerate(hit.tolist()):
            routed = count > 0
            if not routed and not self.calibrate_all:
                continue
            expert = self.expert(index)
            if self.calibrate_all:
                # The statistics hooks see every token; only the routed rows count below.
                every = expert(hidden_states)
                if not routed:
                    continue
                top_k_pos, token_idx = torch.where(mask[index])
                routing = top_k_weights[token_idx, top_k_pos]
                result = every[token_idx]
            else:
                top_k_pos, token_idx = torch.where(mask[index])
                routing = top_k_weights[token_idx, top_k_pos]
                if self.weight_by_routing:
                    expert.set_row_weights(routing)
                try:
                    result = expert(hidden_states[token_idx])
                finally:
                    if self.weight_by_routing:
                        expert.set_row_weights(None)
            result = result * routing[:, None]
            out.index_add_(0, token_idx, result.to(out.dtype))
        return out


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` holds its experts as transformers' fused 3-D ``gate_up_proj`` and
    ``down_proj`` parameters."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, nn.Parameter)
        and isinstance(down, nn.Parameter)
        and gate_up.dim() == 3
        and down.dim() == 3
    )


def _check_fused_layout(path: str, module: nn.Module) -> tuple[int, int, int]:
    """``(experts, hidden, intermediate)`` of a fused experts module whose layout this file
    understands, else a clear error."""
    kind = type(module).__name__
    for attr, wanted in (
        ("is_concatenated", True),
        ("is_transposed", False),
        ("has_bias", False),
        ("has_gate", True),
        ("has_post_expert_norm", False),
    ):
        value = getattr(module, attr, wanted)
        if value != wanted:
            raise ValueError(
                f"{path} ({kind}): experts with {attr}={value} are not supported (quantlab reads "
                "concatenated [gate; up] rows, untransposed, without bias or post-expert norm)"
            )
    if not callable(getattr(module, "act_fn", None)):
        raise ValueError(f"{path} ({kind}): fused experts without an act_fn")
    experts, double, hidden = module.gate_up_proj.shape
    if double % 2 or tuple(module.down_proj.shape) != (experts, hidden, double // 2):
        raise ValueError(
            f"{path} ({kind}): gate_up_proj {list(module.gate_up_proj.shape)} and down_proj "
            f"{list(module.down_proj.shape)} are not [E, 2I, H] and [E, H, I]"
        )
    return experts, hidden, double // 2


@torch.no_grad()
def _from_fused(path: str, module: nn.Module, names: ExpertNames) -> RoutedExperts:
    n_experts, hidden, intermediate = _check_fused_layout(path, module)
    gate_up, down = module.gate_up_proj, module.down_proj
    experts = []
    for index in range(n_experts):
        expert = ExpertMLP(
            hidden, intermediate, module.act_fn, names, gate_up.dtype, gate_up.device
        )
        if gate_up.device.type != "meta":
            # Clones, so the fused tensors are freed once the module is replaced.
            expert.get_submodule(names.gate).weight.copy_(gate_up[index, :intermediate])
            expert.get_submodule(names.up).weight.copy_(gate_up[index, intermediate:])
            expert.get_submodule(names.down).weight.copy_(down[index])
        experts.append(expert)
    routed = RoutedExperts(experts)
    routed.train(module.training)
    return routed


def linearize_experts(model: nn.Module, names: ExpertNames | None = None) -> int:
    """Replace every fused experts module of ``model`` by an equivalent :class:`RoutedExperts`
    (in place; weights copied, or left on the meta device where they are there). Returns how many
    were replaced (0 for a dense model or one already linearized)."""
    names = names or ExpertNames()
    fused = [(path, m) for path, m in model.named_modules() if is_fused_experts(m)]
    for path, module in fused:
        replacement = _from_fused(path, module, names)
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, replacement)
    return len(fused)


def routed_experts(module: nn.Module) -> list[tuple[str, RoutedExperts]]:
    """Every :class:`RoutedExperts` inside ``module``, with its path."""
    return [(path, m) for path, m in module.named_modules() if isinstance(m, RoutedExperts)]


def expert_of(name: str, expert_paths: set[str]) -> tuple[str, int] | None:
    """``("mlp.experts", 7)`` for ``mlp.experts.7.gate_proj`` when ``mlp.experts`` is one of the
    block's :class:`RoutedExperts` paths, else ``None``."""
    head, _, _leaf = name.rpartition(".")
    parent, _, index = head.rpartition(".")
    if parent in expert_paths and index.isdigit():
        return parent, int(index)
    return None


def coverage_summary(
    coverage: list,
    blocks_path: str,
    expert_paths: set[str],
    min_tokens: int,
    calibrate_all: bool,
    routing_weighted: bool,
) -> dict:
    """What the report says about a mixture of experts' calibration: tokens per expert (the
    input of its first projections) in every block, their spread, and every expert that fewer
    than ``min_tokens`` reached with what was done for it. ``coverage``: the run's
    :class:`quantlab.calib.capture.GroupCoverage` rows."""
    per_block: dict[int, dict[str, int]] = {}
    # expert -> its tokens and what was done for it (in the order done)
    done: dict[str, dict] = {}
    for row in coverage:
        found = expert_of(row.names[0], expert_paths)
        if found is None:
            continue
        parent, index = found
        key = f"{parent}.{index}"
        # Its down projection (and a second pass, AWQ's then GPTQ's) sees the same tokens.
        per_block.setdefault(row.block, {}).setdefault(key, row.tokens)
        if row.white:
            expert = f"{blocks_path}.{row.block}.{key}"
            entry = done.setdefault(expert, {"expert": expert, "tokens": row.tokens, "done": []})
            if row.fallback not in entry["done"]:
                entry["done"].append(row.fallback)
    fallbacks = [{**entry, "done": "; ".join(entry["done"])} for entry in done.values()]
    counts = sorted(t for block in per_block.values() for t in block.values())
    summary: dict = {
        "calibrate_all_experts": calibrate_all,
        "routing_weighted_hessians": routing_weighted,
        "min_tokens": min_tokens,
        "experts": len(counts),
        "tokens_per_expert": {
            "min": counts[0] if counts else 0,
            "median": counts[len(counts) // 2] if counts else 0,
            "max": counts[-1] if counts else 0,
        },
        "without_tokens": sum(1 for t in counts if t == 0),
        "under_min_tokens": fallbacks,
        "per_block": {str(b): tokens for b, tokens in sorted(per_block.items())},
    }
    return summary
