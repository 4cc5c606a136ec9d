"""The eager per-tensor backend: the readable reference every other backend must match."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from core.backends.precision import load_param, store, store_param, working_copy
from core.coefficients import AdamStepCoefficients, AdoptStepCoefficients


def adam_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    kahan_comps: Sequence[Tensor | None],
    c: AdamStepCoefficients,
) -> None:
    """Apply one Adam-family step (see AdamStepCoefficients) tensor by tensor."""
    for i, param in enumerate(params):
        kahan_comp = kahan_comps[i]
        theta = load_param(param, kahan_comp)
        grad = working_copy(grads[i])
        exp_avg = working_copy(exp_avgs[i])
        exp_avg_sq = working_copy(exp_avg_sqs[i])

        if c.l2_weight_decay != 0:
            grad = grad.add(theta, alpha=c.l2_weight_decay)
        if c.continues_window:
            exp_avg.add_(grad, alpha=1 - c.beta1)
            exp_avg_sq.addcmul_(grad, grad, value=c.window_grad_sq_weight)
        else:
            exp_avg.lerp_(grad, 1 - c.beta1)
            exp_avg_sq.mul_(c.beta2).addcmul_(grad, grad, value=1 - c.beta2)
        second_moment = exp_avg_sq
        if c.amsgrad:
            assert max_exp_avg_sqs is not None
            max_exp_avg_sq = working_copy(max_exp_avg_sqs[i])
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            store(max_exp_avg_sqs[i], max_exp_avg_sq)
            second_moment = max_exp_avg_sq
        store(exp_avgs[i], exp_avg, c.state_draw)
        store(exp_avg_sqs[i], exp_avg_sq, c.state_draw)

        if not c.update_params:
            continue
        if c.param_decay != 1:
            theta.mul_(c.param_decay)
        if c.adaptive:
            denom = second_moment.sqrt().div_(c.bias_correction2_sqrt).add_(c.eps)
            if c.grad_step != 0:
                theta.addcdiv_(grad, denom, value=-c.grad_step)
            theta.addcdiv_(exp_avg, denom, value=-c.momentum_step)
        else:
            theta.add_(exp_avg, alpha=-c.momentum_step)
        store_param(param, theta, kahan_comp)


def adopt_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    kahan_comps: Sequence[Tensor | None],
    c: AdoptStepCoefficients,
) -> None:
    """Apply one ADOPT step (see AdoptStepCoefficients) tensor by tensor."""
    for i, param in enumerate(params):
        kahan_comp = kahan_comps[i]
        theta = load_param(param, kahan_comp)
        grad = working_copy(grads[i])
        exp_avg_sq = working_copy(exp_avg_sqs[i])
        if c.l2_weight_decay != 0:
            grad = grad.add(theta, alpha=c.l2_weight_decay)

        if c.initialize_only:
            exp_avg_sq.copy_(grad * grad)
            store(exp_avg_sqs[i], exp_avg_sq, c.state_draw)
            continue

        exp_avg = working_copy(exp_avgs[i])
        normed_grad = grad / exp_avg_sq.sqrt().clamp_(min=c.eps)
        if c.clip is not None:
            normed_grad.clamp_(-c.clip, c.clip)
        exp_avg.lerp_(normed_grad, 1 - c.beta1)
        exp_avg_sq.mul_(c.beta2).addcmul_(grad, grad, value=1 - c.beta2)
        store(exp_avgs[i], exp_avg, c.state_draw)
        store(exp_avg_sqs[i], exp_avg_sq, c.state_draw)

        if not c.update_params:
            continue
        if c.param_decay != 1:
            theta.mul_(c.param_decay)
        theta.add_(exp_avg, alpha=-c.lr)
        store_param(param, theta, kahan_comp)
