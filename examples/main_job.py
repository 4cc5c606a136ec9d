"""The main job: one byte-level transformer trained once per optimizer, compared.

Each contender trains `examples/lightning_cli.py` through LightningCLI with the YAML files
in configs/lightning/ (base.yaml plus the contender's file), in its own subprocess so its
peak memory is its own, with Lightning's progress bar. At the end a table (validation
loss, throughput, optimizer step time, optimizer state and peak memory) is printed and
saved as Markdown, and the loss curves are plotted:

    outputs/main_job/results.md     the table
    outputs/main_job/results.json   every number behind it, per run
    outputs/main_job/loss_curves.png

Run: python examples/main_job.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "lightning"


@dataclass(frozen=True)
class Contender:
    """One run: its label, the optimizer YAML added to base.yaml, and extra CLI flags."""

    name: str
    config: str
    flags: tuple[str, ...] = ()
    group: str = "fp32"
    requires: str | None = None
    """A package the run needs that adamkit does not (the anchors' extra), or None."""


LEANEST = ("--trainer.precision", "bf16-true", "--optimizer.state_precision", "8bit")
"""bf16 parameters, 8-bit moments and gradient release: about 4 bytes per parameter."""

CONTENDERS = [
    Contender("torch.optim.AdamW", "torch_adamw.yaml"),
    Contender("core.AdamW", "adamw.yaml"),
    Contender("core.RAdam", "radam.yaml"),
    Contender("core.NAdam", "nadam.yaml"),
    Contender("core.ADOPT", "adopt.yaml"),
    Contender(
        "torch.optim.AdamW bf16-true",
        "torch_adamw.yaml",
        ("--trainer.precision", "bf16-true"),
        "bf16 / release",
    ),
    Contender("core.AdamW bf16-true + Kahan", "bf16_kahan.yaml", (), "bf16 / release"),
    Contender("core.AdamW gradient release", "gradient_release.yaml", (), "bf16 / release"),
    Contender("core.AdamW 8-bit state", "adamw_8bit.yaml", (), "8-bit state"),
    Contender(
        "core.AdamW bf16-true + Kahan + 8-bit state",
        "bf16_kahan.yaml",
        ("--optimizer.state_precision", "8bit"),
        "8-bit state",
    ),
    Contender(
        "core.AdamW bf16-true + 8-bit + release + Kahan",
        "gradient_release.yaml",
        LEANEST,
        "8-bit state",
    ),
    Contender(
        "core.AdamW bf16-true + 8-bit + release + stochastic rounding",
        "gradient_release.yaml",
        (*LEANEST, "--optimizer.stochastic_rounding", "true"),
        "8-bit state",
    ),
    # The 8-bit anchors, where installed (`pip install -e ".[anchors]"`).
    Contender(
        "bitsandbytes AdamW8bit",
        "anchors/bnb_adamw8bit.yaml",
        (),
        "8-bit state",
        "bitsandbytes",
    ),
    Contender("torchao AdamW8bit", "anchors/torchao_adamw8bit.yaml", (), "8-bit state", "torchao"),
    Contender(
        "bitsandbytes AdamW8bit bf16-true",
        "anchors/bnb_adamw8bit.yaml",
        ("--trainer.precision", "bf16-true"),
        "8-bit state",
        "bitsandbytes",
    ),
    Contender(
        "torchao AdamW8bit bf16-true + stochastic rounding",
        "anchors/torchao_adamw8bit.yaml",
        ("--trainer.precision", "bf16-true", "--optimizer.bf16_stochastic_round", "true"),
        "8-bit state",
        "torchao",
    ),
]

FULL = {"steps": 600, "val_every": 100, "warmup": 40}
QUICK = {"steps": 60, "val_every": 30, "warmup": 10}


# -- the child: one LightningCLI run with a recorder ----------------------------------------


def _recorder_class() -> type:
    """The callback is defined lazily so the parent process never imports Lightning."""
    import lightning as L

    class RunRecorder(L.Callback):
        """Records losses, batch and optimizer-step times, and memory; writes JSON at the end.

        Optimizer time is the optimizer's own work per batch: from torch's step pre- and
        post-hooks, plus the per-parameter steps gradient release makes inside backward
        (time_released_steps). Lightning runs forward and backward as a closure
        inside step(), then calls on_before_optimizer_step, so that hook restarts the
        clock: what remains until the post-hook is the update itself.
        """

        def __init__(self, path: Path) -> None:
            self.path = path
            self.train_losses: list[tuple[int, float]] = []
            self.val_losses: list[tuple[int, float]] = []
            self.batch_seconds: list[float] = []
            self.optimizer_seconds: list[float] = []
            self._pending_optimizer = 0.0
            self._step_started = 0.0
            self._batch_started = 0.0

        def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            optimizer = trainer.optimizers[0]
            optimizer.register_step_pre_hook(self._before_step)
            optimizer.register_step_post_hook(self._after_step)
            time_released_steps(self._add_released)

        def _add_released(self, seconds: float) -> None:
            self._pending_optimizer += seconds

        def _before_step(self, *args: Any) -> None:
            self._step_started = time.perf_counter()

        def on_before_optimizer_step(self, *args: Any) -> None:
            self._step_started = time.perf_counter()  # the closure (forward, backward) is done

        def _after_step(self, *args: Any) -> None:
            self._pending_optimizer += time.perf_counter() - self._step_started

        def on_train_batch_start(self, *args: Any) -> None:
            self._pending_optimizer = 0.0
            self._batch_started = time.perf_counter()

        def on_train_batch_end(
            self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, *args: Any
        ) -> None:
            self.batch_seconds.append(time.perf_counter() - self._batch_started)
            self.optimizer_seconds.append(self._pending_optimizer)
            self.train_losses.append((trainer.global_step, float(outputs["loss"])))

        def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            if not trainer.sanity_checking and "val_loss" in trainer.callback_metrics:
                value = float(trainer.callback_metrics["val_loss"])
                self.val_losses.append((trainer.global_step, value))

        def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            data = trainer.datamodule
            summary = run_summary(
                self, trainer.optimizers[0], module, data.batch_size * data.context
            )
            self.path.write_text(json.dumps({**summary, "precision": str(trainer.precision)}))

    return RunRecorder


def time_released_steps(record: Callable[[float], None]) -> None:
    """Pass the duration of every per-parameter step gradient release makes inside backward
    to `record`. Those go through core.gradient_release's step_released_param, which skips
    torch's step hooks (they cost more than a small parameter's update), so the recorders'
    step hooks alone would not see them. For one training run per process."""
    import core.gradient_release as release

    untimed = release.step_released_param

    def timed(optimizer: Any, param: Any, frees_gradient: bool = False) -> bool:
        started = time.perf_counter()
        stepped = untimed(optimizer, param, frees_gradient)
        record(time.perf_counter() - started)
        return stepped

    release.step_released_param = timed


def run_summary(recorder: Any, optimizer: Any, model: Any, tokens_per_batch: int) -> dict:
    """What a run's recorder writes: its losses and times, and the optimizer's memory.

    `recorder` has train_losses, val_losses, batch_seconds and optimizer_seconds; the
    first five batches are left out of the medians (they warm caches and kernels) unless
    that would leave none, in which case every batch counts: a short run's times are
    noisier, but a 0 would read as a free optimizer.
    """
    import torch
    from benchmark import stored_bytes  # a tensor subclass's (torchao's state) own bytes

    state_bytes = sum(
        stored_bytes(value)
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "train_losses": recorder.train_losses,
        "val_losses": recorder.val_losses,
        "tokens_per_batch": tokens_per_batch,
        "seconds_per_batch": statistics.median(
            recorder.batch_seconds[5:] or recorder.batch_seconds
        ),
        "optimizer_ms": 1e3
        * statistics.median(recorder.optimizer_seconds[5:] or recorder.optimizer_seconds),
        "optimizer_state_mb": state_bytes / 2**20,
        "param_and_state_bytes": param_bytes + state_bytes,
        "params": sum(p.numel() for p in model.parameters()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "optimizer": type(optimizer).__module__ + "." + type(optimizer).__name__,
    }


def run_child(result_path: Path, cli_args: list[str]) -> None:
    """Train one contender in this process (called as `main_job.py --child ...`)."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import lightning_cli

    recorder = _recorder_class()

    class RecordingCLI(lightning_cli.AdamKitCLI):
        def before_fit(self) -> None:
            self.trainer.callbacks.append(recorder(result_path))

    lightning_cli.main(["fit", *cli_args], cli_class=RecordingCLI)


# -- the parent: every contender, then the table and the plot ------------------------------


def cli_args(contender: Contender, budget: dict[str, int], log_dir: Path) -> list[str]:
    return [
        "--config",
        str(CONFIGS / "base.yaml"),
        "--config",
        str(CONFIGS / contender.config),
        *contender.flags,
        "--trainer.max_steps",
        str(budget["steps"]),
        "--trainer.val_check_interval",
        str(budget["val_every"]),
        "--trainer.logger.init_args.save_dir",
        str(log_dir),
        "--model.scheduler.warmup_steps",
        str(budget["warmup"]),
    ]


def train_all(
    out: Path, budget: dict[str, int], contenders: list[Contender]
) -> dict[str, dict[str, Any]]:
    results = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for index, contender in enumerate(contenders, 1):
        print(f"\n[{index}/{len(contenders)}] {contender.name}", flush=True)
        path = out / "runs" / f"{index:02d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            str(path),
            "--",
            *cli_args(contender, budget, out / "lightning_logs"),
        ]
        subprocess.run(command, check=True, env=env, cwd=ROOT)
        results[contender.name] = {**json.loads(path.read_text()), "group": contender.group}
    return results


def table(results: dict[str, dict[str, Any]], reference: str = "torch.optim.AdamW") -> str:
    """The comparison as Markdown; optimizer time relative to the reference run if present."""
    base_name = reference if reference in results else next(iter(results))
    base = results[base_name]
    lines = [
        f"| run | val loss | tokens/s | optimizer ms/step | vs {base_name} "
        "| optimizer state MB | θ + state B/param | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in results.items():
        val = run["val_losses"][-1][1] if run["val_losses"] else math.nan
        tokens_per_second = run["tokens_per_batch"] / run["seconds_per_batch"]
        ratio = run["optimizer_ms"] / base["optimizer_ms"] if base["optimizer_ms"] else math.nan
        lines.append(
            f"| {name} | {val:.3f} | {tokens_per_second:,.0f} | {run['optimizer_ms']:.2f} "
            f"| {ratio:.2f} | {run['optimizer_state_mb']:.2f} "
            f"| {run['param_and_state_bytes'] / run['params']:.2f} | {run['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def plot(
    results: dict[str, dict[str, Any]], path: Path, reference: str = "torch.optim.AdamW"
) -> None:
    """Loss curves, one panel per group; the reference run appears in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({run["group"] for run in results.values()}, reverse=True)
    figure, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for axis, group in zip(axes[0], groups, strict=True):
        for name, run in results.items():
            if run["group"] != group and name != reference:
                continue
            steps, losses = zip(*run["train_losses"], strict=True)
            window = max(1, len(losses) // 40)  # a trailing mean makes the curves readable
            smoothed = [
                sum(losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
                for i in range(len(losses))
            ]
            (line,) = axis.plot(steps, smoothed, label=name, linewidth=1.2)
            if run["val_losses"]:
                val_steps, val = zip(*run["val_losses"], strict=True)
                axis.plot(val_steps, val, "o", color=line.get_color(), markersize=4)
        axis.set_title(f"{group}: training loss (smoothed), validation loss (dots)")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("nats per byte")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def refuse_bad_arguments(
    parser: argparse.ArgumentParser, args: argparse.Namespace, count: str, names: list[str]
) -> None:
    """Refuse, before any run starts, what would otherwise be quietly misread: a count
    below 1 (0 used to mean the full budget, a negative one failed deep in every child) and
    an --only name that is not a contender (it used to be dropped if another name was
    valid) and an --out that cannot become a folder (a file, or inside one: a traceback
    from mkdir after the checks). Also makes --out absolute, as the children run from the
    repository root. Shared with composer_compare.py; `count` names its steps or batches
    flag."""
    value = getattr(args, count.removeprefix("--"))
    if value is not None and value < 1:
        parser.error(f"argument {count}: invalid value {value}; allowed: an integer >= 1")
    unknown = [name for name in args.only or [] if name not in names]
    if unknown:
        allowed = ", ".join(repr(valid) for valid in names)
        parser.error(f"invalid --only {unknown}: allowed names are {allowed}")
    args.out = args.out.resolve()
    existing = next(path for path in (args.out, *args.out.parents) if path.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "is not a folder" if not existing.is_dir() else "is not writable"
        parser.error(f"argument --out: {args.out} cannot be the output folder: {existing} {why}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['steps']} steps per run")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "main_job")
    parser.add_argument("--steps", type=int, help="override the optimizer steps per run")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="run only these contenders (default: all)"
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child is not None:  # the rest are LightningCLI's arguments
        run_child(args.child, [a for a in rest if a != "--"])
        return
    if rest:  # a typo such as --quik would otherwise start the full job
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    refuse_bad_arguments(parser, args, "--steps", [c.name for c in CONTENDERS])
    budget = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        budget = {"steps": args.steps, "val_every": args.steps, "warmup": 0}
    contenders = [c for c in CONTENDERS if not args.only or c.name in args.only]
    missing = [c for c in contenders if c.requires and importlib.util.find_spec(c.requires) is None]
    if args.only and missing:
        parser.error(
            f"invalid --only {missing[0].name!r}: it needs {missing[0].requires}, which is not "
            'installed here (pip install -e ".[anchors]")'
        )
    for contender in missing:
        print(f"Skipping {contender.name!r}: {contender.requires} is not installed", flush=True)
    contenders = [c for c in contenders if c not in missing]
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    results = train_all(args.out, budget, contenders)
    report = table(results)
    header = (
        f"{budget['steps']} steps per run, batch 32 x 64 bytes, one thread per run; "
        f"validation loss in nats per byte (uniform guess {math.log(256):.2f})."
    )
    (args.out / "results.md").write_text(f"{header}\n\n{report}\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "loss_curves.png")
    print(f"\n{header}\n\n{report}\n")
    print(f"Written to {args.out}/ (results.md, results.json, loss_curves.png)")
    print(f"Total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
