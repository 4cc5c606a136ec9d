"""References the core optimizers are checked against where torch.optim has no equivalent.

ADOPT is written here directly from the paper's Algorithm 1 and the clipping of its
reference implementation, one tensor at a time, independent of core's backends.
"""

from __future__ import annotations

import torch
from torch import Tensor


class PaperADOPT:
    """ADOPT from Taniguchi et al. (2024); weight decay as described in ALGORITHMS.md."""

    def __init__(
        self,
        params: list[Tensor],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float = 0.0,
        decay_mode: str = "l2",
        max_lr: float | None = None,
        clip: bool = True,
    ) -> None:
        self.params = params
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.weight_decay, self.decay_mode, self.clip = weight_decay, decay_mode, clip
        self.max_lr = lr if max_lr is None else max_lr
        self.calls = 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            g = p.grad.clone()
            if self.decay_mode == "l2":
                g = g + self.weight_decay * p
            if self.calls == 0:
                v.copy_(g * g)
                continue
            if self.decay_mode == "decoupled":
                p.mul_(1 - self.lr * self.weight_decay)
            elif self.decay_mode == "fully_decoupled":
                p.mul_(1 - self.lr / self.max_lr * self.weight_decay)
            normalized = g / torch.clamp(v.sqrt(), min=self.eps)
            if self.clip:
                bound = self.calls**0.25
                normalized = normalized.clamp(-bound, bound)
            m.mul_(self.beta1).add_((1 - self.beta1) * normalized)
            p.sub_(self.lr * m)
            v.mul_(self.beta2).add_((1 - self.beta2) * g * g)
        self.calls += 1
