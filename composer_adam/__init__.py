"""adamkit for MosaicML Composer: drop-in decoupled optimizers, metrics, recipes.

`DecoupledAdamW` replaces `composer.optim.DecoupledAdamW` (same arguments, decay, state
and metric names, on adamkit's core); `DecoupledRAdam`, `DecoupledNAdam` and
`DecoupledADOPT` follow the same conventions.
"""

from composer_adam.optimizers import (
    ComposerConventions,
    DecoupledAdamW,
    DecoupledADOPT,
    DecoupledNAdam,
    DecoupledRAdam,
)

__all__ = [
    "ComposerConventions",
    "DecoupledADOPT",
    "DecoupledAdamW",
    "DecoupledNAdam",
    "DecoupledRAdam",
]
