"""adamkit for PyTorch Lightning: configure_optimizers in one call, LightningCLI selection,
GradientRelease and OptimizerMonitor callbacks.

Importing this package imports `core`, which makes every core optimizer a known
subclass of torch.optim.Optimizer for LightningCLI: `--optimizer core.AdamW` always
works, and `--optimizer ADOPT` works by its short name because torch.optim has no
class of that name (Adam, AdamW, RAdam and NAdam need the `core.` prefix).
"""

import importlib.util

if importlib.util.find_spec("lightning") is None:
    raise ModuleNotFoundError(
        "lightning_adam needs PyTorch Lightning, which is not installed: "
        "pip install 'adamkit[lightning]'",
        name="lightning",
    )

from lightning_adam.callbacks import GradientRelease, OptimizerMonitor
from lightning_adam.cli import link_optimizer
from lightning_adam.optimizers import CORE_OPTIMIZERS, configure_optimizers, resolve_optimizer_class
from lightning_adam.schedules import LRSchedule

__all__ = [
    "CORE_OPTIMIZERS",
    "GradientRelease",
    "LRSchedule",
    "OptimizerMonitor",
    "configure_optimizers",
    "link_optimizer",
    "resolve_optimizer_class",
]
