"""The main job's Composer variant: the byte-level model trained by composer.Trainer from a
YAML recipe, once per optimizer, with the same table and plot as examples/main_job.py.

Every run starts from configs/composer/char_lm_decoupled_adamw.yaml and changes only the
optimizer (and, for release, adds the GradientRelease callback). Composer's own
DecoupledAdamW gets exactly the param groups the recipe builds (no-decay group included).
Each run is its own subprocess, so its peak memory is its own. In the Composer environment:

    .venv-composer/bin/python examples/composer_compare.py [--quick]

Output: outputs/composer_job/{results.md, results.json, loss_curves.png}
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "composer" / "char_lm_decoupled_adamw.yaml"
COMPOSER_BASELINE = "composer.optim.DecoupledAdamW"

CONTENDERS: dict[str, dict[str, Any]] = {
    COMPOSER_BASELINE: {},
    "composer_adam.DecoupledAdamW": {"optimizer": {"name": "adamkit_decoupled_adamw"}},
    "composer_adam.DecoupledRAdam": {"optimizer": {"name": "adamkit_decoupled_radam"}},
    "composer_adam.DecoupledNAdam": {"optimizer": {"name": "adamkit_decoupled_nadam"}},
    "composer_adam.DecoupledADOPT": {
        "optimizer": {"name": "adamkit_decoupled_adopt", "betas": [0.9, 0.9999], "eps": 1e-6}
    },
    "composer_adam.DecoupledAdamW + gradient release": {
        "optimizer": {"name": "adamkit_decoupled_adamw", "gradient_release": True},
        "callbacks": {"gradient_release": {}},
        "group": "release",
    },
}
FULL = {"batches": 600, "val_every": 100, "warmup": 40}
QUICK = {"batches": 60, "val_every": 30, "warmup": 10}
VAL_BATCHES = 20


def _recorder(path: Path, val_set: Any, val_every: int, tokens_per_batch: int) -> Any:
    """A Composer callback recording what main_job.py's Lightning recorder records."""
    import torch
    from char_lm import next_token_loss
    from composer.core import Callback, State
    from composer.loggers import Logger
    from main_job import run_summary, time_released_steps

    class RunRecorder(Callback):
        """Optimizer time per batch is the optimizer's own work: Composer runs the
        microbatches as a closure inside step(), so a top-level step is timed from the
        last backward on, and the per-parameter steps release makes inside backward are
        timed one by one (main_job.time_released_steps)."""

        def __init__(self) -> None:
            self.train_losses: list[tuple[int, float]] = []
            self.val_losses: list[tuple[int, float]] = []
            self.batch_seconds: list[float] = []
            self.optimizer_seconds: list[float] = []
            self._depth, self._pending, self._started = 0, 0.0, [0.0, 0.0]
            self._last_backward = 0.0
            self._batch_started = 0.0

        def fit_start(self, state: State, logger: Logger) -> None:
            optimizer = state.optimizers[0]
            optimizer.register_step_pre_hook(self._before_step)
            optimizer.register_step_post_hook(self._after_step)
            time_released_steps(self._add_released)

        def _add_released(self, seconds: float) -> None:
            self._pending += seconds

        def _before_step(self, *args: Any) -> None:
            self._depth += 1
            self._started[min(self._depth, 2) - 1] = time.perf_counter()

        def _after_step(self, *args: Any) -> None:
            now = time.perf_counter()
            if self._depth >= 2:
                self._pending += now - self._started[1]
            else:
                self._pending += now - max(self._started[0], self._last_backward)
            self._depth -= 1

        def after_backward(self, state: State, logger: Logger) -> None:
            self._last_backward = time.perf_counter()

        def batch_start(self, state: State, logger: Logger) -> None:
            self._pending, self._batch_started = 0.0, time.perf_counter()

        def batch_end(self, state: State, logger: Logger) -> None:
            self.batch_seconds.append(time.perf_counter() - self._batch_started)
            self.optimizer_seconds.append(self._pending)
            batch = int(state.timestamp.batch)
            self.train_losses.append((batch, float(state.loss)))
            if batch % val_every == 0:
                self.val_losses.append((batch, self._validation_loss(state.model)))

        @torch.no_grad()
        def _validation_loss(self, model: Any) -> float:
            model.eval()
            loader = torch.utils.data.DataLoader(val_set, batch_size=32)
            losses = []
            for index, (tokens, targets) in enumerate(loader):
                if index == VAL_BATCHES:
                    break
                losses.append(float(next_token_loss(model.net(tokens), targets)))
            model.train()
            return sum(losses) / len(losses)

        def fit_end(self, state: State, logger: Logger) -> None:
            summary = run_summary(self, state.optimizers[0], state.model, tokens_per_batch)
            path.write_text(json.dumps(summary))

    return RunRecorder()


def run_child(name: str, result_path: Path, budget: dict[str, int]) -> None:
    """Train one contender in this process with composer.Trainer."""
    import torch
    from composer import Trainer
    from composer.optim import DecoupledAdamW
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from char_lm import train_val_split
    from composer_train import CharLanguageModel, build_callbacks

    from composer_adam import build_optimizer, build_scheduler, load_recipe

    recipe = load_recipe(RECIPE)
    overrides = CONTENDERS[name]
    recipe["optimizer"] = {**recipe["optimizer"], **overrides.get("optimizer", {})}
    recipe["callbacks"] = {**(recipe.get("callbacks") or {}), **overrides.get("callbacks", {})}
    recipe["scheduler"] = {**recipe["scheduler"], "t_warmup": f"{budget['warmup']}ba"}
    seed = recipe.get("seed", 17)
    torch.manual_seed(seed)
    context = recipe["model"]["context"]
    train_set, val_set = train_val_split(context, val_fraction=0.05)
    model = CharLanguageModel(**recipe["model"])
    optimizer = build_optimizer(recipe, model)
    if name == COMPOSER_BASELINE:
        # Composer's class with the very param groups (and hyperparameters) ours got.
        groups = [
            {"params": g["params"], "weight_decay": g["weight_decay"], "lr": g["lr"]}
            for g in optimizer.param_groups
        ]
        kwargs = {k: recipe["optimizer"][k] for k in ("lr", "betas", "eps", "weight_decay")}
        optimizer = DecoupledAdamW(groups, **kwargs)
    batch_size = recipe["data"]["batch_size"]
    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    callbacks = build_callbacks(recipe["callbacks"])
    callbacks.append(_recorder(result_path, val_set, budget["val_every"], batch_size * context))
    trainer_options = {**recipe.get("trainer", {}), "max_duration": f"{budget['batches']}ba"}
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        optimizers=optimizer,
        schedulers=build_scheduler(recipe),
        callbacks=callbacks,
        device="cpu",
        seed=seed,
        progress_bar=True,
        log_to_console=False,
        **trainer_options,
    )
    trainer.fit()


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['batches']} batches per run")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "composer_job")
    parser.add_argument("--batches", type=int, help="override the batches per run")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="run only these contenders (default: all)"
    )
    parser.add_argument("--child", nargs=2, metavar=("NAME", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from main_job import plot, refuse_bad_arguments, table

    refuse_bad_arguments(parser, args, "--batches", list(CONTENDERS))
    if importlib.util.find_spec("composer") is None:  # each child failed with a traceback
        parser.error(
            "Composer is not installed in this environment; run it in the Composer one: "
            ".venv-composer/bin/python examples/composer_compare.py (make env-composer)"
        )
    budget = dict(QUICK if args.quick else FULL)
    if args.batches is not None:
        budget = {"batches": args.batches, "val_every": args.batches, "warmup": 0}
    names = [name for name in CONTENDERS if not args.only or name in args.only]
    if args.child is not None:
        run_child(args.child[0], Path(args.child[1]), budget)
        return

    started = time.perf_counter()
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    results = {}
    for index, name in enumerate(names, 1):
        print(f"\n[{index}/{len(names)}] {name}", flush=True)
        path = args.out / "runs" / f"{index:02d}.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--child", name, str(path)]
        if args.quick:
            command.append("--quick")
        if args.batches is not None:
            command += ["--batches", str(args.batches)]
        subprocess.run(command, check=True, env=env, cwd=ROOT)
        group = CONTENDERS[name].get("group", "fp32")
        results[name] = {**json.loads(path.read_text()), "group": group}
    report = table(results, reference=COMPOSER_BASELINE)  # first run if the baseline is left out
    header = (
        f"composer.Trainer, {budget['batches']} batches per run (2 microbatches each), "
        f"batch 32 x 64 bytes, one thread per run; validation loss in nats per byte "
        f"(uniform guess {math.log(256):.2f})."
    )
    (args.out / "results.md").write_text(f"{header}\n\n{report}\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "loss_curves.png", reference=COMPOSER_BASELINE)
    print(f"\n{header}\n\n{report}\n")
    print(f"Written to {args.out}/ (results.md, results.json, loss_curves.png)")
    print(f"Total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
