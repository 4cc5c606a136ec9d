"""Optimizer step time of every core optimizer and backend beside torch.optim, in one run.

Timing on a shared machine is noisy, so: one thread, warm-up steps, the minimum of
several repeats, and every figure also reported as a ratio against torch.optim.AdamW
(fused) measured in the same run. Run: python examples/benchmark.py [--quick]

In the Composer environment (`.venv-composer`) a second table compares
composer_adam.DecoupledAdamW with composer.optim.DecoupledAdamW, as a speed-up over
Composer's class measured in the same run.
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


def composer_contenders(amsgrad: bool) -> list[Contender]:
    """Composer's DecoupledAdamW, then adamkit's drop-in; empty without Composer installed."""
    try:
        from composer.optim import DecoupledAdamW
    except ImportError:
        return []
    import composer_adam

    suffix = " amsgrad" if amsgrad else ""
    rows = [
        Contender(
            f"composer DecoupledAdamW{suffix}",
            lambda p: DecoupledAdamW(p, lr=1e-3, amsgrad=amsgrad),
        )
    ]
    for backend, flags in {"default": {}, "foreach": {"foreach": True}}.items():
        rows.append(
            Contender(
                f"composer_adam DecoupledAdamW{suffix} {backend}",
                lambda p, f=flags: composer_adam.DecoupledAdamW(p, lr=1e-3, amsgrad=amsgrad, **f),
            )
        )
    return rows


def make_params(count: int, numel: int, dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for _ in range(count):
        p = torch.randn(numel, generator=generator).to(dtype).requires_grad_()
        p.grad = torch.randn(numel, generator=generator).to(dtype) * 1e-2
        params.append(p)
    return params


def time_steps(optimizers: list[torch.optim.Optimizer], steps: int, repeats: int) -> list[float]:
    """Per optimizer, the minimum over repeats of the mean seconds per step (after warm-up).

    Repeats take turns across the optimizers, so a burst of load from other processes on
    a shared machine hits them alike instead of one of them.
    """
    for optimizer in optimizers:
        for _ in range(3):
            optimizer.step()
    best = [float("inf")] * len(optimizers)
    for _ in range(repeats):
        for i, optimizer in enumerate(optimizers):
            start = time.perf_counter()
            for _ in range(steps):
                optimizer.step()
            best[i] = min(best[i], (time.perf_counter() - start) / steps)
    return best


def run(
    shapes: list[tuple[int, int]],
    steps: int,
    repeats: int,
    rows: list[Contender],
    ratio: str = "vs torch fused",
    speedup: bool = False,
    interleave: bool = False,
) -> str:
    """One table per shape; the last column is each row's time over the first row's (or,
    with speedup, the first row's time over each row's). interleave times the rows in
    turns (all their tensors live at once: for short tables)."""
    lines = []
    for count, numel in shapes:
        total = count * numel
        lines.append(f"\n{count} tensors x {numel:,} fp32 parameters ({total / 1e6:.0f}M)\n")
        lines.append(f"| optimizer | ms/step | M params/s | {ratio} |")
        lines.append("|---|---:|---:|---:|")
        if interleave:
            optimizers = [c.make(make_params(count, numel, torch.float32)) for c in rows]
            times = time_steps(optimizers, steps, repeats)
            del optimizers
        else:
            times = [
                time_steps([c.make(make_params(count, numel, torch.float32))], steps, repeats)[0]
                for c in rows
            ]
        baseline = times[0]
        for contender, seconds in zip(rows, times, strict=True):
            relative = baseline / seconds if speedup else seconds / baseline
            lines.append(
                f"| {contender.name} | {seconds * 1e3:.2f} | {total / seconds / 1e6:.0f} "
                f"| {relative:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller tensors")
    parser.add_argument(
        "--composer-only", action="store_true", help="only the Composer comparison (20 x 1M)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread")
    shapes = [(20, 100_000), (200, 10_000)] if args.quick else [(20, 1_000_000), (200, 100_000)]
    steps, repeats = (3, 2) if args.quick else (5, 5)
    report = "" if args.composer_only else run(shapes, steps, repeats, contenders())
    for amsgrad in (False, True):
        rows = composer_contenders(amsgrad)
        if rows:
            report += "\n\nSpeed-up over composer.optim.DecoupledAdamW (higher is faster):"
            report += run(
                shapes[:1] if args.composer_only else shapes,
                steps,
                repeats * 2,
                rows,
                "speed-up",
                speedup=True,
                interleave=True,
            )
    print(report)


if __name__ == "__main__":
    main()
