"""A Composer run SIGKILLed between checkpoints and restarted with autoresume ends with
exactly the parameters of an uninterrupted run, on every backend (default flags
included)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.composer_adam.fault_worker import SAVE_EVERY, make_optimizer
from tests.composer_adam.harness import STEPS, train
from tests.processes import kill_when_printed, run_worker

KILL_AT = 35  # of 60 batches: 5 steps past the checkpoint at batch 30


@pytest.mark.parametrize(
    ("optimizer", "backend"),
    [
        ("DecoupledAdamW", "default"),
        ("DecoupledAdamW", "loop"),
        ("DecoupledNAdam", "fused"),
        ("DecoupledNAdam", "foreach"),
    ],
)
def test_sigkill_then_autoresume_matches_uninterrupted_run(
    optimizer: str, backend: str, tmp_path: Path
) -> None:
    uninterrupted, _ = train(make_optimizer(optimizer, backend))
    command = [sys.executable, "-m", "tests.composer_adam.fault_worker", str(tmp_path)]
    command += [optimizer, backend]
    kill_when_printed([*command, str(KILL_AT)], f"waiting at batch {KILL_AT}")
    assert not (tmp_path / "final.pt").exists()

    resumed_run = run_worker(command)
    last_checkpoint = KILL_AT // SAVE_EVERY * SAVE_EVERY
    assert f"start at batch {last_checkpoint}" in resumed_run.stdout.splitlines()
    resumed = torch.load(tmp_path / "final.pt")
    expected = uninterrupted.state.model.state_dict()
    assert int(uninterrupted.state.timestamp.batch) == STEPS
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name
