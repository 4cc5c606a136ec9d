"""The Triton backend: one fused kernel launch per step and bucket of tensors, for GPUs.

Each program updates one block of one tensor, found through a table of (tensor, block)
pairs, so a step over hundreds of tensors of any sizes is a single launch. Every element
of θ, g, m, v (v_max, Kahan k) is read once and written once, in fp32 for fp16/bf16
tensors. Tensors whose every address is 16-byte aligned go in one launch whose full
blocks use 128-bit loads and stores (only a tensor's last, partial block is masked);
any others in a second, scalar launch. The block table and a table of the tensors'
addresses are small device tensors, planned once per bucket and first parameter,
uploaded asynchronously, and made again only when a tensor moves; scalars travel as
kernel arguments, computed on the host, so a step never waits for the device. Launches
go to the tensors' device and its current stream, without contraction (see
compile_options), so a GPU rounds as the interpreter does.

Algorithm switches (AMSGrad, RAdam's momentum-only steps, NAdam's gradient term, ADOPT's
first call and clipping, decay modes, Kahan, stochastic rounding, lr = 0) are constexpr
arguments, so Triton compiles one specialised kernel per combination actually used.
Stochastic rounding (STOCHASTIC) rounds θ as precision.stochastic_round does, bit for
bit: each tensor's stream key sits in the address table's Kahan row and the step is a
kernel argument, so the random bits' keys change every step without an upload. float64
buckets (Triton kernel arguments are fp32) and tensors not densely laid out (and, rounded
stochastically, not contiguous) take the foreach backend.
Parameters with 8-bit state (core.quantization) take a second kernel that decodes and
encodes the moments in the same pass (_quantized_step_kernel, at the end of this file).

Bytes moved per parameter: 4·(4 + 3) = 28 for fp32 Adam, AdamW, RAdam, NAdam and ADOPT,
36 with AMSGrad; 2·(4 + 3) = 14 for bf16/fp16, 18 with Kahan (k read and written), 14
with stochastic rounding.
"""

from __future__ import annotations

import functools
import operator
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import attrgetter
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from core.backends import foreach
from core.backends.checked import CheckedStep, checked_for
from core.backends.grouping import buckets, split_dense, split_quantized, take_all
from core.backends.host_checks import host_checks
from core.backends.kernel_arguments import KernelArguments, adam_arguments, adopt_arguments
from core.backends.precision import LOW_PRECISION_DTYPES, StochasticRounding
from core.backends.views import check_addressable, check_quantized_row
from core.coefficients import AdamStepCoefficients, AdoptStepCoefficients
from core.quantization import BLOCK_SIZE as QUANTIZATION_BLOCK
from core.quantization import (
    SIGNED_MAP,
    SMALLEST_SCALE,
    UNSIGNED_MAP,
    CodeMap,
    QuantizedMoment,
    absmax_shape,
    block_shape,
    map_values,
)
from core.random_bits import offset_key

BLOCK = 1024
TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _locate(blocks, count, BLOCK: tl.constexpr):
    """This program's tensor, its first element and the tensor's size, from the block table:
    the tensors' sizes, then a (tensor, block) pair per program."""
    pair = blocks + count + 2 * tl.program_id(0)
    index = tl.load(pair)
    return index, tl.load(pair + 1) * BLOCK, tl.load(blocks + index)


@triton.jit
def _base(addresses, row, count, index, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to the first element of tensor `index` in list `row` of the address table.
    An int64 turned into a pointer has no known alignment; where the host has checked
    that every tensor of the launch starts on 16 bytes, saying so lets the compiler emit
    128-bit loads and stores."""
    pointer = tl.load(addresses + row * count + index).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


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
def _widened(value):
    """A loaded tile in fp32. bfloat16 is widened by hand (its bits are fp32's top half),
    as _round narrows it: Triton's interpreter misread bf16 subnormals (5.7e-39 as
    1.1e-38, 9e-41 as 0), and the shift gives the same bits on every GPU."""
    if value.dtype == tl.bfloat16:
        bits = value.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True)
    return value.to(tl.float32)


@triton.jit
def _mix32(value):
    """precision.mix32 on uint32 values (multiplication wraps modulo 2^32)."""
    value ^= value >> 16
    value *= 0x7FEB352D
    value ^= value >> 15
    value *= 0x846CA68B
    return value ^ (value >> 16)


@triton.jit
def _random_bits(index, key):
    """core.random_bits.rounding_bits: element `index`'s 32 random bits under `key`."""
    return _mix32(index.to(tl.uint32) * 0x9E3779B1 + key)


@triton.jit
def _uniform(random):
    """The top 24 of 32 random bits as a uniform fp32 value in [0, 1)."""
    return (random >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24


@triton.jit
def _rounding_key(addresses, count, index, step):
    """The 32-bit key of tensor `index` at this step, as StochasticRounding.key(): the
    address table's last row holds the tensor's stream_key() and, in its high 32 bits, its
    shard's offset term (_stream_keys) in place of a Kahan buffer, and the step (an int32
    argument, its bits those of the step modulo 2^32) is hashed in here, so keys change
    every step without an upload."""
    entry = tl.load(addresses + 5 * count + index)
    stream_key = entry.to(tl.uint32)
    offset_term = (entry >> 32).to(tl.uint32)
    return _mix32(stream_key ^ step.to(tl.uint32, bitcast=True)) + offset_term


@triton.jit
def _stochastic_round(theta, index, key, DTYPE: tl.constexpr):
    """precision.stochastic_round up to the final conversion: fp32 values on DTYPE's grid,
    rounded up or down with the reference's random bits for element `index` (the
    offset within the tensor) and `key`; every operation is exact, so the result is the
    reference's bit for bit. Powers of two are built from their bits, and division by
    them is multiplication by their exact reciprocals; non-finite values pass through
    (rounded to nearest by _round)."""
    if DTYPE == tl.bfloat16:  # noqa: SIM300 (DTYPE is the variable)
        mantissa_bits: tl.constexpr = 7
        min_exponent: tl.constexpr = -126
    else:
        mantissa_bits: tl.constexpr = 10
        min_exponent: tl.constexpr = -14
    bits = theta.to(tl.uint32, bitcast=True)
    finite = (bits & 0x7F800000) != 0x7F800000
    value = tl.where(finite, theta, 0.0)
    exponent = ((bits >> 23) & 0xFF).to(tl.int32) - 127
    exponent = tl.maximum(exponent, min_exponent)
    shift = mantissa_bits - exponent
    first = shift >> 1  # floor(shift / 2), as the reference's halves
    second = shift - first
    scale_first = ((first + 127) << 23).to(tl.float32, bitcast=True)
    scale_second = ((second + 127) << 23).to(tl.float32, bitcast=True)
    unscale_first = ((127 - first) << 23).to(tl.float32, bitcast=True)
    unscale_second = ((127 - second) << 23).to(tl.float32, bitcast=True)
    scaled = value * scale_first * scale_second
    below = tl.floor(scaled)
    up = tl.where(_uniform(_random_bits(index, key)) < scaled - below, 1.0, 0.0)
    rounded = (below + up) * unscale_first * unscale_second
    return tl.where(finite, rounded, theta)


@triton.jit
def _load_param(param, comp, mask, KAHAN: tl.constexpr):
    """θ in fp32, including its Kahan compensation."""
    theta = _widened(tl.load(param, mask=mask))
    if KAHAN:
        theta = theta + _widened(tl.load(comp, mask=mask))
    return theta


@triton.jit
def _store_param(
    param,
    comp,
    mask,
    theta,
    index,
    key,
    DTYPE: tl.constexpr,
    KAHAN: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    """Round θ into place; with Kahan keep in k what rounding lost. STOCHASTIC rounds
    16-bit θ stochastically (_stochastic_round, element `index`, the tensor's `key`)."""
    if STOCHASTIC:
        theta = _stochastic_round(theta, index, key, DTYPE)
    rounded = _round(theta, DTYPE)
    tl.store(param, rounded, mask=mask)
    if KAHAN:
        tl.store(comp, _round(theta - _widened(rounded), DTYPE), mask=mask)


@triton.jit
def _lerp(start, end, coeff, SMALL_WEIGHT: tl.constexpr):
    """torch.lerp, exact at both ends: base + coeff·(end − start), as in cpu_kernel.c."""
    if SMALL_WEIGHT:
        return start + coeff * (end - start)
    return end + coeff * (end - start)


@triton.jit
def _rule(
    g,
    theta,
    m,
    v,
    v_max,
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
    ADOPT: tl.constexpr,
    SMALL_WEIGHT: tl.constexpr,
    L2: tl.constexpr,
    DECAY: tl.constexpr,
    UPDATE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    GRAD_TERM: tl.constexpr,
    INIT: tl.constexpr,
    CLIP: tl.constexpr,
):
    """Every algorithm's math, once, on fp32 values however they are stored: Adam,
    AMSGrad, RAdam and NAdam (AdamStepCoefficients) or, with ADOPT, ADOPT
    (AdoptStepCoefficients, neg_momentum_step carrying −lr). Takes g, θ and the moments
    as read (those a switch leaves unread may be anything) and returns the new
    (m, v, v_max, θ); callers load and store them (see _update, _quantized_step_kernel)."""
    if L2:
        g = tl.fma(l2, theta, g)  # one rounding, as torch's add(alpha=) (see cpu_kernel.c)
    if ADOPT:
        if INIT:
            v = g * g
        else:
            # NaN-propagating bounds, as torch.clamp and torch.maximum behave (Triton's
            # default drops NaN, which would turn a NaN gradient into a full-size step).
            root = tl.maximum(tl.sqrt_rn(v), eps, propagate_nan=tl.PropagateNan.ALL)
            normed = tl.div_rn(g, root)
            if CLIP:
                normed = tl.maximum(normed, -clip, propagate_nan=tl.PropagateNan.ALL)
                normed = tl.minimum(normed, clip, propagate_nan=tl.PropagateNan.ALL)
            m = _lerp(m, normed, lerp_coeff, SMALL_WEIGHT)
            v = v * beta2 + beta2_weight * g * g
            if UPDATE:
                if DECAY:
                    theta = theta * param_decay
                theta = theta + neg_momentum_step * m
    else:
        m = _lerp(m, g, lerp_coeff, SMALL_WEIGHT)
        v = v * beta2 + beta2_weight * g * g
        second_moment = v
        if AMSGRAD:
            second_moment = tl.maximum(v_max, v, propagate_nan=tl.PropagateNan.ALL)
        v_max = second_moment
        if UPDATE:
            if DECAY:
                theta = theta * param_decay
            if ADAPTIVE:
                denom = tl.sqrt_rn(second_moment) * inv_bias_correction2_sqrt + eps
                if GRAD_TERM:
                    inv_denom = tl.div_rn(tl.full(denom.shape, 1.0, tl.float32), denom)
                    theta = theta + neg_grad_step * g * inv_denom
                    theta = theta + neg_momentum_step * m * inv_denom
                else:
                    theta = theta + tl.div_rn(neg_momentum_step * m, denom)
            else:
                theta = theta + neg_momentum_step * m
    return m, v, v_max, theta


@triton.jit
def _update(
    param,
    comp,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    mask,
    offsets,
    key,
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
    STOCHASTIC: tl.constexpr,
    L2: tl.constexpr,
    DECAY: tl.constexpr,
    UPDATE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    GRAD_TERM: tl.constexpr,
    INIT: tl.constexpr,
    CLIP: tl.constexpr,
):
    """One block of moments stored in the parameter's dtype: load what the switches
    read, apply _rule, store what it changed. mask None: a full block, no bounds checks.
    (INIT, ADOPT's first call, reads neither moment and writes only v.)"""
    g = _widened(tl.load(grad, mask=mask))
    theta = g * 0
    if L2 or (UPDATE and not INIT):
        theta = _load_param(param, comp, mask, KAHAN)
    m = g * 0
    v = g * 0
    if not INIT:
        m = _widened(tl.load(exp_avg, mask=mask))
        v = _widened(tl.load(exp_avg_sq, mask=mask))
    v_max = v
    if AMSGRAD:
        v_max = _widened(tl.load(max_exp_avg_sq, mask=mask))
    m, v, v_max, theta = _rule(
        g,
        theta,
        m,
        v,
        v_max,
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
        ADOPT,
        SMALL_WEIGHT,
        L2,
        DECAY,
        UPDATE,
        AMSGRAD,
        ADAPTIVE,
        GRAD_TERM,
        INIT,
        CLIP,
    )
    if AMSGRAD:
        tl.store(max_exp_avg_sq, _round(v_max, DTYPE), mask=mask)
    if not INIT:
        tl.store(exp_avg, _round(m, DTYPE), mask=mask)
    tl.store(exp_avg_sq, _round(v, DTYPE), mask=mask)
    if UPDATE and not INIT:
        _store_param(param, comp, mask, theta, offsets, key, DTYPE, KAHAN, STOCHASTIC)


@triton.jit(do_not_specialize=["count", "step"])
def _step_kernel(
    addresses,
    blocks,
    count,
    step,
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
    ALIGNED: tl.constexpr,
    ADOPT: tl.constexpr,
    SMALL_WEIGHT: tl.constexpr,
    KAHAN: tl.constexpr,
    STOCHASTIC: tl.constexpr,
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
    """One step over one block of one tensor. Full blocks run without bounds checks, so
    with ALIGNED every access is 128 bits wide; only a tensor's last, partial block is
    masked (and scalar). STOCHASTIC: θ is rounded stochastically, with the tensor's key
    at `step` (_rounding_key); Kahan and stochastic rounding exclude each other."""
    index, start, size = _locate(blocks, count, BLOCK)
    offsets = start + tl.arange(0, BLOCK)
    param = _base(addresses, 0, count, index, DTYPE, ALIGNED) + offsets
    grad = _base(addresses, 1, count, index, DTYPE, ALIGNED) + offsets
    exp_avg = _base(addresses, 2, count, index, DTYPE, ALIGNED) + offsets
    exp_avg_sq = _base(addresses, 3, count, index, DTYPE, ALIGNED) + offsets
    max_exp_avg_sq = param
    if AMSGRAD:
        max_exp_avg_sq = _base(addresses, 4, count, index, DTYPE, ALIGNED) + offsets
    comp = param
    if KAHAN:
        comp = _base(addresses, 5, count, index, DTYPE, ALIGNED) + offsets
    key = step.to(tl.uint32, bitcast=True)
    if STOCHASTIC:
        key = _rounding_key(addresses, count, index, step)
    if start + BLOCK <= size:
        _update(
            param,
            comp,
            grad,
            exp_avg,
            exp_avg_sq,
            max_exp_avg_sq,
            None,
            offsets,
            key,
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
            DTYPE,
            ADOPT,
            SMALL_WEIGHT,
            KAHAN,
            STOCHASTIC,
            L2,
            DECAY,
            UPDATE,
            AMSGRAD,
            ADAPTIVE,
            GRAD_TERM,
            INIT,
            CLIP,
        )
    else:
        _update(
            param,
            comp,
            grad,
            exp_avg,
            exp_avg_sq,
            max_exp_avg_sq,
            offsets < size,
            offsets,
            key,
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
            DTYPE,
            ADOPT,
            SMALL_WEIGHT,
            KAHAN,
            STOCHASTIC,
            L2,
            DECAY,
            UPDATE,
            AMSGRAD,
            ADAPTIVE,
            GRAD_TERM,
            INIT,
            CLIP,
        )


@functools.cache
def compile_options(device_type: str) -> dict[str, Any]:
    """Triton options for every launch on a device type. Contraction off: no multiply and
    add is fused into an FMA, so each operation rounds as written, as in the loop backend
    (torch's eager kernels) and Triton's interpreter. On CUDA, subnormals are kept
    (libdevice's sqrt and division otherwise flush them to zero) where this Triton has
    the option (enable_reflect_ftz, not in Triton 3.3). maxnreg 255 (the hardware limit)
    stops ptxas for sm_100 from capping registers on its own: it held fp16 Kahan AMSGrad
    at 56 and spilled 8-16 bytes; allowed more, it uses 65 and spills nothing."""
    options: dict[str, Any] = {"enable_fp_fusion": False}
    if device_type == "cuda":
        from triton.backends.nvidia.compiler import CUDAOptions

        options["maxnreg"] = 255

        if "enable_reflect_ftz" in CUDAOptions.__dataclass_fields__:
            options["enable_reflect_ftz"] = False
    return options


RUNTIME_ARGUMENT_TYPES = {"addresses": "*i64", "blocks": "*i64", "count": "i32", "step": "i32"}
"""Types of the kernel's runtime arguments for ahead-of-time compilation; the others
are fp32 scalars. `count` and `step` are never specialised (do_not_specialize), so one
compiled kernel serves any number of tensors, one (gradient release) included, and
every step."""
ALIGNMENT = 16
"""Bytes a tensor's address must be a multiple of for the 128-bit path (ALIGNED)."""
_PLANS_PER_ANCHOR = 4
"""Address layouts remembered per first parameter of a bucket: gradients that come back
at alternating addresses, and the buckets that share a first parameter, fit."""


@dataclass
class _Table:
    """A metadata table on the device, and the streams that may read it already."""

    values: Tensor
    ready: Any  # the upload's event on CUDA/XPU, None on CPU
    streams: set[Any] = field(default_factory=set)


@dataclass
class _Launch:
    """One kernel launch: its tensors' addresses and blocks, and its constexpr ALIGNED."""

    addresses: _Table
    blocks: _Table
    programs: int
    tensors: int
    aligned: bool


@dataclass
class _Plan:
    """How to run one bucket while its tensors stay where they are."""

    launches: list[_Launch]
    eager: list[int]
    """Indices into the bucket that the kernel cannot take (not dense): run eagerly."""


class _AnchorCache(OrderedDict):
    """What was made for the buckets or steps whose first parameter starts at anchor's
    address (with its element count), the least recently used dropped beyond ANCHORS.
    Not by a weak reference to the parameter: torch.utils.swap_tensors (module.to() with
    torch.__future__.set_swap_module_params_on_conversion, to_empty, a DTensor's
    conversions) refuses a tensor with a weak reference, so after one Triton step the
    model could no longer be converted. Not by id either: an FSDP2 parameter's local
    tensor is a new view each step on torch 2.13, so each step planned again. An entry is
    only ever used under its layout key (every tensor's address, size, dtype and layout),
    which is all it depends on, so memory reused by another tensor finds it valid or
    misses."""

    ANCHORS = 8192
    """Parameters remembered: a large model's, released one by one (under a step memo a
    step keeps its own plan; these serve the steps without one: tensor subclasses such as
    FSDP2's DTensors, optimizer accumulation). What a collected model left is dropped as
    new parameters come: its plans' address tables, a few hundred bytes each."""

    @staticmethod
    def _place(anchor: Tensor) -> tuple[int, int]:
        try:
            return anchor.data_ptr(), anchor.numel()
        except RuntimeError:  # no storage: planned under its own key, which then fails
            return id(anchor), -1

    def find(self, anchor: Tensor) -> Any:
        place = self._place(anchor)
        found = self.get(place)
        if found is not None:
            self.move_to_end(place)
        return found

    def keep(self, anchor: Tensor, value: Any) -> Any:
        self[self._place(anchor)] = value
        if len(self) > self.ANCHORS:
            self.popitem(last=False)
        return value


_plans = _AnchorCache()
"""First parameter of a bucket -> {(layout key): plan}. Per parameter, so gradient release
(a bucket per parameter) keeps every parameter's plan."""
_blocks: dict[tuple[torch.device, tuple[int, ...]], _Table] = {}
"""Block tables by sizes, shared: under gradient release many parameters share a shape."""
_BLOCK_TABLES = 4096


def _device_module(device: torch.device) -> Any:
    return None if device.type == "cpu" else getattr(torch, device.type)


def _upload(values: Tensor, device: torch.device) -> _Table:
    """Copy host metadata to the device without waiting (pinned memory, non-blocking, on
    the device's current stream), with an event that other streams wait on before use."""
    module = _device_module(device)
    if module is None:
        return _Table(values, None)
    on_device = values.pin_memory().to(device, non_blocking=True)
    ready = module.Event()
    ready.record(module.current_stream(device))
    return _Table(on_device, ready, {module.current_stream(device)})


def _ready_on(table: _Table, stream: Any) -> Tensor:
    """The table, safe to read on `stream`: that stream waits for the upload once, and the
    allocator is told the table is in use there (it must not be reused under it)."""
    if stream is not None and stream not in table.streams:
        stream.wait_event(table.ready)
        table.values.record_stream(stream)
        table.streams.add(stream)
    return table.values


def _rows_present(bucket: list[list[Tensor] | None]) -> list[list[Tensor]]:
    return [values for values in bucket if values is not None]


def _key(bucket: list[list[Tensor] | None]) -> tuple:
    """What a plan depends on: every tensor's address, size, dtype and contiguity, the
    gradients' types and, if any parameter or gradient is not contiguous, every layout.
    Read every step: a gradient is a new tensor each step (of another dtype, with
    grad_dtype=None, it may land at the old one's address), and any tensor can be moved,
    narrowed, re-strided or replaced by a view of another dtype in place (`.data =`, set_,
    resize_, a state entry set by hand) at the same address: a plan made for the old one
    would have the kernel write past the new one's end."""
    present = _rows_present(bucket)
    flags = tuple(values is not None for values in bucket)
    return flags, *map(_described, present), *_kinds_and_layouts(present)


def _described(values: Sequence[Tensor]) -> Any:
    """Each tensor's address, size, shape, dtype and contiguity, hashable: one C++
    pass (core.backends.host_checks) where the module is built."""
    described = host_checks().parameter_layout(values)
    if described is None:  # not all plain strided tensors: _make_plan refuses them by name
        return tuple((t.data_ptr(), t.numel(), t.dtype) for t in values)
    return described if isinstance(described, bytes) else tuple(map(tuple, described))


def _kinds_and_layouts(present: list[list[Tensor]]) -> tuple[Any, Any]:
    """The gradients' types and dtypes, and every tensor's strides where a parameter or a
    gradient is not contiguous: only then can a non-contiguous tensor be planned into a
    flat pass (split_dense), so only then must its exact layout be in the key."""
    params, grads = present[0], present[1]
    layouts = None
    if not (all(map(Tensor.is_contiguous, params)) and all(map(Tensor.is_contiguous, grads))):
        layouts = tuple(t.stride() for values in present for t in values)
    return _gradient_kinds(grads), layouts


def _gradient_kinds(grads: Sequence[Tensor]) -> tuple[frozenset, frozenset]:
    """The types and dtypes among gradients: a plan checked for one holds for no other."""
    return frozenset(map(type, grads)), frozenset(map(attrgetter("dtype"), grads))


def _check_addressable(bucket: list[list[Tensor] | None]) -> None:
    """Refuse what the kernel must not be given an address of (views.check_addressable):
    a tensor subclass (whose data_ptr need not be its data), another dtype, device or size
    than its parameter's. Layouts the kernel cannot take run eagerly (see _make_plan)."""
    params = bucket[0]
    assert params is not None
    check_addressable(bucket, params[0].dtype, params[0].device, require_dense=False)


def _block_table(sizes: tuple[int, ...], device: torch.device) -> tuple[_Table, int]:
    """The sizes, then (tensor index, block index) for every block of every tensor."""
    key = (device, sizes)
    table = _blocks.get(key)
    if table is None:
        if len(_blocks) >= _BLOCK_TABLES:
            _blocks.clear()
        size = torch.tensor(sizes, dtype=torch.int64, device="cpu")
        per_tensor = (size + BLOCK - 1) // BLOCK
        index = torch.repeat_interleave(torch.arange(len(sizes), device="cpu"), per_tensor)
        first = torch.repeat_interleave(torch.cumsum(per_tensor, 0) - per_tensor, per_tensor)
        block = torch.arange(index.numel(), device="cpu") - first
        table = _upload(torch.cat([size, torch.stack([index, block], dim=1).flatten()]), device)
        _blocks[key] = table
    return table, (table.values.numel() - len(sizes)) // 2


def _make_plan(
    bucket: list[list[Tensor] | None], rounding: Sequence[StochasticRounding] | None = None
) -> _Plan:
    """Check the bucket, then split it: tensors not densely laid out run eagerly; the
    rest in at most two launches, those whose every tensor starts on ALIGNMENT bytes
    (vectorised) and the others, so one odd tensor leaves the rest of its bucket fast.
    rounding: the bucket's StochasticRoundings under STOCHASTIC, whose stream keys take
    the Kahan row of the address table; a tensor's random bits follow its logical
    (row-major) order, so only contiguous tensors are run by the kernel then."""
    _check_addressable(bucket)
    dense, strided = split_dense(bucket)
    params = bucket[0]
    assert params is not None
    if rounding is not None and not all(params[i].is_contiguous() for i in dense):
        strided = sorted(strided + [i for i in dense if not params[i].is_contiguous()])
        dense = [i for i in dense if params[i].is_contiguous()]
    device = params[0].device
    aligned: list[int] = []
    unaligned: list[int] = []
    for i in dense:
        row_addresses = [values[i].data_ptr() for values in _rows_present(bucket)]
        (aligned if all(a % ALIGNMENT == 0 for a in row_addresses) else unaligned).append(i)
    launches = []
    for indices, is_aligned in ((aligned, True), (unaligned, False)):
        part = take_all(bucket, indices)
        sizes = tuple(params[i].numel() for i in indices)
        if sum(sizes) == 0:
            continue
        first = part[0]
        assert first is not None
        addresses = [
            0 if values is None else t.data_ptr() for values in part for t in values or first
        ]
        if rounding is not None:  # the last row: the stream keys
            addresses[-len(indices) :] = _stream_keys([rounding[i] for i in indices])
        blocks, programs = _block_table(sizes, device)
        table = _upload(torch.tensor(addresses, dtype=torch.int64, device="cpu"), device)
        launches.append(_Launch(table, blocks, programs, len(indices), is_aligned))
    return _Plan(launches, strided)


def _plan(
    bucket: list[list[Tensor] | None], rounding: Sequence[StochasticRounding] | None = None
) -> _Plan:
    """The bucket's plan, made again only when a tensor moved or changed size or layout
    (or, under STOCHASTIC, a seed, stream or shard offset changed)."""
    params = bucket[0]
    assert params is not None
    try:
        key = _key(bucket)
    except RuntimeError:  # a tensor without storage: say which
        _check_addressable(bucket)
        raise
    if rounding is not None:
        key = (key, tuple(map(_ROUNDING_PLAN_FIELDS, rounding)))
    plans = _plans.find(params[0])
    if plans is None:
        plans = _plans.keep(params[0], OrderedDict())
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = _make_plan(bucket, rounding)
        if len(plans) > _PLANS_PER_ANCHOR:
            plans.popitem(last=False)
    return plan


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


_ROUNDING_PLAN_FIELDS = attrgetter("seed", "stream", "first_index")
"""The fields of a StochasticRounding that its table entry is made from (_stream_keys): a
plan is made again when any of them changes."""


def rounding_switches(comp: object, dtype: torch.dtype) -> tuple[bool, bool]:
    """(KAHAN, STOCHASTIC) of a bucket whose first parameter (of `dtype`) is rounded as
    `comp` says (its entry of kahan_comps): a Kahan buffer, a StochasticRounding (on 16-bit
    parameters; fp32 has nothing to round), or None."""
    if type(comp) is StochasticRounding:
        return False, dtype in LOW_PRECISION_DTYPES
    return comp is not None, False


def _bucket_rounding(
    bucket: list[Any], dtype: torch.dtype
) -> tuple[bool, list[StochasticRounding] | None]:
    """Take the bucket's rounding list out of it where it holds no tensors (its last list
    set to None): (KAHAN, the bucket's StochasticRoundings where STOCHASTIC, else None)."""
    comps = bucket[-1]
    assert comps is not None
    kahan, stochastic = rounding_switches(comps[0], dtype)
    if not kahan:
        bucket[-1] = None
    return kahan, comps if stochastic else None


def _stream_keys(rounding: Sequence[StochasticRounding]) -> list[int]:
    """Each tensor's StochasticRounding.stream_key() in the low 32 bits and its shard's
    offset term (offset_key(0, first_index)) in the high 32, as an int64: the address
    table's last row under STOCHASTIC (a tensor's key at a step is made from it in the
    kernel, _rounding_key)."""
    entries = [r.stream_key() | offset_key(0, r.first_index) << 32 for r in rounding]
    return [entry - (1 << 64) if entry >= 1 << 63 else entry for entry in entries]


def _step_argument(step: int | None) -> int:
    """A step (or a state_draw) as the kernels' int32 `step`: the bits of step modulo
    2^32 (0 if none)."""
    step = (step or 0) & 0xFFFFFFFF
    return step - (1 << 32) if step >= 1 << 31 else step


def _kernel_scalars(arguments: KernelArguments) -> tuple[tuple[float, ...], bool]:
    """The kernel's runtime scalars, prepared as cpu_kernel.c prepares them, and
    SMALL_WEIGHT."""
    (beta1_weight, beta2, beta2_weight, eps, l2, param_decay, momentum_step, grad_step) = (
        arguments.scalars[:8]
    )
    bias_correction2_sqrt, clip = arguments.scalars[8:]
    # torch.lerp's form for the weight 1 − β1: w·(end − start) from start when w < 0.5,
    # else (w − 1)·(end − start) from end; rounded to fp32 as the C kernel rounds it.
    small_weight = abs(beta1_weight) < 0.5
    weight = _float32(beta1_weight)
    scalars = (
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
    )
    return scalars, small_weight


_last_launch_inputs: list[Any] = [(None, None)]
"""[(KernelArguments, what _launch_inputs made of them)]: reused while a step's arguments
are the same object (every parameter of a replayed released step, see kernel_arguments)."""


def _launch_inputs(
    arguments: KernelArguments, dtype: torch.dtype, device_type: str, stochastic: bool
) -> tuple[tuple[float, ...], tuple[dict[str, Any], dict[str, Any]]]:
    """(runtime scalars, keyword arguments of an unaligned and of an aligned launch)."""
    last_arguments, inputs = _last_launch_inputs[0]
    if last_arguments is not arguments or inputs[2] != (dtype, device_type, stochastic):
        scalars, small_weight = _kernel_scalars(arguments)
        options = compile_options(device_type)
        algorithm, switches = arguments.algorithm, arguments.switches
        keywords = tuple(
            _constexprs(dtype, aligned, algorithm, small_weight, switches, stochastic) | options
            for aligned in (False, True)
        )
        inputs = (scalars, keywords, (dtype, device_type, stochastic))
        _last_launch_inputs[0] = (arguments, inputs)
    return inputs[0], inputs[1]


def _launch_plan(
    plan: _Plan,
    dtype: torch.dtype,
    device: torch.device,
    arguments: KernelArguments,
    step: int | None = None,
) -> None:
    """Launch a plan's kernels on the tensors' device (whatever device is current) and
    its current stream. Floating-point contraction is off: every multiply and add rounds
    as written, as in the loop backend and Triton's interpreter. step: the step whose
    random bits round the parameters stochastically (STOCHASTIC), else None."""
    scalars, keywords = _launch_inputs(arguments, dtype, device.type, step is not None)
    module = _device_module(device)
    guard = nullcontext() if module is None else module.device(device)
    with guard:
        stream = None if module is None else module.current_stream(device)
        for launch in plan.launches:
            _step_kernel[(launch.programs,)](
                _ready_on(launch.addresses, stream),
                _ready_on(launch.blocks, stream),
                launch.tensors,
                _step_argument(step),
                *scalars,
                **keywords[launch.aligned],
            )


def launch_constexprs(
    dtype: torch.dtype,
    aligned: bool,
    algorithm: str,
    small_weight: bool,
    switches: dict[str, bool],
    stochastic: bool = False,
) -> dict[str, Any]:
    """The constexpr arguments of one launch: which specialisation of the kernel runs
    (stochastic: rounding_switches' STOCHASTIC)."""
    return {
        "DTYPE": TRITON_DTYPES[dtype],
        "ALIGNED": aligned,
        "ADOPT": algorithm == "adopt",
        "SMALL_WEIGHT": small_weight,
        "BLOCK": BLOCK,
        **switches,
        "STOCHASTIC": stochastic,
    }


@functools.cache
def _constexprs(
    dtype: torch.dtype,
    aligned: bool,
    algorithm: str,
    small_weight: bool,
    switches: tuple[tuple[str, bool], ...],
    stochastic: bool,
) -> dict[str, Any]:
    """launch_constexprs, built once per combination (a launch copies it into kwargs)."""
    return launch_constexprs(dtype, aligned, algorithm, small_weight, dict(switches), stochastic)


def _step(
    lists: list[Sequence[Tensor] | None],
    arguments: Callable[[bool], KernelArguments],
    eager: Callable[[list[Any]], None],
) -> None:
    """Launches per (dtype, rounding) bucket the kernels take; the rest runs `eager`.
    Every bucket is checked and planned before anything is launched, so a refused tensor
    leaves every parameter and state as it was."""
    checked = checked_for(lists[0])
    full, eight_bit = _split_step(lists, checked)
    if full is not None:  # some moments are 8-bit: they have their own kernel
        lists = take_all(lists, full)
    params = lists[0]
    assert params is not None
    steps = _planned_step(lists, checked) if params else None
    # Everything the kernels take is checked and planned: only now is anything written.
    if eight_bit is not None:
        eight_bit.run(arguments, eager)
    if steps is None:
        return
    for plan, dtype, device, kahan, rounding_index in steps.launches:
        if plan.launches:
            step = None if rounding_index is None else lists[-1][rounding_index].step  # type: ignore[index,union-attr]
            _launch_plan(plan, dtype, device, arguments(kahan), step)
    if steps.rest:
        eager(take_all(lists, steps.rest))


@dataclass
class _SplitStep:
    """How a checked step's lists split into parameters with full-precision moments and
    parameters with 8-bit ones, and the 8-bit part's plans: reused while the step's plan
    key is the one they were made under."""

    key: list[Any]
    full: list[int] | None
    quantized: list[int]
    planned: list[tuple[_QuantizedPlan, Tensor, bool, int | None]]
    eager: list[int]


def _split_step(
    lists: list[Sequence[Tensor] | None], checked: CheckedStep | None
) -> tuple[list[int] | None, _QuantizedStep | None]:
    """(indices of the parameters whose moments are all full precision, or None for
    every one; the others' checked and planned 8-bit step, or None if there are none).

    A step the optimizer checked (core.backends.checked) reuses the last one's split and
    plans while its plan key holds: the memo vouches for every tensor's address, size,
    block rows, dtype and contiguity (core.backends.host_checks) and for each
    moment's form, which is all the split, the checks and the plans depend on besides the
    gradients' addresses in the key. The full-precision part is then planned under the
    same key too (its lists are the same subset every such step)."""
    key = None if checked is None else checked.plan_key
    last = None if checked is None else checked.triton_split
    if key is not None and last is not None and last.key == key:
        eight_bit = None
        if last.quantized:
            eight_bit = _QuantizedStep(take_all(lists, last.quantized), last.planned, last.eager)
        return last.full, eight_bit
    full, quantized = split_quantized(lists)
    eight_bit = _prepare_quantized(take_all(lists, quantized), quantized) if quantized else None
    if key is not None:
        assert checked is not None
        planned, eager = ([], []) if eight_bit is None else (eight_bit.planned, eight_bit.eager)
        checked.triton_split = _SplitStep(key, full, quantized, planned, eager)
    return full, eight_bit


@dataclass
class _Steps:
    """How one step over a set of lists runs: each bucket's plan (with the dtype, device and
    Kahan switch it launches with, and under STOCHASTIC the index of a parameter of the
    bucket, whose StochasticRounding gives the step), and the indices the kernels cannot
    take."""

    key: list[Any] | None
    launches: list[tuple[_Plan, torch.dtype, torch.device, bool, int | None]]
    rest: list[int]


_last_steps = _AnchorCache()
"""First parameter of a step -> how its last step ran, reused while `_steps_key` is
unchanged: a step over 300 tensors then reads each address once, where bucketing and
planning each bucket read the devices, dtypes and addresses again (~70 µs more)."""


def _steps_key(lists: list[Sequence[Tensor] | None]) -> list[Any] | None:
    """What bucketing and every bucket's plan depend on, as `_key` states it for one
    bucket: which lists are present, every tensor's address, size, dtype and contiguity,
    the gradients' types and, if any parameter or gradient is not contiguous, every
    layout, and under stochastic rounding every seed and stream. None when only some
    parameters have a Kahan buffer or are rounded stochastically, or the stochastic
    roundings are of several steps (planned every step)."""
    params, grads, kahan_comps = lists[0], lists[1], lists[-1]
    assert params is not None and grads is not None and kahan_comps is not None
    first = kahan_comps[0]
    kahan: Any = first is not None
    if type(first) is StochasticRounding:
        if set(map(type, kahan_comps)) != {StochasticRounding}:
            return None
        if len(set(map(attrgetter("step"), kahan_comps))) != 1:
            return None
        kahan = tuple(map(_ROUNDING_PLAN_FIELDS, kahan_comps))
        rows: tuple[Any, ...] = (*lists[:-1], None)
    else:
        nones = map(operator.is_, kahan_comps, repeat(None))
        if any(nones) if kahan else not all(nones):
            return None
        rows = (*lists[:-1], kahan_comps if kahan else None)
    present = [values for values in rows if values is not None]
    key: list[Any] = [tuple(values is not None for values in lists[:-1]), kahan]
    key += map(_described, present)
    key += _kinds_and_layouts(present)
    return key


def _same_dtype_gradients(
    indices: list[int], grads: Sequence[Tensor], dtype: torch.dtype
) -> tuple[list[int], list[int]]:
    """(indices whose gradient has the parameters' dtype, the others): a gradient of
    another dtype (grad_dtype=None, say bf16 gradients of fp32 weights) runs eagerly, as
    on the fused CPU backend."""
    every = grads if len(indices) == len(grads) else [grads[i] for i in indices]
    if set(map(attrgetter("dtype"), every)) == {dtype}:
        return indices, []
    same = [i for i in indices if grads[i].dtype == dtype]
    return same, [i for i in indices if grads[i].dtype != dtype]


def _planned_step(
    lists: list[Sequence[Tensor] | None], checked: CheckedStep | None = None
) -> _Steps:
    """The step's buckets and plans: the last step's while no tensor moved, else bucketed
    and planned again (checking every bucket, as the first step did). A step the
    optimizer checked (core.backends.checked) brings its key."""
    params, kahan_comps = lists[0], lists[-1]
    assert params is not None and kahan_comps is not None
    key = checked.plan_key if checked is not None else None
    if key is None:
        try:
            key = _steps_key(lists)
        except RuntimeError:  # a tensor without storage: _plan says which
            key = None
    if key is None:
        last = None
    elif checked is not None:  # its own plan: no lookup by the first parameter (~1 µs)
        last = checked.triton_steps
    else:
        last = _last_steps.find(params[0])
    if last is not None and last.key == key:
        return last
    steps = _Steps(key, [], [])
    grads = lists[1]
    assert grads is not None
    for indices in buckets(params, kahan_comps):
        first = params[indices[0]]
        if first.dtype not in TRITON_DTYPES:
            steps.rest += indices
            continue
        indices, other_dtype = _same_dtype_gradients(indices, grads, first.dtype)
        steps.rest += other_dtype
        if not indices:
            continue
        bucket = take_all(lists, indices)
        kahan, rounding = _bucket_rounding(bucket, first.dtype)
        plan = _plan(bucket, rounding)
        rounding_index = None if rounding is None else indices[0]
        steps.launches.append((plan, first.dtype, first.device, kahan, rounding_index))
        steps.rest += [indices[i] for i in plan.eager]
    steps.rest.sort()
    if key is not None:
        if checked is not None:
            checked.triton_steps = steps
        else:
            _last_steps.keep(params[0], steps)
    return steps


def adam_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    kahan_comps: Sequence[Tensor | None],
    c: AdamStepCoefficients,
) -> None:
    """Apply one Adam-family step (see AdamStepCoefficients): launches per bucket (see _step).

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
    """Apply one ADOPT step (see AdoptStepCoefficients): launches per bucket (see _step)."""
    _step(
        [params, grads, exp_avgs, exp_avg_sqs, None, kahan_comps],  # type: ignore[list-item]
        lambda kahan: adopt_arguments(c, kahan),
        lambda lists: foreach.adopt_step(*lists[:4], lists[5], c),
    )


# -- 8-bit state (core.quantization), in one pass ---------------------------------------------
#
# Each program updates QBLOCKS whole quantization blocks (each up to BLOCK_SIZE elements of
# one row) of one tensor, as a (QBLOCKS, QBLOCK) tile: it decodes m, v (v_max) from their
# codes and each block's scale, applies _rule, and encodes the new moments into the same
# codes and scales, so 8-bit state costs one read and one write of a byte per element and
# moment. The block table lists per block (tensor, first element, length, scale index),
# made on the host from the layout functions of core.quantization, so the kernel knows
# nothing of rows; a tensor's blocks are padded to whole programs with empty ones (length
# 0). Parameters are stepped as in the full-precision kernel (TRITON_DTYPES, Kahan). Bytes
# moved per parameter for fp32 Adam: 4·3 (θ read and written, g) + 2·2 (m, v codes) = 16,
# plus 8 of scales and 32 of table per block of 256 (about 0.16).


def _map_constexprs(spec: CodeMap) -> tuple[tl.constexpr, ...]:
    """A map's numbers in _magnitude_codes's argument order, computed here (Triton 3.3's
    interpreter cannot shift an int by a constexpr)."""
    numbers = (
        spec.exponent_base,
        spec.group_bits,
        spec.smallest_group,
        spec.top_group,
        spec.lowest_exponent,
        spec.smallest_code,
        spec.largest_code,
    )
    return tuple(tl.constexpr(number) for number in numbers)


# core.quantization's maps as the kernels' constexprs, one name each: a Triton call takes
# no unpacked tuple.
(
    _S_BASE,
    _S_GROUP_BITS,
    _S_SMALLEST_GROUP,
    _S_TOP_GROUP,
    _S_LOWEST,
    _S_SMALLEST_CODE,
    _S_LARGEST_CODE,
) = _map_constexprs(SIGNED_MAP)
(
    _U_BASE,
    _U_GROUP_BITS,
    _U_SMALLEST_GROUP,
    _U_TOP_GROUP,
    _U_LOWEST,
    _U_SMALLEST_CODE,
    _U_LARGEST_CODE,
) = _map_constexprs(UNSIGNED_MAP)
_SMALLEST_SCALE = tl.constexpr(SMALLEST_SCALE)

QUANTIZED_BLOCKS_PER_PROGRAM = 4
"""Blocks per program on a GPU: 1024 elements, as the full-precision kernel's BLOCK
(enough work per program)."""
INTERPRETED_BLOCKS_PER_PROGRAM = 16
"""Blocks per program where Triton's interpreter runs the kernel (CPU tensors): it runs
programs one after another at a cost per program (each operation of the kernel's body
is interpreted once per program, whatever the tile's size), so 16 blocks per program
step an 8-bit tensor in a quarter of the time. Each element's arithmetic and random bits
do not depend on the grouping: tests/core/test_quantized_triton.py holds 4 and 16 to
the same bits."""


def blocks_per_program(device: torch.device) -> int:
    """Quantization blocks per program of _quantized_step_kernel on device's tensors."""
    return INTERPRETED_BLOCKS_PER_PROGRAM if device.type == "cpu" else QUANTIZED_BLOCKS_PER_PROGRAM


@triton.jit
def _dequantize(codes, absmax, values, mask, present):
    """A tile of a moment in fp32: map[code] · absmax per block, as quantization.dequantize."""
    code = tl.load(codes, mask=mask, other=0).to(tl.int32)
    return tl.load(values + code) * tl.load(absmax, mask=present, other=0.0)[:, None]


@triton.jit
def _magnitude_codes(
    normalized,
    BASE: tl.constexpr,
    GROUP_BITS: tl.constexpr,
    SMALLEST_GROUP: tl.constexpr,
    TOP_GROUP: tl.constexpr,
    LOWEST: tl.constexpr,
    SMALLEST_CODE: tl.constexpr,
    LARGEST_CODE: tl.constexpr,
    SIGNED: tl.constexpr,
    random,
    STOCHASTIC: tl.constexpr,
):
    """quantization.magnitude_codes of normalized magnitudes in [0, 2), step for
    step on their bits, for the map of exponent base BASE and so on (CodeMap; LOWEST is
    its smallest value's exponent); STOCHASTIC: rounded stochastically with `random`
    (uint32 per element) as that function rounds with its random bits (m below the
    smallest value: to it with probability a / its value, else to 0)."""
    bits = normalized.to(tl.int32, bitcast=True)
    exponent = bits >> 23
    group = (exponent - BASE) >> GROUP_BITS
    group = tl.minimum(tl.maximum(group, SMALLEST_GROUP), TOP_GROUP - 1)
    shift = 23 + GROUP_BITS - group
    one = tl.full(bits.shape, 1, tl.int32)
    offset = bits - ((BASE + (group << GROUP_BITS)) << 23)
    if STOCHASTIC:
        fraction_bits = shift - GROUP_BITS
        addend = (random >> (32 - fraction_bits).to(tl.uint32)).to(tl.int32)
        code = (one << group) + (((offset >> GROUP_BITS) + addend) >> fraction_bits) - 1
    else:
        code = (one << group) + ((offset + (one << (shift - 1))) >> shift) - 1
    code = tl.where(exponent >= 127, LARGEST_CODE, code)
    if SIGNED and STOCHASTIC:
        uniform = _uniform(random)
        below_scale = (tl.full(bits.shape, 254 - LOWEST, tl.int32) << 23).to(
            tl.float32, bitcast=True
        )  # 1 / the smallest value, from its bits
        below = tl.where(uniform < normalized * below_scale, SMALLEST_CODE, 0)
    elif SIGNED:
        below = tl.where(exponent >= LOWEST - 1, SMALLEST_CODE, 0)
    else:
        below = tl.full(bits.shape, SMALLEST_CODE, tl.int32)
    code = tl.where(exponent < LOWEST, below, code)
    return tl.where(bits == 0, 0, code)


@triton.jit
def _quantize(
    x, codes, absmax, mask, present, index, key, SIGNED: tl.constexpr, STOCHASTIC: tl.constexpr
):
    """Store a tile of a moment as quantization.quantize does: per block its largest
    magnitude (NaN if any element is NaN or infinite, 0 below 2^-126), and per element the
    nearest code of |x| · (1 / absmax), each rounded to fp32 (all 0 when absmax is 0 or
    NaN). m's sign goes in bit 7. STOCHASTIC (m, v): rounded stochastically with this
    moment's half (quantization.moment_bits) of the random bits of element `index` (its
    offset in the tensor) under `key`."""
    # NaN counts as infinite, so a plain max (which would drop NaN) sees it.
    magnitude = tl.abs(x)
    magnitude = tl.where(magnitude < float("inf"), magnitude, float("inf"))
    largest = tl.max(tl.where(mask, magnitude, 0.0), axis=1)
    largest = tl.where(largest < float("inf"), largest, float("nan"))
    largest = tl.where(largest < _SMALLEST_SCALE, 0.0, largest)
    scaled = largest > 0
    inverse = tl.div_rn(tl.full(largest.shape, 1.0, tl.float32), tl.where(scaled, largest, 1.0))
    normalized = tl.where(scaled[:, None], magnitude * inverse[:, None], 0.0)
    random = index.to(tl.uint32) * 0
    if STOCHASTIC:  # one hash for both moments: the compiler computes it once
        random = _random_bits(index, key)
        random = (random << 16) if SIGNED else ((random >> 16) << 16)
    if SIGNED:
        code = _magnitude_codes(
            normalized, _S_BASE, _S_GROUP_BITS, _S_SMALLEST_GROUP, _S_TOP_GROUP, _S_LOWEST,
            _S_SMALLEST_CODE, _S_LARGEST_CODE, True, random, STOCHASTIC,
        )  # fmt: skip
        code = tl.where((x < 0) & (code > 0), code | 128, code)
    else:
        code = _magnitude_codes(
            normalized, _U_BASE, _U_GROUP_BITS, _U_SMALLEST_GROUP, _U_TOP_GROUP, _U_LOWEST,
            _U_SMALLEST_CODE, _U_LARGEST_CODE, False, random, STOCHASTIC,
        )  # fmt: skip
        # a nonzero v whose normalized magnitude underflowed to 0 is still positive
        nonzero = scaled[:, None] & (magnitude > 0)
        code = tl.where(nonzero, tl.maximum(code, _U_SMALLEST_CODE), code)
    tl.store(codes, code.to(tl.uint8), mask=mask)
    tl.store(absmax, largest, mask=present)


@triton.jit
def _load_moment(pointer, absmax, values, mask, present, QUANTIZED: tl.constexpr):
    """A tile of a moment in fp32, from codes and scales or, kept in full precision
    (state_precision leaves some moments full, as ADOPT's v), from the tensor."""
    if QUANTIZED:
        value = _dequantize(pointer, absmax, values, mask, present)
    else:
        value = _widened(tl.load(pointer, mask=mask, other=0))
    return value


@triton.jit
def _store_moment(
    value,
    pointer,
    absmax,
    mask,
    present,
    index,
    key,
    DTYPE: tl.constexpr,
    SIGNED: tl.constexpr,
    QUANTIZED: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    """Store a tile of a moment as _load_moment reads it (STOCHASTIC: see _quantize)."""
    if QUANTIZED:
        _quantize(value, pointer, absmax, mask, present, index, key, SIGNED, STOCHASTIC)
    else:
        tl.store(pointer, _round(value, DTYPE), mask=mask)


@triton.jit
def _moment_base(addresses, row, count, index, DTYPE: tl.constexpr, QUANTIZED: tl.constexpr):
    """Pointer to a moment's codes (uint8) or, kept in full precision, its elements."""
    if QUANTIZED:
        pointer = _base(addresses, row, count, index, tl.uint8, False)
    else:
        pointer = _base(addresses, row, count, index, DTYPE, False)
    return pointer


@triton.jit(do_not_specialize=["count", "step", "state_draw"])
def _quantized_step_kernel(
    addresses,
    blocks,
    count,
    step,
    state_draw,
    signed_values,
    unsigned_values,
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
    STOCHASTIC: tl.constexpr,
    L2: tl.constexpr,
    DECAY: tl.constexpr,
    UPDATE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    GRAD_TERM: tl.constexpr,
    INIT: tl.constexpr,
    CLIP: tl.constexpr,
    M_8BIT: tl.constexpr,
    V_8BIT: tl.constexpr,
    V_MAX_8BIT: tl.constexpr,
    QBLOCK: tl.constexpr,
    QBLOCKS: tl.constexpr,
):
    """One step over QBLOCKS quantization blocks of one tensor with 8-bit moments
    (M_8BIT, V_8BIT, V_MAX_8BIT say which; the others are in the parameter's dtype).
    Address table rows (QUANTIZED_ROWS): θ, g, m, v and v_max (codes where 8-bit), Kahan
    k (STOCHASTIC: the tensors' stream keys), the scales of m, v and v_max and, where m
    or v is 8-bit (they round stochastically: core.quantization, step 4), the stream
    keys of their random bits (QuantizedMoment.stream; hashed with state_draw as
    QuantizedMoment.key, plus a shard's index offset term); block
    table: (tensor, first element, length, scale index) per block, QBLOCKS consecutive
    blocks per program."""
    first = tl.program_id(0).to(tl.int64) * QBLOCKS
    entries = blocks + 4 * (first + tl.arange(0, QBLOCKS))
    index = tl.load(blocks + 4 * first)
    lengths = tl.load(entries + 2)
    scales = tl.load(entries + 3)
    lanes = tl.arange(0, QBLOCK)
    offsets = tl.load(entries + 1)[:, None] + lanes[None, :]
    mask = lanes[None, :] < lengths[:, None]
    present = lengths > 0
    param = _base(addresses, 0, count, index, DTYPE, False) + offsets
    comp = param
    if KAHAN:
        comp = _base(addresses, 5, count, index, DTYPE, False) + offsets
    key = step.to(tl.uint32, bitcast=True)
    if STOCHASTIC:
        key = _rounding_key(addresses, count, index, step)
    m_codes = _moment_base(addresses, 2, count, index, DTYPE, M_8BIT) + offsets
    v_codes = _moment_base(addresses, 3, count, index, DTYPE, V_8BIT) + offsets
    m_absmax = _base(addresses, 6, count, index, tl.float32, False) + scales
    v_absmax = _base(addresses, 7, count, index, tl.float32, False) + scales
    v_max_codes = v_codes
    v_max_absmax = v_absmax
    if AMSGRAD:
        v_max_codes = _moment_base(addresses, 4, count, index, DTYPE, V_MAX_8BIT) + offsets
        v_max_absmax = _base(addresses, 8, count, index, tl.float32, False) + scales
    state_key = key
    if M_8BIT or V_8BIT:  # QuantizedMoment.key, m's and v's
        state_stream = tl.load(addresses + 9 * count + index).to(tl.uint32)
        shard_offset = tl.load(addresses + 10 * count + index).to(tl.uint32)
        state_key = _mix32(state_stream ^ state_draw.to(tl.uint32, bitcast=True)) + shard_offset

    grad = _base(addresses, 1, count, index, DTYPE, False) + offsets
    g = _widened(tl.load(grad, mask=mask, other=0))
    theta = g * 0
    if L2 or (UPDATE and not INIT):
        theta = _load_param(param, comp, mask, KAHAN)
    m = g * 0
    v = g * 0
    if not INIT:
        m = _load_moment(m_codes, m_absmax, signed_values, mask, present, M_8BIT)
        v = _load_moment(v_codes, v_absmax, unsigned_values, mask, present, V_8BIT)
    v_max = v
    if AMSGRAD:
        v_max = _load_moment(v_max_codes, v_max_absmax, unsigned_values, mask, present, V_MAX_8BIT)
    m, v, v_max, theta = _rule(
        g,
        theta,
        m,
        v,
        v_max,
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
        ADOPT,
        SMALL_WEIGHT,
        L2,
        DECAY,
        UPDATE,
        AMSGRAD,
        ADAPTIVE,
        GRAD_TERM,
        INIT,
        CLIP,
    )
    if AMSGRAD:
        _store_moment(
            v_max,
            v_max_codes,
            v_max_absmax,
            mask,
            present,
            offsets,
            key,
            DTYPE,
            False,
            V_MAX_8BIT,
            False,
        )
    if not INIT:
        _store_moment(
            m, m_codes, m_absmax, mask, present, offsets, state_key, DTYPE, True, M_8BIT, M_8BIT
        )
    _store_moment(
        v, v_codes, v_absmax, mask, present, offsets, state_key, DTYPE, False, V_8BIT, V_8BIT
    )
    if UPDATE and not INIT:
        _store_param(param, comp, mask, theta, offsets, key, DTYPE, KAHAN, STOCHASTIC)


QUANTIZED_ROWS = (
    "param",
    "grad",
    "exp_avg",
    "exp_avg_sq",
    "max_exp_avg_sq",
    "kahan_comp",
    "exp_avg absmax",
    "exp_avg_sq absmax",
    "max_exp_avg_sq absmax",
    "moment streams",
    "moment index offsets",
)
"""Rows of the quantized kernel's address table: an 8-bit moment's row holds its codes;
the last two, the 8-bit moments' stream key and their shard's core.random_bits.offset_key
term (first_index · 0x9E3779B1 mod 2^32), 0 where neither m nor v is 8-bit."""
QUANTIZED_RUNTIME_ARGUMENT_TYPES = {
    **RUNTIME_ARGUMENT_TYPES,
    "state_draw": "i32",
    "signed_values": "*fp32",
    "unsigned_values": "*fp32",
}
"""RUNTIME_ARGUMENT_TYPES of _quantized_step_kernel (the maps' values, map_values)."""


@dataclass
class _QuantizedLaunch:
    """One launch of _quantized_step_kernel over the 8-bit tensors of one bucket."""

    addresses: _Table
    blocks: _Table
    programs: int
    tensors: int
    blocks_per_program: int
    """The block table's grouping: the launch's QBLOCKS."""


@dataclass
class _QuantizedPlan:
    """How to run one bucket of parameters with 8-bit moments while they stay put."""

    launch: _QuantizedLaunch | None
    switches: dict[str, bool]
    """moment_switches: which moments are 8-bit."""
    eager: list[int]
    """Indices into the bucket the kernel cannot take (not contiguous): run eagerly."""


@dataclass
class _QuantizedStep:
    """A step's parameters with 8-bit moments, checked and planned; run() launches."""

    lists: list[Any]
    planned: list[tuple[_QuantizedPlan, Tensor, bool, int | None]]
    """Per bucket: its plan, first parameter, KAHAN and, under STOCHASTIC, the index of a
    parameter of the bucket (its StochasticRounding gives the step)."""
    eager: list[int]

    def run(
        self, arguments: Callable[[bool], KernelArguments], eager: Callable[[list[Any]], None]
    ) -> None:
        for plan, first, kahan, rounding_index in self.planned:
            if plan.launch is not None:
                step = None if rounding_index is None else self.lists[-1][rounding_index].step
                _launch_quantized(plan, first.dtype, first.device, arguments(kahan), step)
        if self.eager:
            eager(take_all(self.lists, sorted(self.eager)))


_quantized_plans = _AnchorCache()
"""First parameter of a bucket -> {layout key: _QuantizedPlan}, as _plans."""
_quantized_blocks: dict[tuple[torch.device, int, tuple[tuple[int, int], ...]], _Table] = {}
"""Quantized block tables by blocks per program and the tensors' (rows, row length),
shared like _blocks."""
_MOMENT_SIGNS = (("exp_avg", True), ("exp_avg_sq", False), ("max_exp_avg_sq", False))
"""The quantized moments in list order (lists[2:5]) and whether each is signed."""


def moment_switches(bucket: Sequence[Sequence[object] | None]) -> dict[str, bool]:
    """M_8BIT, V_8BIT, V_MAX_8BIT: which of a bucket's moments (lists 2-4) are 8-bit, from
    their first parameter's (_prepare_quantized buckets parameters by this)."""
    return {
        name: moments is not None and type(moments[0]) is QuantizedMoment
        for name, moments in zip(("M_8BIT", "V_8BIT", "V_MAX_8BIT"), bucket[2:5], strict=True)
    }


def _quantized_tensor_rows(bucket: list[Any], positions: list[int]) -> list[list[Tensor] | None]:
    """The bucket's lists as QUANTIZED_ROWS: each 8-bit moment split into codes and
    scales, full-precision moments as they are. A list that is not all QuantizedMoments
    of the right sign, or all tensors, is refused by name (views.check_addressable and
    check_quantized_row) before an attribute is read."""
    params = bucket[0]
    codes: list[list[Tensor] | None] = []
    scales: list[list[Tensor] | None] = []
    for (name, signed), moments in zip(_MOMENT_SIGNS, bucket[2:5], strict=True):
        if moments is None or type(moments[0]) is not QuantizedMoment:
            codes.append(moments)
            scales.append(None)
            continue
        if {QuantizedMoment} != set(map(type, moments)) or {signed} != {m.signed for m in moments}:
            check_quantized_row(params, name, moments, signed, positions)
        codes.append([m.codes for m in moments])
        scales.append([m.absmax for m in moments])
    return [params, bucket[1], *codes, bucket[5], *scales]


def _quantized_key(rows: list[list[Tensor] | None]) -> tuple:
    """What a quantized plan depends on: every tensor's address, dtype and size, the
    parameters' shapes (the block layout) and, if any tensor is not contiguous, every
    layout; read every step, as _key."""
    present = [values for values in rows if values is not None]
    addresses = tuple(chain.from_iterable(map(Tensor.data_ptr, values) for values in present))
    numels = tuple(chain.from_iterable(map(Tensor.numel, values) for values in present))
    dtypes = tuple(frozenset(map(attrgetter("dtype"), values)) for values in present)
    params = present[0]
    shapes = tuple(map(attrgetter("shape"), params))
    layouts = None
    if not all(all(map(Tensor.is_contiguous, values)) for values in present):
        layouts = tuple(t.stride() for values in present for t in values)
    presence = tuple(values is not None for values in rows)
    return presence, addresses, numels, dtypes, shapes, layouts


def _quantized_block_table(
    shapes: tuple[torch.Size, ...], device: torch.device, per_program: int
) -> tuple[_Table, int]:
    """Per block (tensor index, first element, length, scale index): every block of every
    tensor in core.quantization's layout (blocks along rows, a row's last one short), each
    tensor's padded with empty blocks to whole programs of per_program blocks. Returns the
    table and programs."""
    layouts = tuple(block_shape(shape) for shape in shapes)
    key = (device, per_program, layouts)
    table = _quantized_blocks.get(key)
    if table is None:
        if len(_quantized_blocks) >= _BLOCK_TABLES:
            _quantized_blocks.clear()
        parts = []
        for index, ((rows, row_length), shape) in enumerate(zip(layouts, shapes, strict=True)):
            per_row = absmax_shape(shape)[1]
            row = torch.arange(rows, dtype=torch.int64, device="cpu").repeat_interleave(per_row)
            block = torch.arange(per_row, dtype=torch.int64, device="cpu").repeat(rows)
            first = block * QUANTIZATION_BLOCK
            entries = [
                torch.full_like(row, index),
                row * row_length + first,
                (row_length - first).clamp(max=QUANTIZATION_BLOCK),
                row * per_row + block,
            ]
            padding = -row.numel() % per_program
            empty = torch.tensor([index, 0, 0, 0], dtype=torch.int64, device="cpu").repeat(
                padding, 1
            )
            parts.append(torch.cat([torch.stack(entries, dim=1), empty]).flatten())
        values = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device="cpu")
        table = _quantized_blocks[key] = _upload(values, device)
    return table, table.values.numel() // (4 * per_program)


def _make_quantized_plan(
    rows: list[list[Tensor] | None],
    bucket: list[Any],
    positions: list[int],
    rounding: Sequence[StochasticRounding] | None = None,
) -> _QuantizedPlan:
    """Check the bucket (views.check_addressable for θ, g, k and full-precision moments,
    check_quantized_row for 8-bit ones), then plan one launch over its tensors
    that are contiguous; others (whose memory order is not the codes' row-major order)
    run eagerly. rounding: the bucket's StochasticRoundings under STOCHASTIC (their
    stream keys take the Kahan row)."""
    params = rows[0]
    assert params is not None
    device = params[0].device
    quantized = [scales is not None for scales in rows[6:9]]
    full = [None if q else values for q, values in zip(quantized, rows[2:5], strict=True)]
    check_addressable([params, rows[1], *full, rows[5]], params[0].dtype, device, False, positions)
    for (name, signed), moments, q in zip(_MOMENT_SIGNS, bucket[2:5], quantized, strict=True):
        if q:
            check_quantized_row(params, name, moments, signed, positions)
    elementwise = [rows[0], rows[1], *full, rows[5]]
    contiguous = [
        i
        for i in range(len(params))
        if all(values is None or values[i].is_contiguous() for values in elementwise)
    ]
    eager = sorted(set(range(len(params))) - set(contiguous))
    if not contiguous:
        return _QuantizedPlan(None, moment_switches(bucket), eager)
    part = take_all(rows, contiguous)
    first = part[0]
    assert first is not None
    addresses = [0 if values is None else t.data_ptr() for values in part for t in values or first]
    if rounding is not None:  # the Kahan row (5): the stream keys
        count = len(contiguous)
        addresses[5 * count : 6 * count] = _stream_keys([rounding[i] for i in contiguous])
    addresses += _moment_streams(bucket, contiguous)
    per_program = blocks_per_program(device)
    shapes = tuple(t.shape for t in first)
    blocks, programs = _quantized_block_table(shapes, device, per_program)
    table = _upload(torch.tensor(addresses, dtype=torch.int64, device="cpu"), device)
    launch = _QuantizedLaunch(table, blocks, programs, len(contiguous), per_program)
    return _QuantizedPlan(launch, moment_switches(bucket), eager)


def _moment_streams(bucket: list[Any], indices: Sequence[int]) -> list[int]:
    """The address table's last two rows: each parameter's 8-bit m's or v's stream key
    (QuantizedMoment.stream, which its m and v share), then its shard's offset term
    (offset_key(0, first_index)); zeros where neither is 8-bit."""
    for moments in bucket[2:4]:
        if moments and type(moments[0]) is QuantizedMoment:
            return [moments[i].stream for i in indices] + [
                offset_key(0, moments[i].first_index) for i in indices
            ]
    return [0] * (2 * len(indices))


def _quantized_plan(
    bucket: list[Any],
    positions: list[int],
    rounding: Sequence[StochasticRounding] | None = None,
) -> _QuantizedPlan:
    """The bucket's quantized plan, made again only when a tensor moved or changed dtype,
    size, shape or layout (or, under STOCHASTIC, a seed, stream or shard offset changed).
    positions: the bucket's indices in the step's lists (to name a refused tensor by)."""
    rows = _quantized_tensor_rows(bucket, positions)
    params = rows[0]
    assert params is not None
    try:
        key = _quantized_key(rows)
    except (RuntimeError, TypeError):  # no storage, or not a tensor: say which
        _make_quantized_plan(rows, bucket, positions)
        raise
    if rounding is not None:
        key = (key, tuple(map(_ROUNDING_PLAN_FIELDS, rounding)))
    key = (key, tuple(_moment_streams(bucket, range(len(params)))))
    plans = _quantized_plans.find(params[0])
    if plans is None:
        plans = _quantized_plans.keep(params[0], OrderedDict())
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = _make_quantized_plan(rows, bucket, positions, rounding)
        if len(plans) > _PLANS_PER_ANCHOR:
            plans.popitem(last=False)
    return plan


def _quantized_buckets(lists: list[Any]) -> list[list[int]]:
    """buckets() split further by which moments are 8-bit (moment_switches), so that each
    launch is uniform; one pass over each moment list in the usual case."""
    params, kahan_comps = lists[0], lists[-1]
    found = buckets(params, kahan_comps)
    moments = [values for values in lists[2:5] if values is not None]
    if all(len(set(map(type, values))) == 1 for values in moments):
        return found
    split = []
    for indices in found:
        kinds: dict[tuple[bool, ...], list[int]] = {}
        for i in indices:
            kind = tuple(type(values[i]) is QuantizedMoment for values in moments)
            kinds.setdefault(kind, []).append(i)
        split += kinds.values()
    return split


def _prepare_quantized(lists: list[Any], positions: list[int]) -> _QuantizedStep:
    """Check and plan, per (dtype, rounding, 8-bit moments) bucket, the parameters with
    8-bit moments (at `positions` of the step's lists); launches nothing, so a refusal
    leaves every tensor as it was (see _step)."""
    params, grads = lists[0], lists[1]
    planned = []
    eager: list[int] = []
    for indices in _quantized_buckets(lists):
        first = params[indices[0]]
        if first.dtype not in TRITON_DTYPES:
            eager += indices
            continue
        indices, other_dtype = _same_dtype_gradients(indices, grads, first.dtype)
        eager += other_dtype
        if not indices:
            continue
        bucket = take_all(lists, indices)
        kahan, rounding = _bucket_rounding(bucket, first.dtype)
        plan = _quantized_plan(bucket, [positions[i] for i in indices], rounding)
        planned.append((plan, first, kahan, None if rounding is None else indices[0]))
        eager += [indices[i] for i in plan.eager]
    return _QuantizedStep(lists, planned, eager)


def quantized_launch_constexprs(
    dtype: torch.dtype,
    algorithm: str,
    small_weight: bool,
    switches: dict[str, bool],
    moments: dict[str, bool],
    stochastic: bool = False,
    per_program: int = QUANTIZED_BLOCKS_PER_PROGRAM,
) -> dict[str, Any]:
    """The constexpr arguments of one launch of _quantized_step_kernel (moments:
    moment_switches; stochastic: rounding_switches' STOCHASTIC; per_program: the block
    table's grouping, blocks_per_program)."""
    return {
        "DTYPE": TRITON_DTYPES[dtype],
        "ADOPT": algorithm == "adopt",
        "SMALL_WEIGHT": small_weight,
        "QBLOCK": QUANTIZATION_BLOCK,
        "QBLOCKS": per_program,
        **switches,
        "STOCHASTIC": stochastic,
        **moments,
    }


def _launch_quantized(
    plan: _QuantizedPlan,
    dtype: torch.dtype,
    device: torch.device,
    arguments: KernelArguments,
    step: int | None = None,
) -> None:
    """Launch one quantized plan on the tensors' device and its current stream, with the
    scalars and compile options of the full-precision kernel (step: as _launch_plan's)."""
    launch = plan.launch
    assert launch is not None
    scalars, small_weight = _kernel_scalars(arguments)
    signed_values, unsigned_values = map_values(True, device), map_values(False, device)
    module = _device_module(device)
    guard = nullcontext() if module is None else module.device(device)
    with guard:
        stream = None if module is None else module.current_stream(device)
        _quantized_step_kernel[(launch.programs,)](
            _ready_on(launch.addresses, stream),
            _ready_on(launch.blocks, stream),
            launch.tensors,
            _step_argument(step),
            _step_argument(arguments.state_draw),
            signed_values,
            unsigned_values,
            *scalars,
            **quantized_launch_constexprs(
                dtype,
                arguments.algorithm,
                small_weight,
                dict(arguments.switches),
                plan.switches,
                step is not None,
                launch.blocks_per_program,
            ),
            **compile_options(device.type),
        )
