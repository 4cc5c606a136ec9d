"""adamkit core: the Adam family (Adam, AdamW, RAdam, NAdam, ADOPT), written once.

Plain PyTorch; the Lightning and Composer adapters build on these classes.
"""

from core.adam import Adam, AdamW, adam
from core.adopt import ADOPT, adopt
from core.gradient_release import (
    is_gradient_release_prepared,
    prepare_for_gradient_release,
    remove_gradient_release,
)
from core.models import param_groups_weight_decay, to_low_precision
from core.nadam import NAdam, nadam
from core.optimizer import AdamFamilyOptimizer
from core.radam import RAdam, radam

__all__ = [
    "ADOPT",
    "Adam",
    "AdamFamilyOptimizer",
    "AdamW",
    "NAdam",
    "RAdam",
    "adam",
    "adopt",
    "is_gradient_release_prepared",
    "nadam",
    "param_groups_weight_decay",
    "prepare_for_gradient_release",
    "radam",
    "remove_gradient_release",
    "to_low_precision",
]
