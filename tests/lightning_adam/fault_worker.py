"""Worker for test_faults.py: a small Lightning run with a core optimizer and a schedule,
checkpointing every epoch, optionally resumed from the last checkpoint.

Usage: python fault_worker.py OUT_DIR OPTIMIZER BACKEND [resume]
(BACKEND: default, fused, foreach or loop, as in tests/core/configuration_cases.py)
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import core
from tests.core.configuration_cases import BACKENDS

EPOCHS, SAMPLES, BATCH = 4, 256, 8
OPTIMIZERS = {
    "AdamW": lambda p, **kw: core.AdamW(p, lr=3e-3, **kw),
    "RAdam": lambda p, **kw: core.RAdam(p, lr=3e-3, weight_decay=1e-2, decouple_lr=True, **kw),
    "NAdam": lambda p, **kw: core.NAdam(p, lr=3e-3, **kw),
    "ADOPT": lambda p, **kw: core.ADOPT(p, lr=3e-3, **kw),
}


class Regression(L.LightningModule):
    def __init__(self, optimizer: str, backend: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        self.optimizer_name, self.backend = optimizer, backend

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> dict:
        optimizer = OPTIMIZERS[self.optimizer_name](self.parameters(), **BACKENDS[self.backend])
        steps = EPOCHS * SAMPLES // BATCH
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class ReportSteps(Callback):
    """Tells the parent how far training got, so it can kill the run mid-epoch."""

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        print(f"step {trainer.global_step}", flush=True)


def main(out_dir: str, optimizer: str, backend: str, resume: str = "") -> None:
    out = Path(out_dir)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 8, generator=generator)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.1 * torch.randn(SAMPLES, 1, generator=generator)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)
    module = Regression(optimizer, backend)
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=-1),
            ReportSteps(),
        ],
    )
    ckpt_path = str(out / "checkpoints" / "last.ckpt") if resume else None
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    torch.save(module.state_dict(), out / "final.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
