"""adamkit core: the Adam family (Adam, AdamW, RAdam, NAdam, ADOPT), written once.

Plain PyTorch; the Lightning and Composer adapters build on these classes.
"""

from core.adam import Adam, AdamW, adam
from core.adopt import ADOPT, adopt
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
    "nadam",
    "radam",
]
