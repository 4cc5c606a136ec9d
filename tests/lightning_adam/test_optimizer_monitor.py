"""lightning_adam.OptimizerMonitor: norms checked against the run itself, logged where due."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning
from lightning.pytorch.loggers import CSVLogger

import core
from lightning_adam import GradientRelease, OptimizerMonitor
from tests.core.configuration_cases import BACKENDS
from tests.lightning_adam.models import (
    Finetuned,
    Regression,
    assert_backend,
    loader,
    make_trainer,
    regression_data,
)

KINDS = ("moment", "param", "update", "grad")


class LastStep(L.Callback):
    """Keeps the parameters from just before the last optimizer step of the run."""

    def __init__(self, last: int) -> None:
        self.last = last
        self.before: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.last - 1:
            self.before = [p.detach().clone() for p in trainer.lightning_module.parameters()]


def _rows(directory: Path) -> list[dict[str, str]]:
    (metrics,) = directory.glob("**/metrics.csv")
    with metrics.open() as handle:
        return list(csv.DictReader(handle))


SCHEDULES = {
    "constant-lr": None,
    # the lr changes every step, and Lightning steps it before the monitor reads it
    "warmup-linear": {"kind": "linear", "warmup_steps": 2, "total_steps": 6, "min_lr_ratio": 0.1},
}


def _monitored_run(
    directory: Path,
    release: bool = False,
    backend: str = "default",
    schedule: str = "constant-lr",
    optimizer: str = "Adam",
    model_class: type[Regression] = Regression,
    **overrides: Any,
) -> tuple:
    steps = overrides.pop("max_steps", 6)
    # no decay: the update is exact
    model = model_class(
        optimizer=optimizer,
        scheduler=SCHEDULES[schedule],
        lr=1e-2,
        **({"amsgrad": True} if optimizer == "Adam" else {}),
        **BACKENDS[backend],
    )
    last = LastStep(steps)
    callbacks = [
        *overrides.pop("callbacks", []),
        *([GradientRelease()] if release else []),
        OptimizerMonitor(every_n_steps=3),
        last,
    ]
    logger = CSVLogger(directory, name="run")
    trainer = make_trainer(
        **{"max_steps": steps, "precision": "64-true", "callbacks": callbacks, **overrides},
        logger=logger,
    )
    trainer.fit(model, loader(regression_data(256)))
    assert_backend(trainer.optimizers[0], backend)
    return model, trainer, last.before


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_norms_are_the_last_steps_moment_param_update_and_grad(
    backend: str, schedule: str, tmp_path: Path
) -> None:
    """With a per-step schedule the update norm used to be taken at the next step's lr."""
    model, trainer, before = _monitored_run(tmp_path, backend=backend, schedule=schedule)
    rows = _rows(tmp_path)
    assert [int(row["step"]) for row in rows] == [2, 5]  # every 3 steps: after steps 3 and 6
    logged = {key: float(value) for key, value in rows[-1].items() if value and key != "step"}
    optimizer = trainer.optimizers[0]
    squares = dict.fromkeys(KINDS, 0.0)
    for (name, param), old in zip(model.named_parameters(), before, strict=True):
        expected = {
            "moment": optimizer.state[param]["exp_avg"].norm(),
            "param": param.detach().norm(),
            "update": (param.detach() - old).norm(),  # the change the last step made
            "grad": param.grad.norm(),  # still there: Lightning zeroes at the next batch
        }
        for kind, value in expected.items():
            assert logged[f"l2_norm/{kind}/{name}"] == pytest.approx(float(value), rel=1e-12)
            squares[kind] += float(value) ** 2
    for kind in KINDS:
        assert logged[f"l2_norm/{kind}/global"] == pytest.approx(math.sqrt(squares[kind]))


class ShiftUnusedOnTheLastStep(Regression):
    """A learned output shift left out of the loss on the run's last step (a branch not
    taken): that step does not update it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shift = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        used = self.trainer.global_step != 5
        return self.net(x) + self.shift if used else self.net(x)


@pytest.mark.parametrize("release", [False, True], ids=["ordinary", "release"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_parameter_the_step_did_not_update_logs_no_update(
    backend: str, release: bool, tmp_path: Path
) -> None:
    """It logged the update norm of its previous step (or, for a batch training_step
    skipped, every parameter did), though the logged step did not move it."""
    model, _, before = _monitored_run(
        tmp_path, release=release, backend=backend, model_class=ShiftUnusedOnTheLastStep
    )
    names = [name for name, _ in model.named_parameters()]
    assert torch.equal(model.shift.detach(), before[names.index("shift")])  # left alone
    first, last = _rows(tmp_path)
    assert float(first["l2_norm/update/shift"]) > 0
    assert last["l2_norm/update/shift"] == "" and last["l2_norm/grad/shift"] == ""
    assert last["l2_norm/moment/shift"] != "" and float(last["l2_norm/update/net.0.weight"]) > 0


class CompiledNet(Regression):
    """The MLP compiled where it is built (dynamo's eager backend: the same operations, no
    inductor build), so its parameters' names gain torch.compile's '_orig_mod'."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net = torch.compile(self.net, backend="eager")


@pytest.mark.parametrize("release", [False, True], ids=["ordinary", "release"])
def test_a_compiled_submodule_logs_under_the_names_it_was_written_with(
    release: bool, tmp_path: Path
) -> None:
    """Keys were 'l2_norm/param/net._orig_mod.0.weight', so a compiled run's curves did not
    line up with an uncompiled run's."""
    runs = []
    for model_class in (Regression, CompiledNet):
        directory = tmp_path / model_class.__name__
        _monitored_run(directory, release=release, model_class=model_class)
        runs.append(_rows(directory)[-1])
    assert runs[1].keys() == runs[0].keys()
    assert "l2_norm/grad/net.0.weight" in runs[0]
    for key, value in runs[0].items():
        assert float(runs[1][key]) == pytest.approx(float(value), rel=1e-9), key


def test_each_norm_is_taken_once_per_logged_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each logged step takes each parameter's gradient norm once, at the step, beside its
    moment's and its own (the update's is a vector norm of the update). The batch-end
    metrics took every gradient's norm a second time and threw it away, which for
    sharded parameters is a collective per parameter."""
    taken: list[torch.Tensor] = []
    real = core.metrics.l2_norm

    def counting(tensor: torch.Tensor) -> torch.Tensor:
        taken.append(tensor)
        return real(tensor)

    monkeypatch.setattr(core.metrics, "l2_norm", counting)
    model, _, _ = _monitored_run(tmp_path)  # 6 steps, logged after steps 3 and 6
    assert len(taken) == 2 * 3 * len(list(model.parameters()))
    assert [int(row["step"]) for row in _rows(tmp_path)] == [2, 5]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_release_logs_what_the_ordinary_run_logs(backend: str, tmp_path: Path) -> None:
    """Gradient norms are taken in backward before release frees the gradient."""
    _monitored_run(tmp_path / "ordinary", backend=backend)
    model, _, _ = _monitored_run(tmp_path / "release", release=True, backend=backend)
    assert all(p.grad is None for p in model.parameters())
    assert _rows(tmp_path / "ordinary") == _rows(tmp_path / "release")


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_release_logs_the_gradients_of_a_group_added_mid_fit(backend: str, tmp_path: Path) -> None:
    """BackboneFinetuning adds the backbone's group at epoch 1: its gradient norms were
    never logged under release (the monitor hooked the parameters trainable at fit
    start), and the global norm left them out."""
    for run in ("ordinary", "release"):
        finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda _: 1.0)
        _monitored_run(
            tmp_path / run,
            release=run == "release",
            backend=backend,
            model_class=Finetuned,
            callbacks=[finetuning],
            max_steps=24,  # 3 epochs of 8 batches
        )
    ordinary = _rows(tmp_path / "ordinary")
    assert any(row.get("l2_norm/grad/net.0.weight") for row in ordinary), "backbone logged"
    assert ordinary == _rows(tmp_path / "release")


class FirstLayerOnly(Regression):
    """Its optimizer holds the first layer only; the rest still requires grad."""

    def configure_optimizers(self) -> core.Adam:
        return core.Adam(self.net[0].parameters(), **self.hyperparameters)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_release_logs_no_gradient_of_a_parameter_outside_the_optimizer(
    backend: str, tmp_path: Path
) -> None:
    """Under release the monitor hooked every trainable parameter of the module, so it
    logged gradients no optimizer steps (growing: Lightning never zeroes them) into the
    global norm; the ordinary run logs the optimizer's parameters' gradients only."""
    _monitored_run(tmp_path / "ordinary", backend=backend, model_class=FirstLayerOnly)
    _monitored_run(tmp_path / "release", True, backend=backend, model_class=FirstLayerOnly)
    ordinary = _rows(tmp_path / "ordinary")
    grads = {key for row in ordinary for key, value in row.items() if "/grad/" in key and value}
    assert grads == {"l2_norm/grad/net.0.weight", "l2_norm/grad/net.0.bias", "l2_norm/grad/global"}
    assert ordinary == _rows(tmp_path / "release")


def test_release_leaves_out_an_update_that_needs_the_freed_gradient(tmp_path: Path) -> None:
    """NAdam's update reads the gradient itself, which release has freed by batch end: it
    was logged without that term (5-11% of the real norm); now it is left out, and every
    other norm equals the ordinary run's."""
    _monitored_run(tmp_path / "ordinary", optimizer="NAdam", schedule="warmup-linear")
    _monitored_run(tmp_path / "release", release=True, optimizer="NAdam", schedule="warmup-linear")
    ordinary, released = _rows(tmp_path / "ordinary"), _rows(tmp_path / "release")
    assert all(float(row["l2_norm/update/global"]) > 0 for row in ordinary)
    assert not [key for row in released for key in row if key.startswith("l2_norm/update")]
    without_update = [
        {k: v for k, v in row.items() if not k.startswith("l2_norm/update")} for row in ordinary
    ]
    assert without_update == released


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_accumulating_micro_batches_are_not_logged(backend: str, tmp_path: Path) -> None:
    _monitored_run(tmp_path, accumulate_grad_batches=2, backend=backend)
    rows = _rows(tmp_path)
    assert [int(row["step"]) for row in rows] == [2, 5]
    assert all(float(row["l2_norm/grad/global"]) > 0 for row in rows)


def test_global_only_and_trainer_interval(tmp_path: Path) -> None:
    model = Regression(lr=1e-2)
    monitor = OptimizerMonitor(per_parameter=False)
    logger = CSVLogger(tmp_path, name="run")
    trainer = make_trainer(max_steps=8, log_every_n_steps=4, callbacks=[monitor], logger=logger)
    trainer.fit(model, loader(regression_data(256)))
    rows = [row for row in _rows(tmp_path) if row.get("l2_norm/grad/global")]
    assert [int(row["step"]) for row in rows] == [3, 7]
    assert {key for key, value in rows[0].items() if value} == {
        "step",
        *(f"l2_norm/{kind}/global" for kind in KINDS),
    }


@pytest.mark.bad_input
@pytest.mark.parametrize("every", [0, 1.5, True])
def test_bad_interval_is_refused(every: object) -> None:
    with pytest.raises(ValueError, match=rf"Invalid every_n_steps: {every!r}\. Allowed: None"):
        OptimizerMonitor(every_n_steps=every)  # type: ignore[arg-type]


class TwoOptimizers(L.LightningModule):
    """GAN-style: manual optimization, one core optimizer per half of the model."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.first, self.second = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)

    def training_step(self, batch: Any, index: int) -> None:
        x, y = batch
        for optimizer, layer in zip(self.optimizers(), (self.first, self.second), strict=True):
            optimizer.zero_grad()
            self.manual_backward(torch.nn.functional.mse_loss(layer(x), y))
            optimizer.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            core.AdamW(self.first.parameters(), lr=1e-2),
            core.AdamW(self.second.parameters(), lr=1e-2),
        ]


@pytest.mark.bad_input
def test_several_optimizers_are_refused() -> None:
    """global_step counts both optimizers' steps: an even interval never logged, and the
    second optimizer's parameters were never seen. Refused at fit start, by name."""
    trainer = make_trainer(max_steps=4, callbacks=[OptimizerMonitor(every_n_steps=2)])
    with pytest.raises(
        ValueError,
        match=r"Invalid optimizers for OptimizerMonitor: 2 \(\['core\.AdamW', 'core\.AdamW'\]\)\. "
        r"Allowed: one",
    ):
        trainer.fit(TwoOptimizers(), loader(regression_data(64)))


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("optimizer", "named"),
    [
        (None, "builtins.NoneType"),
        (torch.optim.SGD([torch.zeros(1)], lr=0.1), "torch.optim.sgd.SGD"),
    ],
    ids=["None", "torch-SGD"],
)
def test_recording_released_norms_of_another_optimizer_is_refused_by_name(
    optimizer: object, named: str
) -> None:
    """GradientRelease hands the monitor its core optimizer; called by hand with anything
    else it raised a bare AttributeError (no register_release_pre_hook)."""
    monitor = OptimizerMonitor()
    with pytest.raises(
        TypeError, match=rf"Invalid optimizer: {re.escape(named)}\. Allowed: an adamkit"
    ):
        monitor.record_gradient_norms_in_backward(optimizer)  # type: ignore[arg-type]
    assert monitor._hooks == []


@pytest.mark.bad_input
def test_bad_per_parameter_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Invalid per_parameter: 'no'\. Allowed: True or False"):
        OptimizerMonitor(per_parameter="no")  # type: ignore[arg-type]


def test_a_torch_optimizer_gets_param_and_grad_norms(tmp_path: Path) -> None:
    model = Regression("torch.optim.SGD", lr=0.1)
    logger = CSVLogger(tmp_path, name="run")
    monitor = OptimizerMonitor(every_n_steps=2)
    trainer = make_trainer(max_steps=2, callbacks=[monitor], logger=logger)
    trainer.fit(model, loader(regression_data(64)))
    (row,) = _rows(tmp_path)
    logged = {key for key, value in row.items() if value and key != "step"}
    names = [name for name, _ in model.named_parameters()]
    assert logged == {
        f"l2_norm/{kind}/{n}" for kind in ("param", "grad") for n in [*names, "global"]
    }
    for name, param in model.named_parameters():
        assert float(row[f"l2_norm/param/{name}"]) == pytest.approx(float(param.detach().norm()))


@pytest.mark.parametrize("optimizer", ["AdamW", "torch.optim.SGD"])
def test_frozen_parameters_are_left_out_as_composers_monitor_does(
    optimizer: str, tmp_path: Path
) -> None:
    """A frozen layer's norms are not logged and not in the global ones (Composer's
    OptimizerMonitor, whose keys these are, skips parameters that do not require grad)."""
    model = Regression(optimizer, lr=0.1)
    model.net[0].requires_grad_(False)
    logger = CSVLogger(tmp_path, name="run")
    trainer = make_trainer(
        max_steps=2, callbacks=[OptimizerMonitor(every_n_steps=2)], logger=logger
    )
    trainer.fit(model, loader(regression_data(64)))
    (row,) = _rows(tmp_path)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trained and len(trained) < len(list(model.parameters()))
    logged = {key.split("/")[-1] for key, value in row.items() if value and key != "step"}
    assert logged == {*trained, "global"}
    squares = sum(float(p.detach().double().norm()) ** 2 for p in trained.values())
    assert float(row["l2_norm/param/global"]) == pytest.approx(math.sqrt(squares), rel=1e-6)


def test_log_every_n_steps_zero_logs_nothing_as_lightning_does(tmp_path: Path) -> None:
    """Lightning's 0 means never (barebones=True sets it): the monitor divided by it."""
    logger = CSVLogger(tmp_path, name="run")
    trainer = make_trainer(
        max_steps=4, log_every_n_steps=0, callbacks=[OptimizerMonitor()], logger=logger
    )
    trainer.fit(Regression(lr=1e-2), loader(regression_data(64)))
    assert trainer.global_step == 4
    assert not list(tmp_path.glob("**/metrics.csv"))  # nothing was logged, by anyone


class SparseEmbedding(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(8, 3, sparse=True)

    def training_step(self, batch: Any, index: int) -> torch.Tensor:
        tokens = (batch[0][:, :2].abs() * 10).long() % 8  # repeats: an uncoalesced gradient
        return self.embedding(tokens).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SparseAdam(self.parameters(), lr=1e-2)


def test_sparse_gradients_are_logged_by_their_values(tmp_path: Path) -> None:
    """SparseAdam with nn.Embedding(sparse=True): the gradient norm failed after the first
    step (NotImplementedError from linalg_vector_norm on a sparse tensor)."""
    model = SparseEmbedding()
    logger = CSVLogger(tmp_path, name="run")
    seen: list[torch.Tensor] = []

    class KeepGradient(L.Callback):
        def on_before_optimizer_step(self, trainer: L.Trainer, *args: Any) -> None:
            seen.append(model.embedding.weight.grad.to_dense())

    monitor = OptimizerMonitor(every_n_steps=2)
    trainer = make_trainer(max_steps=2, callbacks=[KeepGradient(), monitor], logger=logger)
    trainer.fit(model, loader(regression_data(64)))
    (row,) = _rows(tmp_path)
    expected = float(torch.linalg.vector_norm(seen[-1]))
    assert float(row["l2_norm/grad/embedding.weight"]) == pytest.approx(expected, rel=1e-6)
