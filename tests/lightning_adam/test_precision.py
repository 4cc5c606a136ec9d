"""precision="bf16-true": parameters are bf16 when the optimizer is built, so Kahan turns on."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_adam
from tests.lightning_adam.models import make_trainer

STEPS = 400


class Teacher(L.LightningModule):
    """The pure-bf16 regression from tests/core: an MLP fits a random MLP, full batch."""

    def __init__(self, optimizer: str) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
        self.optimizer = optimizer

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
        )


def _teacher_data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
    x = torch.randn(512, 16)
    with torch.no_grad():
        return x, teacher(x)


def _final_fp32_loss(optimizer: str, precision: str) -> tuple[float, L.Trainer]:
    x, y = _teacher_data()
    model = Teacher(optimizer)
    trainer = make_trainer(max_steps=STEPS, precision=precision)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=len(x)))
    with torch.no_grad():
        return nn.functional.mse_loss(model.net.float()(x), y).item(), trainer


def test_bf16_true_with_core_adamw_lands_near_fp32_where_torch_adamw_does_not() -> None:
    fp32, _ = _final_fp32_loss("core.AdamW", "32-true")
    kahan, trainer = _final_fp32_loss("core.AdamW", "bf16-true")
    torch_bf16, _ = _final_fp32_loss("torch.optim.AdamW", "bf16-true")
    (optimizer,) = trainer.optimizers
    states = list(optimizer.state.values())
    assert states and all(s["kahan_comp"].dtype == torch.bfloat16 for s in states)
    assert kahan < 1.1 * fp32, (fp32, kahan)
    assert torch_bf16 > 1.1 * fp32, (fp32, torch_bf16)
