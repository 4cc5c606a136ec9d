"""A small real Composer training run on CPU, shared by the Composer tests."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from composer import Trainer
from composer.callbacks import OptimizerMonitor
from composer.core import Callback, State
from composer.loggers import InMemoryLogger, Logger
from composer.models import ComposerClassifier
from composer.optim import CosineAnnealingWithWarmupScheduler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MetricCollection

from tests.core.configuration_cases import BACKENDS

BATCH = 16
MICROBATCH = 4
LR = 1e-2
STEPS = 60
EXPLICIT_BACKENDS = [name for name in BACKENDS if name != "default"]


def with_backends(cases: Sequence[Any]) -> list[Any]:
    """pytest params (case, backend): every case with default flags, as users build it,
    and with one explicit backend of BACKENDS dealt in turn, so every backend runs in the
    test for one Trainer run more per case instead of three (fewer cases than explicit
    backends take several each)."""
    import pytest  # here, not at the top: the training workers import this module

    explicit = [
        (cases[i % len(cases)], EXPLICIT_BACKENDS[i % len(EXPLICIT_BACKENDS)])
        for i in range(max(len(cases), len(EXPLICIT_BACKENDS)))
    ]
    pairs = [(case, "default") for case in cases] + explicit
    pairs.sort(key=lambda pair: cases.index(pair[0]))  # stable: default first per case
    return [
        pytest.param(case, backend, id=f"{getattr(case, '__name__', case)}-{backend}")
        for case, backend in pairs
    ]


def make_model(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    hidden: int = 32,
    train_accuracy: bool = True,
) -> ComposerClassifier:
    """ComposerClassifier's default model; without train_accuracy it has no training
    metric, which on 2 ranks the Trainer would gather after every batch (two all_gathers:
    a quarter of a distributed cell's time, and nothing the optimizer sees)."""
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(10, hidden), nn.Tanh(), nn.Linear(hidden, 4)).to(dtype)
    metrics = {} if train_accuracy else {"train_metrics": MetricCollection([])}
    return ComposerClassifier(module, num_classes=4, **metrics)


def make_loader(steps: int = STEPS, dtype: torch.dtype = torch.float32) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(steps * BATCH, 10, generator=generator)
    teacher = torch.randn(10, 4, generator=generator)
    y = (x @ teacher + 0.5 * torch.randn(steps * BATCH, 4, generator=generator)).argmax(1)
    return DataLoader(TensorDataset(x.to(dtype), y), batch_size=BATCH, shuffle=False)


def train(
    make_optimizer: Callable[[Any], torch.optim.Optimizer],
    *,
    model: nn.Module | None = None,
    max_duration: str = f"{STEPS}ba",
    callbacks: list[Callback] | None = None,
    dtype: torch.dtype = torch.float32,
    optimizer_metrics: bool = True,
    **trainer_kwargs: Any,
) -> tuple[Trainer, InMemoryLogger]:
    """Train with a warmup-cosine schedule and microbatching (the model and data in
    dtype, OptimizerMonitor's log_optimizer_metrics as optimizer_metrics); return the
    trainer and log."""
    model = model if model is not None else make_model(dtype=dtype)
    logger = InMemoryLogger()
    monitor = OptimizerMonitor(batch_log_interval=1, log_optimizer_metrics=optimizer_metrics)
    trainer = Trainer(
        model=model,
        train_dataloader=make_loader(dtype=dtype),
        optimizers=make_optimizer(model.parameters()),
        schedulers=CosineAnnealingWithWarmupScheduler(
            t_warmup="10ba", t_max=f"{STEPS}ba", alpha_f=0.1
        ),
        max_duration=max_duration,
        device="cpu",
        device_train_microbatch_size=MICROBATCH,
        loggers=[logger],
        callbacks=[monitor, *(callbacks or [])],
        progress_bar=False,
        log_to_console=False,
        seed=17,
        **trainer_kwargs,
    )
    trainer.fit()
    return trainer, logger


class GradientsAfterBackward(Callback):
    """Records whether any gradient survived each microbatch's backward."""

    def __init__(self) -> None:
        self.kept: list[bool] = []

    def after_backward(self, state: State, logger: Logger) -> None:
        self.kept.append(any(p.grad is not None for p in state.model.parameters()))


def logged(logger: InMemoryLogger, prefix: str) -> dict[str, list[float]]:
    """Every logged series whose key starts with prefix, as lists of floats."""
    return {
        key: [float(value) for _, value in series]
        for key, series in logger.data.items()
        if key.startswith(prefix)
    }


class ReferenceUpdateNorms(Callback):
    """Logs `reference/update/<name>`: ||θ_new − θ_old|| = ||decay·θ_new + a|| / (1 − decay)
    with a = lr/bc1 · m/d, from θ_new = (1 − decay)·θ_old − a, a Composer
    DecoupledAdamW's state, the group's hyperparameters and AMSGrad's maximum, written
    from the update rule independently of core (Composer's own metric takes the decay
    term with the wrong sign, and at the new θ without the division)."""

    def batch_end(self, state: State, logger: Logger) -> None:
        optimizer = state.optimizers[0]
        values = {}
        for group in optimizer.param_groups:
            beta1, beta2 = group["betas"]
            names = {p: n for n, p in state.model.named_parameters()}
            for p in group["params"]:
                s = optimizer.state[p]
                step = float(s["step"])
                v = s["max_exp_avg_sq"] if group["amsgrad"] else s["exp_avg_sq"]
                denom = v.sqrt() / math.sqrt(1 - beta2**step) + group["eps"]
                adam_step = group["lr"] / (1 - beta1**step) * s["exp_avg"] / denom
                decay = group["weight_decay"] * group["lr"] / group["initial_lr"]
                change = (adam_step + decay * p) / (1 - decay)
                values[f"reference/update/{names[p]}"] = float(change.norm())
        logger.log_metrics(values)


def assert_same_parameters(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
