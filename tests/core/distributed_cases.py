"""What the distributed tests train: the same model, data and optimizers on every rank."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import core

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "Adam": lambda p, **kw: core.Adam(p, lr=1e-2, weight_decay=0.1, **kw),
    "AdamW": lambda p, **kw: core.AdamW(p, lr=1e-2, amsgrad=True, **kw),
    "RAdam": lambda p, **kw: core.RAdam(p, lr=1e-2, decouple_lr=True, weight_decay=1e-3, **kw),
    "NAdam": lambda p, **kw: core.NAdam(p, lr=1e-2, **kw),
    "ADOPT": lambda p, **kw: core.ADOPT(p, lr=1e-2, **kw),
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _batches(count: int = 8, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [
        (torch.randn(size, 8, generator=generator), torch.randn(size, 4, generator=generator))
        for _ in range(count)
    ]


GLOBAL_BATCHES = _batches()
