"""BitStack's loading order: one global order of every layer's residual blocks, so any memory
budget maps to a prefix of it, recorded in each layer's ``steps`` (:func:`order_blocks`,
:func:`assign_order`).

* ``order="hessian"`` (default): block ``b`` of a layer is scored by the calibration output error
  it removes per byte, ``(tr(R_b H R_b^T) - tr(R_{b+1} H R_{b+1}^T)) / bytes``, relative to the
  layer's output energy ``tr(W H W^T)`` (``order_normalize``); stage-major, so every layer holds
  ``b`` or ``b + 1`` blocks at any budget. Free: the errors come out of the decomposition.
* ``order="ppl"``: BitStack's own criterion. For each stage ``b``, with every layer at ``b``
  blocks, each layer alone gets its block ``b`` and the perplexity on a small validation set
  (calibration text, seed + 1) is measured; lower first. ``(blocks - 1) x layers`` evaluations,
  each re-running only the decoder blocks from the changed one on; ``order_max_stage`` caps the
  measured stages (later ones use the Hessian score).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantlab.calib.capture import move_to
from quantlab.calib.data import calibration_samples
from quantlab.methods.base import MethodContext
from quantlab.methods.bitstack.config import BitStackConfig
from quantlab.methods.bitstack.decompose import LayerRecord
from quantlab.models.arch import ArchSpec, get_submodule, resolve
from quantlab.nn.bitstack_linear import BitStackLinear
from quantlab.nn.swap import set_submodule
from quantlab.ops import bitstack as bs_ops
from quantlab.solvers.bitstack import stage_major_order

__all__ = ["assign_order", "order_blocks"]


def _hessian_scores(records: dict[str, LayerRecord], normalize: str) -> dict[str, list[float]]:
    scores = {}
    for name, rec in records.items():
        e = rec.errors
        energy = e[0] if normalize == "relative" and e[0] > 0 else 1.0
        scores[name] = [(e[b] - e[b + 1]) / energy / rec.block_bytes for b in range(1, len(e) - 1)]
    return scores


def assign_order(model: nn.Module, order: Sequence[tuple[str, int]]) -> None:
    """Record each layer's position in the global order (``BitStackLinear.steps``)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BitStackLinear)}
    steps: dict[str, dict[int, int]] = {name: {} for name in layers}
    for position, (name, block) in enumerate(order):
        steps[name][block] = position
    for name, layer in layers.items():
        want = list(range(1, layer.n_blocks))
        if sorted(steps[name]) != want:
            raise ValueError(f"{name}: the order lists blocks {sorted(steps[name])}, want {want}")
        layer.steps = [steps[name][b] for b in want]


class _ValidationSet:
    """Cached inputs of every decoder block on the validation windows, for re-running the model
    from any block on."""

    def __init__(
        self, model: nn.Module, spec: ArchSpec, tokens: torch.Tensor, device: torch.device
    ):
        self.model, self.spec, self.device = model, spec, device
        self.blocks = get_submodule(model, spec.blocks)
        self.norm = get_submodule(model, spec.final_norm)
        self.head = get_submodule(model, spec.lm_head)
        self.tokens = tokens.to(device)
        self.hidden: list[torch.Tensor] = []
        self.kwargs: dict[str, Any] = {}

    @torch.no_grad()
    def refresh(self) -> float:
        """Re-capture every block's input with the current weights; return the loss."""
        hidden: list[torch.Tensor] = []

        def catch(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden.append(args[0] if args else kwargs["hidden_states"])
            if not self.kwargs:
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                kw["use_cache"], kw["past_key_values"] = False, None
                self.kwargs.update(kw)

        handles = [b.register_forward_pre_hook(catch, with_kwargs=True) for b in self.blocks]
        try:
            logits = self.model(input_ids=self.tokens, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        self.hidden = hidden
        return self._loss(logits)

    def _loss(self, logits: torch.Tensor) -> float:
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(2, self.tokens[:, 1:].unsqueeze(2)).mean()
        return float(nll)

    @torch.no_grad()
    def loss_from(self, index: int) -> float:
        """Loss of the model re-run from decoder block ``index`` on its cached input."""
        h = self.hidden[index]
        kwargs = move_to(self.kwargs, self.device)
        for block in self.blocks[index:]:
            out = block(h, **kwargs)
            h = out[0] if isinstance(out, tuple | list) else out
        return self._loss(self.head(self.norm(h)))


def _ppl_scores(
    model: nn.Module,
    spec: ArchSpec,
    config: BitStackConfig,
    ctx: MethodContext,
    n_blocks: int,
    max_stage: int,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Measured ppl scores for stages ``1 .. max_stage``: ``(scores, ppl)`` per layer, with
    ``score = -ppl`` (lower ppl is loaded first)."""
    if ctx.tokenizer is None:
        raise ValueError("order='ppl' needs a tokenizer for its validation windows")
    tokens = calibration_samples(
        ctx.tokenizer,
        ctx.calib.source,
        config.order_samples,
        config.order_seq_len,
        ctx.calib.seed + 1 + config.seed,
    )
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BitStackLinear)}
    block_of = {name: int(name[len(spec.blocks) + 1 :].split(".")[0]) for name in layers}
    # Dense stand-ins: the probe only needs the weight of b and b + 1 blocks, so plain
    # nn.Linears with the reconstructed weight run the many forwards at BLAS speed.
    dense: dict[str, nn.Linear] = {}
    for name, layer in layers.items():
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        lin.to(ctx.device)
        with torch.no_grad():
            lin.weight.copy_(_block_weight(layer, 0))
            if layer.bias is not None:
                lin.bias.copy_(layer.bias)
        dense[name] = lin
        set_submodule(model, name, lin)
    scores: dict[str, list[float]] = {name: [] for name in layers}
    ppl: dict[str, list[float]] = {name: [] for name in layers}
    val = _ValidationSet(model, spec, tokens, ctx.device)
    bar = tqdm(total=max_stage * len(layers), desc="bitstack order (ppl)", disable=not ctx.progress)
    try:
        for stage in range(1, max_stage + 1):
            val.refresh()
            for name in sorted(layers, key=lambda n: block_of[n]):
                layer, lin = layers[name], dense[name]
                if layer.n_blocks <= stage:
                    continue
                before = lin.weight.detach().clone()
                with torch.no_grad():
                    lin.weight.add_(_block_weight(layer, stage))
                loss = val.loss_from(block_of[name])
                with torch.no_grad():
                    lin.weight.copy_(before)
                ppl[name].append(math.exp(loss))
                scores[name].append(-loss)
                bar.update()
            for name, lin in dense.items():
                if layers[name].n_blocks > stage:
                    with torch.no_grad():
                        lin.weight.add_(_block_weight(layers[name], stage))
    finally:
        bar.close()
        for name, layer in layers.items():
            set_submodule(model, name, layer)
    return scores, ppl


def _block_weight(layer: BitStackLinear, b: int) -> torch.Tensor:
    """Dense fp32 contribution ``S_b ⊙ (u_b v_b)`` of one block."""
    return bs_ops.dequant(
        layer.signs[b : b + 1], layer.u[b : b + 1], layer.v[b : b + 1], layer.in_features
    )


def order_blocks(
    model: nn.Module,
    config: BitStackConfig,
    ctx: MethodContext,
    output_errors: dict[str, list[float]],
) -> tuple[list[tuple[str, int]], dict[str, list[float]]]:
    """The global order of ``model``'s BitStack blocks by ``config.order``, recorded in each
    layer's ``steps``; also returns the measured validation ppls (``order="ppl"``).

    Works on a freshly decomposed model or on one loaded with all its blocks (then
    ``output_errors`` come from the checkpoint's ``quantlab_report.json``), so an existing
    decomposition can be re-ordered without decomposing again.
    """
    spec = resolve(model, float_linears=False)  # its linears are BitStack layers now
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BitStackLinear)}
    missing = set(layers) - set(output_errors)
    if missing:
        raise ValueError(f"no output errors for {sorted(missing)[:3]}")
    records = {
        name: LayerRecord(list(output_errors[name]), layers[name].block_bytes, 0.0)
        for name in layers
    }
    scores = _hessian_scores(records, config.order_normalize)
    measured: dict[str, list[float]] = {}
    if config.order == "ppl":
        n_blocks = max(m.n_blocks for m in layers.values())
        max_stage = n_blocks - 1
        if config.order_max_stage is not None:
            max_stage = min(max_stage, config.order_max_stage)
        if max_stage > 0:
            device_home = next(model.parameters()).device
            model.to(ctx.device)
            try:
                ppl_scores, measured = _ppl_scores(model, spec, config, ctx, n_blocks, max_stage)
            finally:
                model.to(device_home)
            # Stages are sorted separately, so measured stages (-loss) and later Hessian-scored
            # ones need no common scale.
            for name, values in ppl_scores.items():
                scores[name] = values + scores[name][len(values) :]
    order = stage_major_order(scores)
    assign_order(model, order)
    return order, measured
