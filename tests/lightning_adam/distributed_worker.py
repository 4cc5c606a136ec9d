"""Run by test_distributed.py: Lightning on 2 CPU processes (gloo).

`main`: Lightning's launcher (the first Trainer, strategy="ddp") re-runs this module for
rank 1; later Trainers and Fabrics join the same process group. Each rank trains every
run in RUNS (DDP with a sampler, a schedule and GradientRelease), then every cell of
strategy_cases.all_cells, and saves all to <out>/rank<r>.pt. `spawn`: "ddp_spawn" fits
SPAWN_CELLS (each fit spawns its own two processes, so only a few). `refusals`: one
process tries the settings GradientRelease refuses and prints each error.
"""

from __future__ import annotations

import sys
import warnings
from itertools import product
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.fsdp import fully_shard

from lightning_adam import GradientRelease, OptimizerMonitor
from tests.core.configuration_cases import BACKENDS, Cell
from tests.lightning_adam import strategy_cases
from tests.lightning_adam.models import (
    Regression,
    ResumableLoader,
    StopInsideWindow,
    loader,
    make_trainer,
    regression_data,
)

SCHEDULE = {"kind": "cosine", "warmup_steps": 2, "total_steps": 12, "min_lr_ratio": 0.1}
COUNTED_SCHEDULE = {"kind": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1}
"""total_steps left to the trainer (6 here), as the helper's default schedules leave it."""
SAMPLES, EPOCHS, BATCH_PER_RANK = 256, 3, 32
BATCHES_PER_EPOCH = SAMPLES // (2 * BATCH_PER_RANK)
ADAMW = {"optimizer": "AdamW", "lr": 1e-2, "weight_decay": 0.1}
ACCUMULATION_SCHEDULE = {0: 1, 1: 2}
"""A GradientAccumulationScheduler's windows by epoch: a step per batch, then per two."""
RUNS: dict[str, tuple[dict[str, Any], bool, int | dict[int, int], str]] = {
    # name: (optimizer kwargs, gradient release, accumulate_grad_batches or a
    # GradientAccumulationScheduler's scheduling, strategy). Every optimizer and dtype is
    # strategy_cases' matrix; these add lightning_adam.configure_optimizers (decay and
    # no-decay groups, a schedule), the DistributedSampler, accumulation and release under
    # DDP and ModelParallelStrategy, each run with default flags and each explicit backend
    # (run_name).
    "AdamW": (ADAMW, False, 1, "ddp"),
    "AdamW-release": (ADAMW, True, 1, "ddp"),
    "ADOPT-accumulate": ({"optimizer": "ADOPT", "lr": 1e-2}, False, 2, "ddp"),
    "ADOPT-accumulate-release": ({"optimizer": "ADOPT", "lr": 1e-2}, True, 2, "ddp"),
    "AdamW-scheduled-accumulate": (ADAMW, False, ACCUMULATION_SCHEDULE, "ddp"),
    "AdamW-scheduled-accumulate-release": (ADAMW, True, ACCUMULATION_SCHEDULE, "ddp"),
    "AdamW-model-parallel": (ADAMW, False, 1, "model_parallel"),
    "AdamW-model-parallel-release": (ADAMW, True, 1, "model_parallel"),
    "AdamW-model-parallel-scheduled-accumulate-release": (
        ADAMW,
        True,
        ACCUMULATION_SCHEDULE,
        "model_parallel",
    ),
}


def run_name(name: str, backend: str) -> str:
    """The key of RUNS[name] trained with BACKENDS[backend]'s flags."""
    return f"{name}[{backend}]"


def accumulation_settings(accumulate: int | dict[int, int]) -> dict[str, Any]:
    """The Trainer settings of a RUNS accumulation: a fixed window, or a
    GradientAccumulationScheduler that changes it at epoch starts."""
    if isinstance(accumulate, dict):
        return {"callbacks": [GradientAccumulationScheduler(scheduling=accumulate)]}
    return {"accumulate_grad_batches": accumulate}


def optimizer_steps(accumulate: int | dict[int, int]) -> int:
    """The optimizer steps EPOCHS epochs take: Lightning steps at every window's last
    batch and at each epoch's last batch."""
    schedule = accumulate if isinstance(accumulate, dict) else {0: accumulate}
    steps = 0
    for epoch in range(EPOCHS):
        window = schedule[max(start for start in schedule if start <= epoch)]
        steps += -(-BATCHES_PER_EPOCH // window)
    return steps


def run_trainer(
    accumulate: int | dict[int, int], callbacks: list[L.Callback], **settings: Any
) -> L.Trainer:
    """make_trainer with a RUNS accumulation and these callbacks besides."""
    chosen = accumulation_settings(accumulate)
    chosen["callbacks"] = [*chosen.get("callbacks", []), *callbacks]
    return make_trainer(**chosen, **settings)


MONITORED = ("ddp", "model_parallel")
"""OptimizerMonitor logs the same global norms under DDP and under FSDP2 shards (default
flags: the monitor reads gradients, state and parameters, which every backend leaves
alike, as the runs above show)."""
MONITORED_STATES = {"full": 16, "8bit": 2048}
"""state_precision -> the model's width: 2048 makes the last weight (3, 2048), quantized."""


def _monitored_fit(out: str, strategy: str, state_precision: str) -> None:
    """AdamW for one epoch with OptimizerMonitor every step, logged to
    <out>/monitor-<strategy>-<state_precision>."""
    sharded = strategy == "model_parallel"
    model = (ShardedRegression if sharded else Regression)(
        width=MONITORED_STATES[state_precision], state_precision=state_precision, **ADAMW
    )
    trainer = make_trainer(
        strategy=strategy_cases.model_parallel(data=2, tensor=1) if sharded else strategy,
        devices=2,
        max_epochs=1,
        callbacks=[OptimizerMonitor(every_n_steps=1)],
        logger=CSVLogger(out, name=f"monitor-{strategy}-{state_precision}"),
    )
    trainer.fit(model, loader(regression_data(SAMPLES), BATCH_PER_RANK))
    if state_precision == "8bit":
        state = trainer.optimizers[0].state[model.net[-1].weight]
        assert "exp_avg_codes" in state, "the wide weight keeps 8-bit state"


def _resumed_fit(
    out: str, name: str, backend: str, whole_checkpoint: bool = False
) -> list[torch.Tensor]:
    """RUNS[name] for one epoch with a checkpoint, then resumed from it to EPOCHS: under
    ModelParallelStrategy the checkpoint is torch.distributed.checkpoint's, whose loader
    creates the state it loads into with a step at lr 0 (see the test), or with
    whole_checkpoint one file of whole tensors, which torch's full-state loader shards."""
    kwargs, release, accumulate, strategy = RUNS[name]
    sharded = strategy == "model_parallel"
    directory = f"{out}/{run_name(name, backend)}-checkpoint{'-whole' if whole_checkpoint else ''}"
    model = None
    for epochs, resume in ((1, None), (EPOCHS, f"{directory}/last.ckpt")):
        model = (ShardedRegression if sharded else Regression)(
            scheduler=SCHEDULE, **kwargs, **BACKENDS[backend]
        )
        callbacks: list[L.Callback] = [ModelCheckpoint(dirpath=directory, save_last=True)]
        trainer = run_trainer(
            accumulate,
            [*callbacks, *([GradientRelease()] if release else [])],
            strategy=(
                strategy_cases.model_parallel(data=2, tensor=1, whole_checkpoint=whole_checkpoint)
                if sharded
                else strategy
            ),
            devices=2,
            max_epochs=epochs,
            enable_checkpointing=True,
        )
        trainer.fit(model, loader(regression_data(SAMPLES), BATCH_PER_RANK), ckpt_path=resume)
    return strategy_cases.full_parameters(model)


def _resumed_inside_a_window(out: str, backend: str) -> dict[str, list[torch.Tensor]]:
    """AdamW released under ModelParallelStrategy with windows of two batches: fitted
    whole, and stopped inside a window with a checkpoint (torch.distributed.checkpoint's)
    then resumed from it. DCP loads only the state keys the fresh optimizer has, so the
    window's count is carried by GradientRelease's own checkpoint state. The schedule's
    length is the trainer's to count: ModelParallelStrategy restores a checkpoint after
    configure_optimizers, where counting would load the data before Lightning restored
    its loops (Lightning issue 20550: the resumed epoch restarted its data)."""
    path = f"{out}/inside-window-{backend}.ckpt"
    results = {}
    for name, stop, resume in (
        ("whole", None, None),
        ("stopped", StopInsideWindow(path, epoch=1, batch=0), None),
        ("resumed", None, path),
    ):
        model = ShardedRegression(scheduler=COUNTED_SCHEDULE, **ADAMW, **BACKENDS[backend])
        trainer = make_trainer(
            accumulate_grad_batches=2,
            callbacks=[GradientRelease(), *([stop] if stop else [])],
            strategy=strategy_cases.model_parallel(data=2, tensor=1),
            devices=2,
            max_epochs=EPOCHS,
        )
        data = ResumableLoader(regression_data(SAMPLES), batch_size=BATCH_PER_RANK)
        trainer.fit(model, data, ckpt_path=resume)
        results[name] = strategy_cases.full_parameters(model)
        results[f"{name}-steps"] = trainer.global_step
        results[f"{name}-total-steps"] = trainer.lr_scheduler_configs[0].scheduler.total_steps
    return results


RESUMED = ("AdamW-model-parallel-release",)
"""Runs also trained in two halves across a checkpoint."""
RESUMED_FROM_WHOLE = ("AdamW-model-parallel",)
"""Runs also trained in two halves across a checkpoint of whole tensors."""


class ShardedRegression(Regression):
    """Regression with each Linear and the whole net sharded (FSDP2)."""

    def configure_model(self) -> None:
        strategy_cases.shard(self.net, self.device_mesh["data_parallel"])


def main(out: str) -> None:
    results, rank = {}, 0
    for (name, (kwargs, release, accumulate, strategy)), backend in product(RUNS.items(), BACKENDS):
        sharded = strategy == "model_parallel"
        model = (ShardedRegression if sharded else Regression)(
            scheduler=SCHEDULE, **kwargs, **BACKENDS[backend]
        )
        trainer = run_trainer(
            accumulate,
            [GradientRelease()] if release else [],
            strategy=strategy_cases.model_parallel(data=2, tensor=1) if sharded else strategy,
            devices=2,
            max_epochs=EPOCHS,
        )
        trainer.fit(model, loader(regression_data(SAMPLES), BATCH_PER_RANK))
        results[run_name(name, backend)] = strategy_cases.full_parameters(model)
        results[f"{run_name(name, backend)}-steps"] = trainer.global_step
        rank = trainer.global_rank
    for name, backend in product(RESUMED, BACKENDS):
        results[f"{run_name(name, backend)}-resumed"] = _resumed_fit(out, name, backend)
    for name, backend in product(RESUMED_FROM_WHOLE, BACKENDS):
        resumed = _resumed_fit(out, name, backend, whole_checkpoint=True)
        results[f"{run_name(name, backend)}-resumed-whole"] = resumed
    for backend in BACKENDS:
        results[run_name("inside-window", backend)] = _resumed_inside_a_window(out, backend)
    for strategy in MONITORED:
        for state_precision in MONITORED_STATES:
            _monitored_fit(out, strategy, state_precision)
    results["matrix"] = strategy_cases.all_cells()
    results["fabric_joint_setup_trains"] = strategy_cases.joint_setup_under_model_parallel_fabric()
    torch.save(results, f"{out}/rank{rank}.pt")


SPAWN_CELLS = [Cell("AdamW", "default", "fp32"), Cell("ADOPT", "default", "bf16")]
"""ddp_spawn fits, each with GradientRelease (pickled into the spawned processes with
the Trainer) and default flags; the math is DDP's, which the matrix covers cell by cell."""


class LeaveTogether(L.Callback):
    """Ends a spawned worker's process group on both ranks at once, after training.

    Otherwise each spawned process destroys its gloo group at exit (Lightning's atexit
    handler) whenever it gets there; once in a few runs on a loaded machine a rank then
    aborted in gloo's teardown ("terminate called without an active exception") after a
    fit that had completed. Nothing after teardown needs the group: rank 0 hands its
    weights back through a file and a queue."""

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def spawn(out: str) -> None:
    """Each fit spawns 2 processes; rank 0's weights come back into this process's module."""
    results = {}
    for cell in SPAWN_CELLS:
        fit = strategy_cases.fit_cell(
            cell, "ddp_spawn", release=True, extra_callbacks=(LeaveTogether(),)
        )
        results[cell.key] = fit["params"]
    torch.save(results, f"{out}/spawn.pt")


class CommHook(L.Callback):
    """Registers DDP's default all-reduce hook, as DDPStrategy(ddp_comm_hook=...) does on GPU
    (Lightning registers user hooks on CUDA only, so on CPU this callback stands in)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.model.register_comm_hook(None, allreduce_hook)


class PartlySharded(strategy_cases.MatrixModule):
    """Shards the first Linear only: the others stay plain parameters."""

    def configure_model(self) -> None:
        fully_shard(self.net[0], mesh=self.device_mesh["data_parallel"])


def refusals() -> None:
    """On one process: the DDP settings release refuses, and a partly sharded model under
    ModelParallelStrategy (a one-rank mesh) with release."""
    for strategy, first in ((DDPStrategy(find_unused_parameters=True), []), ("ddp", [CommHook()])):
        callbacks = [*first, GradientRelease()]
        trainer = make_trainer(strategy=strategy, devices=1, max_steps=2, callbacks=callbacks)
        try:
            trainer.fit(Regression(lr=1e-2), loader(regression_data(64)))
        except ValueError as error:
            print(f"refused: {error}")
    trainer = strategy_cases.trainer_for(
        ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
        "fp32",
        devices=1,
        callbacks=[GradientRelease()],
    )
    try:
        trainer.fit(PartlySharded(Cell("AdamW", "default", "fp32")))
    except ValueError as error:
        switched = [g["gradient_release"] for g in trainer.optimizers[0].param_groups]
        print(f"refused: {error} | groups switched to release: {any(switched)}")


if __name__ == "__main__":
    warnings.filterwarnings("ignore", ".*(num_workers|does not have many workers).*")
    if sys.argv[1] == "--refusals":
        refusals()
    elif sys.argv[1] == "--spawn":
        spawn(sys.argv[2])
    else:
        main(sys.argv[1])
