"""Backends run the elementwise part of a step; algorithms hand them host scalars.

Every backend module exposes the same two functions, `adam_step` (Adam, AMSGrad,
RAdam, NAdam) and `adopt_step`, and must reproduce `loop` to floating-point tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from torch import Tensor

from core.backends import foreach, loop
from core.coefficients import AdamStepCoefficients, AdoptStepCoefficients


class Backend(Protocol):
    """What an algorithm needs from a backend."""

    def adam_step(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        exp_avgs: Sequence[Tensor],
        exp_avg_sqs: Sequence[Tensor],
        max_exp_avg_sqs: Sequence[Tensor] | None,
        kahan_comps: Sequence[Tensor | None],
        c: AdamStepCoefficients,
    ) -> None: ...

    def adopt_step(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        exp_avgs: Sequence[Tensor],
        exp_avg_sqs: Sequence[Tensor],
        kahan_comps: Sequence[Tensor | None],
        c: AdoptStepCoefficients,
    ) -> None: ...


def select_backend(
    params: Sequence[Tensor], *, foreach: bool | None, fused: bool | None
) -> Backend:
    """Pick the backend for one step: explicit flags win, None means fastest for the device."""
    if fused:
        raise ValueError("fused=True: no fused backend is available in this build; use fused=None")
    if foreach is None:
        foreach = any(p.device.type != "cpu" for p in params)
    return _FOREACH if foreach else _LOOP


_LOOP: Backend = loop  # type: ignore[assignment]
_FOREACH: Backend = foreach  # type: ignore[assignment]
