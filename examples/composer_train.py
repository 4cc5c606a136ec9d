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
import os
import sys
from pathlib import Path
from typing import Any

import torch
from composer import Trainer
from composer.callbacks import OptimizerMonitor
from composer.core import Time, TimeUnit
from composer.loggers import InMemoryLogger
from composer.models import ComposerModel
from torch import Tensor
from torch.utils.data import DataLoader

import composer_adam
from composer_adam import build_optimizer, build_scheduler, load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))  # char_lm.py sits beside this file
from char_lm import VOCAB, CharTransformer, next_token_loss, train_val_split


class CharLanguageModel(ComposerModel):
    """The byte-level transformer of char_lm.py as a ComposerModel (parameters `net.*`)."""

    def __init__(self, context: int, d_model: int, n_heads: int, n_layers: int) -> None:
        super().__init__()
        self.net = CharTransformer(VOCAB, context, d_model, n_heads, n_layers)

    def forward(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        return self.net(batch[0])

    def loss(self, outputs: Tensor, batch: tuple[Tensor, Tensor], *args: Any, **kwargs: Any):
        return next_token_loss(outputs, batch[1])


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


class NotATrainingRecipe(ValueError):
    """A YAML file without the sections this example trains from."""


MODEL_KEYS = ("context", "d_model", "n_heads", "n_layers")


def check_training_recipe(recipe: dict[str, Any], recipe_path: str) -> None:
    """Refuse a file lacking model or data settings before anything is built: it used to
    stop with a bare KeyError 'model'. The likely one is llmfoundry_optimizer.yaml, which
    holds only the optimizer and scheduler sections to paste into an llm-foundry YAML."""
    missing = [name for name in ("model", "data") if not isinstance(recipe.get(name), dict)]
    if not missing:
        missing = [f"model.{key}" for key in MODEL_KEYS if key not in recipe["model"]]
        missing += [] if "batch_size" in recipe["data"] else ["data.batch_size"]
    if missing:
        raise NotATrainingRecipe(
            f"Invalid recipe {recipe_path}: no {' or '.join(missing)}, which this example "
            f"trains from. Allowed: a training recipe with model ({', '.join(MODEL_KEYS)}) "
            "and data (batch_size) sections, such as "
            "configs/composer/char_lm_decoupled_adamw.yaml. A file with only optimizer and "
            "scheduler sections, such as configs/composer/llmfoundry_optimizer.yaml, is an "
            "llm-foundry snippet to paste into an llm-foundry training YAML, not a recipe "
            "to train here."
        )


def train(recipe_path: str, max_duration: str | None = None) -> dict[str, float]:
    """Train from the recipe; return the first and last training loss."""
    recipe = load_recipe(recipe_path)
    check_training_recipe(recipe, recipe_path)
    torch.manual_seed(recipe.get("seed", 17))
    data, _ = train_val_split(recipe["model"]["context"], val_fraction=0.05)
    model = CharLanguageModel(**recipe["model"])
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


TRAINING_UNITS = {TimeUnit.EPOCH: "ep", TimeUnit.BATCH: "ba"}
"""What this example trains for: the recipes' warmups are in batches (Composer refuses a
samples duration beside them), and its batches are tuples, in which Composer counts no
tokens (a tokens duration never ended)."""


def refuse_bad_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse by flag, before anything is built, a recipe path that is no file and a
    duration Composer would misread or refuse deep inside the Trainer ('3' is 30 seconds
    of wall clock to Composer's parser, which the Trainer then refuses as a unit)."""
    if not os.path.exists(args.recipe) or os.path.isdir(args.recipe):  # a pipe is fine
        parser.error(f"argument recipe: {args.recipe!r} is not a file (a YAML recipe)")
    if args.max_duration is None:
        return
    allowed = f"a positive whole number of {' or '.join(TRAINING_UNITS.values())}, e.g. 50ba"
    try:
        duration = Time.from_timestring(args.max_duration)
    except (ValueError, TypeError):
        duration = None
    if duration is None or duration.unit not in TRAINING_UNITS or duration.value <= 0:
        parser.error(f"argument --max-duration: invalid value {args.max_duration!r}; {allowed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a YAML recipe, e.g. configs/composer/*.yaml")
    parser.add_argument("--max-duration", help="override trainer.max_duration, e.g. 50ba")
    args = parser.parse_args()
    refuse_bad_arguments(parser, args)
    torch.set_num_threads(1)
    try:
        result = train(args.recipe, args.max_duration)
    except NotATrainingRecipe as error:
        parser.error(str(error))
    print(
        f"{result['batches']} batches: loss {result['first_loss']:.3f} -> "
        f"{result['last_loss']:.3f} (uniform guess {math.log(VOCAB):.3f})"
    )


if __name__ == "__main__":
    main()
