"""lightning_adam.GradientRelease, real Trainer: exact equality, resume, accumulation, refusals."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    GradientAccumulationScheduler,
    LearningRateMonitor,
    ModelCheckpoint,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import TensorDataset

import core
from lightning_adam import GradientRelease, OptimizerMonitor
from tests.core.configuration_cases import BACKENDS
from tests.lightning_adam.models import (
    Finetuned,
    Regression,
    ResumableLoader,
    StopInsideWindow,
    assert_backend,
    loader,
    make_trainer,
    regression_data,
)
from tests.lightning_adam.test_checkpoint import OPTIMIZERS, SCHEDULE

EPOCHS = 4


def _fit(model: Regression, release: bool, **overrides: Any) -> Any:
    callbacks = [*overrides.pop("callbacks", []), *([GradientRelease()] if release else [])]
    data = overrides.pop("data", None) or loader(regression_data(128))
    trainer = make_trainer(**{"max_epochs": EPOCHS, "callbacks": callbacks, **overrides})
    trainer.fit(model, data)
    return trainer


def _csv(directory: Path) -> str:
    (metrics,) = directory.glob("**/metrics.csv")
    return metrics.read_text()


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_release_equals_ordinary_training_exactly_with_schedule_and_logging(
    name: str, backend: str, tmp_path: Path
) -> None:
    runs = {}
    for release in (False, True):
        model = Regression(scheduler=SCHEDULE, **OPTIMIZERS[name], **BACKENDS[backend])
        logger = CSVLogger(tmp_path / str(release), name="run")
        monitor = LearningRateMonitor(logging_interval="step")
        trainer = _fit(model, release, logger=logger, callbacks=[monitor], log_every_n_steps=1)
        runs[release] = (model, trainer)
    (ordinary, plain_trainer), (released, release_trainer) = runs[False], runs[True]
    assert release_trainer.global_step == plain_trainer.global_step == EPOCHS * 4
    assert_backend(release_trainer.optimizers[0], backend)
    for a, b in zip(ordinary.parameters(), released.parameters(), strict=True):
        assert torch.equal(a, b)
    # The same losses and learning rates were logged, step by step.
    assert _csv(tmp_path / "False") == _csv(tmp_path / "True")
    assert f"lr-{name}/decay" in _csv(tmp_path / "True")
    # Teardown handed the optimizer back: no parameter is left released.
    assert not release_trainer.optimizers[0].released_params
    assert not core.is_gradient_release_prepared(released)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_release_under_bf16_mixed_autocast_equals_ordinary_training(backend: str) -> None:
    runs = [Regression(scheduler=SCHEDULE, lr=1e-2, **BACKENDS[backend]) for _ in range(2)]
    for model, release in zip(runs, (False, True), strict=True):
        _fit(model, release, precision="bf16-mixed")
    for a, b in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_release_frees_gradients_inside_backward(backend: str) -> None:
    seen: list[list[bool]] = []

    class Probe(Regression):
        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            seen.append([p.grad is None for p in self.parameters()])

    _fit(Probe(lr=1e-2, **BACKENDS[backend]), release=True, max_epochs=1)
    assert len(seen) == 4 and all(all(step) for step in seen)


class GradientProbe(L.Callback):
    """A held-out gradient taken at the end of each training batch, then discarded (a
    callback measuring gradients, not training)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        x = torch.linspace(-1, 1, 24).reshape(4, 6)
        pl_module(x).square().mean().backward()
        pl_module.zero_grad(set_to_none=True)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_backward_between_batches_steps_nothing(backend: str) -> None:
    """The hooks stayed armed between batches, so a probe's backward there stepped the
    optimizer (twice the steps); the run without release ignores it, as release does now."""
    runs = [Regression(lr=1e-2, **BACKENDS[backend]) for _ in range(2)]
    for model, release in zip(runs, (False, True), strict=True):
        _fit(model, release, max_epochs=2, callbacks=[GradientProbe()])
    optimizer_state = runs[1].trainer.optimizers[0].state
    assert {float(state["step"]) for state in optimizer_state.values()} == {8.0}
    for a, b in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        assert torch.equal(a, b)


class BackwardAfterBackward(L.Callback):
    """A callback's own backward in on_after_backward: placed before GradientRelease, it
    runs while release is still on for Lightning's backward."""

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module(torch.linspace(-1, 1, 24).reshape(4, 6)).square().mean().backward()


class AuxiliaryInTrainingStep(Regression):
    """An auxiliary loss backpropagated inside training_step, before the loss is returned."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        (0.1 * self(batch[0]).square().mean()).backward()
        return super().training_step(batch, index)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_backward_in_training_step_accumulates_into_the_step(backend: str) -> None:
    """Release is paused until Lightning's own backward, which then steps the sum."""
    runs = [AuxiliaryInTrainingStep(lr=1e-2, **BACKENDS[backend]) for _ in range(2)]
    for model, release in zip(runs, (False, True), strict=True):
        _fit(model, release, max_epochs=1)
    for a, b in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.bad_input
def test_a_second_backward_while_release_is_on_is_refused_before_a_second_step() -> None:
    """Every parameter it reached was stepped a second time in the training step, with
    only core's warning about two steps."""
    model = Regression(lr=1e-2)
    with pytest.raises(RuntimeError, match=r"a second backward reached a released parameter"):
        _fit(model, release=True, max_epochs=1, callbacks=[BackwardAfterBackward()])
    optimizer_state = model.trainer.optimizers[0].state
    assert all(float(state["step"]) <= 1 for state in optimizer_state.values())


class BackwardInOnAfterBackward(Regression):
    """The module's own on_after_backward runs a backward: Lightning calls it after every
    callback's, when GradientRelease has stepped the parameters and paused."""

    def on_after_backward(self) -> None:
        (0.1 * self(torch.linspace(-1, 1, 24).reshape(4, 6)).square().mean()).backward()


@pytest.mark.bad_input
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_backward_after_lightnings_backward_is_refused_before_the_step(backend: str) -> None:
    """Its gradient reached parameters release had stepped and freed: optimizer.step()
    skipped them and zero_grad dropped it (the run without release adds it to the step),
    silently. Refused at the step, which changes nothing."""
    model = BackwardInOnAfterBackward(lr=1e-2, **BACKENDS[backend])
    with pytest.raises(RuntimeError, match=r"got a gradient after release had stepped them"):
        _fit(model, release=True, max_epochs=1)
    optimizer_state = model.trainer.optimizers[0].state
    assert {float(state["step"]) for state in optimizer_state.values()} == {1.0}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_resume_with_release_continues_exactly(backend: str, tmp_path: Path) -> None:
    kwargs = {"scheduler": SCHEDULE, **OPTIMIZERS["AdamW"], **BACKENDS[backend]}
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    uninterrupted = Regression(**kwargs)
    _fit(uninterrupted, True, callbacks=[saver], enable_checkpointing=True)
    resumed = Regression(seed=7, **kwargs)
    trainer = make_trainer(max_epochs=EPOCHS, callbacks=[GradientRelease()])
    trainer.fit(resumed, loader(regression_data(128)), ckpt_path=tmp_path / "epoch=1.ckpt")
    assert trainer.global_step == EPOCHS * 4
    for a, b in zip(uninterrupted.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_fit_stopped_inside_a_window_resumes_exactly(backend: str, tmp_path: Path) -> None:
    """Windows of two batches, the fit stopped after a window's first (should_stop, as
    max_time or EarlyStopping stop it) with a checkpoint, then resumed from it: the same
    parameters as the uninterrupted fit (the loader resumes mid-epoch). The checkpoint
    holds the open window twice, in the optimizer's state and in GradientRelease's own
    (which restores it where a loader drops it: the distributed test); Lightning without
    release drops the window's first micro-batch instead."""
    kwargs = {"scheduler": SCHEDULE, **OPTIMIZERS["AdamW"], **BACKENDS[backend]}
    path = tmp_path / "inside-window.ckpt"
    params = []
    for stop, resume in (
        (None, None),
        (StopInsideWindow(path, epoch=1, batch=2), None),
        (None, path),
    ):
        model = Regression(**kwargs)
        trainer = make_trainer(
            max_epochs=EPOCHS,
            accumulate_grad_batches=2,
            callbacks=[GradientRelease(), *([stop] if stop else [])],
        )
        trainer.fit(model, ResumableLoader(regression_data(128), batch_size=32), ckpt_path=resume)
        params.append([p.detach().clone() for p in model.parameters()])
        if stop:
            assert trainer.global_step == 3
            (saved,) = torch.load(path, weights_only=False)["callbacks"].values()
            assert set(saved["open_windows"].values()) == {1}
    whole, _, resumed = params
    for a, b in zip(whole, resumed, strict=True):
        assert torch.equal(a, b)


class Evaluated(Regression):
    """Regression with the evaluation stages a checkpoint can be given to."""

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> None:
        self.log("val_loss", nn.functional.mse_loss(self(batch[0]), batch[1]))

    test_step = validation_step

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        return self(batch[0])


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_an_evaluation_of_a_checkpoint_leaves_a_later_fit_without_its_windows(
    stage: str, tmp_path: Path
) -> None:
    """Lightning restores callbacks for every stage: trainer.validate(ckpt_path=...) of a
    checkpoint saved inside a window handed its open windows to the next fit without
    ckpt_path, which failed at start ("Invalid counts key") on a fresh optimizer and
    reopened them, silently, on one with state. That fit equals one of a model given the
    checkpoint's weights by hand."""
    path = tmp_path / "inside-window.ckpt"
    data = regression_data(128)
    trainer = make_trainer(
        max_epochs=1,
        accumulate_grad_batches=2,
        callbacks=[GradientRelease(), StopInsideWindow(path, 0, 2)],
    )
    trainer.fit(Evaluated(lr=1e-2), loader(data))
    assert set(
        torch.load(path, weights_only=False)["callbacks"]["GradientRelease"][
            "open_windows"
        ].values()
    ) == {1}
    fits = []
    for evaluated in (True, False):
        model = Evaluated(lr=1e-2, seed=3)
        trainer = make_trainer(
            max_epochs=2, accumulate_grad_batches=2, callbacks=[GradientRelease()]
        )
        if evaluated:
            getattr(trainer, stage)(model, loader(data), ckpt_path=path)
        else:
            model.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
        trainer.fit(model, loader(data))
        fits.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*fits, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_group_added_mid_fit_is_released_and_follows_the_schedule(backend: str) -> None:
    """BackboneFinetuning adds the backbone's group at epoch 1 (add_param_group): it is
    released like the first (its gradients were kept, the memory saving lost), and the
    schedule moves it (the cosine stage had no starting lr for it and failed)."""
    runs = []
    for release in (False, True):
        model = Finetuned(scheduler="cosine", lr=1e-2, **BACKENDS[backend])
        finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda _: 1.0)
        trainer = _fit(model, release, callbacks=[finetuning])
        runs.append((model, trainer))
    (ordinary, trainer), (released, _) = runs
    assert len(trainer.optimizers[0].param_groups) == 3, "decay, no-decay, then the backbone"
    assert_backend(trainer.optimizers[0], backend)
    for a, b in zip(ordinary.parameters(), released.parameters(), strict=True):
        assert torch.equal(a, b)
    assert any("net.0.weight" in names for names in ordinary.held_after_backward), "backbone"
    assert not any(released.held_after_backward), "every gradient freed inside backward"
    assert trainer.optimizers[0].param_groups[-1]["lr"] < 1e-4, "decayed with the others"


class Checkpointed(Regression):
    """The first layer applied twice, each time in a reentrant checkpointed segment, as a
    model with shared layers and Hugging Face-style gradient checkpointing runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, rest = self.net[0], self.net[1:]
        h = torch.tanh(x).requires_grad_()
        for layer in (first, lambda t: first(t[..., :6])):
            h = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=True)
        return rest(h)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_release_under_reentrant_checkpointing_equals_ordinary_training(backend: str) -> None:
    """The shared layer's gradient arrives in two parts (one per segment): it is left to
    the step after backward, with a warning, instead of being stepped twice a batch."""
    runs = []
    for release in (False, True):
        model = Checkpointed(scheduler=SCHEDULE, lr=1e-2, **BACKENDS[backend])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _fit(model, release, max_epochs=2)
        runs.append((model, [str(w.message) for w in caught]))
    (ordinary, _), (released, messages) = runs
    for a, b in zip(ordinary.parameters(), released.parameters(), strict=True):
        assert torch.equal(a, b)
    assert sum("nested backward" in m for m in messages) == 1


class FailsAtBatch3(Regression):
    """A training_step that raises at its fourth batch, as a bug or a bad batch does."""

    failing_index = 3

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        if index == self.failing_index:
            raise RuntimeError("a bad batch")
        return super().training_step(batch, index)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_fit_that_raises_leaves_nothing_hooked(backend: str) -> None:
    """Lightning tears no callback down when fit raises: release's and the monitor's hooks
    stayed on the module (and clipping patched), so a later fit of it, with no callback,
    stepped the crashed fit's optimizer inside backward too (0.02 off), and one with the
    callbacks was refused for hooks the user had not made."""
    model = FailsAtBatch3(lr=1e-2, **BACKENDS[backend])
    callbacks = [GradientRelease(), OptimizerMonitor()]
    with pytest.raises(RuntimeError, match="a bad batch"):
        _fit(model, release=False, callbacks=callbacks, max_epochs=1)
    assert not core.is_gradient_release_prepared(model)
    assert not any(getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
    assert torch.nn.utils.clip_grad_norm_.__module__ == "torch.nn.utils.clip_grad"
    plain = Regression(lr=1e-2, **BACKENDS[backend])
    plain.load_state_dict(model.state_dict())
    for fitted in (model, plain):
        fitted.training_step = Regression.training_step.__get__(fitted)  # type: ignore[method-assign]
        _fit(fitted, release=False, max_epochs=1)
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)


class FailsAtBatch2(FailsAtBatch3):
    """Raises at its third batch: the first of a window of two."""

    failing_index = 2


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_fit_that_raises_inside_a_window_leaves_the_optimizer_stepping(backend: str) -> None:
    """The window a failed fit left open is closed at teardown: the optimizer's own step()
    after it moves the weights (it stayed in accumulation, folding every later step)."""
    model = FailsAtBatch2(lr=1e-2, **BACKENDS[backend])
    with pytest.raises(RuntimeError, match="a bad batch"):
        _fit(model, release=True, max_epochs=1, accumulate_grad_batches=2)
    optimizer = model.trainer.optimizers[0]
    assert not optimizer.optimizer_accumulation
    before = [p.detach().clone() for p in model.parameters()]
    x, y = regression_data(32).tensors
    model.zero_grad()
    torch.nn.functional.mse_loss(model(x.float()), y.float()).backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))


def _repeated_batches(repeats: int) -> TensorDataset:
    """Every batch of 32 appears `repeats` times in a row: each window's micro-batches agree."""
    x, y = regression_data(128).tensors
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 128, 32)]
    xs = torch.cat([bx for bx, _ in batches for _ in range(repeats)])
    ys = torch.cat([by for _, by in batches for _ in range(repeats)])
    return TensorDataset(xs.double(), ys.double())


ACCUMULATING = {
    "Adam-amsgrad": {"optimizer": "Adam", "lr": 1e-2, "amsgrad": True},
    "AdamW": OPTIMIZERS["AdamW"],
    "RAdam-fully-decoupled": OPTIMIZERS["RAdam"],
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name", list(ACCUMULATING))
def test_accumulation_matches_lightnings_windows(name: str, backend: str) -> None:
    """With agreeing micro-batches optimizer accumulation is exact (float64, 1e-12), so any
    window misaligned with Lightning's accumulate_grad_batches would show."""
    runs = []
    for release in (False, True):
        model = Regression(scheduler=SCHEDULE, **ACCUMULATING[name], **BACKENDS[backend])
        trainer = _fit(
            model,
            release,
            precision="64-true",
            accumulate_grad_batches=3,
            data=loader(_repeated_batches(3)),
        )
        assert trainer.global_step == EPOCHS * 4
        runs.append(model)
    for a, b in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


class WithABranch(Regression):
    """A second head trained only by the first micro-batch of each window of 3 (as an
    expert the later micro-batches do not reach), its output the same in all, so the
    other parameters' micro-batch gradients still agree."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.branch = torch.nn.Linear(6, 3)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        branch = self.branch(x)  # the same output, its gradient only in the first
        out = self(x) + (branch if index % 3 == 0 else branch.detach())
        return torch.nn.functional.mse_loss(out, y)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_accumulation_closes_the_window_of_a_branch_the_last_microbatch_skipped(
    backend: str,
) -> None:
    """Under release with accumulate_grad_batches, the branch's window stayed open (no
    gradient in its last micro-batch) and it was never trained."""
    runs = []
    for release in (False, True):
        model = WithABranch(scheduler=SCHEDULE, lr=1e-2, **BACKENDS[backend])
        _fit(
            model,
            release,
            precision="64-true",
            accumulate_grad_batches=3,
            data=loader(_repeated_batches(3)),
        )
        runs.append(model)
    for a, b in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_accumulation_follows_a_gradient_accumulation_scheduler(backend: str) -> None:
    """Windows of 1 for two epochs, then 3: the window used to be read once at fit start,
    so every micro-batch of the later epochs updated the parameters (24 steps too many)."""
    runs = []
    for release in (False, True):
        model = Regression(scheduler=SCHEDULE, **ACCUMULATING["AdamW"], **BACKENDS[backend])
        trainer = _fit(
            model,
            release,
            precision="64-true",
            callbacks=[GradientAccumulationScheduler({0: 1, 2: 3})],
            data=loader(_repeated_batches(3)),
        )
        assert trainer.global_step == 2 * 12 + 2 * 4
        states = trainer.optimizers[0].state.values()
        assert {float(s["step"]) for s in states} == {32.0}
        runs.append(model)
    for a, b in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.bad_input
def test_a_scheduled_window_is_refused_up_front_where_accumulation_cannot_work() -> None:
    model = Regression(**OPTIMIZERS["NAdam"])
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(
        ValueError, match=r"Invalid accumulate_grad_batches for GradientRelease with NAdam: 2\."
    ):
        _fit(model, True, callbacks=[GradientAccumulationScheduler({0: 1, 2: 2})])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_accumulation_with_a_short_last_window_trains(backend: str) -> None:
    """5 batches per epoch, windows of 2: Lightning steps after batches 2, 4 and 5, and
    the short window's step equals ordinary accumulation's (each window's micro-batches
    agree, so the fold is exact)."""
    x, y = _repeated_batches(2).tensors
    data = TensorDataset(x[: 5 * 32], y[: 5 * 32])  # batches a, a, b, b, c
    runs = []
    for release in (False, True):
        model = Regression(scheduler=SCHEDULE, **ACCUMULATING["AdamW"], **BACKENDS[backend])
        trainer = _fit(
            model, release, precision="64-true", accumulate_grad_batches=2, data=loader(data)
        )
        assert trainer.global_step == EPOCHS * 3
        states = trainer.optimizers[0].state.values()
        assert {float(s["step"]) for s in states} == {EPOCHS * 3.0}
        runs.append(model)
    for a, b in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    start = Regression(scheduler=SCHEDULE, **ACCUMULATING["AdamW"]).double()
    moved = [
        (a - b).abs().max() for a, b in zip(start.parameters(), runs[1].parameters(), strict=True)
    ]
    assert min(moved) > 1e-3, "every parameter trained"


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("NAdam", r"Invalid accumulate_grad_batches for GradientRelease with NAdam: 2\."),
        ("ADOPT", r"Invalid accumulate_grad_batches for GradientRelease with ADOPT: 2\."),
    ],
)
def test_accumulation_refused_where_the_update_needs_the_whole_gradient(
    name: str, message: str
) -> None:
    model = Regression(**OPTIMIZERS[name])
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        _fit(model, True, accumulate_grad_batches=2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


class Manual(Regression):
    def __init__(self) -> None:
        super().__init__(lr=1e-2)
        self.automatic_optimization = False


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("model", "overrides", "message"),
    [
        (Regression(lr=1e-2), {"gradient_clip_val": 1.0}, r"Invalid gradient_clip_val .*: 1\.0"),
        (
            Regression(lr=1e-2),
            {"plugins": [MixedPrecision("16-mixed", device="cpu")]},
            r"Invalid precision for GradientRelease: '16-mixed'\. Allowed: .*'bf16-mixed'",
        ),
        (Manual(), {}, r"Invalid automatic_optimization for GradientRelease: False"),
        (
            Regression("torch.optim.AdamW", lr=1e-2),
            {},
            r"Invalid optimizers for GradientRelease: \['torch\.optim\.AdamW'\]\. "
            r"Allowed: exactly one",
        ),
    ],
    ids=["clipping", "16-mixed", "manual", "torch-optimizer"],
)
def test_unsupported_settings_are_refused_before_training(
    model: Regression, overrides: dict, message: str
) -> None:
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises((ValueError, TypeError), match=message):
        _fit(model, True, **overrides)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


class ClipsItself(Regression):
    def configure_gradient_clipping(self, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        self.clip_gradients(optimizer, gradient_clip_val=1.0)


class SkipsBatch2(Regression):
    """optimizer_step skipping a batch by running the closure alone, as Lightning's docs
    show for conditional steps; every other batch steps with the closure."""

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, closure: Any) -> None:
        if batch_idx == 2:
            closure()
        else:
            optimizer.step(closure=closure)


class WarmsUp(Regression):
    """optimizer_step setting the lr before stepping: Lightning's manual warmup recipe."""

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, closure: Any) -> None:
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * min(1.0, (self.trainer.global_step + 1) / 3)
        optimizer.step(closure=closure)


@pytest.mark.bad_input
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(
    ("model_class", "callbacks", "message"),
    [
        (
            ClipsItself,
            [],
            r"Invalid ClipsItself\.configure_gradient_clipping for GradientRelease: overridden",
        ),
        (
            Regression,
            [GradientRelease()],
            # Lightning refuses a second instance of a stateful callback when the Trainer
            # is built; one appended later is refused by GradientRelease (next test).
            r"Found more than one stateful callback of type `GradientRelease`",
        ),
        (SkipsBatch2, [], r"Invalid SkipsBatch2\.optimizer_step for GradientRelease: backward"),
    ],
    ids=["clipping-override", "two-callbacks", "skipping-override"],
)
def test_settings_release_cannot_honour_are_refused_before_they_change_anything(
    model_class: type, callbacks: list, message: str, backend: str
) -> None:
    """Each trained on silently or failed midway: a clipping override failed after the first
    batch had stepped; a batch an optimizer_step override skipped was stepped anyway (0.015
    off); two callbacks trained twice-hooked, and failed under accumulation."""
    model, plain = (model_class(lr=1e-2, **BACKENDS[backend]) for _ in range(2))
    plain.load_state_dict(model.state_dict())
    with pytest.raises((ValueError, RuntimeError), match=message):
        _fit(model, True, callbacks=callbacks, max_epochs=1)
    if model_class is SkipsBatch2:  # refused at batch 2, before its backward: as without release
        _fit(plain, False, max_epochs=1, limit_train_batches=2)
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not core.is_gradient_release_prepared(model)


@pytest.mark.bad_input
def test_a_second_gradient_release_appended_after_the_trainer_is_refused_at_setup() -> None:
    model = Regression(lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = make_trainer(max_epochs=1, callbacks=[GradientRelease()])
    trainer.callbacks.append(GradientRelease())
    with pytest.raises(
        ValueError, match=r"Invalid callbacks for GradientRelease: .*more than once"
    ):
        trainer.fit(model, loader(regression_data(128)))
    assert all(map(torch.equal, before, model.parameters()))
    assert not core.is_gradient_release_prepared(model)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_an_optimizer_step_override_that_steps_with_the_closure_trains_exactly(
    backend: str,
) -> None:
    runs = [WarmsUp(lr=1e-2, **BACKENDS[backend]) for _ in range(2)]
    runs[1].load_state_dict(runs[0].state_dict())
    for model, release in zip(runs, (False, True), strict=True):
        _fit(model, release, max_epochs=2)
    for a, b in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.bad_input
def test_a_refusal_at_fit_start_gives_the_groups_their_setting_back() -> None:
    """A refusal in on_fit_start (here a hook the user put on a parameter) left every group
    and the optimizer's defaults switched to release."""
    model = Regression(lr=1e-2)
    next(model.parameters()).register_post_accumulate_grad_hook(lambda p: None)
    trainer = make_trainer(max_epochs=1, callbacks=[GradientRelease()])
    with pytest.raises(ValueError, match="already carry post-accumulate-grad hooks"):
        trainer.fit(model, loader(regression_data(128)))
    optimizer = trainer.optimizers[0]
    assert not any(group["gradient_release"] for group in optimizer.param_groups)
    assert optimizer.defaults["gradient_release"] is False


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_bf16_true_with_release_uses_kahan_and_trains(backend: str) -> None:
    model = Regression(lr=1e-2, **BACKENDS[backend])
    trainer = _fit(model, True, precision="bf16-true", max_epochs=EPOCHS * 4)
    states = list(trainer.optimizers[0].state.values())
    assert all(s["kahan_comp"].dtype == torch.bfloat16 for s in states)
    assert float(trainer.callback_metrics["train_loss"]) < 0.5 * _initial_loss()


def _initial_loss() -> float:
    x, y = regression_data(128).tensors
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(Regression()(x), y))
