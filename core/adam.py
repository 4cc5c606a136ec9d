"""Adam and AdamW (Kingma & Ba 2015; Loshchilov & Hutter 2019), as torch.optim.Adam does them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from core.backends import STEP_LIST_NAMES, backend_and_lists
from core.coefficients import AdamStepCoefficients, TorchAdamTerms
from core.optimizer import (
    AdamFamilyOptimizer,
    ParamsT,
    advance_counters,
    call_backend,
    checked_functional_form,
    decoupled_decay_rate,
    hyperparameters,
    no_kahan,
    require,
    step_lists,
    weight_decay_terms,
    window_position,
    window_terms,
)
from core.quantization import StatePrecision


def adam_coefficients(
    step: float,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    l2_weight_decay: float,
    param_decay: float,
    amsgrad: bool,
    microbatch: int = 1,
    accumulate: bool = False,
    folded_share: float | None = None,
    microbatch_share: float | None = None,
    decoupled_rate: float = 0.0,
) -> AdamStepCoefficients:
    """Adam's scalars for step t (counted from 1): bias corrections folded into the step size.

    `microbatch` is the 1-based position in an optimizer-accumulation window and
    `accumulate` means this micro-batch only folds into the moments (see window_terms).
    decoupled_rate is the decoupled decay as torch.optim.AdamW's weight_decay (see
    `decoupled_decay_rate`), so the step can also be stated in torch's terms.
    """
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return AdamStepCoefficients(
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        param_decay=param_decay,
        momentum_step=lr / bias_correction1,
        grad_step=0.0,
        bias_correction2_sqrt=bias_correction2**0.5,
        adaptive=True,
        amsgrad=amsgrad,
        update_params=lr != 0 and not accumulate,
        **window_terms(step, microbatch, beta2, l2_weight_decay, folded_share, microbatch_share),
        torch_terms=None
        if math.isnan(decoupled_rate)
        else TorchAdamTerms(
            lr=lr,
            step=step,
            weight_decay=decoupled_rate if decoupled_rate != 0 else l2_weight_decay,
            decoupled=decoupled_rate != 0,
        ),
    )


@checked_functional_form
def adam(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
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
    amsgrad: bool = False,
    kahan_comps: Sequence[Tensor | None] | None = None,
    window_microbatches: Sequence[Tensor] | None = None,
    accumulate: bool = False,
    window_shares: Sequence[Tensor] | None = None,
    microbatch_share: float | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """Functional Adam/AdamW over lists of tensors; what the classes call.

    Args:
        params: Parameters to update in place.
        grads: Their gradients (never modified).
        exp_avgs: First moments, raw (not bias-corrected), as torch.optim stores them.
        exp_avg_sqs: Second moments, raw.
        max_exp_avg_sqs: Running maxima of the second moments (required when amsgrad).
        state_steps: 0-dim float32 CPU tensors counting steps taken; incremented here.
        lr: Learning rate.
        beta1: First-moment decay.
        beta2: Second-moment decay.
        eps: Added to the bias-corrected root of the second moment.
        weight_decay: Weight decay coefficient (L2 unless decouple_wd or decouple_lr).
        decouple_wd: Decoupled weight decay (AdamW): θ ← θ·(1 − lr·weight_decay).
        decouple_lr: Fully decoupled weight decay: θ ← θ·(1 − lr/max_lr·weight_decay).
        max_lr: The lr the decay is relative to when decouple_lr; None means lr.
        amsgrad: Use the running maximum of the second moment.
        kahan_comps: Per-parameter Kahan compensation buffers (None entries: no compensation).
        window_microbatches: Per-parameter 0-dim counters of micro-batches folded into the
            current optimizer-accumulation window (None: no optimizer accumulation).
        accumulate: Fold this micro-batch into the moments without updating parameters.
        window_shares: Per-parameter 0-dim sums of the shares of the micro-batches folded
            into the current window (used with microbatch_share; incremented here).
        microbatch_share: This micro-batch's share of its window, such as its samples;
            None: equal shares (see `AdamFamilyOptimizer.microbatch_share`).
        foreach: Use the foreach backend (None: the faster one for the device).
        fused: Use a fused backend (None: when one is available and exact).
    """
    require(
        not amsgrad or max_exp_avg_sqs is not None,
        "max_exp_avg_sqs",
        None,
        "a list of tensors when amsgrad=True",
    )
    decay_mode = (lr, weight_decay, decouple_wd, decouple_lr, max_lr)
    l2_weight_decay, param_decay = weight_decay_terms(*decay_mode)
    backend, tensor_lists = backend_and_lists(
        (
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs if amsgrad else None,
            kahan_comps if kahan_comps is not None else no_kahan(params),
        ),
        STEP_LIST_NAMES,
        foreach=foreach,
        fused=fused,
    )
    for step, microbatch, folded, indices in window_position(
        state_steps, window_microbatches, window_shares if microbatch_share is not None else None
    ):
        coefficients = adam_coefficients(
            step + 1,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            l2_weight_decay=l2_weight_decay,
            param_decay=param_decay,
            amsgrad=amsgrad,
            microbatch=microbatch,
            accumulate=accumulate,
            folded_share=folded,
            microbatch_share=microbatch_share,
            decoupled_rate=decoupled_decay_rate(*decay_mode),
        )
        call_backend(backend.adam_step, step_lists(tensor_lists, indices, step + 1), coefficients)
    advance_counters(state_steps, window_microbatches, accumulate, window_shares, microbatch_share)


class Adam(AdamFamilyOptimizer):
    """Adam, optionally with decoupled (AdamW) or fully decoupled weight decay, and AMSGrad.

    Defaults follow optimi (betas (0.9, 0.99), eps 1e-6), which usually beat torch's.
    State is torch.optim.Adam's, so torch checkpoints load and continue exactly.

    Args:
        params: Iterable of parameters or dicts defining parameter groups.
        lr: Learning rate.
        betas: Coefficients of the running averages of the gradient and its square.
        weight_decay: Weight decay coefficient; an L2 penalty unless decouple_wd or decouple_lr.
        eps: Added to the denominator for numerical stability.
        decouple_wd: Apply decoupled weight decay (AdamW) instead of an L2 penalty.
        decouple_lr: Apply fully decoupled weight decay, scaled by lr / max_lr, so the
            effective decay does not change when the peak lr does; use a smaller weight_decay.
        max_lr: The peak lr fully decoupled decay is relative to; None means each group's
            lr when the group is created.
        amsgrad: Use the running maximum of the second moment (AMSGrad).
        kahan_sum: Kahan-compensated updates so bf16/fp16 parameters do not lose small
            updates to rounding; None turns it on for low-precision parameters only.
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
        amsgrad: bool = False,
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

    def _validate_algorithm(self, group: dict[str, Any], where: str) -> None:
        require(
            isinstance(group["amsgrad"], bool), "amsgrad", group["amsgrad"], "True or False", where
        )

    def _tensor_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        if group["amsgrad"]:
            return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        return ("exp_avg", "exp_avg_sq")

    def _step_coefficients(
        self, group: dict[str, Any], state: dict[str, Any], step: float, scalars: dict[str, Any]
    ) -> AdamStepCoefficients:
        return adam_coefficients(step, amsgrad=group["amsgrad"], **scalars)

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
    ) -> None:
        adam(
            params,
            grads,
            self._moments(states, "exp_avg", group, params),
            self._moments(states, "exp_avg_sq", group, params),
            self._moments(states, "max_exp_avg_sq") if group["amsgrad"] else None,
            self._column(states, "step"),
            amsgrad=group["amsgrad"],
            kahan_comps=self._kahan_comps(group, params, states),
            **self._window_kwargs(states),
            **self._common_kwargs(group),
        )


class AdamW(Adam):
    """Adam with decoupled weight decay (AdamW): Adam with decouple_wd=True, weight_decay=1e-2.

    Args:
        params: Iterable of parameters or dicts defining parameter groups.
        lr: Learning rate.
        betas: Coefficients of the running averages of the gradient and its square.
        weight_decay: Decoupled weight decay: each step θ ← θ·(1 − lr·weight_decay).
        eps: Added to the denominator for numerical stability.
        decouple_wd: Decoupled weight decay (True for AdamW); False turns it into L2.
        decouple_lr: Apply fully decoupled weight decay, scaled by lr / max_lr, so the
            effective decay does not change when the peak lr does; use a smaller weight_decay.
        max_lr: The peak lr fully decoupled decay is relative to; None means each group's
            lr when the group is created.
        amsgrad: Use the running maximum of the second moment (AMSGrad).
        kahan_sum: Kahan-compensated updates so bf16/fp16 parameters do not lose small
            updates to rounding; None turns it on for low-precision parameters only.
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
        weight_decay: float = 1e-2,
        eps: float = 1e-6,
        *,
        decouple_wd: bool = True,
        decouple_lr: bool = False,
        max_lr: float | None = None,
        amsgrad: bool = False,
        kahan_sum: bool | None = None,
        state_precision: StatePrecision = "full",
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
        foreach: bool | None = None,
        fused: bool | None = None,
        triton: bool | None = None,
        gradient_release: bool = False,
    ) -> None:
        super().__init__(params, **hyperparameters(locals()))
