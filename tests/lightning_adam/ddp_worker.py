"""Run by test_ddp.py: Lightning DDP on 2 CPU processes (gloo), every core optimizer, and
GradientRelease under DDP.

`main`: Lightning's launcher re-runs this module for rank 1; each rank trains every run
in RUNS in turn and saves the parameters after each to <out>/rank<r>.pt. `refusals`: one
process (DDP with devices=1) tries the DDP settings GradientRelease refuses and prints
each error.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from lightning_adam import GradientRelease
from tests.lightning_adam.models import Regression, loader, make_trainer, regression_data

SCHEDULE = {"kind": "cosine", "warmup_steps": 2, "total_steps": 12, "min_lr_ratio": 0.1}
SAMPLES, EPOCHS, BATCH_PER_RANK = 256, 3, 32
OPTIMIZERS = {
    # Every core optimizer with a weight-decay mode each. Summing the replicas' gradients
    # instead of averaging them moves these runs 2e-5 (decoupled decay: only eps notices)
    # to 8e-2 (L2, which adds λθ to the gradient) away from one process.
    "Adam-l2": {"optimizer": "Adam", "lr": 1e-2, "weight_decay": 0.1},
    "AdamW-amsgrad": {"optimizer": "AdamW", "lr": 1e-2, "weight_decay": 0.1, "amsgrad": True},
    "RAdam-fully-decoupled": {
        "optimizer": "RAdam",
        "lr": 1e-2,
        "weight_decay": 1e-2,
        "decouple_lr": True,
    },
    "NAdam-decoupled": {"optimizer": "NAdam", "lr": 1e-2, "weight_decay": 0.1, "decouple_wd": True},
    "ADOPT-l2": {"optimizer": "ADOPT", "lr": 1e-2, "weight_decay": 0.1},
}
RUNS = {
    # name: (optimizer kwargs, gradient release, accumulate_grad_batches)
    **{name: (kwargs, False, 1) for name, kwargs in OPTIMIZERS.items()},
    "AdamW": ({"optimizer": "AdamW", "lr": 1e-2}, False, 1),
    "AdamW-release": ({"optimizer": "AdamW", "lr": 1e-2}, True, 1),
    "ADOPT-accumulate": ({"optimizer": "ADOPT", "lr": 1e-2}, False, 2),
    "ADOPT-accumulate-release": ({"optimizer": "ADOPT", "lr": 1e-2}, True, 2),
}


def main(out: str) -> None:
    results, rank = {}, 0
    for name, (kwargs, release, accumulate) in RUNS.items():
        model = Regression(scheduler=SCHEDULE, **kwargs)
        trainer = make_trainer(
            strategy="ddp",
            devices=2,
            max_epochs=EPOCHS,
            accumulate_grad_batches=accumulate,
            callbacks=[GradientRelease()] if release else [],
        )
        trainer.fit(model, loader(regression_data(SAMPLES), BATCH_PER_RANK))
        results[name] = [p.detach().clone() for p in model.parameters()]
        results[f"{name}-steps"] = trainer.global_step
        rank = trainer.global_rank
    torch.save(results, f"{out}/rank{rank}.pt")


class CommHook(L.Callback):
    """Registers DDP's default all-reduce hook, as DDPStrategy(ddp_comm_hook=...) does on GPU
    (Lightning registers user hooks on CUDA only, so on CPU this callback stands in)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.model.register_comm_hook(None, allreduce_hook)


def refusals() -> None:
    for strategy, first in ((DDPStrategy(find_unused_parameters=True), []), ("ddp", [CommHook()])):
        callbacks = [*first, GradientRelease()]
        trainer = make_trainer(strategy=strategy, devices=1, max_steps=2, callbacks=callbacks)
        try:
            trainer.fit(Regression(lr=1e-2), loader(regression_data(64)))
        except ValueError as error:
            print(f"refused: {error}")


if __name__ == "__main__":
    if sys.argv[1] == "--refusals":
        refusals()
    else:
        main(sys.argv[1])
