"""Gradient release: peak memory of a training step, and the cost of optimizer accumulation.

1. Peak memory: a ~21M-parameter MLP (20 layers) trains a few steps with core.AdamW, each
   mode in its own fresh subprocess; the peak resident set size above the process's size
   before the model was built (after a warm-up that initialises torch's kernels) is
   reported, so interpreter and runtime overhead cancel out. The same again sharded with
   FSDP2 (fully_shard per layer) over 2 gloo processes, the larger rank's peak reported.
   glibc is told to return freed large blocks at once (MALLOC_MMAP_THRESHOLD_), so the
   peak measures live tensors rather than the allocator's cache.
2. Optimizer accumulation: the same small model trained with ordinary gradient
   accumulation and with release + optimizer accumulation; the gap in final loss.

Run: python examples/gradient_release.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import core

WIDTH, LAYERS, BATCH = 1024, 20, 64


def rss_mb() -> float:
    """This process's resident set size now (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_peak(release: bool, steps: int, fsdp2: bool = False) -> dict[str, float]:
    """Train in this process and report memory; meant to run in a fresh subprocess (one
    per rank, under torch.distributed.run, for fsdp2)."""
    torch.set_num_threads(1)
    if fsdp2:
        torch.distributed.init_process_group("gloo")
    warm_up = nn.Linear(8, 8)  # torch's kernels and thread pools allocate on first use
    warm_up(torch.randn(2, 8)).sum().backward()
    core.AdamW(warm_up.parameters(), lr=1e-3).step()
    before = rss_mb()
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(LAYERS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    model = nn.Sequential(*layers)
    if fsdp2:
        from torch.distributed.fsdp import fully_shard

        for layer in layers[::2]:
            fully_shard(layer)
        fully_shard(model)
    optimizer = core.AdamW(model.parameters(), lr=1e-4, gradient_release=release)
    if release:
        core.prepare_for_gradient_release(model, optimizer)
    x, y = torch.randn(BATCH, WIDTH), torch.randn(BATCH, WIDTH)
    for _ in range(steps):
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in model.parameters())
    if fsdp2:
        torch.distributed.destroy_process_group()
    return {"params_m": params / 1e6, "peak_above_start_mb": peak - before, "peak_mb": peak}


def run_measurement(command: list[str]) -> None:
    """Run a measuring child with glibc returning freed blocks at once and one thread. Its
    output is captured (torch.distributed.run's notices would break up the table), so on
    failure it is shown here: otherwise only the exit status would say what went wrong."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(
            f"the measuring child failed with exit status {result.returncode}: "
            f"{shlex.join(command)}\n--- its stdout (end) ---\n{result.stdout[-4000:]}"
            f"\n--- its stderr (end) ---\n{result.stderr[-8000:]}"
        )


def _measure_in_subprocess(release: bool, steps: int, fsdp2: bool) -> dict[str, float]:
    """One fresh process (two ranks for fsdp2: the larger peak) measuring one mode. Each
    rank writes its own file: lines the two printed to one pipe could interleave."""
    launcher = [sys.executable]
    if fsdp2:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    flags = ["--measure", str(int(release)), "--steps", str(steps)]
    with tempfile.TemporaryDirectory(prefix="gradient-release-") as name:
        out = Path(name)
        run_measurement(
            [*launcher, __file__, *flags, "--out", str(out), *(["--fsdp2"] if fsdp2 else [])]
        )
        ranks = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    if len(ranks) != (2 if fsdp2 else 1):
        sys.exit(f"the measuring child exited 0 but wrote {len(ranks)} rank file(s)")
    return max(ranks, key=lambda row: row["peak_above_start_mb"])


def memory_table(steps: int) -> str:
    lines = ["| setup | mode | peak RSS above start (MB) | peak RSS (MB) |", "|---|---|---:|---:|"]
    savings = []
    params_m = 0.0
    for setup, fsdp2 in (("one process", False), ("FSDP2, 2 ranks (larger rank)", True)):
        plain, released = (_measure_in_subprocess(r, steps, fsdp2) for r in (False, True))
        params_m = plain["params_m"]
        for mode, row in (("ordinary", plain), ("gradient release", released)):
            lines.append(
                f"| {setup} | {mode} | {row['peak_above_start_mb']:.0f} | {row['peak_mb']:.0f} |"
            )
        saving = 1 - released["peak_above_start_mb"] / plain["peak_above_start_mb"]
        savings.append(f"{setup}: gradient release {saving:.0%} lower peak")
    title = f"Peak memory of training steps, {params_m:.1f}M-parameter MLP, core.AdamW fp32"
    return "\n".join([title, "", *lines, "", *savings])


def accumulation_gap(windows: int, microbatches: int = 4) -> str:
    """Final loss: ordinary accumulation vs release with optimizer accumulation."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
    data = []
    for _ in range(windows * microbatches):
        x = torch.randn(16, 16, generator=generator)
        with torch.no_grad():
            data.append((x, teacher(x) + 0.05 * torch.randn(16, 4, generator=generator)))
    losses = {}
    for mode in ("ordinary accumulation", "release + optimizer accumulation"):
        release = mode.startswith("release")
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
        optimizer = core.AdamW(model.parameters(), lr=3e-3, gradient_release=release)
        if release:
            core.prepare_for_gradient_release(model, optimizer)
        for index, (x, y) in enumerate(data):
            last = index % microbatches == microbatches - 1
            optimizer.optimizer_accumulation = release and not last
            (nn.functional.mse_loss(model(x), y) / microbatches).backward()
            if last:  # under release the hooks stepped; step() closes the training step
                optimizer.step()
                optimizer.zero_grad()
        with torch.no_grad():
            x = torch.cat([d[0] for d in data[-64:]])
            y = torch.cat([d[1] for d in data[-64:]])
            losses[mode] = nn.functional.mse_loss(model(x), y).item()
    ordinary, folded = losses.values()
    lines = [
        f"Optimizer accumulation, {windows} windows of {microbatches} micro-batches, small MLP",
        "",
        "| mode | final training MSE |",
        "|---|---:|",
        *[f"| {mode} | {loss:.5f} |" for mode, loss in losses.items()],
        "",
        f"relative gap: {folded / ordinary - 1:+.1%}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--measure", type=int, choices=[0, 1], help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--fsdp2", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        if args.out is None:
            parser.error("argument --measure: needs --out (the folder for rank<N>.json)")
        row = measure_peak(bool(args.measure), args.steps, args.fsdp2)
        rank = os.environ.get("RANK", "0")  # set by torch.distributed.run
        (args.out / f"rank{rank}.json").write_text(json.dumps(row))
        return
    print(memory_table(steps=2 if args.quick else 3))
    print()
    print(accumulation_gap(windows=50 if args.quick else 300))


if __name__ == "__main__":
    main()
