"""LightningCLI example: a small character-level transformer on Python's own documentation.

The YAML files in configs/lightning/ drive it (later files and flags override earlier ones):

    python examples/lightning_cli.py fit --config configs/lightning/base.yaml \\
        --config configs/lightning/adopt.yaml
    python examples/lightning_cli.py fit --config configs/lightning/base.yaml \\
        --optimizer core.AdamW --optimizer.lr 3e-3 --optimizer.kahan_sum true
    python examples/lightning_cli.py fit --optimizer.help core.AdamW

The text is `pydoc_data.topics`, which ships with CPython, so it runs offline; bytes are
the tokens. `--optimizer` is LightningCLI's own optimizer argument, linked into the
model so that `lightning_adam.configure_optimizers` can add no-weight-decay groups and
an LR schedule around whichever optimizer is chosen.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

import lightning_adam

sys.path.insert(0, str(Path(__file__).resolve().parent))  # char_lm.py sits beside this file
from char_lm import VOCAB, CharTransformer, next_token_loss, topics_bytes, train_val_split


class TopicsText(L.LightningDataModule):
    """pydoc_data.topics as byte windows; the last `val_fraction` of the text validates.

    Args:
        context: Bytes per training window.
        batch_size: Windows per batch.
        val_fraction: Fraction of the text, from its end, held out for validation.
    """

    def __init__(self, context: int = 64, batch_size: int = 32, val_fraction: float = 0.05) -> None:
        super().__init__()
        self.context, self.batch_size, self.val_fraction = context, batch_size, val_fraction

    def setup(self, stage: str) -> None:
        self.train_set, self.val_set = train_val_split(self.context, self.val_fraction)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class CharLM(L.LightningModule):
    """The byte-level transformer of char_lm.py; its optimizer comes from the CLI's --optimizer.

    Args:
        optimizer: The optimizer as LightningCLI links it ({'class_path', 'init_args'});
            None means core.AdamW at lr 3e-3.
        scheduler: The LR schedule (fields of lightning_adam.LRSchedule); None: fixed lr.
        d_model: Width of the residual stream.
        n_layers: Transformer blocks.
        n_heads: Attention heads per block.
        context: Longest sequence the positional embedding covers.
    """

    def __init__(
        self,
        optimizer: dict[str, Any] | None = None,
        scheduler: lightning_adam.LRSchedule | None = None,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        context: int = 64,
    ) -> None:
        super().__init__()
        # Plain dicts in hparams, so checkpoints load with torch.load(weights_only=True).
        if scheduler is not None:
            scheduler = dataclasses.asdict(scheduler)  # type: ignore[assignment]
        self.save_hyperparameters()
        self.net = CharTransformer(VOCAB, context, d_model, n_heads, n_layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens, targets = batch
        return next_token_loss(self(tokens), targets)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.hparams.optimizer or {
            "class_path": "core.AdamW",
            "init_args": {"lr": 3e-3},
        }
        return lightning_adam.configure_optimizers(
            self, optimizer, scheduler=self.hparams.scheduler
        )


class AdamKitCLI(LightningCLI):
    """LightningCLI whose --optimizer goes to the model, not over its configure_optimizers."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        lightning_adam.link_optimizer(parser, to="model.optimizer")

    def before_instantiate_classes(self) -> None:
        """Refuse windows longer than the positional embedding before anything is built:
        they used to fail in the first forward with torch's bare `index out of range`.
        Not a link (data.context -> model.context): jsonargparse then drops the model's
        value that configs/lightning/base.yaml sets, and silently ignores any config's
        other value. A longer model.context is fine (positions it never uses). Also a
        data.val_fraction that leaves training or validation without one window (1.5 split
        the text like 0.5, 0 or 0.0001 validated on nothing, 1.0 or 0.9999 failed in
        torch's sampler)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        fraction, window = config.data.val_fraction, config.data.context + 1
        total = len(topics_bytes())
        held_out = total - int(total * (1 - fraction)) if 0 < fraction < 1 else 0
        if min(held_out, total - held_out) < window:  # a side without one window
            self.parser.error(
                f"Invalid data.val_fraction {fraction}: the share of the text held out for "
                f"validation; each side needs a window of data.context + 1 = {window} bytes "
                f"of the {total}. Allowed: a number from {_rounded(window / total, up=True)} "
                f"to {_rounded(1 - window / total, up=False)} (default 0.05)."
            )
        data, model = config.data.context, config.model.context
        if data > model:
            self.parser.error(
                f"Invalid data.context {data}: longer than model.context {model}, the "
                "sequence length the positional embedding covers. Allowed: data.context at "
                f"most model.context (set both, e.g. --data.context {data} --model.context "
                f"{data})."
            )


def _rounded(value: float, up: bool) -> str:
    """value to six decimals, rounded toward the inside of the range it bounds, so the
    number shown is itself allowed."""
    scaled = value * 1e6
    return f"{(math.ceil(scaled) if up else math.floor(scaled)) / 1e6:.6f}"


def main(args: list[str] | None = None, cli_class: type[AdamKitCLI] = AdamKitCLI) -> None:
    """Run the CLI; `cli_class` lets a caller (examples/main_job.py) add to it."""
    cli_class(
        CharLM,
        TopicsText,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
