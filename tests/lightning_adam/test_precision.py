"""precision="bf16-true": parameters are bf16 when the optimizer is built, so Kahan turns on."""

from __future__ import annotations

import functools
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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
