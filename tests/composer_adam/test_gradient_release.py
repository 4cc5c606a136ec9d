"""GradientRelease in a real Trainer with microbatching equals the ordinary run, keeps the
OptimizerMonitor's metrics, and refuses what cannot work."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.algorithms import SAM, GradientClipping
from composer.callbacks import OptimizerMonitor
from composer.core import Algorithm, Callback, DataSpec, Event, Precision, State
from composer.loggers import Logger
from composer.models import ComposerClassifier, ComposerModel
from torch import Tensor, nn

import composer_adam
import core
from tests.composer_adam.harness import (
    BATCH,
    LR,
    MICROBATCH,
    STEPS,
    GradientsAfterBackward,
    assert_same_parameters,
    logged,
    make_loader,
    make_model,
    train,
    with_backends,
)
from tests.core.configuration_cases import BACKENDS
from tests.processes import ROOT

FAMILY = [composer_adam.DecoupledAdamW, composer_adam.DecoupledADOPT, composer_adam.DecoupledNAdam]


@pytest.mark.parametrize(("cls", "backend"), with_backends(FAMILY))
def test_release_with_microbatching_equals_the_ordinary_run(cls: type, backend: str) -> None:
    kwargs = {"lr": LR, "weight_decay": 1e-4, **BACKENDS[backend]}
    ordinary, ordinary_log = train(lambda p: cls(p, **kwargs))
    probe = GradientsAfterBackward()
    released, released_log = train(
        lambda p: cls(p, gradient_release=True, **kwargs),
        callbacks=[composer_adam.GradientRelease(), probe],
    )
    assert_same_parameters(released.state.model, ordinary.state.model, atol=0)
    # Four microbatches per batch: gradients accumulate in the first three, and are all
    # released in the last one's backward.
    assert probe.kept == [True, True, True, False] * STEPS
    mine, reference = logged(released_log, "l2_norm/"), logged(ordinary_log, "l2_norm/")
    assert len(reference) == 17
    if cls is composer_adam.DecoupledNAdam:
        # Its update reads the gradient (the Nesterov term), gone once released: left out
        # rather than logged without that term.
        reference = {k: v for k, v in reference.items() if not k.startswith("l2_norm/update/")}
    assert mine.keys() == reference.keys()
    for key, series in reference.items():
        assert mine[key] == pytest.approx(series, rel=1e-6), key
    assert any(isinstance(c, OptimizerMonitor) for c in released.state.callbacks)


class _BranchOfTheFirstMicrobatch(ComposerClassifier):
    """The harness's classifier plus a branch trained only by each batch's first
    microbatch (as an expert the later microbatches do not reach)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        module = torch.nn.Sequential(
            torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
        )
        super().__init__(module, num_classes=4)
        self.branch = torch.nn.Linear(10, 4)
        self.calls = 0

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, _ = batch
        branch = self.branch(x)
        first, self.calls = self.calls % 4 == 0, self.calls + 1
        return self.module(x) + (branch if first else branch.detach())


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_branch_only_earlier_microbatches_train_is_stepped_as_in_the_ordinary_run(
    backend: str,
) -> None:
    """Release arms its hooks for the last microbatch; the branch's gradient, accumulated
    in the first, reached no hook, and the step after backward skipped it as released:
    it was updated at its first batch only."""
    kwargs = {"lr": LR, "weight_decay": 1e-4, **BACKENDS[backend]}
    runs = [
        train(
            lambda p, release=release: composer_adam.DecoupledAdamW(
                p, gradient_release=release, **kwargs
            ),
            model=_BranchOfTheFirstMicrobatch(),
            max_duration="8ba",
            callbacks=[composer_adam.GradientRelease()] if release else [],
        )[0]
        for release in (False, True)
    ]
    assert_same_parameters(runs[1].state.model, runs[0].state.model, atol=0)
    branch = runs[1].state.model.branch.weight
    assert float(runs[1].state.optimizers[0].state[branch]["step"]) == 8


class _BranchOfEveryOtherBatch(_BranchOfTheFirstMicrobatch):
    """The branch trained by the whole of every other batch, and by no microbatch of the
    rest: its gradient is absent for whole batches."""

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, _ = batch
        used, self.calls = (self.calls // (BATCH // MICROBATCH)) % 2 == 0, self.calls + 1
        return self.module(x) + (self.branch(x) if used else 0)


def test_a_branch_without_gradient_for_a_batch_logs_no_stale_norm() -> None:
    """A batch the branch sat out logs no gradient norm of it, and the global norm of that
    batch is the other parameters' alone, as in the ordinary run (the norm release
    recorded in the batch before was logged again)."""
    runs = [
        train(
            lambda p, release=release: composer_adam.DecoupledAdamW(
                p, lr=LR, gradient_release=release
            ),
            model=_BranchOfEveryOtherBatch(),
            max_duration="6ba",
            callbacks=[composer_adam.GradientRelease()] if release else [],
        )
        for release in (False, True)
    ]
    (ordinary, ordinary_log), (released, released_log) = runs
    assert_same_parameters(released.state.model, ordinary.state.model, atol=0)
    mine, reference = logged(released_log, "l2_norm/grad/"), logged(ordinary_log, "l2_norm/grad/")
    branch = [key for key in reference if "branch.weight" in key]
    assert branch and len(reference[branch[0]]) == 3  # batches 0, 2, 4
    assert mine == reference
    # the monitor release took over during fit is given back at its place
    kinds = [type(callback) for callback in released.state.callbacks]
    assert kinds.index(OptimizerMonitor) < kinds.index(composer_adam.GradientRelease)


class _BranchOfTwoMicrobatches(nn.Module):
    """A layer plus a branch used only by the 3rd microbatch (of batch 0) and the 5th
    (the first of batch 1)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer, self.branch, self.calls = nn.Linear(10, 4), nn.Linear(10, 4), 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.layer(x) + (self.branch(x) if self.calls in (3, 5) else 0)


def _padded_samples(batch: Any) -> int:
    """Samples that count: rows whose first feature is not the padding mark 100."""
    return int((batch[0][:, 0] != 100).sum())


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_branch_stepped_in_one_batch_and_used_in_the_next_with_padded_microbatches(
    backend: str,
) -> None:
    """Each batch's last microbatch counts no sample (padding): release steps at the last
    microbatch that counts. The branch, stepped in batch 0, is used again only by batch 1's
    first microbatch: it must step there as in the ordinary run (batch 0's mark that it
    had stepped was kept, and batch 1 skipped it: 0.01 off)."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 10, generator=generator), torch.randint(0, 4, (32,), generator=generator)
    x.view(2, 16, 10)[:, 12:, 0] = 100
    branches = []
    for release in (False, True):
        net = _BranchOfTwoMicrobatches()
        model = ComposerClassifier(net, num_classes=4)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
        Trainer(
            model=model,
            train_dataloader=DataSpec(loader, get_num_samples_in_batch=_padded_samples),
            device_train_microbatch_size=4,
            optimizers=composer_adam.DecoupledAdamW(
                model.parameters(), lr=1e-2, gradient_release=release, **BACKENDS[backend]
            ),
            max_duration="2ba",
            device="cpu",
            progress_bar=False,
            log_to_console=False,
            callbacks=[composer_adam.GradientRelease(get_num_samples_in_batch=_padded_samples)]
            if release
            else [],
        ).fit()
        branches.append(net.branch.weight.detach().clone())
    assert torch.equal(branches[1], branches[0])


def test_a_padded_microbatch_after_the_step_leaves_no_gradient_allocated() -> None:
    """A microbatch after the one release stepped at (it counts no sample) still runs its
    backward, which Composer scales to zero gradients: release drops them at once, so
    nothing gradient-sized lives on until the next batch's zero_grad (numbers alike
    either way: only memory shows it)."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 10, generator=generator), torch.randint(0, 4, (32,), generator=generator)
    x.view(2, 16, 10)[:, 12:, 0] = 100
    model = make_model()
    recorder = GradientsAfterBackward()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    Trainer(
        model=model,
        train_dataloader=DataSpec(loader, get_num_samples_in_batch=_padded_samples),
        device_train_microbatch_size=4,
        optimizers=composer_adam.DecoupledAdamW(model.parameters(), lr=1e-2, gradient_release=True),
        max_duration="2ba",
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        callbacks=[
            composer_adam.GradientRelease(get_num_samples_in_batch=_padded_samples),
            recorder,
        ],
    ).fit()
    # per batch: two microbatches accumulate, the third steps and frees, the fourth is dropped
    assert recorder.kept == [True, True, False, False] * 2


@pytest.mark.parametrize("optimizer_metrics", [True, False])
def test_released_bf16_gradients_log_the_norms_the_ordinary_run_logs(
    optimizer_metrics: bool,
) -> None:
    """bf16 parameters, default flags: with log_optimizer_metrics adamkit's metrics take a
    gradient's norm in float32, without it Composer's monitor takes it in bf16; the norm
    release records in backward follows the same setting (it was always bf16: up to 0.4%
    off the ordinary run's)."""
    runs = [
        train(
            lambda p, release=release: composer_adam.DecoupledAdamW(
                p, lr=LR, gradient_release=release
            ),
            callbacks=[composer_adam.GradientRelease()] if release else [],
            dtype=torch.bfloat16,
            optimizer_metrics=optimizer_metrics,
        )
        for release in (False, True)
    ]
    (ordinary, ordinary_log), (released, released_log) = runs
    assert_same_parameters(released.state.model, ordinary.state.model, atol=0)
    mine, reference = logged(released_log, "l2_norm/grad/"), logged(ordinary_log, "l2_norm/grad/")
    assert len(reference) == 5
    assert mine == reference


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_optimizer_accumulation_frees_every_microbatch_and_trains_alike(backend: str) -> None:
    kwargs = {"lr": LR, **BACKENDS[backend]}
    _, ordinary_log = train(lambda p: composer_adam.DecoupledAdamW(p, **kwargs))
    probe = GradientsAfterBackward()
    released, log = train(
        lambda p: composer_adam.DecoupledAdamW(p, gradient_release=True, **kwargs),
        callbacks=[composer_adam.GradientRelease(optimizer_accumulation=True), probe],
    )
    assert probe.kept == [False] * 4 * STEPS
    # m is exact; v also carries the variance between microbatches (core.optimizer.
    # window_terms), so steps are smaller: the run trains, a little slower.
    losses = [v for _, v in log.data["loss/train/total"]]
    ordinary = [v for _, v in ordinary_log.data["loss/train/total"]]
    assert losses[0] == ordinary[0]
    assert sum(losses[-10:]) < 0.6 * sum(losses[:10])
    assert sum(losses[-10:]) < 1.5 * sum(ordinary[-10:])
    assert not released.state.optimizers[0].optimizer_accumulation


def _repeated_sample_loader(batches: int = 6, batch: int = 8) -> torch.utils.data.DataLoader:
    """Each batch one sample repeated: every microbatch's per-sample gradient agrees."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batches, 1, 10, generator=generator).expand(batches, batch, 10)
    y = torch.randint(0, 4, (batches, 1), generator=generator).expand(batches, batch)
    dataset = torch.utils.data.TensorDataset(x.reshape(-1, 10), y.reshape(-1))
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("microbatch", [3, 6])
def test_optimizer_accumulation_is_exact_for_unequal_microbatches(
    microbatch: int, backend: str
) -> None:
    """Batches of 8 in microbatches of 3 (3, 3, 2) or 6 (6, 2): Composer scales each loss
    by its share of the samples, and the callback tells the optimizer those shares. With
    agreeing gradients the run equals ordinary accumulation; v used to weight every
    microbatch alike (6.8% and 15% of the distance travelled off)."""
    runs = []
    for release in (False, True):
        model = make_model()
        start = [p.detach().clone() for p in model.parameters()]
        optimizer = composer_adam.DecoupledAdamW(
            model.parameters(), lr=1e-2, gradient_release=release, **BACKENDS[backend]
        )
        trainer = Trainer(
            model=model,
            train_dataloader=_repeated_sample_loader(),
            optimizers=optimizer,
            max_duration="6ba",
            device="cpu",
            device_train_microbatch_size=microbatch,
            callbacks=[composer_adam.GradientRelease(optimizer_accumulation=True)]
            if release
            else [],
            progress_bar=False,
            log_to_console=False,
            seed=17,
        )
        trainer.fit()
        runs.append([p.detach().clone() for p in model.parameters()])
    ordinary, released = runs
    travelled = sum(float((p - q).square().sum()) for p, q in zip(ordinary, start, strict=True))
    gap = sum(float((p - q).square().sum()) for p, q in zip(released, ordinary, strict=True))
    assert (gap / travelled) ** 0.5 < 1e-5
    assert optimizer.microbatch_share is None, "reset when the fit ends"


def _trainer(model: ComposerModel | None = None, **kwargs: Any) -> Trainer:
    """A quiet two-batch Trainer, on a new model and released optimizer unless given."""
    model = make_model() if model is None else model
    released = composer_adam.DecoupledAdamW(model.parameters(), lr=LR, gradient_release=True)
    settings: dict[str, Any] = {
        "optimizers": released,
        "train_dataloader": make_loader(4),
        "max_duration": "2ba",
        "device": "cpu",
        "progress_bar": False,
        "log_to_console": False,
    }
    return Trainer(model=model, **{**settings, **kwargs})


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "algorithm",
    [GradientClipping(clipping_type="norm", clipping_threshold=1.0), SAM(interval=1)],
    ids=["GradientClipping", "SAM"],
)
def test_algorithms_that_need_the_whole_gradient_are_refused(algorithm: Algorithm) -> None:
    """Named as what they are: SAM used to be refused as a foreign optimizer (its wrapper)."""
    trainer = _trainer(callbacks=[composer_adam.GradientRelease()], algorithms=[algorithm])
    name = type(algorithm).__name__
    with pytest.raises(ValueError, match=rf"Invalid algorithms for GradientRelease: \['{name}'\]"):
        trainer.fit()


@pytest.mark.bad_input
def test_amp_fp16_is_refused() -> None:
    trainer = _trainer()
    trainer.state.precision = Precision.AMP_FP16
    with pytest.raises(ValueError, match="Invalid precision for GradientRelease: amp_fp16"):
        composer_adam.GradientRelease().fit_start(trainer.state, trainer.logger)


@pytest.mark.bad_input
def test_an_optimizer_without_release_is_refused() -> None:
    model = make_model()
    trainer = Trainer(
        model=model,
        train_dataloader=make_loader(4),
        optimizers=torch.optim.AdamW(model.parameters()),
        max_duration="2ba",
        device="cpu",
        callbacks=[composer_adam.GradientRelease()],
        progress_bar=False,
    )
    with pytest.raises(
        ValueError,
        match=r"Invalid optimizers for GradientRelease: \['torch\.optim\.adamw\.AdamW'\]",
    ):
        trainer.fit()


@pytest.mark.bad_input
def test_accumulation_with_an_algorithm_that_needs_the_whole_gradient_is_refused() -> None:
    model = make_model()
    trainer = Trainer(
        model=model,
        train_dataloader=make_loader(4),
        optimizers=composer_adam.DecoupledNAdam(model.parameters(), gradient_release=True),
        max_duration="2ba",
        device="cpu",
        callbacks=[composer_adam.GradientRelease(optimizer_accumulation=True)],
        progress_bar=False,
    )
    with pytest.raises(ValueError, match="Invalid optimizer_accumulation for DecoupledNAdam: True"):
        trainer.fit()


class _FailsAtBatch(Callback):
    def batch_end(self, state: State, logger: Logger) -> None:
        if state.timestamp.batch.value == 1:
            raise RuntimeError("a bad batch")


@pytest.mark.bad_input
@pytest.mark.parametrize("accumulation", [False, True], ids=["last-microbatch", "accumulation"])
def test_a_fit_that_raises_is_undone_when_the_trainer_closes(accumulation: bool) -> None:
    """Composer runs no event after a raise, only close: the hooks stayed armed (a plain
    backward then stepped the optimizer and freed every gradient), torch's clipping stayed
    patched and optimizer accumulation stayed on."""
    release = composer_adam.GradientRelease(optimizer_accumulation=accumulation)
    trainer = _trainer(callbacks=[release, _FailsAtBatch()], device_train_microbatch_size=2)
    model, optimizer = trainer.state.model, trainer.state.optimizers[0]
    with pytest.raises(RuntimeError, match="a bad batch"):
        trainer.fit()
    trainer.close()
    assert not core.is_gradient_release_prepared(model)
    assert not optimizer.optimizer_accumulation
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(iter(make_loader(1)))
    model.loss(model((x, y)), (x, y)).backward()
    assert all(p.grad is not None for p in model.parameters())  # kept, as without release
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # refused while released


class _FailsInsideBatch(Callback):
    """Raises after the first microbatch's backward of the second batch, whose fold is then
    in the moments; keeps the optimizer's state at the end of the first batch."""

    def __init__(self) -> None:
        self.saved: dict[str, Any] = {}

    def batch_end(self, state: State, logger: Logger) -> None:
        self.saved = copy.deepcopy(state.optimizers[0].state_dict())

    def after_backward(self, state: State, logger: Logger) -> None:
        if state.timestamp.batch.value == 1:
            raise RuntimeError("stopped inside a batch")


@pytest.mark.parametrize("loaded", [False, True], ids=["continued", "checkpoint-loaded"])
def test_a_window_left_open_by_a_fit_that_raised_is_said_at_the_next_fit(loaded: bool) -> None:
    """Composer drops a batch that does not finish; its microbatches folded with
    optimizer_accumulation stay in the moments, and the next fit's first step closes their
    window with its own batch: said at that fit's start, not when a checkpoint loaded
    since (a batch's end) holds no open window."""
    probe = _FailsInsideBatch()
    release = composer_adam.GradientRelease(optimizer_accumulation=True)
    failed = _trainer(callbacks=[release, probe], device_train_microbatch_size=2)
    model, optimizer = failed.state.model, failed.state.optimizers[0]
    with pytest.raises(RuntimeError, match="stopped inside a batch"):
        failed.fit()
    assert set(optimizer.open_windows().values()) == {1}
    if loaded:
        optimizer.load_state_dict(probe.saved)
        assert not optimizer.open_windows()
    again = _trainer(
        model,
        optimizers=optimizer,
        max_duration="1ba",
        device_train_microbatch_size=2,
        callbacks=[composer_adam.GradientRelease(optimizer_accumulation=True)],
    )
    said = r"window left open by a fit that stopped inside a batch \(\[1\] micro-batches"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again.fit()
    told = [w for w in caught if re.search(said, str(w.message))]
    assert len(told) == (0 if loaded else 1)
    assert not optimizer.open_windows()


class _ClosesAfterFirstBatch(Callback):
    def __init__(self, other: Trainer) -> None:
        self.other, self.closed = other, False

    def batch_end(self, state: State, logger: Logger) -> None:
        if state.timestamp.batch.value == 1:
            self.other.close()
            self.closed = True


@pytest.mark.parametrize("optimizer_kind", ["same", "new"])
def test_a_new_trainer_releases_beside_a_failed_one_still_referenced(optimizer_kind: str) -> None:
    """A Trainer whose fit raised, still referenced (a notebook keeps the last traceback)
    and not closed, then a new Trainer with a new GradientRelease on the same model: with
    the same optimizer the new fit was refused at its first backward as a 'second backward'
    (the old callback's hooks on the optimizer kept their records); with a new optimizer
    release stayed off (the model counted as prepared, by the old one). Both now release
    and train as the same fit without the failed one, also when the failed Trainer is
    closed midway (its close undid the running fit's release)."""
    failed = _trainer(callbacks=[composer_adam.GradientRelease(), _FailsAtBatch()])
    model, optimizer = failed.state.model, failed.state.optimizers[0]
    with pytest.raises(RuntimeError, match="a bad batch"):
        failed.fit()
    if optimizer_kind == "new":
        optimizer = composer_adam.DecoupledAdamW(model.parameters(), lr=LR, gradient_release=True)
    twin = copy.deepcopy(model)
    ordinary_optimizer = composer_adam.DecoupledAdamW(twin.parameters(), lr=LR)
    saved = copy.deepcopy(optimizer.state_dict())
    for group in saved["param_groups"]:
        group["gradient_release"] = False
    ordinary_optimizer.load_state_dict(saved)
    kept: dict[str, list[bool]] = {}
    closing = _ClosesAfterFirstBatch(failed)
    for name, trained, chosen, callbacks in (
        ("released", model, optimizer, [composer_adam.GradientRelease(), closing]),
        ("ordinary", twin, ordinary_optimizer, []),
    ):
        probe = GradientsAfterBackward()
        _trainer(trained, optimizers=chosen, callbacks=[*callbacks, probe]).fit()
        kept[name] = probe.kept
    assert closing.closed
    assert kept == {"released": [False, False], "ordinary": [True, True]}
    assert_same_parameters(model, twin, atol=0)


def test_closing_a_failed_trainer_leaves_a_release_made_since_alone() -> None:
    """After a fit that raised, the user prepares release by hand on the same model and
    optimizer; the failed Trainer's close then removed it (the callback removed whatever
    release the optimizer had), silently turning it off."""
    failed = _trainer(callbacks=[composer_adam.GradientRelease(), _FailsAtBatch()])
    model, optimizer = failed.state.model, failed.state.optimizers[0]
    with pytest.raises(RuntimeError, match="a bad batch"):
        failed.fit()
    core.prepare_for_gradient_release(model, optimizer)
    failed.close()
    assert core.is_gradient_release_prepared(model, optimizer)
    x, y = next(iter(make_loader(1)))
    model.loss(model((x, y)), (x, y)).backward()
    assert all(p.grad is None for p in model.parameters()), "stepped and freed in backward"
    core.remove_gradient_release(model)


def test_fitted_trainers_with_release_leave_nothing_alive() -> None:
    """The callback's record of which GradientRelease armed an optimizer held the callback,
    which holds the optimizer and model: every fitted optimizer, its state and its model
    stayed in memory for the rest of the process. In a fresh process, with Composer's own
    exit handler (which keeps each Trainer until exit) cleared."""
    script = """
import atexit, gc, weakref
import composer_adam
from composer import Trainer
from tests.composer_adam.harness import make_loader, make_model

refs = []
for _ in range(2):
    model = make_model()
    optimizer = composer_adam.DecoupledAdamW(model.parameters(), lr=1e-2, gradient_release=True)
    trainer = Trainer(model=model, train_dataloader=make_loader(4), optimizers=optimizer,
                      max_duration="2ba", device="cpu", progress_bar=False, log_to_console=False,
                      callbacks=[composer_adam.GradientRelease()])
    trainer.fit()
    trainer.close()
    refs += [weakref.ref(optimizer), weakref.ref(model)]
    del model, optimizer, trainer
atexit._clear()
gc.collect()
print(sum(ref() is not None for ref in refs))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout.split()[-1] == "0"


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_frozen_parameter_with_the_monitor_trains_and_logs_as_the_ordinary_run(
    backend: str,
) -> None:
    """fit_start tried to hook the frozen parameter for its gradient norm and failed
    (cannot register a hook on a tensor that doesn't require gradient)."""
    runs = []
    for release in (False, True):
        model = make_model()
        model.module[2].bias.requires_grad_(False)
        runs.append(
            train(
                lambda p, release=release: composer_adam.DecoupledAdamW(
                    p, lr=LR, gradient_release=release, **BACKENDS[backend]
                ),
                model=model,
                max_duration="6ba",
                callbacks=[composer_adam.GradientRelease()] if release else [],
            )
        )
    (ordinary, ordinary_log), (released, released_log) = runs
    assert_same_parameters(released.state.model, ordinary.state.model, atol=0)
    mine, reference = logged(released_log, "l2_norm/"), logged(ordinary_log, "l2_norm/")
    assert "l2_norm/grad/module.2.bias" not in reference and len(reference) == 13
    assert mine.keys() == reference.keys()
    for key, series in reference.items():
        assert mine[key] == pytest.approx(series, rel=1e-6), key


@pytest.mark.bad_input
@pytest.mark.parametrize("samples", [0, float("nan"), -2, "4", torch.ones(2)])
def test_a_sample_count_that_cannot_tell_the_last_microbatch_is_refused(samples: object) -> None:
    """0 made every microbatch the last (a step each: 4 steps in 2 batches), NaN none (no
    gradient ever released), both silently."""
    release = composer_adam.GradientRelease(get_num_samples_in_batch=lambda batch: samples)
    trainer = _trainer(callbacks=[release], device_train_microbatch_size=2)
    model = trainer.state.model
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"Invalid get_num_samples_in_batch: it returned .* for a"):
        trainer.fit()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.bad_input
def test_a_sample_counter_that_is_not_callable_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Invalid get_num_samples_in_batch: 'len'\. Allowed"):
        composer_adam.GradientRelease(get_num_samples_in_batch="len")  # type: ignore[arg-type]


@pytest.mark.bad_input
def test_a_second_gradient_release_is_refused_before_anything_changes() -> None:
    """Two ran: each armed and disarmed the same hooks, each with its own
    optimizer_accumulation (the Lightning callback refuses a second one too)."""
    trainer = _trainer(
        callbacks=[
            composer_adam.GradientRelease(),
            composer_adam.GradientRelease(optimizer_accumulation=True),
        ],
        device_train_microbatch_size=2,
    )
    model = trainer.state.model
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"Invalid callbacks for GradientRelease: .*more than"):
        trainer.fit()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not core.is_gradient_release_prepared(model)


class _WeightedClassifier(ComposerModel):
    """Cross-entropy weighted per sample (batches are (x, y, weight)): a weight is the
    sample's loss-generating tokens, 0 for a sample whose tokens are all masked."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, batch: Any) -> Tensor:
        return self.net(batch[0])

    def loss(self, outputs: Tensor, batch: Any) -> Tensor:
        weights = batch[2]
        losses = F.cross_entropy(outputs, batch[1], reduction="none")
        return (losses * weights).sum() / weights.sum().clamp_min(1e-30)


def _tokens(batch: Any) -> int:
    return int(batch[2].sum())


def _fractional_weights(batch: Any) -> float:
    return float(batch[2].sum())


def _masked(first: int) -> Callable[[Tensor], Tensor]:
    """Token counts with microbatch `first // 2` (of 4) all masked."""
    return lambda w: w.round().index_fill(1, torch.tensor([first, first + 1]), 0.0)


WEIGHTINGS: dict[str, Callable[[Tensor], Tensor]] = {
    "tokens": torch.round,
    "masked first": _masked(0),
    "masked middle": _masked(2),
    "masked last": _masked(6),
    # fractional counts, not Composer's: summed per microbatch, they fall a rounding
    # short of the batch's sum in some batches
    "fractional": lambda w: w,
}


def _fit_counting(
    model: ComposerModel,
    loader: torch.utils.data.DataLoader,
    release: bool,
    accumulation: bool,
    counter: Callable[[Any], float],
    on_tokens: bool,
    backend: str,
) -> torch.optim.Optimizer:
    """Fit every batch of loader in microbatches of 2, Composer scaling them by tokens
    (on_tokens) or samples, GradientRelease (if release) counting with counter."""
    optimizer = composer_adam.DecoupledAdamW(
        model.parameters(), lr=1e-2, gradient_release=release, **BACKENDS[backend]
    )
    callback = composer_adam.GradientRelease(
        optimizer_accumulation=accumulation, get_num_samples_in_batch=counter
    )
    Trainer(
        model=model,
        train_dataloader=DataSpec(loader, get_num_tokens_in_batch=_tokens),
        accumulate_train_batch_on_tokens=on_tokens,
        optimizers=optimizer,
        max_duration=f"{len(loader)}ba",
        device="cpu",
        device_train_microbatch_size=2,
        callbacks=[callback] if release else [],
        progress_bar=False,
        log_to_console=False,
    ).fit()
    return optimizer


def _weighted_run(
    release: bool, accumulation: bool, weighting: str, backend: str
) -> tuple[list[Tensor], int]:
    """6 batches of 8 in microbatches of 2, one sample repeated per batch (every
    per-sample gradient agrees) with its own weight per copy. Composer scales each
    microbatch by its loss-generating tokens (accumulate_train_batch_on_tokens), and the
    callback is given the same counter, as the README says; for "fractional" Composer
    scales by samples and the callback counts the weights. Returns the parameters and
    the steps taken."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1, 10, generator=generator).expand(6, 8, 10)
    y = torch.randint(0, 4, (6, 1), generator=generator).expand(6, 8)
    weights = WEIGHTINGS[weighting](1 + 4 * torch.rand(6, 8, generator=generator))
    samples = torch.utils.data.TensorDataset(x.reshape(-1, 10), y.reshape(-1), weights.reshape(-1))
    loader = torch.utils.data.DataLoader(samples, batch_size=8, shuffle=False)
    on_tokens = weighting != "fractional"
    counter = _tokens if on_tokens else _fractional_weights
    model = _WeightedClassifier()
    optimizer = _fit_counting(model, loader, release, accumulation, counter, on_tokens, backend)
    assert all(p.grad is None for p in model.parameters()) or not release
    steps = {int(state["step"]) for state in optimizer.state.values()}
    assert len(steps) == 1
    return [p.detach().clone() for p in model.parameters()], steps.pop()


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("accumulation", [False, True])
@pytest.mark.parametrize("weighting", list(WEIGHTINGS))
def test_token_counts_with_masked_microbatches_step_once_per_batch_as_the_ordinary_run(
    weighting: str, accumulation: bool, backend: str
) -> None:
    """A microbatch whose tokens are all masked (count 0) was refused mid-batch, after
    earlier ones were folded; fractional counts summed per microbatch fell a rounding
    short of the batch's, so the last microbatch was missed in some batches (no step
    with optimizer accumulation, nothing released without). Now each batch steps once,
    equal to the ordinary run: bit for bit without accumulation, and to 1e-5 of the
    distance travelled with it (where the callback counts what Composer scales by)."""
    start = [p.detach().clone() for p in _WeightedClassifier().parameters()]
    ordinary, ordinary_steps = _weighted_run(False, False, weighting, backend)
    released, steps = _weighted_run(True, accumulation, weighting, backend)
    assert ordinary_steps == steps == 6
    travelled = torch.cat([(p - q).flatten() for p, q in zip(ordinary, start, strict=True)])
    gap = torch.cat([(p - q).flatten() for p, q in zip(released, ordinary, strict=True)])
    assert float(travelled.norm()) > 0.05
    if not accumulation:
        assert float(gap.norm()) == 0.0
    elif weighting != "fractional":  # shares other than Composer's scale: v approximate
        assert float(gap.norm()) < 1e-5 * float(travelled.norm())


class _BackwardOutsideTheLoop(Callback):
    """A held-out gradient taken at an event outside the microbatch loop, then discarded
    (a probe of the gradient; Composer's SeqLengthWarmup runs a blank forward and
    backward at AFTER_DATALOADER the same way)."""

    def __init__(self, event: str) -> None:
        self.event = event

    def run_event(self, event: Any, state: State, logger: Logger) -> None:
        if event.value == self.event:
            x, y = torch.ones(4, 10), torch.tensor([0, 1, 2, 3])
            F.cross_entropy(state.model((x, y)), y).backward()
            for optimizer in state.optimizers:
                optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("accumulation", [False, True])
@pytest.mark.parametrize("event", ["after_dataloader", "batch_end"])
def test_a_backward_outside_the_microbatches_steps_nothing(event: str, accumulation: bool) -> None:
    """The hooks stayed armed between batches (from the last microbatch, or all fit with
    optimizer accumulation), so such a backward stepped the optimizer: 7-8 steps in 4
    batches. The run without release ignores it; so does the released run now."""
    runs = []
    for probe in ([], [_BackwardOutsideTheLoop(event)]):
        trainer, _ = train(
            lambda p: composer_adam.DecoupledAdamW(p, lr=LR, gradient_release=True),
            max_duration="4ba",
            callbacks=[*probe, composer_adam.GradientRelease(optimizer_accumulation=accumulation)],
        )
        optimizer = trainer.state.optimizers[0]
        assert {float(state["step"]) for state in optimizer.state.values()} == {4.0}
        runs.append(trainer.state.model)
    assert_same_parameters(runs[1], runs[0], atol=0)


@pytest.mark.bad_input
def test_automatic_microbatching_is_refused_before_anything_changes() -> None:
    """After an out-of-memory error Composer reruns the batch in smaller microbatches:
    parameters released in the failed attempt were stepped twice (2e-2 off). Composer
    takes device_train_microbatch_size="auto" on GPUs only; its state flag is set here."""
    trainer = _trainer(callbacks=[composer_adam.GradientRelease()])
    trainer.state.auto_microbatching = True
    model = trainer.state.model
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(
        ValueError, match=r"Invalid device_train_microbatch_size for GradientRelease: 'auto'\."
    ):
        trainer.fit()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not core.is_gradient_release_prepared(model)


@pytest.mark.bad_input
@pytest.mark.parametrize("accumulation", [False, True])
def test_counts_whose_microbatches_fall_short_of_their_batch_are_refused(
    accumulation: bool,
) -> None:
    """A counter that counts a batch (16) above its microbatches (4 x 4) never reaches
    the last microbatch: with optimizer accumulation nothing ever stepped (every batch
    folded into a window left open), without it nothing was released; silently. Refused
    at the end of the first batch, where it shows."""

    def overcounting(batch: Any) -> int:
        samples = len(batch[0])
        return 2 * samples if samples > MICROBATCH else samples

    release = composer_adam.GradientRelease(
        optimizer_accumulation=accumulation, get_num_samples_in_batch=overcounting
    )
    trainer = _trainer(callbacks=[release], device_train_microbatch_size=MICROBATCH)
    with pytest.raises(
        ValueError, match=r"microbatches counted 16\.0 of the 32\.0 it returned for the whole"
    ):
        trainer.fit()
    assert int(trainer.state.timestamp.batch) == 0


class _Branchy(_WeightedClassifier):
    """_WeightedClassifier plus a layer only the samples flagged in batch[3] use (an
    expert, a branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(10, 4)

    def forward(self, batch: Any) -> Tensor:
        out = self.net(batch[0])
        return out + self.extra(batch[0]) if bool(batch[3].any()) else out


BRANCH_CASES = {
    # microbatch 0 uses the branch, the last (3) is all masked: the branch's gradient,
    # kept from microbatch 0 for optimizer.step(), was dropped with the masked one's zeros
    "branch early, masked last": ([1, 1, 1, 0], 0, 4),
    # token counts 1e6, 1e6, 2 of 2,000,002: the 1e-6 tolerance took microbatch 1 for the
    # last and dropped microbatch 2's gradient, the branch's only one
    "branch in a tiny last": ([500_000, 500_000, 1], 2, 3),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("accumulation", [False, True])
@pytest.mark.parametrize("case", list(BRANCH_CASES))
def test_a_branch_of_one_microbatch_steps_as_in_the_ordinary_run(
    case: str, accumulation: bool, backend: str
) -> None:
    """Bit for bit without optimizer accumulation; with it (microbatch gradients differ,
    v approximate) the branch still steps once per batch."""
    weights, branch_at, microbatches = BRANCH_CASES[case]

    def run(release: bool) -> tuple[dict[str, Tensor], dict[str, int]]:
        generator = torch.Generator().manual_seed(3)
        samples = 2 * microbatches * 4
        per_sample = torch.tensor(weights, dtype=torch.float32).repeat_interleave(2)
        flags = torch.zeros(2 * microbatches)
        flags[2 * branch_at : 2 * branch_at + 2] = 1
        data = torch.utils.data.TensorDataset(
            torch.randn(samples, 10, generator=generator),
            torch.randint(0, 4, (samples,), generator=generator),
            per_sample.repeat(4),
            flags.repeat(4),
        )
        loader = torch.utils.data.DataLoader(data, batch_size=2 * microbatches, shuffle=False)
        model = _Branchy()
        optimizer = _fit_counting(model, loader, release, accumulation, _tokens, True, backend)
        steps = {n: int(optimizer.state[p]["step"]) for n, p in model.named_parameters()}
        return {n: p.detach().clone() for n, p in model.named_parameters()}, steps

    (ordinary, ordinary_steps), (released, steps) = run(False), run(True)
    assert steps == ordinary_steps == dict.fromkeys(ordinary, 4)
    if not accumulation:
        assert all(torch.equal(released[n], ordinary[n]) for n in ordinary)


class _AuxiliaryBackward(Algorithm):
    """An auxiliary loss backpropagated by an Algorithm inside each microbatch (Composer
    runs Algorithms before callbacks at every event)."""

    def __init__(self, event: Event) -> None:
        self.event = event

    def match(self, event: Event, state: State) -> bool:
        return event == self.event

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        (0.1 * state.model(state.batch).square().mean()).backward()


@pytest.mark.parametrize("accumulation", [False, True])
@pytest.mark.parametrize("event", [Event.AFTER_FORWARD, Event.BEFORE_BACKWARD])
def test_an_algorithms_backward_before_the_trainers_accumulates_as_without_release(
    event: Event, accumulation: bool
) -> None:
    """Release was live from the stepping microbatch's forward: such a backward stepped
    the parameters, and the Trainer's own backward then failed (in-place modification).
    Release now starts at BEFORE_BACKWARD's callbacks, after the Algorithms."""
    runs = []
    for release in (False, True):
        trainer, _ = train(
            lambda p, release=release: composer_adam.DecoupledAdamW(
                p, lr=LR, gradient_release=release
            ),
            max_duration="3ba",
            algorithms=[_AuxiliaryBackward(event)],
            callbacks=[composer_adam.GradientRelease(optimizer_accumulation=accumulation)]
            if release
            else [],
        )
        runs.append(trainer)
    steps = {float(s["step"]) for s in runs[1].state.optimizers[0].state.values()}
    assert steps == {3.0}
    if not accumulation:
        assert_same_parameters(runs[1].state.model, runs[0].state.model, atol=0)


@pytest.mark.bad_input
@pytest.mark.parametrize("accumulation", [False, True])
def test_an_algorithms_backward_after_the_trainers_is_refused_before_a_second_step(
    accumulation: bool,
) -> None:
    """At AFTER_BACKWARD the Algorithm runs before this callback pauses release: every
    parameter it reached was stepped (or folded) a second time, with only core's warning
    about two steps (6 steps in 3 batches, 2e-2 off)."""
    trainer = _trainer(
        callbacks=[composer_adam.GradientRelease(optimizer_accumulation=accumulation)],
        algorithms=[_AuxiliaryBackward(Event.AFTER_BACKWARD)],
        device_train_microbatch_size=MICROBATCH,
    )
    optimizer = trainer.state.optimizers[0]
    with pytest.raises(RuntimeError, match=r"a second backward reached a released parameter"):
        trainer.fit()
    assert all(float(state["step"]) <= 1 for state in optimizer.state.values())


@pytest.mark.bad_input
def test_counts_whose_microbatches_pass_their_batch_are_refused_before_losing_one() -> None:
    """A batch counted 8 (distinct documents, say) whose microbatches count 8 and 8: the
    batch's count was reached at the first, so the second's gradient was dropped."""

    def distinct(batch: Any) -> int:
        return min(len(batch[0]), 2 * MICROBATCH)

    release = composer_adam.GradientRelease(get_num_samples_in_batch=distinct)
    trainer = _trainer(callbacks=[release], device_train_microbatch_size=2 * MICROBATCH)
    with pytest.raises(ValueError, match=r"and then a microbatch of 8\.0 more: the batch was"):
        trainer.fit()
