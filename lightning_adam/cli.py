"""LightningCLI wiring: `--optimizer` handed to the model as a plain dict.

LightningCLI's automatic `--optimizer` replaces the model's configure_optimizers with
`optimizer(model.parameters())`, which loses no-weight-decay groups and step-wise
schedules. Linking the argument into a model init argument instead keeps the same flags,
YAML and `--optimizer.help`, and lets the model call `lightning_adam.configure_optimizers`.
"""

from __future__ import annotations

from argparse import SUPPRESS
from typing import Any

from torch.optim import Optimizer


def link_optimizer(parser: Any, to: str = "model.optimizer", key: str = "optimizer") -> None:
    """Add `--<key>` (any torch Optimizer subclass by class path) and link it to `to`.

    Call it once, from `LightningCLI.add_arguments_to_parser`, and construct the CLI with
    `auto_configure_optimizers=False`. The model argument receives
    {'class_path': ..., 'init_args': {...}}: plain data, so it can be saved with
    save_hyperparameters and passed straight to `configure_optimizers`. Without an
    `--optimizer` the link is left out (its default is absent, not None), so the model
    argument keeps its own value: the model's default, or on `fit --ckpt_path` the
    checkpoint's. A None default made the link set None over the checkpoint's optimizer
    when Lightning re-parsed with its hyperparameters, so a resumed run trained on with
    the model's fallback optimizer, silently. An explicit `--optimizer null` (or
    `optimizer: null`) is still taken, and passes None: the model's fallback.
    """
    try:
        parser.add_subclass_arguments(
            (Optimizer,),
            key,
            instantiate=False,
            fail_untyped=False,
            skip={"params"},
            required=False,
        )
    except ValueError as error:  # jsonargparse: "Group with name optimizer already exists."
        if "already exists" not in str(error):
            raise
        raise ValueError(_group_exists(key)) from error
    parser.set_defaults({key: SUPPRESS})
    if hasattr(type(parser), "add_optimizer_args"):
        # LightningCLI(auto_configure_optimizers=True) adds its own '--optimizer' group after
        # add_arguments_to_parser, where jsonargparse's error says nothing of that setting.
        parser.add_optimizer_args = _AddOptimizerArgs(parser, key)
    parser.link_arguments(key, to, compute_fn=_plain_dict)


def _group_exists(key: str) -> str:
    return (
        f"Invalid link_optimizer key: {key!r} (the parser already has a group of that name). "
        f"Allowed: a group the parser does not have: link_optimizer adds the '--{key}' group "
        "itself, so construct the LightningCLI with auto_configure_optimizers=False and call "
        "link_optimizer once, from add_arguments_to_parser."
    )


class _AddOptimizerArgs:
    """The parser's add_optimizer_args once link_optimizer has added `key`: a second
    optimizer group is refused with what to change. Under another key LightningCLI's
    automatic '--optimizer' was added silently beside it, and its configure_optimizers
    replaced the model's, so the linked optimizer was never built. A class, not a
    closure, so the parser still pickles and deep-copies."""

    def __init__(self, parser: Any, key: str) -> None:
        self.parser, self.key = parser, key

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            "Invalid LightningCLI auto_configure_optimizers: True, beside link_optimizer "
            f"(its group '--{self.key}'). Allowed: False: LightningCLI would add an optimizer "
            "group of its own and replace the model's configure_optimizers, so the linked "
            "optimizer would never be built; construct the LightningCLI with "
            "auto_configure_optimizers=False."
        )


def _plain_dict(namespace: Any) -> dict[str, Any] | None:
    return None if namespace is None else _yaml_data(namespace.as_dict())


def _yaml_data(value: Any) -> Any:
    """Tuples as lists (betas), so the dict round-trips through YAML and hparams files."""
    if isinstance(value, dict):
        return {key: _yaml_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yaml_data(item) for item in value]
    return value
