"""Lightning DDP on 2 CPU processes (gloo): every core optimizer keeps the replicas identical
and equal to one process with the same global batch; GradientRelease changes nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from tests.lightning_adam.ddp_worker import (
    BATCH_PER_RANK,
    EPOCHS,
    OPTIMIZERS,
    RUNS,
    SAMPLES,
    SCHEDULE,
)
from tests.lightning_adam.models import (
    Regression,
    make_trainer,
    parameters_of,
    regression_data,
)
from tests.processes import run_worker

STEPS = SAMPLES // (2 * BATCH_PER_RANK) * EPOCHS  # 2 ranks: 4 steps per epoch


def _run_script(*args: str) -> subprocess.CompletedProcess:
    """tests/lightning_adam/ddp_worker.py in a fresh process: no distributed state leaks."""
    return run_worker([sys.executable, "-m", "tests.lightning_adam.ddp_worker", *args])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each of the 2 ranks saved after every run of RUNS (one DDP launch for all)."""
    out = tmp_path_factory.mktemp("ddp")
    _run_script(str(out))
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def test_every_run_keeps_the_replicas_identical(ranks: list[dict]) -> None:
    initial = parameters_of(Regression())
    for name, (_, _, accumulate) in RUNS.items():
        assert ranks[0][f"{name}-steps"] == ranks[1][f"{name}-steps"] == STEPS // accumulate
        for a, b in zip(ranks[0][name], ranks[1][name], strict=True):
            assert torch.equal(a, b), f"{name}: replicas differ"
        assert all(not torch.equal(a, b) for a, b in zip(initial, ranks[0][name], strict=True))


def _global_batches() -> list[list[int]]:
    """Each DDP step's samples, both ranks' together, for all epochs in order.

    Lightning gives each rank a DistributedSampler (shuffled, seed 0, set_epoch(epoch)
    every epoch); the same samplers, built here for ranks 0 and 1, say which samples the
    two replicas' batches of 32 held.
    """
    dataset, batches = regression_data(SAMPLES), []
    for epoch in range(EPOCHS):
        per_rank = []
        for rank in (0, 1):
            sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            per_rank.append(list(sampler))
        for start in range(0, SAMPLES // 2, BATCH_PER_RANK):
            end = start + BATCH_PER_RANK
            batches.append(per_rank[0][start:end] + per_rank[1][start:end])
    return batches


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_ddp_equals_one_process_with_the_same_global_batch(name: str, ranks: list[dict]) -> None:
    """One process takes each step on the 64 samples the two replicas shared (DDP averages
    their gradients, a mean over 32 each): the same parameters to float32 rounding."""
    model = Regression(scheduler=SCHEDULE, **OPTIMIZERS[name])
    trainer = make_trainer(max_epochs=1)  # the three epochs' batches in one
    trainer.fit(model, DataLoader(regression_data(SAMPLES), batch_sampler=_global_batches()))
    assert trainer.global_step == STEPS
    for a, b in zip(ranks[0][name], model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=0)


def test_ddp_release_equals_ddp_without_release(ranks: list[dict]) -> None:
    for ordinary, released in (
        ("AdamW", "AdamW-release"),
        ("ADOPT-accumulate", "ADOPT-accumulate-release"),
    ):
        for a, b in zip(ranks[0][ordinary], ranks[0][released], strict=True):
            assert torch.equal(a, b), f"{released} differs from {ordinary}"


@pytest.mark.bad_input
def test_ddp_settings_release_cannot_follow_are_refused() -> None:
    refused = [line for line in _run_script("--refusals").stdout.splitlines() if "refused" in line]
    assert len(refused) == 2, refused
    assert "Invalid find_unused_parameters for GradientRelease under DDP: True." in refused[0]
    assert (
        "Invalid DDP setup for GradientRelease: the model already has a communication"
        in (refused[1])
    )
