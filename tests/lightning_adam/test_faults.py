"""A Lightning run SIGKILLed mid-epoch and resumed from its last checkpoint ends exactly
where an uninterrupted run ends, also when the resumed run uses another backend."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "lightning_adam" / "fault_worker.py"
KILL_AT_STEP = 80  # epoch 3 of 4 (32 steps each): after the epoch-2 checkpoint


def _worker(out: Path, optimizer: str, backend: str, *extra: str) -> list[str]:
    return [sys.executable, str(WORKER), str(out), optimizer, backend, *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run(command: list[str]) -> None:
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _run_and_kill(command: list[str]) -> None:
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if line.strip() == f"step {KILL_AT_STEP}":
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=600)
    assert process.returncode == -signal.SIGKILL, "the run must be killed, not finish"


@pytest.mark.parametrize(
    ("optimizer", "first_backend", "resumed_backend"),
    [
        ("AdamW", "loop", "loop"),
        ("RAdam", "foreach", "foreach"),
        ("NAdam", "loop", "foreach"),
        ("ADOPT", "foreach", "loop"),
    ],
)
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(
    optimizer: str, first_backend: str, resumed_backend: str, tmp_path: Path
) -> None:
    _run(_worker(tmp_path / "uninterrupted", optimizer, first_backend))
    interrupted = tmp_path / "interrupted"
    _run_and_kill(_worker(interrupted, optimizer, first_backend))
    assert not (interrupted / "final.pt").exists()
    assert (interrupted / "checkpoints" / "last.ckpt").exists()
    _run(_worker(interrupted, optimizer, resumed_backend, "resume"))

    expected = torch.load(tmp_path / "uninterrupted" / "final.pt")
    resumed = torch.load(interrupted / "final.pt")
    for name, value in expected.items():
        if first_backend == resumed_backend:
            assert torch.equal(resumed[name], value), name
        else:
            torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=0)
