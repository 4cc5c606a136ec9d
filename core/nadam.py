"""NAdam, Adam with Nesterov momentum (Dozat 2016), as torch.optim.NAdam computes it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from core.backends import STEP_LIST_NAMES, backend_and_lists
from core.coefficients import AdamStepCoefficients
from core.optimizer import (
    AdamFamilyOptimizer,
    ParamsT,
    add_to_host_scalars,
    call_backend,
    checked_functional_form,
    finite_at_least,
    hyperparameters,
    multiply_host_scalars,
    no_kahan,
    partition_by_host_scalars,
    require,
    step_lists,
    subset,
    weight_decay_terms,
)
from core.quantization import StatePrecision
from core.random_bits import rounding_draw


def nadam_momentum(step: float, beta1: float, momentum_decay: float) -> float:
    """μt, the momentum schedule of step t."""
    return beta1 * (1 - 0.5 * 0.96 ** (step * momentum_decay))


def nadam_coefficients(
    step: float,
    mu_product: float,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    momentum_decay: float,
    l2_weight_decay: float,
    param_decay: float,
) -> AdamStepCoefficients:
    """NAdam's scalars for step t, given Πt = μ1···μt (mu_product after this step)."""
    mu = nadam_momentum(step, beta1, momentum_decay)
    mu_next = nadam_momentum(step + 1, beta1, momentum_decay)
    return AdamStepCoefficients(
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        l2_weight_decay=l2_weight_decay,
        param_decay=param_decay,
        momentum_step=lr * mu_next / (1 - mu_product * mu_next),
        grad_step=lr * (1 - mu) / (1 - mu_product),
        bias_correction2_sqrt=(1 - beta2**step) ** 0.5,
        adaptive=True,
        amsgrad=False,
        update_params=lr != 0,
        state_draw=rounding_draw(step),
    )


@checked_functional_form
def nadam(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    mu_products: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    momentum_decay: float = 4e-3,
    weight_decay: float = 0.0,
    decouple_wd: bool = False,
    decouple_lr: bool = False,
    max_lr: float | None = None,
    kahan_comps: Sequence[Tensor | None] | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """Functional NAdam over lists of tensors; arguments as in `core.adam`, plus
    `mu_products` (0-dim float32 CPU tensors, updated here) and `momentum_decay`."""
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
    for (step, mu_before), indices in partition_by_host_scalars(state_steps, mu_products):
        partition_mu_products = list(subset(mu_products, indices))
        # Π is kept in float32, as torch stores it, so trajectories match torch's.
        momentum = nadam_momentum(step + 1, beta1, momentum_decay)
        multiply_host_scalars(partition_mu_products, momentum)
        coefficients = nadam_coefficients(
            step + 1,
            float(partition_mu_products[0]),
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            momentum_decay=momentum_decay,
            l2_weight_decay=l2_weight_decay,
            param_decay=param_decay,
        )
        try:
            call_backend(
                backend.adam_step, step_lists(tensor_lists, indices, step + 1), coefficients
            )
        except BaseException:
            # A refused step leaves Π as it was (the float32 value it came from is exact).
            for mu_product in partition_mu_products:
                mu_product.fill_(mu_before)
            raise
    add_to_host_scalars(state_steps, 1.0)


class NAdam(AdamFamilyOptimizer):
    """NAdam: Adam with Nesterov momentum and torch's momentum schedule.

    Args:
        params: Iterable of parameters or dicts defining parameter groups.
        lr: Learning rate.
        betas: Coefficients of the running averages of the gradient and its square.
        weight_decay: Weight decay coefficient; an L2 penalty unless decouple_wd or decouple_lr.
        eps: Added to the denominator for numerical stability.
        momentum_decay: ψ of the momentum schedule μt = β1·(1 − 0.5·0.96^(t·ψ)).
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
    update_reads_gradient = True

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        eps: float = 1e-6,
        *,
        momentum_decay: float = 4e-3,
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

    def _validate_algorithm(self, group: dict[str, Any], where: str) -> None:
        value = group["momentum_decay"]
        require(
            finite_at_least(value, 0.0),
            "momentum_decay",
            value,
            "a finite number >= 0",
            where,
        )

    host_state_keys: ClassVar[tuple[str, ...]] = ("step", "mu_product")

    def _init_host_state(self, state: dict[str, Any], group: dict[str, Any]) -> None:
        super()._init_host_state(state, group)
        if "mu_product" not in state:
            # Rebuild Π from the step count when resuming from a state without it.
            beta1 = float(group["betas"][0])
            product = torch.tensor(1.0, dtype=torch.float32, device="cpu")
            for t in range(1, int(state["step"]) + 1):
                product *= nadam_momentum(t, beta1, group["momentum_decay"])
            state["mu_product"] = product

    def _step_coefficients(
        self, group: dict[str, Any], state: dict[str, Any], step: float, scalars: dict[str, Any]
    ) -> AdamStepCoefficients:
        momentum_decay = float(group["momentum_decay"])
        return nadam_coefficients(
            step, float(state["mu_product"]), momentum_decay=momentum_decay, **scalars
        )

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
    ) -> None:
        nadam(
            params,
            grads,
            self._moments(states, "exp_avg", group, params),
            self._moments(states, "exp_avg_sq", group, params),
            self._column(states, "mu_product"),
            self._column(states, "step"),
            momentum_decay=float(group["momentum_decay"]),
            kahan_comps=self._kahan_comps(group, params, states),
            **self._common_kwargs(group),
        )
