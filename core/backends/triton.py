"""The Triton backend: one fused kernel launch per step and bucket of tensors, for GPUs.

Each program updates one block of one tensor, found through a table of (tensor, block)
pairs, so a step over hundreds of tensors of any sizes is a single launch. Every element
of θ, g, m, v (v_max, Kahan k) is read once and written once, in fp32 for fp16/bf16
tensors. The block table and a table of the tensors' addresses are small device tensors,
cached, and uploaded asynchronously when they change; scalars travel as kernel
arguments, computed on the host, so a step never waits for the device.

Algorithm switches (AMSGrad, RAdam's momentum-only steps, NAdam's gradient term, ADOPT's
first call and clipping, decay modes, Kahan, lr = 0) are constexpr arguments, so Triton
compiles one specialised kernel per combination actually used. float64 buckets (Triton
kernel arguments are fp32) and strided tensors take the foreach backend.

Bytes moved per parameter: 4·(4 + 3) = 28 for fp32 Adam, AdamW, RAdam, NAdam and ADOPT,
36 with AMSGrad; 2·(4 + 3) = 14 for bf16/fp16, 18 with Kahan (k read and written).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from core.backends import foreach
from core.backends.grouping import buckets, split_dense, take_all
from core.backends.kernel_arguments import KernelArguments, adam_arguments, adopt_arguments
from core.coefficients import AdamStepCoefficients, AdoptStepCoefficients

BLOCK = 1024
TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
LIST_COUNT = 6
"""Rows of the address table: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, kahan_comp."""
_CACHE_SIZE = 64


@triton.jit
def _locate(blocks, count, BLOCK: tl.constexpr):
    """This program's tensor, element offsets and bounds mask, from the block table:
    the tensors' sizes, then a (tensor, block) pair per program."""
    pair = blocks + count + 2 * tl.program_id(0)
    index = tl.load(pair)
    offsets = tl.load(pair + 1) * BLOCK + tl.arange(0, BLOCK)
    return index, offsets, offsets < tl.load(blocks + index)


@triton.jit
def _pointers(addresses, row, count, index, offsets, DTYPE: tl.constexpr):
    """Pointers to this program's elements of tensor `index` in list `row` of the table."""
    return tl.load(addresses + row * count + index).to(tl.pointer_type(DTYPE)) + offsets


@triton.jit
def _round(value, DTYPE: tl.constexpr):
    """fp32 to the storage dtype, rounding to nearest even. bfloat16 is rounded by hand, as
    torch does it (NaN to 0x7fc0): Triton's interpreter truncates instead, and the same
    integer operations give the same bits on every GPU."""
    if DTYPE == tl.bfloat16:  # noqa: SIM300 (DTYPE is the variable)
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return value.to(DTYPE)


@triton.jit
def _load_param(param, comp, mask, KAHAN: tl.constexpr):
    """θ in fp32, including its Kahan compensation."""
    theta = tl.load(param, mask=mask).to(tl.float32)
    if KAHAN:
        theta = theta + tl.load(comp, mask=mask).to(tl.float32)
    return theta


@triton.jit
def _store_param(param, comp, mask, theta, DTYPE: tl.constexpr, KAHAN: tl.constexpr):
    """Round θ into place; with Kahan keep in k what rounding lost."""
    rounded = _round(theta, DTYPE)
    tl.store(param, rounded, mask=mask)
    if KAHAN:
        tl.store(comp, _round(theta - rounded.to(tl.float32), DTYPE), mask=mask)


@triton.jit
def _lerp(start, end, coeff, SMALL_WEIGHT: tl.constexpr):
    """torch.lerp, exact at both ends: base + coeff·(end − start), as in cpu_kernel.c."""
    if SMALL_WEIGHT:
        return start + coeff * (end - start)
    return end + coeff * (end - start)


@triton.jit
def _step_kernel(
    addresses,
    blocks,
    count,
    lerp_coeff,
    beta2,
    beta2_weight,
    eps,
    l2,
    param_decay,
    neg_momentum_step,
    neg_grad_step,
    inv_bias_correction2_sqrt,
    clip,
    DTYPE: tl.constexpr,
    ADOPT: tl.constexpr,
    SMALL_WEIGHT: tl.constexpr,
    KAHAN: tl.constexpr,
    L2: tl.constexpr,
    DECAY: tl.constexpr,
    UPDATE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    GRAD_TERM: tl.constexpr,
    INIT: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One step over one block: Adam, AMSGrad, RAdam and NAdam (AdamStepCoefficients)
    or, with ADOPT, ADOPT (AdoptStepCoefficients, neg_momentum_step carrying −lr)."""
    index, offsets, mask = _locate(blocks, count, BLOCK)
    param = _pointers(addresses, 0, count, index, offsets, DTYPE)
    comp = param
    if KAHAN:
        comp = _pointers(addresses, 5, count, index, offsets, DTYPE)
    grad = tl.load(_pointers(addresses, 1, count, index, offsets, DTYPE), mask=mask)
    grad = grad.to(tl.float32)
    exp_avg = _pointers(addresses, 2, count, index, offsets, DTYPE)
    exp_avg_sq = _pointers(addresses, 3, count, index, offsets, DTYPE)
    theta = grad * 0
    if L2 or (UPDATE and not INIT):
        theta = _load_param(param, comp, mask, KAHAN)
    if L2:
        grad = grad + l2 * theta
    if ADOPT:
        if INIT:
            tl.store(exp_avg_sq, _round(grad * grad, DTYPE), mask=mask)
        else:
            v = tl.load(exp_avg_sq, mask=mask).to(tl.float32)
            # NaN-propagating bounds, as torch.clamp and torch.maximum behave (Triton's
            # default drops NaN, which would turn a NaN gradient into a full-size step).
            root = tl.maximum(tl.sqrt_rn(v), eps, propagate_nan=tl.PropagateNan.ALL)
            normed = tl.div_rn(grad, root)
            if CLIP:
                normed = tl.maximum(normed, -clip, propagate_nan=tl.PropagateNan.ALL)
                normed = tl.minimum(normed, clip, propagate_nan=tl.PropagateNan.ALL)
            m = _lerp(tl.load(exp_avg, mask=mask).to(tl.float32), normed, lerp_coeff, SMALL_WEIGHT)
            tl.store(exp_avg, _round(m, DTYPE), mask=mask)
            v = v * beta2 + beta2_weight * grad * grad
            tl.store(exp_avg_sq, _round(v, DTYPE), mask=mask)
            if UPDATE:
                if DECAY:
                    theta = theta * param_decay
                _store_param(param, comp, mask, theta + neg_momentum_step * m, DTYPE, KAHAN)
    else:
        m = _lerp(tl.load(exp_avg, mask=mask).to(tl.float32), grad, lerp_coeff, SMALL_WEIGHT)
        v = tl.load(exp_avg_sq, mask=mask).to(tl.float32) * beta2 + beta2_weight * grad * grad
        second_moment = v
        if AMSGRAD:
            max_exp_avg_sq = _pointers(addresses, 4, count, index, offsets, DTYPE)
            second_moment = tl.maximum(
                tl.load(max_exp_avg_sq, mask=mask).to(tl.float32),
                v,
                propagate_nan=tl.PropagateNan.ALL,
            )
            tl.store(max_exp_avg_sq, _round(second_moment, DTYPE), mask=mask)
        tl.store(exp_avg, _round(m, DTYPE), mask=mask)
        tl.store(exp_avg_sq, _round(v, DTYPE), mask=mask)
        if UPDATE:
            if DECAY:
                theta = theta * param_decay
            if ADAPTIVE:
                denom = tl.sqrt_rn(second_moment) * inv_bias_correction2_sqrt + eps
                if GRAD_TERM:
                    inv_denom = tl.div_rn(tl.full(denom.shape, 1.0, tl.float32), denom)
                    theta = theta + neg_grad_step * grad * inv_denom
                    theta = theta + neg_momentum_step * m * inv_denom
                else:
                    theta = theta + tl.div_rn(neg_momentum_step * m, denom)
            else:
                theta = theta + neg_momentum_step * m
            _store_param(param, comp, mask, theta, DTYPE, KAHAN)


_addresses: OrderedDict[tuple, Tensor] = OrderedDict()
_blocks: OrderedDict[tuple, tuple[Tensor, int]] = OrderedDict()


def _cached(cache: OrderedDict, key: tuple, build: Callable[[], Any]) -> Any:
    """A small LRU cache: a training loop meets the same few keys over and over."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    cache[key] = value = build()
    if len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _upload(values: Tensor, device: torch.device) -> Tensor:
    """Copy host metadata to the device without waiting: pinned memory, non-blocking."""
    if device.type != "cpu":
        values = values.pin_memory()
    return values.to(device, non_blocking=True)


def _tables(lists: list[list[Tensor] | None]) -> tuple[Tensor, Tensor, int]:
    """(address table, block table, number of blocks) for one launch.

    Both are cached: the block table by the tensors' sizes (it never changes in a training
    run), the addresses by their values (parameters and state never move; gradients
    usually come back at the same addresses, and when not only this small table of
    6 × tensors integers is uploaded, asynchronously). A missing list's row holds zeros.
    """
    params = lists[0]
    assert params is not None
    device = params[0].device
    addresses = tuple(
        0 if values is None else t.data_ptr() for values in lists for t in values or params
    )
    sizes = tuple(p.numel() for p in params)
    address_table = _cached(
        _addresses,
        (device, addresses),
        lambda: _upload(torch.tensor(addresses, dtype=torch.int64), device),
    )
    block_table, count = _cached(_blocks, (device, sizes), lambda: _block_table(sizes, device))
    return address_table, block_table, count


def _block_table(sizes: tuple[int, ...], device: torch.device) -> tuple[Tensor, int]:
    """The sizes, then (tensor index, block index) for every block of every tensor."""
    size = torch.tensor(sizes, dtype=torch.int64)
    per_tensor = (size + BLOCK - 1) // BLOCK
    index = torch.repeat_interleave(torch.arange(len(sizes)), per_tensor)
    first = torch.repeat_interleave(torch.cumsum(per_tensor, 0) - per_tensor, per_tensor)
    block = torch.arange(index.numel()) - first
    table = torch.cat([size, torch.stack([index, block], dim=1).flatten()])
    return _upload(table, device), index.numel()


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _launch(bucket: list[list[Tensor] | None], arguments: KernelArguments) -> None:
    """One launch of the step kernel over a bucket, scalars prepared as cpu_kernel.c does."""
    addresses, blocks, count = _tables(bucket)
    if count == 0:
        return
    (beta1_weight, beta2, beta2_weight, eps, l2, param_decay, momentum_step, grad_step) = (
        arguments.scalars[:8]
    )
    bias_correction2_sqrt, clip = arguments.scalars[8:]
    # torch.lerp's form for the weight 1 − β1: w·(end − start) from start when w < 0.5,
    # else (w − 1)·(end − start) from end; rounded to fp32 as the C kernel rounds it.
    small_weight = abs(beta1_weight) < 0.5
    weight = _float32(beta1_weight)
    _step_kernel[(count,)](
        addresses,
        blocks,
        len(bucket[0]),  # type: ignore[arg-type]
        weight if small_weight else _float32(weight - 1),
        beta2,
        beta2_weight,
        eps,
        l2,
        param_decay,
        -momentum_step,
        -grad_step,
        1 / bias_correction2_sqrt,
        clip,
        DTYPE=TRITON_DTYPES[bucket[0][0].dtype],  # type: ignore[index]
        ADOPT=arguments.algorithm == "adopt",
        SMALL_WEIGHT=small_weight,
        BLOCK=BLOCK,
        **dict(arguments.switches),
    )


def _step(
    lists: list[Sequence[Tensor] | None],
    arguments: Callable[[bool], KernelArguments],
    eager: Callable[[list[Any]], None],
) -> None:
    """One launch per (dtype, Kahan) bucket the kernels take; the rest runs `eager`."""
    params, kahan_comps = lists[0], lists[-1]
    assert params is not None and kahan_comps is not None
    rest: list[int] = []
    for indices in buckets(params, kahan_comps):
        bucket = take_all(lists, indices)
        kahan = kahan_comps[indices[0]] is not None
        if not kahan:
            bucket[-1] = None
        if params[indices[0]].dtype in TRITON_DTYPES and not split_dense(bucket)[1]:
            _launch(bucket, arguments(kahan))
        else:
            rest += indices
    if rest:
        eager(take_all(lists, sorted(rest)))


def adam_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    kahan_comps: Sequence[Tensor | None],
    c: AdamStepCoefficients,
) -> None:
    """Apply one Adam-family step (see AdamStepCoefficients): one launch per bucket.

    Later micro-batches of an optimizer-accumulation window run the foreach backend."""
    if c.continues_window:
        foreach.adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, kahan_comps, c)
        return
    _step(
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, kahan_comps],  # type: ignore[list-item]
        lambda kahan: adam_arguments(c, kahan),
        lambda lists: foreach.adam_step(*lists, c),
    )


def adopt_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    kahan_comps: Sequence[Tensor | None],
    c: AdoptStepCoefficients,
) -> None:
    """Apply one ADOPT step (see AdoptStepCoefficients): one launch per bucket."""
    _step(
        [params, grads, exp_avgs, exp_avg_sqs, None, kahan_comps],  # type: ignore[list-item]
        lambda kahan: adopt_arguments(c, kahan),
        lambda lists: foreach.adopt_step(*lists[:4], lists[5], c),
    )
