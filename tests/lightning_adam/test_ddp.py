"""GradientRelease under DDP: 2 CPU processes (gloo) stay identical and equal DDP without it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.lightning_adam.ddp_release import RUNS
from tests.lightning_adam.models import Regression

ROOT = Path(__file__).resolve().parents[2]


def _run_script(*args: str) -> subprocess.CompletedProcess:
    """tests/lightning_adam/ddp_release.py in a fresh process: no distributed state leaks."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for variable in ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(variable, None)
    command = [sys.executable, "-m", "tests.lightning_adam.ddp_release", *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_ddp_release_equals_ddp_without_release_on_every_replica(tmp_path: Path) -> None:
    _run_script(str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for name in RUNS:
        # 256 samples, 2 ranks, batches of 32: 4 batches per rank and epoch, 3 epochs.
        expected_steps = 12 // RUNS[name][2]
        assert ranks[0][f"{name}-steps"] == ranks[1][f"{name}-steps"] == expected_steps
        for a, b in zip(ranks[0][name], ranks[1][name], strict=True):
            assert torch.equal(a, b), f"{name}: replicas differ"
    for ordinary, released in (
        ("AdamW", "AdamW-release"),
        ("ADOPT-accumulate", "ADOPT-accumulate-release"),
    ):
        for a, b in zip(ranks[0][ordinary], ranks[0][released], strict=True):
            assert torch.equal(a, b), f"{released} differs from {ordinary}"
    initial = list(Regression().parameters())
    for name in RUNS:
        assert all(not torch.equal(a, b) for a, b in zip(initial, ranks[0][name], strict=True))


def test_ddp_settings_release_cannot_follow_are_refused() -> None:
    refused = [line for line in _run_script("--refusals").stdout.splitlines() if "refused" in line]
    assert len(refused) == 2, refused
    assert "Invalid find_unused_parameters for GradientRelease under DDP: True." in refused[0]
    assert (
        "Invalid DDP setup for GradientRelease: the model already has a communication"
        in (refused[1])
    )
