"""Train a small MLP on synthetic regression with core.AdamW, beside torch.optim.AdamW.

The shortest plain-PyTorch example (README, "The main job", names it): no framework.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import core


def train(make_optimizer, dtype: torch.dtype, steps: int = 300) -> tuple[float, float]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 8))
    x = torch.randn(2048, 32)
    with torch.no_grad():
        y = teacher(x)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 8)).to(dtype)
    optimizer = make_optimizer(model.parameters())
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x.to(dtype)).float(), y).backward()
        optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        return nn.functional.mse_loss(model.float()(x), y).item(), seconds


def main() -> None:
    runs = {
        "torch.optim.AdamW fp32": (lambda p: torch.optim.AdamW(p, lr=3e-3), torch.float32),
        "core.AdamW fp32": (lambda p: core.AdamW(p, lr=3e-3), torch.float32),
        "torch.optim.AdamW bf16": (lambda p: torch.optim.AdamW(p, lr=3e-3), torch.bfloat16),
        "core.AdamW bf16 + Kahan": (lambda p: core.AdamW(p, lr=3e-3), torch.bfloat16),
    }
    print("| run | final MSE | seconds |\n|---|---:|---:|")
    for name, (make, dtype) in runs.items():
        loss, seconds = train(make, dtype)
        print(f"| {name} | {loss:.5f} | {seconds:.2f} |")


if __name__ == "__main__":
    # No options: --help says what it does, and a flag it does not have is refused
    # (it was ignored, so `--steps 10` ran the whole example).
    argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split())).parse_args()
    main()
