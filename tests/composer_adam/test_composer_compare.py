"""The main job's Composer variant runs end to end (a few batches of two contenders)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.processes import ROOT, run_worker

pytest.importorskip("composer")
pytest.importorskip("matplotlib")


def test_composer_variant_trains_compares_and_reports(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(ROOT / "examples" / "composer_compare.py"),
        "--batches",
        "6",
        "--only",
        "composer.optim.DecoupledAdamW",
        "composer_adam.DecoupledAdamW",
        "--out",
        str(tmp_path),
    ]
    run_worker(command, timeout=600)
    runs = json.loads((tmp_path / "results.json").read_text())
    theirs, ours = runs["composer.optim.DecoupledAdamW"], runs["composer_adam.DecoupledAdamW"]
    assert theirs["optimizer"] == "composer.optim.decoupled_weight_decay.DecoupledAdamW"
    assert ours["optimizer"] == "composer_adam.optimizers.DecoupledAdamW"
    # The drop-in computes the same steps: the same losses batch by batch.
    for (_, a), (_, b) in zip(theirs["train_losses"], ours["train_losses"], strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    assert ours["val_losses"][-1][1] == pytest.approx(theirs["val_losses"][-1][1], abs=1e-5)
    assert "| composer_adam.DecoupledAdamW |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
