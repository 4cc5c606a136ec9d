"""The README's main job runs end to end (a few steps of two contenders)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.processes import ROOT, exit_of_script, run_worker

pytest.importorskip("lightning")
LEANEST = "core.AdamW bf16-true + 8-bit + release + stochastic rounding"
pytest.importorskip("matplotlib")


def test_main_job_trains_compares_and_reports(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(ROOT / "examples" / "main_job.py"),
        "--steps",
        "6",
        "--only",
        "torch.optim.AdamW",
        LEANEST,
        "--out",
        str(tmp_path),
    ]
    run_worker(command, timeout=600)
    runs = json.loads((tmp_path / "results.json").read_text())
    assert list(runs) == ["torch.optim.AdamW", LEANEST]
    torch_run, released = runs.values()
    assert torch_run["optimizer"] == "torch.optim.adamw.AdamW"
    assert released["optimizer"] == "core.adam.AdamW"
    # Same model, data, seed and hyperparameters: the first losses agree to bf16's
    # precision of the forward pass, and both train.
    first_losses = torch_run["train_losses"][0][1], released["train_losses"][0][1]
    assert first_losses[0] == pytest.approx(first_losses[1], rel=1e-3)
    for run in runs.values():
        assert len(run["train_losses"]) == 6 and run["val_losses"][-1][0] == 6
        assert run["optimizer_ms"] > 0 and run["optimizer_state_mb"] > 0
    # fp32 θ and m, v: 12 bytes per parameter; bf16 θ and 8-bit m, v (small tensors full)
    assert torch_run["param_and_state_bytes"] / torch_run["params"] == pytest.approx(12, abs=0.01)
    assert released["param_and_state_bytes"] / released["params"] < 4.5
    table = (tmp_path / "results.md").read_text()
    assert f"| {LEANEST} |" in table
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000


def test_unknown_contender_is_refused_with_the_valid_names(monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, stderr = exit_of_script("examples/main_job.py", ["--only", "SGD"], monkeypatch)
    assert code == 2
    assert "invalid --only ['SGD']" in stderr and "'core.ADOPT'" in stderr


ANCHORS = ("bitsandbytes", "torchao")
"""The 8-bit anchors' packages: the main job's optional rows (`pip install -e ".[anchors]"`)."""


@pytest.mark.bad_input
@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here"
)
def test_an_anchor_whose_package_is_missing_is_refused_with_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    arguments = ["--only", "bitsandbytes AdamW8bit"]
    code, _, stderr = exit_of_script("examples/main_job.py", arguments, monkeypatch)
    assert code == 2
    assert "invalid --only 'bitsandbytes AdamW8bit': it needs bitsandbytes" in stderr
    assert 'pip install -e ".[anchors]"' in stderr


@pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ANCHORS),
    reason='the anchors are not installed (pip install -e ".[anchors]")',
)
def test_the_anchors_train_beside_core_8bit_state_with_their_own_state_bytes(
    tmp_path: Path,
) -> None:
    names = ["core.AdamW 8-bit state", "bitsandbytes AdamW8bit", "torchao AdamW8bit"]
    command = [sys.executable, str(ROOT / "examples" / "main_job.py"), "--steps", "4"]
    run_worker([*command, "--only", *names, "--out", str(tmp_path)], timeout=900)
    runs = json.loads((tmp_path / "results.json").read_text())
    assert list(runs) == names
    core_run = runs[names[0]]
    for name in names[1:]:
        run = runs[name]
        assert run["optimizer"].split(".")[0] == name.split()[0]
        # the same model and data: the same first loss, and fp32 θ (4 B) beside 8-bit m, v
        # (small tensors full) within 0.5 bytes per parameter of core's layout
        assert run["train_losses"][0][1] == pytest.approx(core_run["train_losses"][0][1])
        per_param = run["param_and_state_bytes"] / run["params"]
        assert per_param == pytest.approx(
            core_run["param_and_state_bytes"] / core_run["params"], abs=0.5
        )
