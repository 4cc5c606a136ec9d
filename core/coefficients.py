"""Per-step scalar coefficients: the contract between algorithms and backends.

Every algorithm computes its scalars (bias corrections, rectification, clip bound,
decay factors) once per parameter group and step, on the host, and hands one of these
records to whichever backend runs the elementwise part. Backends never decide
hyperparameter semantics; they only apply these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TorchAdamTerms:
    """A plain Adam/AdamW step restated in torch.optim's own terms.

    torch's native fused kernels (torch._fused_adam_ / torch._fused_adamw_) take lr, the
    step count and weight decay rather than our folded scalars; algorithms whose step is
    exactly theirs attach these so a backend may hand the whole step to torch.
    """

    lr: float
    step: float
    weight_decay: float
    decoupled: bool


@dataclass(frozen=True, slots=True)
class AdamStepCoefficients:
    """Scalars of one Adam-family step (Adam, AMSGrad, RAdam and NAdam share its shape).

    The elementwise rule every backend applies, in the parameter's compute precision:

        g ← g + l2_weight_decay·θ                      (a copy: p.grad is never written)
        first micro-batch of a window (always, without optimizer accumulation):
            m ← m + (1 − beta1)·(g − m)
            v ← beta2·v + (1 − beta2)·g²
        a later micro-batch of an accumulation window (continues_window):
            m ← m + (1 − beta1)·g
            v ← v + window_grad_sq_weight·g²
        amsgrad: v_max ← max(v_max, v) and v_max replaces v below
        if update_params:
            θ ← param_decay·θ
            adaptive:     d = √v / bias_correction2_sqrt + eps
                          θ ← θ − grad_step·g/d − momentum_step·m/d
            not adaptive: θ ← θ − momentum_step·m     (RAdam before rectification)

    torch_terms is set only when the step is exactly torch.optim.Adam/AdamW's.
    state_draw names the random bits 8-bit m and v round with (core.random_bits.rounding_draw
    of the step and micro-batch; core.quantization, step 4).
    """

    beta1: float
    beta2: float
    eps: float
    l2_weight_decay: float
    param_decay: float
    momentum_step: float
    grad_step: float
    bias_correction2_sqrt: float
    adaptive: bool
    amsgrad: bool
    update_params: bool
    continues_window: bool = False
    window_grad_sq_weight: float = 0.0
    torch_terms: TorchAdamTerms | None = None
    state_draw: int = 0


@dataclass(frozen=True, slots=True)
class AdoptStepCoefficients:
    """Scalars of one ADOPT step.

    g ← g + l2_weight_decay·θ                      (a copy)
    initialize_only: v ← g², nothing else
    otherwise:
        if update_params: θ ← param_decay·θ
        ĝ = g / max(√v, eps), clamped to [−clip, clip] when clip is not None
        m ← m + (1 − beta1)·(ĝ − m)
        if update_params: θ ← θ − lr·m
        v ← beta2·v + (1 − beta2)·g²
    state_draw: as AdamStepCoefficients' (here only m can be 8-bit).
    """

    beta1: float
    beta2: float
    eps: float
    lr: float
    l2_weight_decay: float
    param_decay: float
    clip: float | None
    initialize_only: bool
    update_params: bool
    state_draw: int = 0
