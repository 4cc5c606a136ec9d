"""The README's main job runs end to end (a few steps of two contenders)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import ROOT, run_worker

pytest.importorskip("lightning")
pytest.importorskip("matplotlib")


def test_main_job_trains_compares_and_reports(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(ROOT / "examples" / "main_job.py"),
        "--steps",
        "6",
        "--only",
        "torch.optim.AdamW",
        "core.AdamW gradient release",
        "--out",
        str(tmp_path),
    ]
    run_worker(command, timeout=600)
    runs = json.loads((tmp_path / "results.json").read_text())
    assert list(runs) == ["torch.optim.AdamW", "core.AdamW gradient release"]
    torch_run, released = runs.values()
    assert torch_run["optimizer"] == "torch.optim.adamw.AdamW"
    assert released["optimizer"] == "core.adam.AdamW"
    # Same model, data, seed and hyperparameters: the first losses agree, and both train.
    assert torch_run["train_losses"][0][1] == pytest.approx(released["train_losses"][0][1])
    for run in runs.values():
        assert len(run["train_losses"]) == 6 and run["val_losses"][-1][0] == 6
        assert run["optimizer_ms"] > 0 and run["optimizer_state_mb"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "| core.AdamW gradient release |" in table
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000


def test_unknown_contender_is_refused_with_the_valid_names(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "examples" / "main_job.py"), "--only", "SGD"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "invalid --only ['SGD']" in result.stderr and "'core.ADOPT'" in result.stderr
