"""adamkit for MosaicML Composer: drop-in decoupled optimizers, metrics, recipes.

`DecoupledAdamW` replaces `composer.optim.DecoupledAdamW` (same arguments, decay, state
and metric names, on adamkit's core); `DecoupledRAdam`, `DecoupledNAdam` and
`DecoupledADOPT` follow the same conventions. `GradientRelease` steps parameters inside
backward; `build_optimizer` builds any of them from a YAML or dict recipe (llm-foundry's
format), `build_scheduler` a Composer scheduler from the same recipe.
"""

import importlib.util

if importlib.util.find_spec("composer") is None:
    raise ModuleNotFoundError(
        "composer_adam needs MosaicML Composer (mosaicml), which is not installed: "
        "pip install 'adamkit[composer]'",
        name="composer",
    )

from composer_adam.gradient_release import GradientRelease
from composer_adam.optimizers import (
    ComposerConventions,
    DecoupledAdamW,
    DecoupledADOPT,
    DecoupledNAdam,
    DecoupledRAdam,
)
from composer_adam.recipes import build_optimizer, build_scheduler, load_recipe

__all__ = [
    "ComposerConventions",
    "DecoupledADOPT",
    "DecoupledAdamW",
    "DecoupledNAdam",
    "DecoupledRAdam",
    "GradientRelease",
    "build_optimizer",
    "build_scheduler",
    "load_recipe",
]
