"""What a generated kernel takes for one step: compile-time switches and runtime scalars.

The C kernels (cpu_kernel.c) and the Triton kernels (triton.py) implement the same rules
with the same switches, so both are driven from one translation of the per-step
coefficients, made here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from core.coefficients import AdamStepCoefficients, AdoptStepCoefficients

SWITCHES = ("KAHAN", "L2", "DECAY", "UPDATE", "AMSGRAD", "ADAPTIVE", "GRAD_TERM", "INIT", "CLIP")
"""Every switch of the kernels; those an algorithm does not use are off."""


@dataclass(frozen=True, slots=True)
class KernelArguments:
    """One step of one algorithm, as the generated kernels take it.

    scalars: 1 − β1, β2, 1 − β2, eps, l2 coefficient, param_decay, momentum_step (ADOPT:
    lr), grad_step, bias_correction2_sqrt, clip bound. Kernels derive what they need from
    these (negations, the reciprocal of bias_correction2_sqrt) in their own precision.
    state_draw: the coefficients' state_draw, with which 8-bit m and v round
    stochastically (core.quantization, step 4).
    """

    algorithm: str
    switches: tuple[tuple[str, bool], ...]
    scalars: tuple[float, ...]
    state_draw: int = 0


def _shared_scalars(c: AdamStepCoefficients | AdoptStepCoefficients) -> tuple[float, ...]:
    return (1 - c.beta1, c.beta2, 1 - c.beta2, c.eps, c.l2_weight_decay, c.param_decay)


def _switches(**on: bool) -> tuple[tuple[str, bool], ...]:
    return _switch_table(tuple(bool(on.get(name, False)) for name in SWITCHES))


@functools.cache
def _switch_table(values: tuple[bool, ...]) -> tuple[tuple[str, bool], ...]:
    """One tuple per combination, built once: a launch hashes it as a cache key."""
    return tuple(zip(SWITCHES, values, strict=True))


Coefficients = TypeVar("Coefficients", AdamStepCoefficients, AdoptStepCoefficients)


def _reused_for_same_coefficients(
    translate: Callable[[Coefficients, bool], KernelArguments],
) -> Callable[[Coefficients, bool], KernelArguments]:
    """translate(c, kahan), reused while c is the very object of the last call: a replayed
    released step (core.optimizer) hands each parameter of a group the same coefficients,
    so the translation, and what a launch derives from it, are made once per step."""
    last: dict[bool, tuple[Coefficients, KernelArguments]] = {}

    @functools.wraps(translate)
    def arguments(c: Coefficients, kahan: bool) -> KernelArguments:
        entry = last.get(kahan)
        if entry is None or entry[0] is not c:
            entry = last[kahan] = (c, translate(c, kahan))
        return entry[1]

    return arguments


@_reused_for_same_coefficients
def adam_arguments(c: AdamStepCoefficients, kahan: bool) -> KernelArguments:
    """Adam, AMSGrad, RAdam and NAdam."""
    return KernelArguments(
        "adam",
        _switches(
            KAHAN=kahan,
            L2=c.l2_weight_decay != 0,
            DECAY=c.param_decay != 1,
            UPDATE=c.update_params,
            AMSGRAD=c.amsgrad,
            ADAPTIVE=c.adaptive,
            GRAD_TERM=c.grad_step != 0,
        ),
        (*_shared_scalars(c), c.momentum_step, c.grad_step, c.bias_correction2_sqrt, 0.0),
        c.state_draw,
    )


@_reused_for_same_coefficients
def adopt_arguments(c: AdoptStepCoefficients, kahan: bool) -> KernelArguments:
    """ADOPT. Its first call only seeds v, so decay, update and clipping are off then,
    which also spares compiling a configuration that differs in switches it ignores."""
    updates = not c.initialize_only
    return KernelArguments(
        "adopt",
        _switches(
            KAHAN=kahan,
            L2=c.l2_weight_decay != 0,
            DECAY=updates and c.param_decay != 1,
            UPDATE=updates and c.update_params,
            INIT=c.initialize_only,
            CLIP=updates and c.clip is not None,
        ),
        (*_shared_scalars(c), c.lr, 0.0, 1.0, 0.0 if c.clip is None else c.clip),
        c.state_draw,
    )
