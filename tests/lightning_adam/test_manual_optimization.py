"""Manual optimization (automatic_optimization=False), as GAN, RL and custom-loop users
write it with what `self.optimizers()` returns (a LightningOptimizer wrapping the core
optimizer), checked against the same loop without Lightning."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import core
import lightning_adam
from tests.core.configuration_cases import BACKENDS

_generator = torch.Generator().manual_seed(0)
X, Y = torch.randn(64, 8, generator=_generator), torch.randn(64, 4, generator=_generator)
BATCH = 8  # 8 batches per epoch


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _trainer(**overrides: Any) -> L.Trainer:
    settings: dict[str, Any] = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return L.Trainer(**{**settings, **overrides})


def _fit(module: L.LightningModule, **overrides: Any) -> tuple[L.Trainer, list[str]]:
    """Fit one epoch; the messages of the warnings core raised about release or accumulation."""
    trainer = _trainer(**overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(TensorDataset(X, Y), batch_size=BATCH))
    ours = [str(w.message) for w in caught if "optimizer_accumulation" in str(w.message)]
    return trainer, ours + [str(w.message) for w in caught if "release" in str(w.message)]


class Accumulating(L.LightningModule):
    """Windows of two micro-batches, folded by core's optimizer accumulation, the flag set
    on what self.optimizers() returns (before, it stayed on the wrapper: every micro-batch
    was a full step, silently)."""

    def __init__(self, backend: str, release: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = _net()
        self.backend, self.release = backend, release

    def on_fit_start(self) -> None:
        if self.release:  # by hand, with the optimizer in hand, as the callback's refusal says
            core.prepare_for_gradient_release(self, self.optimizers())

    def on_fit_end(self) -> None:
        core.remove_gradient_release(self)

    def training_step(self, batch: list[torch.Tensor], index: int) -> None:
        opt = self.optimizers()
        opt.optimizer_accumulation = index % 2 == 0
        self.manual_backward(nn.functional.mse_loss(self.net(batch[0]), batch[1]) / 2)
        opt.step()
        opt.optimizer_accumulation = False
        opt.zero_grad()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        flags = BACKENDS[self.backend]
        return core.AdamW(self.net.parameters(), lr=1e-2, gradient_release=self.release, **flags)


def _accumulated_without_lightning(backend: str) -> list[torch.Tensor]:
    net = _net()
    optimizer = core.AdamW(net.parameters(), lr=1e-2, **BACKENDS[backend])
    for index, (x, y) in enumerate(zip(X.split(BATCH), Y.split(BATCH), strict=True)):
        optimizer.optimizer_accumulation = index % 2 == 0
        (nn.functional.mse_loss(net(x), y) / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach() for p in net.parameters()]


@pytest.mark.parametrize("release", [False, True], ids=["ordinary", "release"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_optimizer_accumulation_set_through_self_optimizers(backend: str, release: bool) -> None:
    module = Accumulating(backend, release)
    trainer, messages = _fit(module)
    assert messages == []  # release through the wrapper warned that it had no hooks
    steps = {float(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert steps == {4.0}  # 8 micro-batches, windows of 2
    if release:
        assert all(p.grad is None for p in module.parameters())
    expected = _accumulated_without_lightning(backend)
    for param, reference in zip(module.parameters(), expected, strict=True):
        assert torch.equal(param.detach(), reference)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_optimizer_accumulation_set_through_fabrics_wrapper(backend: str) -> None:
    """Fabric's setup() wraps the optimizer the same way (a _FabricOptimizer posing as its
    class): the flag set on it reaches the optimizer Fabric steps."""
    fabric = L.Fabric(accelerator="cpu", devices=1)
    net = _net()
    model, optimizer = fabric.setup(net, core.AdamW(net.parameters(), lr=1e-2, **BACKENDS[backend]))
    for index, (x, y) in enumerate(zip(X.split(BATCH), Y.split(BATCH), strict=True)):
        optimizer.optimizer_accumulation = index % 2 == 0
        fabric.backward(nn.functional.mse_loss(model(x), y) / 2)
        optimizer.step()
        optimizer.zero_grad()
    assert {float(s["step"]) for s in optimizer.optimizer.state.values()} == {4.0}
    expected = _accumulated_without_lightning(backend)
    for param, reference in zip(net.parameters(), expected, strict=True):
        assert torch.equal(param.detach(), reference)


def test_release_prepared_through_fabrics_module_is_found_through_the_users_module() -> None:
    """fabric.setup() hands back a wrapper of the user's module: removing release through
    the user's module did nothing (silently), preparing again through it was refused as
    foreign hooks, and dropping the wrapper dropped the clipping guard (clip_gradients then
    clipped nothing)."""
    fabric = L.Fabric(accelerator="cpu", devices=1)
    net = _net()
    wrapped, optimizer = fabric.setup(
        net, core.AdamW(net.parameters(), lr=1e-2, gradient_release=True)
    )
    x, y = X[:BATCH], Y[:BATCH]
    core.prepare_for_gradient_release(wrapped, optimizer)
    core.prepare_for_gradient_release(net, optimizer)  # replaces it: one hook per parameter
    assert [len(p._post_accumulate_grad_hooks) for p in net.parameters()] == [1] * 4
    del wrapped
    fabric.backward(nn.functional.mse_loss(net(x), y))
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(RuntimeError, match="under gradient release"):
        fabric.clip_gradients(net, optimizer, max_norm=1.0)
    core.remove_gradient_release(net)
    assert not core.is_gradient_release_prepared(net)
    fabric.backward(nn.functional.mse_loss(net(x), y))
    assert all(p.grad is not None for p in net.parameters())  # ordinary training again


@pytest.mark.bad_input
def test_release_under_fabrics_grad_scaler_is_refused_when_prepared() -> None:
    """16-mixed (a GradScaler) was accepted: backward then stepped every parameter from
    gradients scaled by 65536 (NaN and inf here), and only optimizer.step() refused it."""
    from lightning.fabric.plugins.precision import MixedPrecision

    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=MixedPrecision("16-mixed", "cpu"))
    net = _net()
    wrapped, optimizer = fabric.setup(
        net, core.AdamW(net.parameters(), lr=1e-2, gradient_release=True)
    )
    for model, opt in ((wrapped, optimizer), (net, optimizer), (wrapped, optimizer.optimizer)):
        with pytest.raises(RuntimeError, match=r"the loss is scaled by a GradScaler"):
            core.prepare_for_gradient_release(model, opt)
        assert not core.is_gradient_release_prepared(net)
    before = [p.detach().clone() for p in net.parameters()]
    fabric.backward(nn.functional.mse_loss(wrapped(X[:BATCH]), Y[:BATCH]))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


@pytest.mark.bad_input
def test_a_wrapped_torch_optimizer_is_named_by_its_own_class() -> None:
    """Fabric's wrapper of torch.optim.AdamW was named 'FabricAdamW', read as adamkit's."""
    fabric = L.Fabric(accelerator="cpu", devices=1)
    net = _net()
    wrapped, optimizer = fabric.setup(net, torch.optim.AdamW(net.parameters()))
    with pytest.raises(TypeError, match=r"Invalid optimizer: torch\.optim\.adamw\.AdamW\."):
        core.prepare_for_gradient_release(wrapped, optimizer)


class Gan(L.LightningModule):
    """Two optimizers stepped in turn with toggle_optimizer, each with the helper's cosine
    schedule (total_steps given: Lightning cannot count manual steps) stepped by hand."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator, self.critic = _net(), nn.Linear(4, 1)
        self.backend = backend

    def training_step(self, batch: list[torch.Tensor], index: int) -> None:
        for opt, scheduler, loss in zip(
            self.optimizers(), self.lr_schedulers(), _gan_losses(self, batch), strict=True
        ):
            self.toggle_optimizer(opt)
            opt.zero_grad()
            self.manual_backward(loss())
            opt.step()
            scheduler.step()
            self.untoggle_optimizer(opt)

    def configure_optimizers(self) -> tuple[list[Any], list[Any]]:
        schedule = {"kind": "cosine", "warmup_steps": 2, "total_steps": 8, "min_lr_ratio": 0.1}
        configs = [
            lightning_adam.configure_optimizers(
                part, "AdamW", lr=1e-2, scheduler=schedule, **BACKENDS[self.backend]
            )
            for part in (self.generator, self.critic)
        ]
        return [c["optimizer"] for c in configs], [c["lr_scheduler"] for c in configs]


def _gan_losses(module: Any, batch: list[torch.Tensor]) -> list[Any]:
    x, y = batch
    return [
        lambda: (
            nn.functional.mse_loss(module.generator(x), y)
            - module.critic(module.generator(x)).mean()
        ),
        lambda: module.critic(module.generator(x).detach()).mean() - module.critic(y).mean(),
    ]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_two_optimizers_with_hand_stepped_schedules_equal_the_plain_loop(backend: str) -> None:
    module = Gan(backend)
    trainer, _ = _fit(module)
    assert trainer.global_step == 16  # Lightning counts both optimizers' steps
    reference = Gan(backend)
    (optimizers, schedulers) = reference.configure_optimizers()
    schedulers = [config["scheduler"] for config in schedulers]
    for batch in zip(X.split(BATCH), Y.split(BATCH), strict=True):
        for frozen, opt, scheduler, loss in zip(
            (reference.critic, reference.generator),
            optimizers,
            schedulers,
            _gan_losses(reference, list(batch)),
            strict=True,
        ):
            frozen.requires_grad_(False)  # what toggle_optimizer does
            opt.zero_grad()
            loss().backward()
            opt.step()
            scheduler.step()
            frozen.requires_grad_(True)
    for param, expected in zip(module.parameters(), reference.parameters(), strict=True):
        assert torch.equal(param.detach(), expected.detach())
    for opt in trainer.optimizers:  # the cosine reached its floor after its 8 steps
        assert [group["lr"] for group in opt.param_groups] == pytest.approx([1e-3] * 2)


class HelperSchedule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = _net()

    def training_step(self, batch: list[torch.Tensor], index: int) -> None:
        raise AssertionError("refused before training")

    def configure_optimizers(self) -> dict[str, Any]:
        return lightning_adam.configure_optimizers(self, "AdamW", lr=1e-2, scheduler="cosine")


@pytest.mark.bad_input
def test_a_schedule_length_left_to_the_trainer_is_refused_under_manual_optimization() -> None:
    """The trainer counted one step per batch: a GAN (two steps a batch) or a hand-made
    accumulation (one per two) ended halfway down its cosine, silently."""
    with pytest.raises(
        ValueError,
        match=r"Invalid scheduler total_steps: None\. Allowed: an int under manual "
        r"optimization \(automatic_optimization=False\)",
    ):
        _fit(HelperSchedule())


class Monitored(L.LightningModule):
    """Two optimizer steps per batch (an RL-style inner loop), each zeroing its gradients
    after stepping; records what the monitor must log for each batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = _net()
        self.expected: dict[int, dict[str, float]] = {}

    def training_step(self, batch: list[torch.Tensor], index: int) -> None:
        opt = self.optimizers()
        self.log("batch", float(index))
        for _ in range(2):
            before = [p.detach().clone() for p in self.net.parameters()]
            self.manual_backward(nn.functional.mse_loss(self.net(batch[0]), batch[1]))
            grads = [p.grad.clone() for p in self.net.parameters()]
            opt.step()
            opt.zero_grad()
        params = list(self.net.parameters())
        state = opt.optimizer.state
        self.expected[index] = {
            "grad": _global([g.norm() for g in grads]),
            "moment": _global([state[p]["exp_avg"].norm() for p in params]),
            "param": _global([p.detach().norm() for p in params]),
            "update": _global(
                [(p.detach() - b).norm() for p, b in zip(params, before, strict=True)]
            ),
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return core.Adam(self.net.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)


def _global(norms: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(n) ** 2 for n in norms))


def test_monitor_logs_each_batchs_last_step_on_lightnings_axis(tmp_path: Path) -> None:
    """Under manual optimization with two steps per batch, an even every_n_steps logged
    nothing (global_step was even at every batch start); with steps then zero_grad no
    gradient norm was logged; and rows went to optimizer-step indices, not the batch's."""
    module = Monitored()
    monitor = lightning_adam.OptimizerMonitor(every_n_steps=2, per_parameter=False)
    logger = CSVLogger(tmp_path, name="run")
    _fit(module, callbacks=[monitor], logger=logger, log_every_n_steps=1, precision="64-true")
    (metrics,) = tmp_path.glob("**/metrics.csv")
    with metrics.open() as handle:
        rows = list(csv.DictReader(handle))
    batch_at = {int(row["step"]): int(float(row["batch"])) for row in rows if row.get("batch")}
    logged = [row for row in rows if row.get("l2_norm/update/global")]
    assert [int(row["step"]) for row in logged] == [1, 3, 5, 7]
    for row in logged:
        batch = batch_at[int(row["step"])]  # the batch Lightning logged at the same step
        for kind, value in module.expected[batch].items():
            assert float(row[f"l2_norm/{kind}/global"]) == pytest.approx(value, rel=1e-9)
