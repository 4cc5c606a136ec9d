"""The plain-PyTorch examples users copy from run as the README shows them: quietly and
with the numbers it quotes (their timings and memory are not asserted)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from tests.processes import ROOT, exit_of_script


def _example(name: str) -> ModuleType:
    """examples/<name>.py imported as a module (examples/ is not a package); registered in
    sys.modules, where dataclasses look up a module's string annotations."""
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", ROOT / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


RECIPE = "configs/composer/char_lm_decoupled_adamw.yaml"


def test_release_accumulation_example_follows_the_documented_loop() -> None:
    """examples/gradient_release.py's optimizer-accumulation comparison left out
    optimizer.step() under release, so every run warned that two backward passes made two
    steps: the example taught the pattern the warning exists to catch."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = _example("gradient_release").accumulation_gap(windows=20)
    ordinary, folded = (
        float(value) for value in re.findall(r"\| (?:ordinary|release)[^|]*\| ([0-9.]+) \|", report)
    )
    # Folding noisy micro-batches into v makes steps somewhat smaller (README: +2.6% at 300
    # windows); a step lost or doubled per window moves the loss far more.
    assert abs(folded / ordinary - 1) < 0.1, report


class _Stop(Exception):
    """Raised by a stand-in for a run's launch: the arguments reached it, stop there."""


def _no_runs(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"a refused argument started a run: {args}")


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("script", "arguments", "message"),
    [
        (
            "main_job",
            ["--steps", "0"],
            "argument --steps: invalid value 0; allowed: an integer >= 1",
        ),
        ("main_job", ["--steps", "-2"], "argument --steps: invalid value -2; allowed: an integer"),
        ("main_job", ["--quik"], "unrecognized arguments: --quik"),
        (
            "main_job",
            ["--only", "torch.optim.AdamW", "core.AdamX"],
            "invalid --only ['core.AdamX']: allowed names are 'torch.optim.AdamW'",
        ),
        ("composer_compare", ["--batches", "0"], "argument --batches: invalid value 0; allowed"),
        ("composer_compare", ["--batches", "-1"], "argument --batches: invalid value -1; allowed"),
        (
            "composer_compare",
            ["--only", "composer.optim.DecoupledAdamW", "composer_adam.DecoupledAdamX"],
            "invalid --only ['composer_adam.DecoupledAdamX']: allowed names are",
        ),
    ],
    ids=["steps-0", "steps-negative", "typo", "only", "batches-0", "batches-negative", "only-c"],
)
def test_main_jobs_refuse_bad_arguments_before_any_run(
    script: str,
    arguments: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """0 used to mean the full budget, a negative count failed in every child, a typo was
    ignored (the 600-step job started) and a misspelt --only name was dropped when another
    was valid. A launch here fails the test at once instead of training."""
    monkeypatch.setattr(subprocess, "run", _no_runs)
    monkeypatch.setattr(sys, "path", list(sys.path))  # composer_compare adds examples/
    path = f"examples/{script}.py"
    code, _, stderr = exit_of_script(path, [*arguments, "--out", str(tmp_path)], monkeypatch)
    assert code == 2
    assert message in stderr


@pytest.mark.bad_input
@pytest.mark.parametrize("script", ["main_job", "composer_compare"])
@pytest.mark.parametrize("inside", [False, True], ids=["a-file", "inside-a-file"])
def test_main_jobs_refuse_an_out_that_cannot_be_a_folder(
    script: str, inside: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mkdir's FileExistsError or NotADirectoryError, with a traceback, after the checks."""
    monkeypatch.setattr(subprocess, "run", _no_runs)
    monkeypatch.setattr(sys, "path", list(sys.path))  # composer_compare adds examples/
    taken = tmp_path / "results.md"
    taken.write_text("")
    out = taken / "run" if inside else taken
    code, _, stderr = exit_of_script(f"examples/{script}.py", ["--out", str(out)], monkeypatch)
    assert code == 2
    assert f"argument --out: {out} cannot be the output folder: {taken} is not a folder" in stderr


@pytest.mark.bad_input
@pytest.mark.skipif(importlib.util.find_spec("composer") is not None, reason="Composer is here")
def test_composer_job_without_composer_says_where_to_run_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each child failed with ModuleNotFoundError, then the parent with CalledProcessError."""
    monkeypatch.setattr(subprocess, "run", _no_runs)
    monkeypatch.setattr(sys, "path", list(sys.path))
    arguments = ["--quick", "--out", str(tmp_path)]
    code, _, stderr = exit_of_script("examples/composer_compare.py", arguments, monkeypatch)
    assert code == 2
    assert "Composer is not installed in this environment; run it in the Composer one" in stderr


@pytest.mark.bad_input
def test_core_example_refuses_flags_it_does_not_have(monkeypatch: pytest.MonkeyPatch) -> None:
    """It took no arguments and ignored any: `--steps 10` ran the whole example."""
    code, _, stderr = exit_of_script("examples/train_core.py", ["--steps", "10"], monkeypatch)
    assert code == 2
    assert "unrecognized arguments: --steps 10" in stderr


def test_main_job_summary_of_a_short_run_times_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """With five steps or fewer the optimizer time was a made-up 0.0 (each row 0.00, its
    ratio nan); now every step counts, as for batch times. Longer runs skip five."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))  # run_summary imports benchmark
    run_summary = _example("main_job").run_summary
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for seconds, expected_ms in (([0.001, 0.002, 0.004], 2.0), ([1.0] * 5 + [0.003], 3.0)):
        recorder = SimpleNamespace(
            train_losses=[], val_losses=[], batch_seconds=seconds, optimizer_seconds=seconds
        )
        summary = run_summary(recorder, optimizer, model, tokens_per_batch=64)
        assert summary["optimizer_ms"] == pytest.approx(expected_ms)
        assert summary["seconds_per_batch"] == pytest.approx(expected_ms / 1e3)


def test_main_job_timing_of_released_steps_keeps_release_freeing_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The timing wrapper returned None where the release hook reads whether the step
    happened, so the main job's release rows kept every gradient until zero_grad (their
    memory was that of training without release); each step is still timed."""
    import core
    import core.gradient_release as release

    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    monkeypatch.setattr(release, "step_released_param", release.step_released_param)
    seconds: list[float] = []
    _example("main_job").time_released_steps(seconds.append)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    optimizer = core.AdamW(model.parameters(), lr=0.1, gradient_release=True)
    core.prepare_for_gradient_release(model, optimizer)
    model(torch.ones(2, 3)).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert len(seconds) == 4 and all(s > 0 for s in seconds)
    assert {float(state["step"]) for state in optimizer.state.values()} == {1.0}
    core.remove_gradient_release(model)


def test_main_job_resolves_a_relative_out_for_its_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The children run from the repository root: a relative --out reached them as it was
    typed, so their files went under the repository (or nowhere)."""
    module = _example("main_job")
    reached: list[Path] = []

    def train_all(out: Path, *args: object) -> None:
        reached.append(out)
        raise _Stop

    monkeypatch.setattr(module, "train_all", train_all)
    monkeypatch.chdir(tmp_path)
    arguments = ["--steps", "1", "--only", "core.AdamW", "--out", "relative"]
    monkeypatch.setattr(sys, "argv", ["main_job.py", *arguments])
    with pytest.raises(_Stop):
        module.main()
    assert reached == [tmp_path / "relative"]


def test_composer_job_resolves_a_relative_out_for_its_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("composer")  # without it the job stops before any child
    module = _example("composer_compare")
    commands: list[list[str]] = []

    def run(command: list[str], **kwargs: object) -> None:
        commands.append(command)
        raise _Stop

    monkeypatch.setattr(module, "subprocess", SimpleNamespace(run=run))
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() adds examples/
    monkeypatch.chdir(tmp_path)
    arguments = ["--batches", "1", "--only", "composer_adam.DecoupledAdamW", "--out", "relative"]
    monkeypatch.setattr(sys, "argv", ["composer_compare.py", *arguments])
    with pytest.raises(_Stop):
        module.main()
    (command,) = commands
    result = command[command.index("--child") + 2]
    assert Path(result) == tmp_path / "relative" / "runs" / "01.json"


def test_failed_measurement_shows_the_childs_output() -> None:
    """examples/gradient_release.py (and composer_fsdp2_release_memory.py) captured the
    child's output and, when it failed, showed only CalledProcessError's exit status."""
    run_measurement = _example("gradient_release").run_measurement
    child = "import sys; print('measured nothing'); sys.exit('out of gloo ports')"
    with pytest.raises(SystemExit) as exit_info:
        run_measurement([sys.executable, "-c", child])
    assert "exit status 1" in str(exit_info.value.code)
    assert "measured nothing" in str(exit_info.value.code)
    assert "out of gloo ports" in str(exit_info.value.code)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--data.context", "128", "Invalid data.context 128: longer than model.context 64"),
        *(
            ("--data.val_fraction", value, f"Invalid data.val_fraction {float(value)}: the share")
            for value in ("1.5", "1.0", "0.9999", "0.0001", "0", "-0.1")
        ),
    ],
    ids=[
        "context",
        *("fraction-above-1", "fraction-1", "no-training-window", "no-validation-window"),
        *("fraction-0", "fraction-negative"),
    ],
)
def test_lightning_example_refuses_data_it_cannot_train_on(
    flag: str, value: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--data.context above --model.context failed in the first forward with torch's bare
    'index out of range in self'; a val_fraction of 1.5 split the text as 0.5 did, one
    that left validation no window (0, or 0.0001) validated on nothing, and one that left
    training none (1.0, or 0.9999) failed in torch's sampler (num_samples=0)."""
    pytest.importorskip("lightning")
    configs = ROOT / "configs" / "lightning"
    arguments = [
        "fit",
        *("--config", str(configs / "base.yaml"), "--config", str(configs / "adamw.yaml")),
        *(flag, value, "--trainer.logger.init_args.save_dir", str(tmp_path)),
    ]
    code, _, stderr = exit_of_script("examples/lightning_cli.py", arguments, monkeypatch)
    assert code == 2
    assert message in stderr


@pytest.mark.bad_input
def test_composer_example_refuses_the_llm_foundry_snippet_clearly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It stopped with a bare KeyError: 'model'."""
    pytest.importorskip("composer")
    arguments = ["configs/composer/llmfoundry_optimizer.yaml"]
    code, _, stderr = exit_of_script("examples/composer_train.py", arguments, monkeypatch)
    assert code == 2
    assert "llmfoundry_optimizer.yaml: no model or data" in stderr
    assert "is an llm-foundry snippet" in stderr


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["missing.yaml"], "argument recipe: 'missing.yaml' is not a file"),
        (["configs/composer"], "argument recipe: 'configs/composer' is not a file"),
        *(
            (
                [RECIPE, f"--max-duration={value}"],
                f"argument --max-duration: invalid value {value!r}",
            )
            for value in ("3", "abc", "0ba", "-5ba", "1.5ep", "0.5dur", "100sp", "1000tok")
        ),
    ],
    ids=[
        *("missing", "a-folder", "bare-number", "words", "zero", "negative", "fraction"),
        *("dur", "samples", "tokens"),
    ],
)
def test_composer_example_refuses_a_bad_recipe_path_or_duration_by_flag(
    arguments: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A traceback from open(), or Composer's from inside the Trainer ('3' is 30 seconds
    of wall clock to its parser, then 'Wall clock time not an allowed time unit'; samples
    clashed with the recipes' warmup in batches; tokens never ended: Composer counts none
    in this example's batches)."""
    pytest.importorskip("composer")
    code, _, stderr = exit_of_script("examples/composer_train.py", arguments, monkeypatch)
    assert code == 2
    assert message in stderr
