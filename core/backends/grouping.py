"""Splitting a step's tensor lists into uniform buckets, shared by the multi-tensor backends."""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import TypeVar

import torch
from torch import Tensor

from core.backends.precision import StochasticRounding
from core.backends.views import PLAIN_TENSOR_TYPES, dense, device_of, dtype_of
from core.quantization import QuantizedMoment

__all__ = [
    "buckets",
    "dense",
    "device_of",
    "dtype_of",
    "moment_pattern",
    "rounding_kind",
    "same_dense_layout",
    "split_dense",
    "split_moment_patterns",
    "split_quantized",
    "split_quantized_dense",
]

T = TypeVar("T")


def rounding_kind(comp: object) -> object:
    """How a parameter's update is rounded, as buckets() groups it: False to nearest, True
    with a Kahan buffer, ("stochastic", step) stochastically (one step per bucket, so a
    kernel launch hashes one step into every tensor's key)."""
    if comp is None:
        return False
    if type(comp) is StochasticRounding:
        return ("stochastic", comp.step)
    return True


def buckets(
    params: Sequence[Tensor], kahan_comps: Sequence[Tensor | StochasticRounding | None]
) -> list[list[int]]:
    """Indices of parameters grouped by (device, dtype, rounding_kind)."""
    if (
        len(set(map(device_of, params))) == 1
        and len(set(map(dtype_of, params))) == 1
        and len(set(map(rounding_kind, kahan_comps))) == 1
    ):
        return [list(range(len(params)))]  # the usual case, at C speed per parameter
    grouped: dict[tuple[torch.device, torch.dtype, object], list[int]] = {}
    for i, param in enumerate(params):
        key = (param.device, param.dtype, rounding_kind(kahan_comps[i]))
        grouped.setdefault(key, []).append(i)
    return list(grouped.values())


def split_quantized(
    lists: Sequence[Sequence[object] | None],
) -> tuple[list[int] | None, list[int]]:
    """(indices with full-precision moments, indices with any 8-bit moment) of a step's
    lists (moments at 2, 3 and 4, as the backends order them); the first is None when no
    moment is 8-bit (every index, without building the list)."""
    moments = [values for values in lists[2:5] if values is not None]
    if all(QuantizedMoment not in set(map(type, values)) for values in moments):
        return None, []
    full: list[int] = []
    quantized: list[int] = []
    for i, row in enumerate(zip(*moments, strict=True)):
        (quantized if QuantizedMoment in set(map(type, row)) else full).append(i)
    return full, quantized


def take(values: Sequence[T], indices: list[int]) -> list[T]:
    return [values[i] for i in indices]


def take_all(lists: Sequence[Sequence[T] | None], indices: list[int]) -> list[list[T] | None]:
    """take() over several lists at once; None lists stay None."""
    first = next((values for values in lists if values is not None), None)
    if first is not None and len(indices) == len(first):  # every index, in order
        return [None if values is None else list(values) for values in lists]
    return [None if values is None else take(values, indices) for values in lists]


def same_dense_layout(tensors: Sequence[Tensor]) -> bool:
    """Whether a flat elementwise pass over raw memory is valid for these tensors together:
    each dense, all of one dtype, shape and strides. Runs for every parameter of every
    step, hence the plain loop."""
    first = tensors[0]
    numel, dtype = first.numel(), first.dtype
    for t in tensors:  # the usual case, in the fewest calls: all contiguous alike
        if not t.is_contiguous() or t.dtype != dtype or t.numel() != numel:
            break
    else:
        return True
    shape = first.shape
    contiguous = True
    for t in tensors:
        if t.shape != shape or t.dtype != dtype:
            return False
        contiguous = contiguous and t.is_contiguous()
    if contiguous:
        return True
    strides = first.stride()
    return dense(first) and all(t.stride() == strides for t in tensors)


def split_dense(lists: Sequence[Sequence[Tensor] | None]) -> tuple[list[int], list[int]]:
    """(indices a flat pass over memory can take, the others); None lists are absent."""
    flat: list[int] = []
    strided: list[int] = []
    present = [values for values in lists if values is not None]
    numels, dtypes = list(map(Tensor.numel, present[0])), list(map(dtype_of, present[0]))
    if all(
        all(map(Tensor.is_contiguous, values))
        and list(map(Tensor.numel, values)) == numels
        and list(map(dtype_of, values)) == dtypes
        for values in present
    ):
        return list(range(len(numels))), []  # the usual case, without a call per row
    for i, row in enumerate(zip(*present, strict=True)):
        (flat if same_dense_layout(row) else strided).append(i)
    return flat, strided


def _contiguous(tensors: Sequence[Tensor]) -> bool:
    return all(map(Tensor.is_contiguous, tensors))


_CODES, _ABSMAX = attrgetter("codes"), attrgetter("absmax")


def _all_fit(moments: Sequence[object], params: Sequence[Tensor]) -> bool:
    """split_quantized_dense's test of one moment list in the usual case (every moment
    8-bit, or every one a tensor), a pass per property at C speed; False (then each is
    tested on its own) for anything else."""
    kinds = set(map(type, moments))
    if kinds == {QuantizedMoment}:
        codes, scales = list(map(_CODES, moments)), list(map(_ABSMAX, moments))
        return (
            set(map(dtype_of, codes)) == {torch.uint8}
            and set(map(dtype_of, scales)) == {torch.float32}
            and _contiguous(codes)
            and _contiguous(scales)
        )
    return (
        kinds <= PLAIN_TENSOR_TYPES
        and list(map(dtype_of, moments)) == list(map(dtype_of, params))
        and _contiguous(moments)  # type: ignore[arg-type]
    )


def moment_pattern(lists: Sequence[Sequence[object] | None], index: int = 0) -> tuple[bool, ...]:
    """Which of the moments (lists 2-4, the backends' order) of parameter `index` are 8-bit;
    an absent list counts as not."""
    return tuple(
        values is not None and type(values[index]) is QuantizedMoment for values in lists[2:5]
    )


def split_moment_patterns(lists: Sequence[Sequence[object] | None]) -> list[list[int]]:
    """Indices grouped by moment_pattern, so that one kernel configuration (which moments
    are 8-bit) takes each group; one pass over each moment list in the usual case, where
    every parameter's moments are stored alike."""
    moments = [values for values in lists[2:5] if values is not None]
    count = len(lists[0])  # type: ignore[arg-type]
    if all(len(set(map(type, values))) <= 1 for values in moments):
        return [list(range(count))] if count else []
    groups: dict[tuple[bool, ...], list[int]] = {}
    for i in range(count):
        groups.setdefault(moment_pattern(lists, i), []).append(i)
    return list(groups.values())


def split_quantized_dense(
    lists: Sequence[Sequence[object] | None],
) -> tuple[list[int], list[int]]:
    """(indices a block-wise pass over 8-bit moments can take, the others), for lists in
    the backends' order (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
    kahan_comps; None lists absent) whose parameters share one moment_pattern: each 8-bit
    moment with uint8 codes and float32 scales, each full-precision one (ADOPT's v) a
    tensor of the parameter's dtype, the gradient of the parameter's dtype too, and the
    parameter, gradient, Kahan buffer, full moments, codes and scales contiguous, since
    blocks run along the logical rows. The rest (codes or a moment a checkpoint load cast
    to another dtype, a bf16 gradient of an fp32 weight under grad_dtype=None, another
    layout) is the loop backend's to run; sizes and devices are the kernel's check to
    refuse by name."""
    params, grads, *moments, comps = lists
    assert params is not None and grads is not None
    moment_lists = [values for values in moments if values is not None]
    tensor_lists = [params, grads] + ([comps] if comps is not None else [])

    def fits(moment: object, param: Tensor) -> bool:  # load_state_dict may have cast codes
        if type(moment) is not QuantizedMoment:
            return (
                isinstance(moment, Tensor)
                and moment.dtype == param.dtype
                and moment.is_contiguous()
            )
        return (
            moment.codes.dtype == torch.uint8
            and moment.absmax.dtype == torch.float32
            and moment.codes.is_contiguous()
            and moment.absmax.is_contiguous()
        )

    if (
        all(_contiguous(values) for values in tensor_lists)  # type: ignore[arg-type]
        and list(map(dtype_of, grads)) == list(map(dtype_of, params))
        and all(_all_fit(values, params) for values in moment_lists)
    ):
        return list(range(len(params))), []  # the usual case, without a call per row
    flat: list[int] = []
    other: list[int] = []
    for i in range(len(params)):
        ok = (
            all(values[i].is_contiguous() for values in tensor_lists)  # type: ignore[union-attr]
            and grads[i].dtype == params[i].dtype  # type: ignore[union-attr]
            and all(fits(values[i], params[i]) for values in moment_lists)
        )
        (flat if ok else other).append(i)
    return flat, other
