"""LightningCLI in subprocesses: each YAML in configs/lightning and flags train (one
subprocess runs them all, tests.lightning_adam.cli_runs), a run resumes from its
checkpoint in a fresh one; clear errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml

import core
from tests.core.configuration_cases import BACKENDS
from tests.lightning_adam.cli_runs import BASE, EXAMPLE, fit_arguments
from tests.lightning_adam.models import load_module, make_trainer
from tests.processes import run_worker

CONFIGS = BASE.parent
example = load_module(EXAMPLE)
OPTIMIZER_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml") if p != BASE)
SHORT_RUN = [
    "--trainer.max_steps=40",
    "--trainer.limit_val_batches=0",
    "--trainer.log_every_n_steps=1",
    "--model.scheduler.warmup_steps=5",
]


def run_cli(directory: Path, *args: str) -> subprocess.CompletedProcess:
    """`examples/lightning_cli.py fit --config base.yaml ...` in a fresh process, logging
    into directory."""
    command = [sys.executable, str(EXAMPLE), *fit_arguments(directory, list(args))]
    # One thread: a tiny model gains nothing from two, and loses 10x when they fight a busy core.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        command, cwd=directory, env=env, capture_output=True, text=True, timeout=600
    )


def logged(directory: Path, column: str) -> list[float]:
    """Every value the CSVLogger wrote in one column of the run's metrics.csv."""
    (metrics,) = directory.glob("lightning_logs/version_*/metrics.csv")
    with metrics.open() as handle:
        return [float(row[column]) for row in csv.DictReader(handle) if row.get(column)]


FLAGS = ["--optimizer=core.AdamW", "--optimizer.lr=3e-3", "--optimizer.kahan_sum=true"]


def backend_flags(backend: str) -> list[str]:
    """The command-line flags that choose a backend (none for the default)."""
    return [f"--optimizer.{flag}={str(value).lower()}" for flag, value in BACKENDS[backend].items()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each YAML, and the flags with each backend, trained by LightningCLI in one fresh
    process: run name -> the folder it logged to (with its outcome.json)."""
    root = tmp_path_factory.mktemp("cli_runs")
    runs = {config: ["--config", str(CONFIGS / config)] for config in OPTIMIZER_CONFIGS}
    runs |= {f"flags-{backend}": [*FLAGS, *backend_flags(backend)] for backend in BACKENDS}
    plan = [
        {"directory": str(root / name), "args": [*args, *SHORT_RUN]} for name, args in runs.items()
    ]
    # What users run first on a config: one batch, the config's own 30-step warmup.
    smoke = ["--config", str(CONFIGS / "adamw.yaml"), "--trainer.fast_dev_run=true"]
    plan.append({"directory": str(root / "fast_dev_run"), "args": smoke})
    (root / "plan.json").write_text(json.dumps(plan))
    run_worker(
        [sys.executable, "-m", "tests.lightning_adam.cli_runs", str(root / "plan.json")], 900
    )
    return {name: root / name for name in [*runs, "fast_dev_run"]}


def assert_trains(directory: Path) -> None:
    outcome = json.loads((directory / "outcome.json").read_text())
    assert outcome["code"] == 0, outcome["error"]
    losses = logged(directory, "train_loss")
    assert len(losses) == 40
    first, last = losses[0], sum(losses[-5:]) / 5
    assert first > 5.0  # ln(256) = 5.5 for an untrained byte model
    assert last < 0.75 * first, losses


def test_every_optimizer_config_is_covered() -> None:
    expected = {"adam.yaml", "adamw.yaml", "radam.yaml", "nadam.yaml", "adopt.yaml"}
    assert expected <= set(OPTIMIZER_CONFIGS)


@pytest.mark.parametrize("config", OPTIMIZER_CONFIGS)
def test_each_yaml_trains_and_the_loss_falls(config: str, trained: dict[str, Path]) -> None:
    directory = trained[config]
    assert_trains(directory)
    chosen = yaml.safe_load((CONFIGS / config).read_text())["optimizer"]
    name = chosen["class_path"].rpartition(".")[2]
    # LearningRateMonitor names its columns after the optimizer class that really ran.
    assert max(logged(directory, f"lr-{name}/decay")) == pytest.approx(chosen["init_args"]["lr"])


def test_a_shipped_config_runs_under_fast_dev_run(trained: dict[str, Path]) -> None:
    """Its schedule's warmup (30 steps) is longer than fast_dev_run's one step: the helper
    refused to build the schedule, so the smoke test users run first failed."""
    outcome = json.loads((trained["fast_dev_run"] / "outcome.json").read_text())
    assert outcome["code"] == 0, outcome["error"]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_flags_select_optimizer_hyperparameters_and_backend(
    backend: str, trained: dict[str, Path]
) -> None:
    directory = trained[f"flags-{backend}"]
    assert_trains(directory)
    (hparams,) = directory.glob("lightning_logs/version_*/hparams.yaml")
    optimizer = yaml.safe_load(hparams.read_text())["optimizer"]
    assert optimizer["class_path"] == "core.AdamW"
    chosen = {"kahan_sum": True, "lr": 3e-3, **BACKENDS[backend]}
    assert {key: optimizer["init_args"][key] for key in chosen} == chosen
    peak = max(logged(directory, "lr-AdamW/decay"))
    assert peak == pytest.approx(3e-3)


def test_a_cli_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """The checkpoint holds the linked optimizer dict and the LRSchedule in hparams, and
    loads with Lightning's default torch.load(weights_only=True). Resumed as Lightning
    documents it, `fit --ckpt_path` without repeating the optimizer's file, it trains on
    with the checkpoint's optimizer: the link recomputed model.optimizer from the absent
    --optimizer, so the model's fallback (core.AdamW) took the RAdam state silently."""
    # Validating every 20 steps makes Lightning's default ModelCheckpoint save at step 40.
    config = [*SHORT_RUN, "--trainer.val_check_interval=20", "--trainer.limit_val_batches=1"]
    first = run_cli(tmp_path, "--config", str(CONFIGS / "radam.yaml"), *config)
    assert first.returncode == 0, first.stderr[-3000:]
    (checkpoint,) = tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt")
    assert "step=40" in checkpoint.name
    resumed = run_cli(tmp_path, *config, f"--ckpt_path={checkpoint}", "--trainer.max_steps=45")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (metrics,) = tmp_path.glob("lightning_logs/version_1/metrics.csv")
    with metrics.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows if row.get("train_loss")] == list(range(40, 45))
    # LearningRateMonitor names its columns after the optimizer class that ran.
    assert "lr-RAdam/decay" in rows[0] and "lr-AdamW/decay" not in rows[0]


class _ParsedOptimizer(example.AdamKitCLI):
    """The example's CLI stopped before anything is built, recording model.optimizer as
    the model would receive it (after Lightning read a --ckpt_path's hyperparameters)."""

    received: ClassVar[list[object]] = []

    def before_instantiate_classes(self) -> None:
        self.received.append(self.config[self.subcommand].model.get("optimizer"))
        raise SystemExit(0)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], "core.RAdam"),  # the checkpoint's, not the model's fallback
        (["--optimizer=core.AdamW", "--optimizer.lr=1e-3"], "core.AdamW"),  # as asked
        # an explicit null (config.yaml files of runs without an optimizer held it until
        # 2026-12-07) asks for the model's fallback: it was refused as no Optimizer
        (["--optimizer=null"], None),
    ],
    ids=["from-checkpoint", "given", "null"],
)
def test_a_resumed_cli_run_takes_its_optimizer_from_the_checkpoint_unless_given(
    flags: list[str], expected: str | None, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "resume.ckpt"
    linked = {"class_path": "core.RAdam", "init_args": {"lr": 2e-3, "decouple_wd": True}}
    torch.save({"hyper_parameters": {"optimizer": linked}}, checkpoint)
    _ParsedOptimizer.received.clear()
    with pytest.raises(SystemExit) as exit_info:
        example.main(
            ["fit", "--config", str(BASE), *flags, f"--ckpt_path={checkpoint}"],
            cli_class=_ParsedOptimizer,
        )
    assert exit_info.value.code == 0
    (optimizer,) = _ParsedOptimizer.received
    if expected is None:
        assert optimizer is None
        return
    assert optimizer["class_path"] == expected  # type: ignore[index]
    if not flags:
        assert optimizer == linked


def parse_only(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """The example's LightningCLI in this process, for runs that stop at parsing (exit code)."""
    with pytest.raises(SystemExit) as exit_info:
        example.main(["fit", "--config", str(BASE), *args])
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--optimizer=core.AdamX"], "Problem with given class_path 'core.AdamX'"),
        (["--optimizer=NoSuchOptimizer"], "NoSuchOptimizer"),
        (["--optimizer=core.AdamW", "--optimizer.lrr=1"], "Option 'lrr' is not accepted"),
        (
            ["--optimizer=AdamW"],
            # The list holds every imported Optimizer subclass named AdamW (optimi's too, once
            # the main environment's optimi comparison tests have imported it).
            "Multiple subclasses with name AdamW. Give the full class path to avoid ambiguity: "
            "torch.optim.AdamW, core.AdamW",
        ),
        (
            ["--optimizer=core.AdamW", "--optimizer.state_precision=4bit"],
            "Expected a typing.Literal['full', '8bit']",
        ),
    ],
    ids=["unknown-path", "unknown-name", "unknown-argument", "ambiguous-name", "state-precision"],
)
def test_bad_optimizer_flags_give_lightnings_clear_error(
    flags: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    code, _, err = parse_only(capsys, *flags)
    assert code == 2 and message in err


def test_help_shows_hyperparameters_and_docstrings(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = parse_only(capsys, "--optimizer.help=core.AdamW")
    assert code == 0
    assert "--optimizer.kahan_sum {true,false,null}" in out
    assert "--optimizer.state_precision {full,8bit}" in out
    assert "Kahan-compensated updates so bf16/fp16 parameters" in out
    assert "--optimizer.decouple_lr" in out


def test_print_config_shows_the_chosen_optimizer(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = parse_only(
        capsys, "--optimizer=ADOPT", "--optimizer.clip=false", "--print_config"
    )
    assert code == 0
    config = out[out.index("\noptimizer:") :]
    assert "class_path: core.ADOPT" in config and "clip: false" in config
    assert "betas:\n    - 0.9\n    - 0.9999" in config


def test_plain_lightning_cli_takes_core_optimizers_by_short_name() -> None:
    """LightningCLI's own automatic --optimizer, no adamkit wiring: ADOPT after the import."""
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    import lightning_adam  # noqa: F401  (the import is what registers the short name)

    cli = LightningCLI(
        BoringModel,
        BoringDataModule,
        run=False,
        args=["--optimizer=ADOPT", "--optimizer.lr=0.01", "--optimizer.clip=false"],
        trainer_defaults={"logger": False, "enable_checkpointing": False},
        save_config_callback=None,
    )
    trainer = make_trainer(max_steps=3)
    trainer.fit(cli.model, cli.datamodule)
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is core.ADOPT
    assert optimizer.param_groups[0]["clip"] is False
    states = list(optimizer.state.values())
    assert states and all(float(s["step"]) == 3 for s in states)


_LINK_ONCE = (
    r"Invalid link_optimizer key: 'optimizer' \(the parser already has a group of that name\)\. "
    r"Allowed: .*: link_optimizer adds the '--optimizer' group itself, so construct the "
    r"LightningCLI with auto_configure_optimizers=False and call link_optimizer once"
)
_NOT_AUTOMATIC = (
    r"Invalid LightningCLI auto_configure_optimizers: True, beside link_optimizer \(its group "
    r"'--{key}'\)\. Allowed: False: .*so the linked optimizer would never be built"
)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("calls", "automatic", "key", "message"),
    [
        (2, False, "optimizer", _LINK_ONCE),
        (1, True, "optimizer", _NOT_AUTOMATIC.format(key="optimizer")),
        (1, True, "opt", _NOT_AUTOMATIC.format(key="opt")),
    ],
    ids=["twice", "automatic-optimizers", "automatic-beside-another-key"],
)
def test_a_second_optimizer_group_says_to_link_once_without_automatic_optimizers(
    calls: int, automatic: bool, key: str, message: str
) -> None:
    """Calling link_optimizer twice, or leaving LightningCLI's automatic --optimizer on,
    failed with jsonargparse's 'Group with name optimizer already exists.'; beside a key of
    another name the automatic group was added silently and its configure_optimizers
    replaced the model's, so the linked optimizer was never built."""
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    import lightning_adam

    class Model(BoringModel):
        def __init__(self, optimizer: dict | None = None) -> None:
            super().__init__()

    class CLI(LightningCLI):
        def add_arguments_to_parser(self, parser: object) -> None:
            for _ in range(calls):
                lightning_adam.link_optimizer(parser, key=key)

    with pytest.raises(ValueError, match=message):
        CLI(
            Model,
            BoringDataModule,
            run=False,
            args=[f"--{key}=core.AdamW", f"--{key}.lr=0.01"],
            auto_configure_optimizers=automatic,
            save_config_callback=None,
        )
