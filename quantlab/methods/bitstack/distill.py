"""Distillation of a BitStack prefix: the continuous magnitude factors ``u, v`` of the first
``b`` residual blocks of every linear are tuned so the compressed model's next-token distribution
matches the float model's on the calibration windows; the signs stay as decomposed.

Why: the decomposition fits every linear alone (on its own Hessian), so errors of all 210 layers
compound through the network; at ~2 bits that compounding, not any single layer, is what ruins
the model. The factors are <= 10% of a block's bits but set every weight's magnitude, so a few
hundred gradient steps on them (signs fixed, nothing else trained) remove much of the compounded
error while the format, the kernels and the loading order stay as they are.

Teacher: the float model's final hidden states (the head's inputs) on the calibration windows
(:mod:`quantlab.methods.bitstack.decompose` takes them from the float block outputs of its
decomposition
pass, or from a separate float pass when replay feeds that pass compressed outputs). The head is
frozen and shared, so the teacher's logits are recomputed from them per step (``[S, L, hidden]``
floats instead of ``[S, L, vocab]``).
Loss: ``KL(teacher || student)`` per token, summed over the vocabulary, averaged over tokens.
Adam, linear warm-up over 5 steps then cosine decay to 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quantlab.formats.bitstack import FACTOR_DTYPE, unpack_signs
from quantlab.models.arch import ArchSpec, get_submodule
from quantlab.nn.bitstack_linear import BitStackLinear
from quantlab.nn.swap import set_submodule

__all__ = ["distill_prefix"]


class _TrainableStack(nn.Module):
    """A BitStackLinear's loaded blocks with ``u, v`` as fp32 parameters and the dense weight
    rebuilt differentiably each forward (training only; the kernels never rebuild it)."""

    def __init__(self, layer: BitStackLinear) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("positive", unpack_signs(layer.signs, layer.in_features))
        self.u = nn.Parameter(layer.u.to(torch.float32).clone())
        self.v = nn.Parameter(layer.v.to(torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        magnitude = self.u @ self.v  # [B, N, K]
        weight = torch.where(self.positive, magnitude, -magnitude).sum(0)
        bias = self.layer.bias
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @torch.no_grad()
    def write_back(self, name: str) -> None:
        u, v = self.u.detach().to(FACTOR_DTYPE), self.v.detach().to(FACTOR_DTYPE)
        if not (bool(torch.isfinite(u).all()) and bool(torch.isfinite(v).all())):
            raise ValueError(f"{name}: distilled factors are not finite in float16")
        self.layer.u, self.layer.v = u.contiguous(), v.contiguous()


def distill_prefix(
    model: nn.Module,
    spec: ArchSpec,
    samples: torch.Tensor,
    teacher_inputs: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Tune the ``u, v`` of every :class:`BitStackLinear` of ``model`` (all its loaded blocks; the
    caller truncates to the target prefix first) by distillation; returns the loss per step.

    Args:
        samples: calibration token ids ``[S, L]``.
        teacher_inputs: the float model's head inputs (final hidden states) on ``samples``,
            ``[S, L, hidden]``.
        steps: optimizer steps (each on ``batch_size`` windows drawn with ``seed``).
        lr: Adam's peak learning rate.
    Raises:
        ValueError: mismatched teacher inputs, bad steps/lr/batch size, or a non-finite loss.
    """
    if steps < 1 or not lr > 0 or batch_size < 1:
        raise ValueError(
            f"need steps >= 1, lr > 0, batch_size >= 1; got {steps}, {lr}, {batch_size}"
        )
    if tuple(teacher_inputs.shape[:2]) != tuple(samples.shape):
        raise ValueError(
            f"teacher inputs {tuple(teacher_inputs.shape)} do not match samples "
            f"{tuple(samples.shape)}"
        )
    head = get_submodule(model, spec.lm_head)
    stacks: dict[str, _TrainableStack] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, BitStackLinear):
            stacks[name] = _TrainableStack(module).to(device)
            set_submodule(model, name, stacks[name])
    if not stacks:
        raise ValueError("the model has no BitStack layers to distill")
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    params = [t for s in stacks.values() for t in (s.u, s.v)]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    warmup = min(5, steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)),
    )
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="bitstack distill", disable=not progress)
    try:
        with torch.enable_grad():  # the quantization pipeline runs under no_grad
            for step in bar:
                pick = torch.randint(0, samples.shape[0], (batch_size,), generator=generator)
                ids = samples[pick].to(device)
                with torch.no_grad():
                    target = F.log_softmax(head(teacher_inputs[pick.to(teacher_inputs.device)]), -1)
                logits = model(input_ids=ids, use_cache=False).logits.to(torch.float32)
                loss = (
                    F.kl_div(F.log_softmax(logits, -1), target, log_target=True, reduction="none")
                    .sum(-1)
                    .mean()
                )
                if not bool(torch.isfinite(loss)):
                    raise ValueError(f"bitstack distillation: non-finite loss at step {step}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(float(loss.detach()))
                bar.set_postfix(kl=f"{losses[-1]:.3f}")
    finally:
        bar.close()
        for name, stack in stacks.items():
            if len(losses) == steps:
                stack.write_back(name)
            set_submodule(model, name, stack.layer)
        for p, flag in frozen:
            p.requires_grad_(flag)
    return losses
