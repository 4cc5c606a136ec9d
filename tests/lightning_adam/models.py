"""Small LightningModules, data and Trainer settings the adapter tests share."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_adam
from tests.core.configuration_cases import BACKENDS


def regression_data(count: int = 128, seed: int = 1) -> TensorDataset:
    """A noisy smooth teacher (6 -> 3) in float64, cast to float32."""
    generator = torch.Generator().manual_seed(seed)
    teacher = 0.4 * torch.randn(6, 3, generator=generator, dtype=torch.float64)
    x = torch.randn(count, 6, generator=generator, dtype=torch.float64)
    y = torch.sin(x @ teacher) + 0.1 * torch.randn(
        count, 3, generator=generator, dtype=torch.float64
    )
    return TensorDataset(x.float(), y.float())


def loader(dataset: TensorDataset, batch_size: int = 32) -> DataLoader:
    """Fixed order, so a resumed run sees exactly the batches an uninterrupted one does."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


class ResumableLoader(DataLoader):
    """A fixed-order loader Lightning can resume mid-epoch (its `_Stateful` protocol):
    it skips the batches a checkpoint's epoch already took, so a fit resumed from inside
    an epoch sees the batches the uninterrupted fit saw (a plain DataLoader starts the
    epoch again)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.taken = 0
        self.skip = 0

    def __iter__(self) -> Any:
        skip, self.skip = self.skip, 0
        for index, batch in enumerate(super().__iter__()):
            if index >= skip:
                self.taken = index + 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"taken": self.taken}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skip = state_dict["taken"]


class StopInsideWindow(L.Callback):
    """Saves a checkpoint after batch `batch` of epoch `epoch` and stops the fit there
    (inside an accumulation window when the batch is not a window's last), as a fit
    stopped by should_stop or max_time does."""

    def __init__(self, path: str | Path, epoch: int, batch: int) -> None:
        self.path, self.epoch, self.batch = path, epoch, batch

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        batch_index = args[-1]
        if (trainer.current_epoch, batch_index) == (self.epoch, self.batch):
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


class Regression(L.LightningModule):
    """An MLP with a LayerNorm whose optimizer is whatever configure_optimizers is given."""

    def __init__(
        self,
        optimizer: Any = "AdamW",
        scheduler: Any = None,
        width: int = 16,
        seed: int = 0,
        **hyperparameters: Any,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Linear(6, width), nn.LayerNorm(width), nn.Tanh(), nn.Linear(width, 3)
        )
        self.optimizer_spec, self.scheduler_spec = optimizer, scheduler
        self.hyperparameters = hyperparameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y.float())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        return lightning_adam.configure_optimizers(
            self, self.optimizer_spec, scheduler=self.scheduler_spec, **self.hyperparameters
        )


class Finetuned(Regression):
    """A backbone BackboneFinetuning freezes, then adds to the optimizer as a new group."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.backbone = self.net[:3]
        self.held_after_backward: list[list[str]] = []

    def on_after_backward(self) -> None:
        self.held_after_backward.append(
            [name for name, p in self.named_parameters() if p.grad is not None]
        )


def make_trainer(**overrides: Any) -> L.Trainer:
    """A quiet CPU Trainer: no logger, progress bar, summary or checkpoints unless asked."""
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }
    return L.Trainer(**{**settings, **overrides})


def assert_backend(optimizer: torch.optim.Optimizer, backend: str) -> None:
    """The Trainer's optimizer runs the backend the test chose: explicit flags reached every
    param group through configure_optimizers (default leaves them for adamkit to choose)."""
    chosen = BACKENDS[backend] or {"foreach": None, "fused": None}  # default: none given
    for group in optimizer.param_groups:
        for flag, value in chosen.items():
            assert group[flag] is value, (flag, group[flag])


def parameters_of(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def load_module(path: Path) -> ModuleType:
    """Import a script (examples/ is not a package) as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module
