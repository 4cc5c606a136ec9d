"""precision="bf16-true": parameters are bf16 when the optimizer is built, so Kahan turns on."""

from __future__ import annotations

import functools
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import core
import lightning_adam
from tests.core.configuration_cases import BACKENDS
from tests.lightning_adam.models import assert_backend, make_trainer

STEPS = 400


class Teacher(L.LightningModule):
    """The pure-bf16 regression from tests/core: an MLP fits a random MLP, full batch."""

    def __init__(self, optimizer: str, **flags: Any) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
        self.optimizer, self.flags = optimizer, flags

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x).float(), y.float())

    def configure_optimizers(self) -> dict[str, Any]:
        return lightning_adam.configure_optimizers(
            self,
            self.optimizer,
            lr=3e-4,
            betas=(0.9, 0.99),  # the same hyperparameters for core and torch
            eps=1e-8,
            weight_decay=0.0,
            no_weight_decay=False,
            **self.flags,
        )


def _teacher_data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
    x = torch.randn(512, 16)
    with torch.no_grad():
        return x, teacher(x)


def _final_fp32_loss(optimizer: str, precision: str, **flags: Any) -> tuple[float, L.Trainer]:
    x, y = _teacher_data()
    model = Teacher(optimizer, **flags)
    trainer = make_trainer(max_steps=STEPS, precision=precision)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=len(x)))
    with torch.no_grad():
        return nn.functional.mse_loss(model.net.float()(x), y).item(), trainer


@functools.cache
def _references() -> tuple[float, float]:
    """Final losses of torch AdamW in fp32 (the same hyperparameters: the same math) and
    in bf16-true, shared by every backend's case."""
    return (
        _final_fp32_loss("torch.optim.AdamW", "32-true")[0],
        _final_fp32_loss("torch.optim.AdamW", "bf16-true")[0],
    )


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_bf16_true_with_core_adamw_lands_near_fp32_where_torch_adamw_does_not(
    backend: str,
) -> None:
    fp32, torch_bf16 = _references()
    kahan, trainer = _final_fp32_loss("core.AdamW", "bf16-true", **BACKENDS[backend])
    (optimizer,) = trainer.optimizers
    assert_backend(optimizer, backend)
    states = list(optimizer.state.values())
    assert states and all(s["kahan_comp"].dtype == torch.bfloat16 for s in states)
    assert kahan < 1.1 * fp32, (fp32, kahan)
    assert torch_bf16 > 1.1 * fp32, (fp32, torch_bf16)


class _Overflowing(L.LightningModule):
    """A regression whose fourth batch's loss overflows (inf): fp16 training's routine
    event, which the GradScaler answers by skipping that step and lowering its scale."""

    OVERFLOWING_BATCH = 3

    def __init__(self, make_optimizer: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        self.make_optimizer = make_optimizer

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).float(), y)
        return loss * float("inf") if index == self.OVERFLOWING_BATCH else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.parameters())


_TORCH_HYPERPARAMETERS = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}


def _fit_16_mixed(make_optimizer: Any) -> tuple[torch.Tensor, L.Trainer]:
    """12 steps under Lightning's 16-mixed (its GradScaler) with norm clipping at 1."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(384, 8, generator=generator)
    y = x.sum(1, keepdim=True).sin()
    model = _Overflowing(make_optimizer)
    trainer = make_trainer(
        max_steps=12,
        plugins=[MixedPrecision("16-mixed", device="cpu")],
        gradient_clip_val=1.0,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32))
    return torch.cat([p.detach().flatten() for p in model.parameters()]), trainer


@functools.cache
def _torch_16_mixed() -> tuple[torch.Tensor, float]:
    """torch.optim.AdamW's parameters after the run, and the scaler's final scale."""
    params, trainer = _fit_16_mixed(lambda p: torch.optim.AdamW(p, **_TORCH_HYPERPARAMETERS))
    return params, trainer.precision_plugin.scaler.get_scale()


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_16_mixed_with_clipping_and_an_overflowed_step_is_torch_adamws_run(
    backend: str,
) -> None:
    """fp16 users (GPUs without bf16) train with precision="16-mixed" and usually clip:
    Lightning unscales the gradients, clips them and lets the scaler skip a step whose
    gradients overflowed. Every backend and the default take that run as torch.optim.AdamW
    does (to float32 rounding), the overflowed step skipped (NaN otherwise) and the scale
    lowered the same. torch's own fused AdamW cannot run it: it unscales inside its kernel,
    so Lightning refuses clipping with it; adamkit's fused backend leaves unscaling to the
    scaler."""
    expected, expected_scale = _torch_16_mixed()
    flags = BACKENDS[backend]
    params, trainer = _fit_16_mixed(lambda p: core.AdamW(p, **_TORCH_HYPERPARAMETERS, **flags))
    (optimizer,) = trainer.optimizers
    assert all(group.get(k) is v for group in optimizer.param_groups for k, v in flags.items())
    assert torch.isfinite(params).all()
    torch.testing.assert_close(params, expected, rtol=0, atol=1e-7)
    assert trainer.precision_plugin.scaler.get_scale() == expected_scale < 2.0**16
    assert all(float(state["step"]) == 11 for state in optimizer.state.values())
