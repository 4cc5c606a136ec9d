"""The multi-tensor backend: the same rules as loop.py with torch._foreach_* kernels.

Tensors are bucketed by device, dtype and Kahan use so every foreach call sees uniform
lists; bf16/fp16 buckets run on fp32 working copies and are rounded once at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from core.backends.grouping import buckets, take
from core.backends.precision import load_param, store, store_param, working_copy
from core.coefficients import AdamStepCoefficients, AdoptStepCoefficients


def _working(tensors: list[Tensor]) -> list[Tensor]:
    return [working_copy(t) for t in tensors]


def _store_all(targets: list[Tensor], values: list[Tensor], draw: int | None = None) -> None:
    for target, value in zip(targets, values, strict=True):
        store(target, value, draw)


def _load_params(params: list[Tensor], comps: list[Tensor | None]) -> list[Tensor]:
    return [load_param(p, k) for p, k in zip(params, comps, strict=True)]


def _store_params(params: list[Tensor], values: list[Tensor], comps: list[Tensor | None]) -> None:
    for param, value, comp in zip(params, values, comps, strict=True):
        store_param(param, value, comp)


def adam_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    kahan_comps: Sequence[Tensor | None],
    c: AdamStepCoefficients,
) -> None:
    """Apply one Adam-family step (see AdamStepCoefficients) with foreach kernels."""
    for idx in buckets(params, kahan_comps):
        bucket_params, comps = take(params, idx), [kahan_comps[i] for i in idx]
        theta = _load_params(bucket_params, comps)
        grad = _working(take(grads, idx))
        bucket_exp_avgs, bucket_exp_avg_sqs = take(exp_avgs, idx), take(exp_avg_sqs, idx)
        exp_avg, exp_avg_sq = _working(bucket_exp_avgs), _working(bucket_exp_avg_sqs)

        if c.l2_weight_decay != 0:
            grad = torch._foreach_add(grad, theta, alpha=c.l2_weight_decay)
        if c.continues_window:
            torch._foreach_add_(exp_avg, grad, alpha=1 - c.beta1)
            torch._foreach_addcmul_(exp_avg_sq, grad, grad, value=c.window_grad_sq_weight)
        else:
            torch._foreach_lerp_(exp_avg, grad, 1 - c.beta1)
            torch._foreach_mul_(exp_avg_sq, c.beta2)
            torch._foreach_addcmul_(exp_avg_sq, grad, grad, value=1 - c.beta2)
        second_moment = exp_avg_sq
        if c.amsgrad:
            assert max_exp_avg_sqs is not None
            bucket_max = take(max_exp_avg_sqs, idx)
            max_exp_avg_sq = _working(bucket_max)
            torch._foreach_maximum_(max_exp_avg_sq, exp_avg_sq)
            _store_all(bucket_max, max_exp_avg_sq)
            second_moment = max_exp_avg_sq
        _store_all(bucket_exp_avgs, exp_avg, c.state_draw)
        _store_all(bucket_exp_avg_sqs, exp_avg_sq, c.state_draw)

        if not c.update_params:
            continue
        if c.param_decay != 1:
            torch._foreach_mul_(theta, c.param_decay)
        if c.adaptive:
            denom = torch._foreach_sqrt(second_moment)
            torch._foreach_div_(denom, c.bias_correction2_sqrt)
            torch._foreach_add_(denom, c.eps)
            if c.grad_step != 0:
                torch._foreach_addcdiv_(theta, grad, denom, value=-c.grad_step)
            torch._foreach_addcdiv_(theta, exp_avg, denom, value=-c.momentum_step)
        else:
            torch._foreach_add_(theta, exp_avg, alpha=-c.momentum_step)
        _store_params(bucket_params, theta, comps)


def adopt_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    kahan_comps: Sequence[Tensor | None],
    c: AdoptStepCoefficients,
) -> None:
    """Apply one ADOPT step (see AdoptStepCoefficients) with foreach kernels."""
    for idx in buckets(params, kahan_comps):
        bucket_params, comps = take(params, idx), [kahan_comps[i] for i in idx]
        theta = _load_params(bucket_params, comps)
        grad = _working(take(grads, idx))
        bucket_exp_avg_sqs = take(exp_avg_sqs, idx)
        exp_avg_sq = _working(bucket_exp_avg_sqs)
        if c.l2_weight_decay != 0:
            grad = torch._foreach_add(grad, theta, alpha=c.l2_weight_decay)

        if c.initialize_only:
            _store_all(bucket_exp_avg_sqs, torch._foreach_mul(grad, grad), c.state_draw)
            continue

        bucket_exp_avgs = take(exp_avgs, idx)
        exp_avg = _working(bucket_exp_avgs)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_clamp_min_(denom, c.eps)
        normed_grad = torch._foreach_div(grad, denom)
        if c.clip is not None:
            torch._foreach_clamp_min_(normed_grad, -c.clip)
            torch._foreach_clamp_max_(normed_grad, c.clip)
        torch._foreach_lerp_(exp_avg, normed_grad, 1 - c.beta1)
        torch._foreach_mul_(exp_avg_sq, c.beta2)
        torch._foreach_addcmul_(exp_avg_sq, grad, grad, value=1 - c.beta2)
        _store_all(bucket_exp_avgs, exp_avg, c.state_draw)
        _store_all(bucket_exp_avg_sqs, exp_avg_sq, c.state_draw)

        if not c.update_params:
            continue
        if c.param_decay != 1:
            torch._foreach_mul_(theta, c.param_decay)
        torch._foreach_add_(theta, exp_avg, alpha=-c.lr)
        _store_params(bucket_params, theta, comps)
