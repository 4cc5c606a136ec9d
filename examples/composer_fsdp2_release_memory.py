"""Gradient release under Composer's FSDP2Config: peak memory per rank, 2 CPU processes.

A ~21M-parameter MLP (20 layers of 1024 x 1024) trains a few batches in a
`composer.Trainer` with `parallelism_config={"fsdp": FSDP2Config()}` and
composer_adam.DecoupledAdamW, once without and once with `GradientRelease`, each mode in
its own 2-process gloo group (`torch.distributed.run`). Each rank reports its peak
resident set size above its size before the model was built (after a warm-up step of a
tiny FSDP2 Trainer), so interpreter, Composer and gloo overhead cancel out. glibc is told
to return freed large blocks at once (MALLOC_MMAP_THRESHOLD_), so the peak measures live
tensors rather than the allocator's cache. One microbatch per batch: release then frees
every sharded gradient inside backward.

Two layouts: Composer's default policy makes the model's Sequential a single FSDP unit,
whose whole unsharded gradient and reduce-scatter buffer are the peak (release, which
acts after the reduce-scatter, cannot lower it); with one unit per layer the sharded
gradients are what release removes.

Memory only: torch 2.7's FSDP2 sums gradients over gloo instead of averaging them (see
the README), which changes no tensor's size.

Run (Composer environment): python examples/composer_fsdp2_release_memory.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from gradient_release import rss_mb, run_measurement  # noqa: E402  (shared with that example)

WIDTH, LAYERS, BATCH, STEPS = 1024, 20, 32, 3


def _fit(width: int, layers: int, release: bool, per_layer: bool) -> int:
    """Train `layers` Linear(width, width) under FSDP2Config; return the parameter count."""
    from composer import Trainer
    from composer.models import ComposerClassifier
    from composer.utils import FSDP2Config

    import composer_adam

    torch.manual_seed(0)
    module = nn.Sequential(
        *[m for _ in range(layers) for m in (nn.Linear(width, width), nn.Tanh())]
    )
    if per_layer:
        # One FSDP unit per layer, as llm-foundry wraps blocks: a layer's gradient is
        # reduce-scattered (and, with release, stepped and freed) as soon as it is
        # complete. Otherwise Composer makes the whole Sequential one unit.
        module.fsdp_wrap_fn = lambda m: isinstance(m, nn.Linear)  # type: ignore[assignment]
    model = ComposerClassifier(module, num_classes=width)
    x = torch.randn(STEPS * BATCH, width)
    y = torch.randint(0, width, (STEPS * BATCH,))
    dataset = TensorDataset(x, y)
    loader = DataLoader(dataset, batch_size=BATCH // 2, sampler=DistributedSampler(dataset))
    optimizer = composer_adam.DecoupledAdamW(model.parameters(), lr=1e-4, gradient_release=release)
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        optimizers=optimizer,
        max_duration=f"{STEPS}ba",
        device="cpu",
        parallelism_config={"fsdp": FSDP2Config()},
        callbacks=[composer_adam.GradientRelease()] if release else [],
        progress_bar=False,
        log_to_console=False,
        loggers=[],
    )
    trainer.fit()
    trainer.close()
    return sum(p.numel() for p in module.parameters())


def measure(release: bool, per_layer: bool, out: Path) -> None:
    """One rank's measurement (run under torch.distributed.run), written to out/rank<N>.json."""
    from composer.utils import dist

    torch.set_num_threads(1)
    dist.initialize_dist("cpu")
    _fit(16, 2, release, per_layer)  # kernels, gloo buffers, Composer's setup
    before = rss_mb()
    params = _fit(WIDTH, LAYERS, release, per_layer)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {"params_m": params / 1e6, "peak_above_start_mb": peak - before}
    (out / f"rank{dist.get_global_rank()}.json").write_text(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--measure", type=int, choices=[0, 1], help=argparse.SUPPRESS)
    parser.add_argument("--per-layer", type=int, choices=[0, 1], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        measure(bool(args.measure), bool(args.per_layer), args.out)
        return
    rows = {}
    for per_layer, release in itertools.product((False, True), (False, True)):
        with tempfile.TemporaryDirectory() as name:
            out = Path(name)
            # --standalone: a free rendezvous port (a fixed one fails while another run
            # or service holds it); the child's output is shown if it fails.
            run_measurement(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc-per-node=2",
                    __file__,
                    "--measure",
                    str(int(release)),
                    "--per-layer",
                    str(int(per_layer)),
                    "--out",
                    str(out),
                ]
            )
            rows[per_layer, release] = [
                json.loads((out / f"rank{r}.json").read_text()) for r in range(2)
            ]
    params = rows[False, False][0]["params_m"]
    print(
        f"Peak memory per rank, {params:.1f}M-parameter MLP, DecoupledAdamW fp32, "
        f"Composer FSDP2Config, 2 gloo processes (sharded gradients: {params * 2:.0f} MB "
        "per rank)"
    )
    print()
    print("| FSDP units | mode | rank 0 peak RSS above start (MB) | rank 1 (MB) | saving |")
    print("|---|---|---:|---:|---:|")
    for (per_layer, release), ranks in rows.items():
        peaks = [row["peak_above_start_mb"] for row in ranks]
        plain = sum(row["peak_above_start_mb"] for row in rows[per_layer, False])
        units = "one per layer" if per_layer else "one (Composer's default here)"
        mode = "GradientRelease" if release else "ordinary"
        saving = f"{1 - sum(peaks) / plain:.0%}" if release else ""
        print(f"| {units} | {mode} | {peaks[0]:.0f} | {peaks[1]:.0f} | {saving} |")


if __name__ == "__main__":
    main()
