"""ADOPT (Taniguchi et al., NeurIPS 2024), as its reference implementation computes it.

ADOPT normalises the gradient by a second moment that does not yet contain it, then
feeds the normalised gradient to the momentum; with clipping (on by default, bound
step^0.25) it is the reference's recommended variant, without it the paper's original.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from core.backends import ADOPT_LIST_NAMES, backend_and_lists
from core.coefficients import AdoptStepCoefficients
from core.optimizer import (
    AdamFamilyOptimizer,
    ParamsT,
    add_to_host_scalars,
    call_backend,
    caller_stacklevel,
    checked_functional_form,
    hyperparameters,
    no_kahan,
    partition_by_host_scalars,
    require,
    step_lists,
    weight_decay_terms,
)
from core.quantization import StatePrecision
from core.random_bits import rounding_draw


def adopt_coefficients(
    step: float,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    clip: bool,
    l2_weight_decay: float,
    param_decay: float,
) -> AdoptStepCoefficients:
    """ADOPT's scalars for a call whose state step (calls so far) is `step`.

    The first call (step 0) only seeds the second moment with g²; later calls update,
    with clip bound step^0.25 (1 on the first update). No bias correction.
    """
    return AdoptStepCoefficients(
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        lr=lr,
        l2_weight_decay=l2_weight_decay,
        param_decay=param_decay,
        clip=step**0.25 if clip else None,
        initialize_only=step == 0,
        update_params=lr != 0,
        state_draw=rounding_draw(step + 1),
    )


@checked_functional_form
def adopt(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    clip: bool = True,
    weight_decay: float = 0.0,
    decouple_wd: bool = False,
    decouple_lr: bool = False,
    max_lr: float | None = None,
    kahan_comps: Sequence[Tensor | None] | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """Functional ADOPT over lists of tensors; arguments as in `core.adam`, plus `clip`."""
    l2_weight_decay, param_decay = weight_decay_terms(
        lr, weight_decay, decouple_wd, decouple_lr, max_lr
    )
    backend, tensor_lists = backend_and_lists(
        (
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            kahan_comps if kahan_comps is not None else no_kahan(params),
        ),
        ADOPT_LIST_NAMES,
        foreach=foreach,
        fused=fused,
    )
    for (step,), indices in partition_by_host_scalars(state_steps):
        coefficients = adopt_coefficients(
            step,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            clip=clip,
            l2_weight_decay=l2_weight_decay,
            param_decay=param_decay,
        )
        call_backend(backend.adopt_step, step_lists(tensor_lists, indices, step + 1), coefficients)
    add_to_host_scalars(state_steps, 1.0)


class ADOPT(AdamFamilyOptimizer):
    """ADOPT: adaptive gradient method that converges for any beta2 (Taniguchi et al. 2024).

    Args:
        params: Iterable of parameters or dicts defining parameter groups.
        lr: Learning rate.
        betas: Coefficients of the running averages of the normalised gradient and the
            squared gradient; ADOPT works with beta2 close to 1 (0.9999).
        weight_decay: Weight decay coefficient; an L2 penalty unless decouple_wd or decouple_lr.
        eps: Lower bound of the root of the second moment the gradient is divided by.
        clip: Clip the normalised gradient to ±step^0.25 (the reference's stable
            default); False gives the paper's original, unclipped ADOPT.
        decouple_wd: Apply decoupled weight decay instead of an L2 penalty.
        decouple_lr: Apply fully decoupled weight decay, scaled by lr / max_lr.
        max_lr: The peak lr fully decoupled decay is relative to; None means each group's
            lr when the group is created.
        kahan_sum: Kahan-compensated updates for bf16/fp16 parameters; None turns it on
            for low-precision parameters only.
        state_precision: 'full' keeps m and v in the parameter's dtype; '8bit' stores
            them block-wise in 8 bits (about 2 bytes per parameter for both; parameters
            under 4096 elements stay full). See core.quantization.
        stochastic_rounding: Round bf16/fp16 parameters stochastically (unbiased, no
            buffer) instead of keeping a Kahan buffer; reproducible from rounding_seed.
        rounding_seed: Seed of stochastic rounding's random bits, of the parameters and
            of 8-bit m and v (with the parameter's position, the step and the element index).
        foreach: Use the multi-tensor foreach backend; None picks the faster for the device.
        fused: Use a fused one-pass kernel; None picks it where available and exact.
        triton: optimi's name for fused, so optimi code runs unchanged (Triton on GPU,
            the fused CPU backend on CPU); only fused is stored in the param groups.
        gradient_release: Step each parameter inside backward and free its gradient;
            requires `core.prepare_for_gradient_release(model, optimizer)`.
    """

    supports_optimizer_accumulation = False
    moment_family = "ADOPT"
    quantized_state_keys = frozenset({"exp_avg"})
    """ADOPT divides the gradient itself by √v, so v's quantization error reaches every
    update undamped: with 8-bit v a 200-step regression ended 8% higher in loss, with
    8-bit m alone within 0.4% (tests/core/test_quantization.py). v stays full precision."""

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        weight_decay: float = 0.0,
        eps: float = 1e-6,
        *,
        clip: bool = True,
        decouple_wd: bool = False,
        decouple_lr: bool = False,
        max_lr: float | None = None,
        kahan_sum: bool | None = None,
        state_precision: StatePrecision = "full",
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
        foreach: bool | None = None,
        fused: bool | None = None,
        triton: bool | None = None,
        gradient_release: bool = False,
    ) -> None:
        super().__init__(params, hyperparameters(locals()))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (the constructor adds each through here), warning where it is
        unclipped over float16 parameters (_warn_if_unclipped_float16)."""
        super().add_param_group(param_group)
        self._warn_if_unclipped_float16(self.param_groups[-1])

    @staticmethod
    def _warn_if_unclipped_float16(group: dict[str, Any]) -> None:
        """Warn when an unclipped group holds float16 parameters: their v is float16 too,
        and where it has underflowed to 0 (nothing below 6e-8 is held) a gradient is
        normalised by eps alone: m takes (1 − β1)·g/eps, a step of lr times that, and
        overflows float16 once |g| > 65504·eps/(1 − β1), so the parameter becomes inf or
        NaN (clipping bounds it; measured: finite steps of 7000·lr at |g| = 0.07, m inf at
        |g| = 1, the defaults). A group added later (add_param_group) is warned of as one
        given to the constructor."""
        if not group["clip"] and any(p.dtype == torch.float16 for p in group["params"]):
            eps, beta1 = float(group["eps"]), float(group["betas"][0])
            warnings.warn(
                f"ADOPT: clip=False with float16 parameters: where v underflows to 0, a "
                f"gradient is normalised by eps alone (a step of lr * (1 - beta1) * |g| / "
                f"eps), and m overflows float16 for |g| > 65504 * eps / (1 - beta1) = "
                f"{65504 * eps / (1 - beta1):.3g}, making the parameters inf or NaN. "
                "Use clip=True (the default), bfloat16 or float32 parameters, or a larger eps.",
                UserWarning,
                stacklevel=caller_stacklevel(),
            )

    def _validate_algorithm(self, group: dict[str, Any], where: str) -> None:
        require(isinstance(group["clip"], bool), "clip", group["clip"], "True or False", where)

    def _step_coefficients(
        self, group: dict[str, Any], state: dict[str, Any], step: float, scalars: dict[str, Any]
    ) -> AdoptStepCoefficients:
        # ADOPT's state counts calls, and a call at count k uses the coefficients of k.
        return adopt_coefficients(step - 1, clip=group["clip"], **scalars)

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
    ) -> None:
        adopt(
            params,
            grads,
            self._moments(states, "exp_avg", group, params),
            self._moments(states, "exp_avg_sq"),
            self._column(states, "step"),
            clip=group["clip"],
            kahan_comps=self._kahan_comps(group, params, states),
            **self._common_kwargs(group),
        )
