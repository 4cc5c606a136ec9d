"""A Lightning run SIGKILLed mid-epoch and resumed from its last checkpoint ends exactly
where an uninterrupted run ends, also when the resumed run uses another backend. Every
backend runs, default flags included, before the kill and after the resume."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.lightning_adam import fault_worker
from tests.processes import ROOT, kill_when_printed, run_worker

WORKER = ROOT / "tests" / "lightning_adam" / "fault_worker.py"
KILL_AT_STEP = 80  # epoch 3 of 4 (32 steps each): after the epoch-2 checkpoint


def _worker(out: Path, optimizer: str, backend: str, *extra: str) -> list[str]:
    return [sys.executable, str(WORKER), str(out), optimizer, backend, *extra]


@pytest.mark.parametrize(
    ("optimizer", "first_backend", "resumed_backend"),
    [
        ("AdamW", "default", "default"),
        ("RAdam", "foreach", "foreach"),
        ("NAdam", "loop", "fused"),
        ("ADOPT", "fused", "loop"),
    ],
)
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(
    optimizer: str, first_backend: str, resumed_backend: str, tmp_path: Path
) -> None:
    # The uninterrupted run in this process (one torch thread, as the workers): only the
    # runs that are killed and resumed need processes of their own.
    fault_worker.main(str(tmp_path / "uninterrupted"), optimizer, first_backend)
    interrupted = tmp_path / "interrupted"
    kill_when_printed(_worker(interrupted, optimizer, first_backend), f"step {KILL_AT_STEP}")
    assert not (interrupted / "final.pt").exists()
    assert (interrupted / "checkpoints" / "last.ckpt").exists()
    run_worker(_worker(interrupted, optimizer, resumed_backend, "resume"))

    expected = torch.load(tmp_path / "uninterrupted" / "final.pt")
    resumed = torch.load(interrupted / "final.pt")
    for name, value in expected.items():
        if first_backend == resumed_backend:
            assert torch.equal(resumed[name], value), name
        else:
            torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=0)
