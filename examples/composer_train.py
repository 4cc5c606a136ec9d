"""Train a small character-level language model with composer.Trainer from a YAML recipe.

The recipe names the optimizer (an adamkit Composer optimizer, built by
composer_adam.build_optimizer), the scheduler, the model size and the callbacks; see
configs/composer/. Data is Python's own help text (pydoc_data.topics), so it runs
offline on CPU:

    python examples/composer_train.py configs/composer/char_lm_decoupled_adamw.yaml
"""

from __future__ import annotations

import argparse
import math
import pydoc_data.topics
from typing import Any

import torch
from composer import Trainer
from composer.callbacks import OptimizerMonitor
from composer.loggers import InMemoryLogger
from composer.models import ComposerModel
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import composer_adam
from composer_adam.recipes import build_optimizer, build_scheduler, load_recipe


class CharDataset(Dataset):
    """Windows of `context + 1` characters of the help text, as (input, next-char target)."""

    def __init__(self, context: int) -> None:
        text = "".join(pydoc_data.topics.topics.values())
        self.alphabet = sorted(set(text))
        index = {c: i for i, c in enumerate(self.alphabet)}
        self.tokens = torch.tensor([index[c] for c in text], dtype=torch.long)
        self.context = context

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.context

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        window = self.tokens[i * self.context : (i + 1) * self.context + 1]
        return window[:-1], window[1:]


class CharTransformer(ComposerModel):
    """A causal Transformer over characters; names follow llm-foundry's (`head.*`)."""

    def __init__(self, vocab: int, context: int, d_model: int, n_heads: int, n_layers: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(context, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, _ = batch
        positions = torch.arange(x.shape[1], device=x.device)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        h = self.blocks(self.embedding(x) + self.position(positions), mask=mask, is_causal=True)
        return self.head(self.norm(h))

    def loss(self, outputs: Tensor, batch: tuple[Tensor, Tensor], *args: Any, **kwargs: Any):
        _, y = batch
        return nn.functional.cross_entropy(outputs.flatten(0, 1), y.flatten())


def build_callbacks(config: dict[str, Any]) -> list[Any]:
    """The recipe's `callbacks:` section: optimizer_monitor and gradient_release."""
    known = {"optimizer_monitor": OptimizerMonitor}
    if hasattr(composer_adam, "GradientRelease"):
        known["gradient_release"] = composer_adam.GradientRelease
    callbacks = []
    for name, kwargs in (config or {}).items():
        if name not in known:
            raise ValueError(f"Invalid callback name: {name!r}. Allowed: {', '.join(known)}.")
        callbacks.append(known[name](**(kwargs or {})))
    return callbacks


def train(recipe_path: str, max_duration: str | None = None) -> dict[str, float]:
    """Train from the recipe; return the first and last training loss."""
    recipe = load_recipe(recipe_path)
    torch.manual_seed(recipe.get("seed", 17))
    data = CharDataset(recipe["model"]["context"])
    model = CharTransformer(len(data.alphabet), **recipe["model"])
    generator = torch.Generator().manual_seed(recipe.get("seed", 17))
    loader = DataLoader(
        data,
        batch_size=recipe["data"]["batch_size"],
        shuffle=True,
        drop_last=True,
        generator=generator,
    )
    logger = InMemoryLogger()
    trainer_options = dict(recipe.get("trainer", {}))
    if max_duration is not None:
        trainer_options["max_duration"] = max_duration
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        optimizers=build_optimizer(recipe, model),
        schedulers=build_scheduler(recipe),
        callbacks=build_callbacks(recipe.get("callbacks")),
        loggers=[logger],
        device="cpu",
        seed=recipe.get("seed", 17),
        progress_bar=False,
        log_to_console=False,
        **trainer_options,
    )
    trainer.fit()
    losses = [float(value) for _, value in logger.data["loss/train/total"]]
    return {"first_loss": losses[0], "last_loss": losses[-1], "batches": len(losses)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a YAML recipe, e.g. configs/composer/*.yaml")
    parser.add_argument("--max-duration", help="override trainer.max_duration, e.g. 50ba")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = train(args.recipe, args.max_duration)
    print(
        f"{result['batches']} batches: loss {result['first_loss']:.3f} -> "
        f"{result['last_loss']:.3f} (uniform guess {math.log(103):.3f})"
    )


if __name__ == "__main__":
    main()
