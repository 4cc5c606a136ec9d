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
def _adam_kernel(
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
    DTYPE: tl.constexpr,
    SMALL_WEIGHT: tl.constexpr,
    KAHAN: tl.constexpr,
    L2: tl.constexpr,
    DECAY: tl.constexpr,
    UPDATE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    GRAD_TERM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Adam, AMSGrad, RAdam and NAdam: the rule of AdamStepCoefficients."""
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
    if L2 or UPDATE:
        theta = _load_param(param, comp, mask, KAHAN)
    if L2:
        grad = grad + l2 * theta
    m = _lerp(tl.load(exp_avg, mask=mask).to(tl.float32), grad, lerp_coeff, SMALL_WEIGHT)
    v = tl.load(exp_avg_sq, mask=mask).to(tl.float32) * beta2 + beta2_weight * grad * grad
    second_moment = v
    if AMSGRAD:
        max_exp_avg_sq = _pointers(addresses, 4, count, index, offsets, DTYPE)
        second_moment = tl.maximum(tl.load(max_exp_avg_sq, mask=mask).to(tl.float32), v)
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


@triton.jit
def _adopt_kernel(
    addresses,
    blocks,
    count,
    lerp_coeff,
    beta2,
    beta2_weight,
    eps,
    l2,
    param_decay,
    neg_lr,
    clip,
    DTYPE: tl.constexpr,
    SMALL_WEIGHT: tl.constexpr,
    KAHAN: tl.constexpr,
    L2: tl.constexpr,
    DECAY: tl.constexpr,
    UPDATE: tl.constexpr,
    INIT: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """ADOPT: the rule of AdoptStepCoefficients."""
    index, offsets, mask = _locate(blocks, count, BLOCK)
    param = _pointers(addresses, 0, count, index, offsets, DTYPE)
    comp = param
    if KAHAN:
        comp = _pointers(addresses, 5, count, index, offsets, DTYPE)
    grad = tl.load(_pointers(addresses, 1, count, index, offsets, DTYPE), mask=mask)
    grad = grad.to(tl.float32)
    exp_avg_sq = _pointers(addresses, 3, count, index, offsets, DTYPE)
    theta = grad * 0
    if L2 or (UPDATE and not INIT):
        theta = _load_param(param, comp, mask, KAHAN)
    if L2:
        grad = grad + l2 * theta
    if INIT:
        tl.store(exp_avg_sq, _round(grad * grad, DTYPE), mask=mask)
    else:
        exp_avg = _pointers(addresses, 2, count, index, offsets, DTYPE)
        v = tl.load(exp_avg_sq, mask=mask).to(tl.float32)
        normed = tl.div_rn(grad, tl.maximum(tl.sqrt_rn(v), eps))
        if CLIP:
            normed = tl.minimum(tl.maximum(normed, -clip), clip)
        m = _lerp(tl.load(exp_avg, mask=mask).to(tl.float32), normed, lerp_coeff, SMALL_WEIGHT)
        tl.store(exp_avg, _round(m, DTYPE), mask=mask)
        tl.store(exp_avg_sq, _round(v * beta2 + beta2_weight * grad * grad, DTYPE), mask=mask)
        if UPDATE:
            if DECAY:
                theta = theta * param_decay
            _store_param(param, comp, mask, theta + neg_lr * m, DTYPE, KAHAN)


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


def _small_weight(beta1: float) -> bool:
    """torch.lerp's choice of form for weight 1 − β1 (the same in cpu_kernel.c)."""
    return abs(1 - beta1) < 0.5


def _lerp_coeff(beta1: float) -> float:
    """w or w − 1 for w = 1 − β1, rounded as cpu_kernel.c rounds it."""
    weight = _float32(1 - beta1)
    return weight if _small_weight(beta1) else _float32(weight - 1)


def _fused_buckets(
    lists: list[Sequence[Tensor] | None],
) -> list[tuple[list[list[Tensor] | None], bool]]:
    """Split into (lists, uses Kahan) buckets the kernels take; the rest runs foreach."""
    params, kahan_comps = lists[0], lists[-1]
    assert params is not None and kahan_comps is not None
    fused = []
    for indices in buckets(params, kahan_comps):
        bucket = take_all(lists, indices)
        kahan = kahan_comps[indices[0]] is not None
        if not kahan:
            bucket[-1] = None
        if params[indices[0]].dtype in TRITON_DTYPES and not split_dense(bucket)[1]:
            fused.append((bucket, kahan))
    return fused


def _unfused_indices(
    params: Sequence[Tensor], fused: list[tuple[list[list[Tensor] | None], bool]]
) -> list[int]:
    done = {id(p) for bucket, _ in fused for p in bucket[0]}  # type: ignore[union-attr]
    return [i for i, p in enumerate(params) if id(p) not in done]


def adam_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    kahan_comps: Sequence[Tensor | None],
    c: AdamStepCoefficients,
) -> None:
    """Apply one Adam-family step (see AdamStepCoefficients): one launch per bucket."""
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, kahan_comps]
    fused = _fused_buckets(lists)  # type: ignore[arg-type]
    rest = _unfused_indices(params, fused)
    if rest:
        foreach.adam_step(*take_all(lists, rest), c)  # type: ignore[arg-type]
    for bucket, kahan in fused:
        addresses, blocks, count = _tables(bucket)
        if count == 0:
            continue
        _adam_kernel[(count,)](
            addresses,
            blocks,
            len(bucket[0]),  # type: ignore[arg-type]
            _lerp_coeff(c.beta1),
            c.beta2,
            1 - c.beta2,
            c.eps,
            c.l2_weight_decay,
            c.param_decay,
            -c.momentum_step,
            -c.grad_step,
            1 / c.bias_correction2_sqrt,
            DTYPE=TRITON_DTYPES[bucket[0][0].dtype],  # type: ignore[index]
            SMALL_WEIGHT=_small_weight(c.beta1),
            KAHAN=kahan,
            L2=c.l2_weight_decay != 0,
            DECAY=c.param_decay != 1,
            UPDATE=c.update_params,
            AMSGRAD=c.amsgrad,
            ADAPTIVE=c.adaptive,
            GRAD_TERM=c.grad_step != 0,
            BLOCK=BLOCK,
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
    lists = [params, grads, exp_avgs, exp_avg_sqs, None, kahan_comps]
    fused = _fused_buckets(lists)
    rest = _unfused_indices(params, fused)
    if rest:
        params_, grads_, exp_avgs_, exp_avg_sqs_, _, comps_ = take_all(lists, rest)
        foreach.adopt_step(params_, grads_, exp_avgs_, exp_avg_sqs_, comps_, c)  # type: ignore[arg-type]
    for bucket, kahan in fused:
        addresses, blocks, count = _tables(bucket)
        if count == 0:
            continue
        _adopt_kernel[(count,)](
            addresses,
            blocks,
            len(bucket[0]),  # type: ignore[arg-type]
            _lerp_coeff(c.beta1),
            c.beta2,
            1 - c.beta2,
            c.eps,
            c.l2_weight_decay,
            c.param_decay,
            -c.lr,
            0.0 if c.clip is None else c.clip,
            DTYPE=TRITON_DTYPES[bucket[0][0].dtype],  # type: ignore[index]
            SMALL_WEIGHT=_small_weight(c.beta1),
            KAHAN=kahan,
            L2=c.l2_weight_decay != 0,
            DECAY=c.param_decay != 1,
            UPDATE=c.update_params,
            INIT=c.initialize_only,
            CLIP=c.clip is not None,
            BLOCK=BLOCK,
        )
