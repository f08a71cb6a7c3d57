"""Streaming statistics of a linear layer's inputs."""

from __future__ import annotations

import torch

__all__ = ["HessianAccumulator"]


class HessianAccumulator:
    """Accumulate ``H = 2 X^T X / n`` over the rows of a stream of inputs, in fp32.

    ``X`` is every token's input vector (``[n, K]`` after flattening batch and sequence). The sum is
    kept as a running average (``H <- H * n / (n + m) + 2 x^T x / (n + m)``) so its magnitude does
    not grow with the token count, which keeps fp32 accurate over long calibration runs.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.in_features = in_features
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``[..., K]`` (any float dtype)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs [..., {self.in_features}], got {tuple(x.shape)}")
        rows = x.reshape(-1, self.in_features).to(device=self.sum.device, dtype=torch.float32)
        m = rows.shape[0]
        if m == 0:
            return
        total = self.n_tokens + m
        self.sum.mul_(self.n_tokens / total)
        self.sum.addmm_(rows.t(), rows, alpha=2.0 / total)
        self.n_tokens = total

    def hessian(self) -> torch.Tensor:
        """``2 X^T X / n`` as fp32 ``[K, K]``."""
        if self.n_tokens == 0:
            raise ValueError("no calibration tokens reached this layer; its Hessian is empty")
        return self.sum
