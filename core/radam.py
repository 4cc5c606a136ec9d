"""RAdam, rectified Adam (Liu et al. 2020)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from core.backends import STEP_LIST_NAMES, backend_and_lists
from core.coefficients import AdamStepCoefficients
from core.optimizer import (
    AdamFamilyOptimizer,
    ParamsT,
    advance_counters,
    call_backend,
    checked_functional_form,
    hyperparameters,
    no_kahan,
    step_lists,
    weight_decay_terms,
    window_position,
    window_terms,
)
from core.quantization import StatePrecision

RECTIFICATION_THRESHOLD = 5.0
"""RAdam uses the second moment once ρt exceeds this (from t = 6 for common beta2)."""


def radam_coefficients(
    step: float,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    l2_weight_decay: float,
    param_decay: float,
    microbatch: int = 1,
    accumulate: bool = False,
    folded_share: float | None = None,
    microbatch_share: float | None = None,
) -> AdamStepCoefficients:
    """RAdam's scalars for step t: a momentum step until the variance is tractable, then
    Adam's step scaled by the rectification r (window arguments as in adam_coefficients)."""
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2**step / bias_correction2
    adaptive = rho_t > RECTIFICATION_THRESHOLD
    rectification = 1.0
    if adaptive:
        rectification = (
            (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        ) ** 0.5
    return AdamStepCoefficients(
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        param_decay=param_decay,
        momentum_step=lr * rectification / bias_correction1,
        grad_step=0.0,
        bias_correction2_sqrt=bias_correction2**0.5,
        adaptive=adaptive,
        amsgrad=False,
        update_params=lr != 0 and not accumulate,
        **window_terms(step, microbatch, beta2, l2_weight_decay, folded_share, microbatch_share),
    )


@checked_functional_form
def radam(
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
    weight_decay: float = 0.0,
    decouple_wd: bool = False,
    decouple_lr: bool = False,
    max_lr: float | None = None,
    kahan_comps: Sequence[Tensor | None] | None = None,
    window_microbatches: Sequence[Tensor] | None = None,
    accumulate: bool = False,
    window_shares: Sequence[Tensor] | None = None,
    microbatch_share: float | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """Functional RAdam over lists of tensors; arguments as in `core.adam` (no amsgrad)."""
    l2_weight_decay, param_decay = weight_decay_terms(
        lr, weight_decay, decouple_wd, decouple_lr, max_lr
    )
    backend, tensor_lists = backend_and_lists(
        (
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            None,
            kahan_comps if kahan_comps is not None else no_kahan(params),
        ),
        STEP_LIST_NAMES,
        foreach=foreach,
        fused=fused,
    )
    for step, microbatch, folded, indices in window_position(
        state_steps, window_microbatches, window_shares if microbatch_share is not None else None
    ):
        coefficients = radam_coefficients(
            step + 1,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            l2_weight_decay=l2_weight_decay,
            param_decay=param_decay,
            microbatch=microbatch,
            accumulate=accumulate,
            folded_share=folded,
            microbatch_share=microbatch_share,
        )
        call_backend(backend.adam_step, step_lists(tensor_lists, indices, step + 1), coefficients)
    advance_counters(state_steps, window_microbatches, accumulate, window_shares, microbatch_share)


class RAdam(AdamFamilyOptimizer):
    """Rectified Adam: Adam whose adaptive step is scaled down while the second-moment
    estimate is still too noisy, which works like a built-in learning-rate warmup.

    Note: eps is added to the bias-corrected root (as in Adam, optimi and Composer);
    torch.optim.RAdam adds it to the raw root, which only differs when eps is not small.

    Args:
        params: Iterable of parameters or dicts defining parameter groups.
        lr: Learning rate.
        betas: Coefficients of the running averages of the gradient and its square.
        weight_decay: Weight decay coefficient; an L2 penalty unless decouple_wd or decouple_lr.
        eps: Added to the denominator for numerical stability.
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

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        eps: float = 1e-6,
        *,
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

    def _step_coefficients(
        self, group: dict[str, Any], state: dict[str, Any], step: float, scalars: dict[str, Any]
    ) -> AdamStepCoefficients:
        return radam_coefficients(step, **scalars)

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
    ) -> None:
        radam(
            params,
            grads,
            self._moments(states, "exp_avg", group, params),
            self._moments(states, "exp_avg_sq", group, params),
            self._column(states, "step"),
            kahan_comps=self._kahan_comps(group, params, states),
            **self._window_kwargs(states),
            **self._common_kwargs(group),
        )
