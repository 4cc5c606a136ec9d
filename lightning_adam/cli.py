"""LightningCLI wiring: `--optimizer` handed to the model as a plain dict.

LightningCLI's automatic `--optimizer` replaces the model's configure_optimizers with
`optimizer(model.parameters())`, which loses no-weight-decay groups and step-wise
schedules. Linking the argument into a model init argument instead keeps the same flags,
YAML and `--optimizer.help`, and lets the model call `lightning_adam.configure_optimizers`.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer


def link_optimizer(parser: Any, to: str = "model.optimizer", key: str = "optimizer") -> None:
    """Add `--<key>` (any torch Optimizer subclass by class path) and link it to `to`.

    Call it from `LightningCLI.add_arguments_to_parser` and construct the CLI with
    `auto_configure_optimizers=False`. The model argument receives
    {'class_path': ..., 'init_args': {...}} (or None when no optimizer is given): plain
    data, so it can be saved with save_hyperparameters and passed straight to
    `configure_optimizers`.
    """
    parser.add_subclass_arguments(
        (Optimizer,), key, instantiate=False, fail_untyped=False, skip={"params"}, required=False
    )
    parser.link_arguments(key, to, compute_fn=_plain_dict)


def _plain_dict(namespace: Any) -> dict[str, Any] | None:
    return None if namespace is None else _yaml_data(namespace.as_dict())


def _yaml_data(value: Any) -> Any:
    """Tuples as lists (betas), so the dict round-trips through YAML and hparams files."""
    if isinstance(value, dict):
        return {key: _yaml_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yaml_data(item) for item in value]
    return value
