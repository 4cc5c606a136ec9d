"""Worker for test_faults.py: harness.train with autoresume, checkpointing every
SAVE_EVERY batches into OUT_DIR/checkpoints, the final parameters into OUT_DIR/final.pt.

Usage: python -m tests.composer_adam.fault_worker OUT_DIR OPTIMIZER BACKEND [STOP_AT]
(BACKEND: default, fused, foreach or loop, as in tests/core/configuration_cases.py)

It prints the batch it starts from. With STOP_AT it prints "waiting at batch STOP_AT"
after that batch's step and waits there for the parent's SIGKILL, so the kill lands at
a known point between checkpoints (never during a save).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger

import composer_adam
from tests.composer_adam.harness import LR, train
from tests.core.configuration_cases import BACKENDS

SAVE_EVERY = 10
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "DecoupledAdamW": lambda p, **kw: composer_adam.DecoupledAdamW(
        p, lr=LR, weight_decay=1e-4, amsgrad=True, **kw
    ),
    # NAdam also keeps a host scalar (mu_product) that the checkpoint must carry.
    "DecoupledNAdam": lambda p, **kw: composer_adam.DecoupledNAdam(
        p, lr=LR, weight_decay=1e-4, **kw
    ),
}


def make_optimizer(optimizer: str, backend: str) -> Callable[[Any], torch.optim.Optimizer]:
    """The optimizer on one backend of tests/core/configuration_cases.py (default flags
    for "default")."""
    return lambda params: OPTIMIZERS[optimizer](params, **BACKENDS[backend])


class Progress(Callback):
    """Reports where training starts and stops at stop_at to be killed."""

    def __init__(self, stop_at: int | None) -> None:
        self.stop_at = stop_at

    def fit_start(self, state: State, logger: Logger) -> None:
        print(f"start at batch {int(state.timestamp.batch)}", flush=True)

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) == self.stop_at:
            print(f"waiting at batch {self.stop_at}", flush=True)
            time.sleep(600)
            raise SystemExit("never killed")


def main(out_dir: str, optimizer: str, backend: str, stop_at: str = "") -> None:
    out = Path(out_dir)
    trainer, _ = train(
        make_optimizer(optimizer, backend),
        callbacks=[Progress(int(stop_at) if stop_at else None)],
        run_name="fault",
        save_folder=str(out / "checkpoints"),
        save_interval=f"{SAVE_EVERY}ba",
        autoresume=True,
    )
    torch.save(trainer.state.model.state_dict(), out / "final.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
