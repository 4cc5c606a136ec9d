"""Optimizer step time of every core optimizer and backend beside torch.optim, in one run.

Timing on a shared machine is noisy, so: one thread, warm-up steps, the minimum of
several repeats, and every figure also reported as a ratio against torch.optim.AdamW
(fused) measured in the same run. Run: python examples/benchmark.py [--quick]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import core

Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


@dataclass(frozen=True)
class Contender:
    name: str
    make: Factory


def _torch_adamw(**flags: bool) -> Factory:
    return lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, **flags)


def contenders() -> list[Contender]:
    """torch.optim.AdamW on its three paths, then every core optimizer on every backend."""
    rows = [
        Contender("torch AdamW fused", _torch_adamw(fused=True)),
        Contender("torch AdamW foreach", _torch_adamw(foreach=True)),
        Contender("torch AdamW for-loop", _torch_adamw(foreach=False)),
    ]
    algorithms: list[tuple[str, Callable[..., torch.optim.Optimizer]]] = [
        ("core AdamW", lambda p, **kw: core.AdamW(p, lr=1e-3, **kw)),
        ("core AdamW amsgrad", lambda p, **kw: core.AdamW(p, lr=1e-3, amsgrad=True, **kw)),
        ("core RAdam", lambda p, **kw: core.RAdam(p, lr=1e-3, **kw)),
        ("core NAdam", lambda p, **kw: core.NAdam(p, lr=1e-3, **kw)),
        ("core ADOPT", lambda p, **kw: core.ADOPT(p, lr=1e-3, **kw)),
    ]
    backends = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "default": {}}
    for name, make in algorithms:
        for backend, flags in backends.items():
            rows.append(Contender(f"{name} {backend}", lambda p, m=make, f=flags: m(p, **f)))
    return rows


def make_params(count: int, numel: int, dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for _ in range(count):
        p = torch.randn(numel, generator=generator).to(dtype).requires_grad_()
        p.grad = torch.randn(numel, generator=generator).to(dtype) * 1e-2
        params.append(p)
    return params


def time_step(optimizer: torch.optim.Optimizer, steps: int, repeats: int) -> float:
    """Minimum over repeats of the mean seconds per step (after warm-up)."""
    for _ in range(3):
        optimizer.step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.step()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def run(shapes: list[tuple[int, int]], steps: int, repeats: int) -> str:
    lines = []
    for count, numel in shapes:
        total = count * numel
        lines.append(f"\n{count} tensors x {numel:,} fp32 parameters ({total / 1e6:.0f}M)\n")
        lines.append("| optimizer | ms/step | M params/s | vs torch fused |")
        lines.append("|---|---:|---:|---:|")
        baseline = None
        for contender in contenders():
            params = make_params(count, numel, torch.float32)
            seconds = time_step(contender.make(params), steps, repeats)
            baseline = baseline or seconds
            lines.append(
                f"| {contender.name} | {seconds * 1e3:.2f} | {total / seconds / 1e6:.0f} "
                f"| {seconds / baseline:.2f} |"
            )
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller tensors")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread")
    if args.quick:
        report = run([(20, 100_000), (200, 10_000)], steps=3, repeats=2)
    else:
        report = run([(20, 1_000_000), (200, 100_000)], steps=5, repeats=5)
    print(report)


if __name__ == "__main__":
    main()
