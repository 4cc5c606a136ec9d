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

from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_adam

VOCAB = 256
"""Byte-level tokens: no vocabulary to build or ship."""


def _windows(data: torch.Tensor, context: int) -> TensorDataset:
    """Non-overlapping windows of `context` bytes and, at each position, the byte after it."""
    count = (len(data) - 1) // context
    inputs = data[: count * context].view(count, context)
    targets = data[1 : count * context + 1].view(count, context)
    return TensorDataset(inputs, targets)


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
        from pydoc_data.topics import topics

        text = "\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
        data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        split = int(len(data) * (1 - self.val_fraction))
        self.train_set = _windows(data[:split], self.context)
        self.val_set = _windows(data[split:], self.context)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class CharTransformer(L.LightningModule):
    """A small causal transformer over bytes; its optimizer comes from the CLI's --optimizer.

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
        self.save_hyperparameters()
        self.tokens = nn.Embedding(VOCAB, d_model)
        self.positions = nn.Embedding(context, d_model)
        block = nn.TransformerEncoderLayer(
            d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        hidden = self.tokens(tokens) + self.positions(torch.arange(length, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(
            length, device=tokens.device, dtype=hidden.dtype
        )
        return self.head(self.norm(self.blocks(hidden, mask=mask, is_causal=True)))

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens, targets = batch
        logits = self(tokens).float()  # the loss in fp32 even when the model is bf16
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

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


def main(args: list[str] | None = None) -> None:
    AdamKitCLI(
        CharTransformer,
        TopicsText,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
