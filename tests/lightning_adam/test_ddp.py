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


def test_ddp_release_equals_ddp_without_release_on_every_replica(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for variable in ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(variable, None)
    command = [sys.executable, "-m", "tests.lightning_adam.ddp_release", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
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
