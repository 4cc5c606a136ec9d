"""Checkpoint save and resume: a resumed run continues exactly as the uninterrupted one."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, ModelCheckpoint
from torch import nn

from lightning_adam import LRSchedule
from lightning_adam.schedules import ScheduledLR
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

EPOCHS, RESUME_AFTER = 4, 2
SCHEDULE = {"kind": "cosine", "warmup_steps": 3, "total_steps": 16, "min_lr_ratio": 0.1}
"""4 epochs of 4 batches; total_steps is fixed so both runs follow one schedule."""

OPTIMIZERS = {
    "Adam": {"optimizer": "Adam", "lr": 1e-2, "weight_decay": 1e-3, "amsgrad": True},
    "AdamW": {"optimizer": "AdamW", "lr": 1e-2},
    "RAdam": {"optimizer": "RAdam", "lr": 1e-2, "decouple_lr": True, "weight_decay": 1e-3},
    "NAdam": {"optimizer": "NAdam", "lr": 1e-2},
    "ADOPT": {"optimizer": "ADOPT", "lr": 1e-2, "betas": (0.9, 0.99)},
}
CASES = [(name, "32-true") for name in OPTIMIZERS] + [("AdamW", "bf16-true")]


def _fit(model: Regression, precision: str, ckpt_path: Path | None = None, **kwargs: Any) -> Any:
    trainer = make_trainer(max_epochs=EPOCHS, precision=precision, **kwargs)
    trainer.fit(model, loader(regression_data(128)), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(("name", "precision"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_resume_continues_exactly_as_the_uninterrupted_run(
    name: str, precision: str, backend: str, tmp_path: Path
) -> None:
    kwargs = {**OPTIMIZERS[name], **BACKENDS[backend]}
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    uninterrupted = Regression(scheduler=SCHEDULE, **kwargs)
    full = _fit(uninterrupted, precision, callbacks=[saver], enable_checkpointing=True)

    resumed = Regression(scheduler=SCHEDULE, seed=123, **kwargs)  # other init: all from the file
    checkpoint = tmp_path / f"epoch={RESUME_AFTER - 1}.ckpt"
    again = _fit(resumed, precision, ckpt_path=checkpoint)

    assert again.global_step == full.global_step == EPOCHS * 4
    assert_backend(again.optimizers[0], backend)
    for a, b in zip(uninterrupted.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    states = [t.optimizers[0].state_dict()["state"] for t in (full, again)]
    assert states[0].keys() == states[1].keys()
    for key, state in states[0].items():
        assert state.keys() == states[1][key].keys()
        for buffer, value in state.items():
            assert torch.equal(value, states[1][key][buffer]), buffer
    if precision == "bf16-true":
        assert all("kahan_comp" in state for state in states[1].values())
    schedulers = [t.lr_scheduler_configs[0].scheduler for t in (full, again)]
    assert schedulers[0].get_last_lr() == schedulers[1].get_last_lr()


COUNTED_BY_THE_TRAINER = {"kind": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1}
"""total_steps left to the trainer, as the helper's default schedules leave it."""


def _fit_mid_epoch(model: Regression, ckpt_path: Path | None = None, **kwargs: Any) -> Any:
    trainer = make_trainer(max_epochs=3, **kwargs)
    trainer.fit(model, ResumableLoader(regression_data(128), batch_size=32), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_fit_resumed_mid_epoch_counts_its_schedule_and_keeps_the_epochs_place(
    backend: str, tmp_path: Path
) -> None:
    """Counting total_steps loads the training data; counted in configure_optimizers, before
    Lightning restores its loops, the loader never got the checkpoint's place in the epoch
    (Lightning issue 20550): the resumed epoch restarted its data from batch 0 while
    Lightning counted from the saved batch, silently (fails at the code before the fix).
    Counted when the scheduler is restored, it continues exactly."""
    kwargs = {**OPTIMIZERS["AdamW"], **BACKENDS[backend]}
    uninterrupted = Regression(scheduler=COUNTED_BY_THE_TRAINER, **kwargs)
    full = _fit_mid_epoch(uninterrupted)
    path = tmp_path / "inside-epoch.ckpt"
    _fit_mid_epoch(
        Regression(scheduler=COUNTED_BY_THE_TRAINER, **kwargs),
        callbacks=[StopInsideWindow(path, epoch=1, batch=1)],
    )
    resumed = Regression(scheduler=COUNTED_BY_THE_TRAINER, seed=123, **kwargs)
    again = _fit_mid_epoch(resumed, ckpt_path=path)

    assert again.global_step == full.global_step == 12
    assert_backend(again.optimizers[0], backend)
    for a, b in zip(uninterrupted.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    schedulers = [t.lr_scheduler_configs[0].scheduler for t in (full, again)]
    assert schedulers[0].total_steps == schedulers[1].total_steps == 12
    assert schedulers[0].get_last_lr() == schedulers[1].get_last_lr()


@pytest.mark.bad_input
@pytest.mark.parametrize("saved_schedule", [COUNTED_BY_THE_TRAINER, None], ids=["saved", "none"])
def test_a_resumed_fit_refuses_a_schedule_its_run_cannot_hold_before_training(
    saved_schedule: dict | None, tmp_path: Path
) -> None:
    """Counted at the scheduler's restore, a too-short schedule is still refused by name
    before the resumed fit trains a step (the checkpoint's weights untouched); also from
    a checkpoint without scheduler state, which restores no scheduler: counted just
    before the first optimizer step (it ran its whole fit uncounted, in warmup, or failed
    at a later checkpoint's save)."""
    path = tmp_path / "inside-epoch.ckpt"
    _fit_mid_epoch(
        Regression(scheduler=saved_schedule, lr=1e-2),
        callbacks=[StopInsideWindow(path, epoch=1, batch=1)],
    )
    saved = torch.load(path, weights_only=True)["state_dict"]
    resumed = Regression(scheduler={"kind": "cosine", "warmup_steps": 40}, lr=1e-2)
    with pytest.raises(ValueError, match=r"total_steps.*more than warmup_steps \(40\)"):
        _fit_mid_epoch(resumed, ckpt_path=path)
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, saved[name]), name


class LearningRates(L.Callback):
    """The first group's lr at each training batch."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_a_schedule_resumed_from_a_checkpoint_without_one_starts_on_its_curve(
    tmp_path: Path,
) -> None:
    """A checkpoint of a run without a schedule restores no scheduler, but its optimizer
    state brings that run's lr back into the groups after the scheduler set its own: the
    first resumed step ran at the checkpoint's lr (0.03 where the curve starts at 0.01/3;
    fails at the code before the fix). Every step follows the configured curve now."""
    path = tmp_path / "inside-epoch.ckpt"
    _fit_mid_epoch(
        Regression(scheduler=None, lr=3e-2), callbacks=[StopInsideWindow(path, epoch=1, batch=1)]
    )
    rates = LearningRates()
    resumed = Regression(scheduler=COUNTED_BY_THE_TRAINER, lr=1e-2)
    trainer = _fit_mid_epoch(resumed, ckpt_path=path, callbacks=[rates])
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert len(rates.seen) == 12 - 6 and scheduler.total_steps == 12
    expected = [1e-2 * scheduler.factor(t) for t in range(len(rates.seen))]
    assert rates.seen == pytest.approx(expected, rel=1e-9)


class BackboneRates(L.Callback):
    """The backbone group's lr at each training batch once BackboneFinetuning added it."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int], float] = {}

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        groups = trainer.optimizers[0].param_groups
        if len(groups) == 3:
            self.seen[(trainer.current_epoch, args[-1])] = groups[2]["lr"]


def test_a_group_added_since_the_schedulers_last_step_resumes_at_its_lr(tmp_path: Path) -> None:
    """BackboneFinetuning adds the backbone's group at epoch 1; an 'epoch' schedule has not
    stepped since when the fit stops inside that epoch. Resumed, the optimizer's restore
    leaves the scheduler's own lrs in the groups, and the joined group's starting lr was
    taken from that ratio instead of the one it joined beside: 0.002 where the
    uninterrupted fit ran 0.001 (fails at the code before the fix). Every batch's lr
    continues as uninterrupted now. (The parameters do not: Lightning skips
    on_train_epoch_start in a resumed epoch, where BackboneFinetuning freezes and
    unfreezes, with or without a schedule.)"""
    schedule = {"kind": "linear", "warmup_steps": 1, "interval": "epoch"}
    path = tmp_path / "inside-epoch.ckpt"

    def fit(*callbacks: L.Callback, ckpt_path: Path | None = None) -> tuple[Finetuned, dict]:
        rates = BackboneRates()
        finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda _: 1.0)
        model = Finetuned(scheduler=schedule, lr=1e-2)
        trainer = make_trainer(max_epochs=3, callbacks=[finetuning, rates, *callbacks])
        data = ResumableLoader(regression_data(64), batch_size=8)
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model, rates.seen

    _, full = fit()
    fit(StopInsideWindow(path, epoch=1, batch=3))
    _, again = fit(ckpt_path=path)
    assert len(again) == 12 and again == {key: full[key] for key in again}


@pytest.mark.parametrize(
    "resumed_schedule",
    [{"kind": "linear"}, {"kind": "cosine", "min_lr_ratio": 0.5}, {"kind": "constant"}],
    ids=["longer", "other-kind", "constant"],
)
def test_a_run_resumed_with_another_schedule_follows_the_configured_one(
    resumed_schedule: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One epoch of a linear schedule whose total_steps came from max_epochs=1 (4 steps,
    so it ends at lr 0), resumed to train 3 epochs: the scheduler's checkpoint carried its
    own curve, so every resumed step ran at lr 0 (parameters unchanged) whatever was
    configured. The configured curve holds now, from the saved step on."""
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    first = Regression(scheduler={"kind": "linear"}, lr=1e-2)
    make_trainer(max_epochs=1, callbacks=[saver], enable_checkpointing=True).fit(
        first, loader(regression_data(128))
    )
    resumed, rates = Regression(scheduler=resumed_schedule, lr=1e-2), LearningRates()
    before = [p.detach().clone() for p in first.parameters()]
    with caplog.at_level(logging.INFO):
        make_trainer(max_epochs=3, callbacks=[rates]).fit(
            resumed, loader(regression_data(128)), ckpt_path=tmp_path / "epoch=0.ckpt"
        )
    assert "Resuming on the configured schedule from step 4" in caplog.text
    configured = LRSchedule.coerce(resumed_schedule)
    probe = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-2)
    curve = ScheduledLR(probe, replace(configured, total_steps=12))
    assert rates.seen == pytest.approx([1e-2 * curve.factor(t) for t in range(4, 12)], rel=1e-9)
    assert all(not torch.equal(p, b) for p, b in zip(resumed.parameters(), before, strict=True))


SWITCHES = {
    "kahan-off": {"kahan_sum": False},
    "stochastic-on": {"stochastic_rounding": True},
}
"""What a resumed bf16-true run may ask for instead of the checkpoint's Kahan compensation."""


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("switch", list(SWITCHES))
def test_resume_takes_the_running_rounding_flags_not_the_checkpoints(
    switch: str, backend: str, tmp_path: Path
) -> None:
    """Resumed with `--optimizer.kahan_sum=false` or `stochastic_rounding=true` (the run's
    hparams say so), the run rounds as asked, like the backend flags and state_precision:
    equal to resuming from the same checkpoint edited by hand (flags set, the Kahan buffer
    removed). The checkpoint's flags used to win, silently."""
    kwargs = {**OPTIMIZERS["AdamW"], **BACKENDS[backend]}
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    _fit(
        Regression(scheduler=SCHEDULE, **kwargs),
        "bf16-true",
        callbacks=[saver],
        enable_checkpointing=True,
    )
    checkpoint = tmp_path / f"epoch={RESUME_AFTER - 1}.ckpt"
    edited = torch.load(checkpoint, weights_only=False)
    optimizer_state = edited["optimizer_states"][0]
    for group in optimizer_state["param_groups"]:
        group.update(SWITCHES[switch])
    for state in optimizer_state["state"].values():
        del state["kahan_comp"]
    torch.save(edited, tmp_path / "edited.ckpt")

    runs = []
    for path in (checkpoint, tmp_path / "edited.ckpt"):
        model = Regression(scheduler=SCHEDULE, **kwargs, **SWITCHES[switch])
        trainer = _fit(model, "bf16-true", ckpt_path=path)
        optimizer = trainer.optimizers[0]
        for group in optimizer.param_groups:
            assert all(group[key] == value for key, value in SWITCHES[switch].items())
        assert not any("kahan_comp" in state for state in optimizer.state.values())
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
