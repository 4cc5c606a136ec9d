"""The tensors a backend addresses: plain, local, real-valued memory.

Every update here is elementwise, so a shard of a distributed tensor (DTensor, as FSDP2
and tensor parallelism hand out) updates correctly on its own: it is replaced by the
local tensor it owns before any backend sees it. Complex tensors become real pairs, as
torch.optim does. Any other tensor subclass is left to backends that go through torch's
dispatch (loop, foreach); the fused kernels read raw addresses, and `check_addressable`
refuses, where the addresses are taken, anything that is not plain dense memory of the
expected dtype and device, so no Python input can send a kernel through a wrong address.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor, nn

from core.backends.precision import StochasticRounding
from core.quantization import SIGNED_KEYS, QuantizedMoment, absmax_shape, block_shape

device_of, dtype_of = attrgetter("device"), attrgetter("dtype")
"""Getters to map over tensor lists: the loop then runs at C speed."""

PLAIN_TENSOR_TYPES = frozenset({Tensor, nn.Parameter})
"""Types whose data_ptr() and numel() describe the memory the kernels write."""

TensorList = Sequence[Tensor | None] | None


@functools.cache
def dtensor_type() -> type | None:
    """torch's DTensor class, or None on builds without torch.distributed."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 kept it private
        from torch.distributed._tensor import DTensor  # type: ignore[no-redef]
    return DTensor


_PLAIN_OR_NONE = PLAIN_TENSOR_TYPES | {type(None)}


def is_plain(tensors: Sequence[Tensor | QuantizedMoment | None]) -> bool:
    """Whether every entry is a plain tensor, an 8-bit moment of plain tensors, or None:
    one C-speed pass where no moment is 8-bit."""
    if _PLAIN_OR_NONE.issuperset(map(type, tensors)):
        return True
    return all(
        type(t) in _PLAIN_OR_NONE
        or type(t) is StochasticRounding
        or (
            type(t) is QuantizedMoment
            and type(t.codes) in PLAIN_TENSOR_TYPES
            and type(t.absmax) in PLAIN_TENSOR_TYPES
        )
        for t in tensors
    )


def _local(tensor: Tensor | None, like: Tensor | None, name: str, dtensor: type) -> Any:
    """The local shard of a DTensor laid out like its parameter (`like`); an 8-bit moment
    of DTensors becomes one of their local shards (its blocks are the shard's rows), and
    a DTensor parameter's stochastic rounding draws by its shard's global indices."""
    if isinstance(tensor, QuantizedMoment):
        return QuantizedMoment(
            _local(tensor.codes, like, name, dtensor),
            _local(tensor.absmax, None, name, dtensor),
            tensor.signed,
            tensor.stream,
            tensor.first_index + _global_offset(tensor.codes, dtensor),
        )
    if isinstance(tensor, StochasticRounding):
        if like is None or not isinstance(like, dtensor) or not _whole_rows(like):
            return tensor  # a shard of columns (tensor parallelism) draws by local index
        offset = tensor.first_index + _global_offset(like, dtensor)
        return dataclasses.replace(tensor, first_index=offset)
    if tensor is None or not isinstance(tensor, dtensor):
        return tensor
    if like is not None and isinstance(like, dtensor) and tensor is not like:
        same_layout = (
            tensor.device_mesh == like.device_mesh and tensor.placements == like.placements
        )
        if not same_layout:
            if name != "grads":
                raise ValueError(
                    f"Invalid {name}: a DTensor with placements {tensor.placements} on "
                    f"{tensor.device_mesh}, for a parameter with placements {like.placements} "
                    f"on {like.device_mesh}. Allowed: optimizer state laid out like its "
                    "parameter (load sharded state with torch.distributed.checkpoint's "
                    "set_optimizer_state_dict)."
                )
            # A gradient may arrive in another layout (Partial from tensor parallelism):
            # it is only read, so a redistributed copy is exact.
            tensor = tensor.redistribute(like.device_mesh, like.placements)
    return tensor.to_local()


def _global_offset(tensor: Tensor, dtensor: type) -> int:
    """The index, in the whole tensor's row-major order, of a DTensor's local shard's first
    element (0 for a plain tensor), for a shard of whole rows (_whole_rows), whose elements
    follow that first one in order. 8-bit moments are DTensors only when every placement
    is Replicate or Shard(0) (core.quantization.quantizable), so their shards are."""
    if not isinstance(tensor, dtensor):
        return 0
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    coordinate = mesh.get_coordinate()
    return _shard_offset(tensor.shape, mesh, tensor.placements, tuple(coordinate or ()))  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=4096)
def _shard_offset(
    shape: torch.Size, mesh: Any, placements: tuple[Any, ...], coordinate: tuple[int, ...]
) -> int:
    """_global_offset of the shard at this mesh coordinate (this rank's) of a DTensor of
    this shape and layout: asked for every sharded parameter at every step, and torch
    takes about 15 µs to find it."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offsets = compute_local_shape_and_global_offset(shape, mesh, placements)
    return offsets[0] * math.prod(shape[1:]) if offsets else 0


def _whole_rows(tensor: Any) -> bool:
    """Whether a DTensor's local shard is a run of whole rows of it (Replicate and
    Shard(0) placements: FSDP2's), so its elements' indices are one offset from those in
    the whole tensor."""
    return all(p.is_replicate() or p.is_shard(0) for p in tensor.placements)


def local_lists(lists: Sequence[TensorList], names: Sequence[str]) -> list[Any]:
    """Each DTensor in the lists replaced by its local shard; plain lists as they are."""
    if all(values is None or is_plain(values) for values in lists):
        return list(lists)
    dtensor = dtensor_type()
    if dtensor is None:
        return list(lists)
    params = lists[0]
    assert params is not None
    return [
        None
        if values is None
        else [_local(t, p, name, dtensor) for t, p in zip(values, params, strict=True)]
        for values, name in zip(lists, names, strict=True)
    ]


def real_views(tensors: TensorList) -> Any:
    """View complex tensors as real pairs, as torch.optim does, so the math is elementwise."""
    if tensors is None:
        return None
    return [
        torch.view_as_real(t) if isinstance(t, Tensor) and t.is_complex() else t for t in tensors
    ]


def real_view_lists(lists: Sequence[TensorList]) -> list[Any]:
    """real_views of every list; the lists as they are when no parameter (lists[0]) is
    complex, which spares a pass over every other list in the usual case."""
    if not any(map(Tensor.is_complex, lists[0])):  # type: ignore[arg-type]
        return list(lists)
    return [real_views(t) for t in lists]


ROWS = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "kahan_comp")
"""The tensor lists a fused kernel addresses, in the order the backends pass them."""


def check_addressable(
    lists: Sequence[Sequence[Tensor] | None],
    dtype: torch.dtype,
    device: torch.device,
    require_dense: bool = True,
    positions: Sequence[int] | None = None,
) -> None:
    """Refuse, before a kernel reads raw addresses, anything but plain tensors of dtype on
    device with as many elements as their parameter (lists[0], rows in ROWS order), and
    with require_dense, laid out densely like it (callers that send other layouts down
    another path check those themselves). positions: each entry's index in the caller's
    lists, to name it by (default: its index here).

    Callers have sorted tensors into such buckets already; this is the last line of
    defence that turns a mistake into a ValueError, naming the tensor, instead of a write
    through a wrong address. It runs per list at C speed in the usual case.
    """
    params = lists[0]
    assert params is not None
    numels = list(map(Tensor.numel, params))
    for row, values in zip(ROWS, lists, strict=False):
        if values is None:
            continue
        if (
            PLAIN_TENSOR_TYPES.issuperset(map(type, values))
            and {dtype} == set(map(dtype_of, values))
            and {device} == set(map(device_of, values))
            and (not require_dense or all(map(Tensor.is_contiguous, values)))
            and list(map(Tensor.numel, values)) == numels
            and not _any_memory_problem(values)
        ):
            continue
        for index, (t, param) in enumerate(zip(values, params, strict=True)):
            problem = _address_problem(t, param, dtype, device, require_dense)
            if problem:
                where = index if positions is None else positions[index]
                raise ValueError(
                    f"Invalid {row}[{where}] for a fused kernel: {problem}. Allowed: a plain "
                    f"torch.Tensor or nn.Parameter (not a subclass such as DTensor) of {dtype} "
                    f"on {device}, laid out like its parameter (fused=False also takes other "
                    "layouts and tensor subclasses such as DTensor)."
                )


def _address_problem(
    t: object, param: Tensor, dtype: torch.dtype, device: torch.device, require_dense: bool
) -> str:
    """Why a kernel may not read t's raw memory beside param's ("" if it may)."""
    if not isinstance(t, Tensor):
        return f"a {type(t).__name__}"
    if type(t) not in PLAIN_TENSOR_TYPES:
        return f"a {type(t).__name__} of {t.dtype} on {t.device}, not a plain tensor"
    if t.layout != torch.strided:
        return f"a tensor with layout {t.layout}"
    if t.dtype != dtype or t.device != device:
        return f"a {type(t).__name__} of {t.dtype} on {t.device}"
    found = memory_problem(t)
    if found is not None:
        return f"a tensor {found[0]}"
    if t.numel() != param.numel():
        return f"a tensor of {t.numel()} elements beside a parameter of {param.numel()}"
    if not require_dense:
        return ""
    if not dense(t):
        return f"a tensor of shape {tuple(t.shape)} with gaps (strides {t.stride()})"
    if not t.is_contiguous() and (t.shape, t.stride()) != (param.shape, param.stride()):
        return (
            f"a tensor with strides {t.stride()} beside a parameter with strides "
            f"{param.stride()} (a flat pass would pair different elements)"
        )
    return ""


def _any_memory_problem(tensors: Sequence[Tensor]) -> bool:
    """Whether memory_problem would find something in one of these plain tensors (a pass
    each, C++ for the storages where it builds): the backends' last check, beside
    check_addressable's, before C reads an address."""
    from core.backends.host_checks import any_lazy_values, host_checks

    return any_lazy_values(tensors) or host_checks().first_unbacked(tensors) >= 0


def lazy_values(tensor: Tensor) -> tuple[str, str] | None:
    """How tensor's memory fails to hold its values as a kernel reads them, and how to
    materialize them: torch's negative or conjugate bit (the memory holds the values
    negated or conjugated) or a ZeroTensor (no memory at all); None for a tensor holding
    its own values. A kernel reading such memory would step with the wrong sign, or read
    address 0 and crash the process."""
    if tensor.is_neg():
        return "with torch's negative bit set (its memory holds its values negated)", (
            ".resolve_neg()"
        )
    if tensor.is_conj():
        return "with torch's conjugate bit set (its memory holds its values conjugated)", (
            ".resolve_conj()"
        )
    if tensor._is_zerotensor():
        return "that is a ZeroTensor (no memory of its own)", ".clone()"
    return None


def shortfall_problem(shortfall: tuple[int, int]) -> str:
    """How an error names a storage_shortfall."""
    held, needed = shortfall
    return (
        f"whose storage holds {held} bytes, fewer than its elements need ({needed}: freed "
        "by untyped_storage().resize_(0), as FSDP frees unsharded parameters, or shrunk)"
    )


BACKED = "a tensor whose storage holds its elements (step it while they are allocated)"


def memory_problem(tensor: Tensor) -> tuple[str, str] | None:
    """(what is wrong, what is allowed) for a tensor whose memory a kernel cannot use as
    its values: lazy_values, or a storage_shortfall (the kernels and torch's own ops
    crashed the process on one); None otherwise."""
    found = lazy_values(tensor)
    if found is not None:
        return (
            f"{found[0]}, which the fused kernels would read and write wrongly",
            f"a tensor holding its own values ({found[1]} it)",
        )
    shortfall = storage_shortfall(tensor)
    if shortfall is None:
        return None
    return shortfall_problem(shortfall), BACKED


def storage_shortfall(tensor: Tensor) -> tuple[int, int] | None:
    """(bytes its storage holds, bytes its elements need) for a tensor whose storage does
    not hold every element its sizes, strides and offset address, else None: one freed with
    untyped_storage().resize_(0) (as FSDP frees unsharded parameters) has address 0, and
    one shrunk has too few bytes; a kernel handed either crashes the process. Only plain
    tensors with data are asked: a DTensor's local shard and a wrapper subclass's inner
    tensors are their owners' to manage, and a meta tensor has no data by design (refused
    by device elsewhere)."""
    if type(tensor) not in PLAIN_TENSOR_TYPES or tensor.is_meta or tensor.numel() == 0:
        return None
    last = tensor.storage_offset() + sum(
        (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )
    storage = tensor.untyped_storage()
    needed, held = (last + 1) * tensor.element_size(), storage.nbytes()
    try:
        address = storage.data_ptr()
    except RuntimeError:  # "an invalid python storage": a ZeroTensor's, which has no memory
        address = 0
    if address == 0:
        return 0, needed
    return None if needed <= held else (held, needed)


def dense(tensor: Tensor) -> bool:
    """Whether the elements fill one block of memory without gaps or overlap, in any
    dimension order (contiguous, channels-last, transposed)."""
    if tensor.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted(
        (s, n) for s, n in zip(tensor.stride(), tensor.shape, strict=True) if n != 1
    ):
        if stride != expected:
            return False
        expected *= size
    return True


QUANTIZED_ROWS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
"""The 8-bit moments a quantized fused kernel addresses, in the order it takes them."""


def check_quantized_addressable(
    params: Sequence[Tensor],
    moments: Sequence[Sequence[QuantizedMoment] | None],
    device: torch.device,
) -> list[int]:
    """Refuse, before a kernel reads raw addresses, 8-bit moments (lists in QUANTIZED_ROWS
    order) whose codes and scales are not exactly the memory core.quantization lays out
    for their parameter: plain contiguous uint8 codes of the parameter's element count and
    plain contiguous float32 scales of its (rows, blocks per row) count, on device, each
    moment of the map its key uses; parameters contiguous (blocks follow logical rows).
    Returns each parameter's row length, which the kernel splits blocks by.

    The parameters, gradients and Kahan buffers are check_addressable's to check.
    """
    for index, param in enumerate(() if all(map(Tensor.is_contiguous, params)) else params):
        if not param.is_contiguous():
            raise ValueError(
                f"Invalid param[{index}] for a quantized fused kernel: shape "
                f"{tuple(param.shape)} with strides {param.stride()}. Allowed: a contiguous "
                "tensor (8-bit blocks run along its logical rows; fused=False takes any layout)."
            )
    layouts = list(map(blocked_layout, map(_SHAPE, params)))
    scale_counts = [scale_count for _, scale_count in layouts]
    numels = list(map(Tensor.numel, params))
    for row, values in zip(QUANTIZED_ROWS, moments, strict=True):
        if values is None:
            continue
        if len(values) != len(params):
            raise ValueError(
                f"Invalid {row}s for a quantized fused kernel: {len(values)} moments for "
                f"{len(params)} parameters. Allowed: one per parameter."
            )
        signed = row in SIGNED_KEYS
        if _all_addressable(values, numels, scale_counts, signed, device):
            continue
        for index, moment in enumerate(values):
            problem = _quantized_problem(moment, numels[index], scale_counts[index], signed, device)
            if problem:
                raise ValueError(
                    f"Invalid {row}[{index}] for a quantized fused kernel: {problem}. Allowed: "
                    f"a QuantizedMoment (signed={signed}) of contiguous plain torch.uint8 codes "
                    f"with the parameter's element count and contiguous plain torch.float32 "
                    f"scales of shape (rows, blocks per row), both on {device}."
                )
    return [row_length for row_length, _ in layouts]


_SHAPE, _CODES, _ABSMAX, _SIGNED = map(attrgetter, ("shape", "codes", "absmax", "signed"))
_LAYOUT = attrgetter("layout")


@functools.lru_cache(maxsize=1024)
def blocked_layout(shape: torch.Size) -> tuple[int, int]:
    """(row length, scale count) of an 8-bit moment of this shape (core.quantization's
    layout), remembered per shape: a model has few, and a step asks for each of them."""
    return block_shape(shape)[1], math.prod(absmax_shape(shape))


def _all_addressable(
    values: Sequence[QuantizedMoment],
    numels: list[int],
    scale_counts: list[int],
    signed: bool,
    device: torch.device,
) -> bool:
    """The usual case of _quantized_problem for a whole list, at C speed per moment."""
    if {QuantizedMoment} != set(map(type, values)) or {signed} != set(map(_SIGNED, values)):
        return False
    for tensors, dtype, counts in (
        (list(map(_CODES, values)), torch.uint8, numels),
        (list(map(_ABSMAX, values)), torch.float32, scale_counts),
    ):
        if not (
            PLAIN_TENSOR_TYPES.issuperset(map(type, tensors))
            and {torch.strided} == set(map(_LAYOUT, tensors))
            and {dtype} == set(map(dtype_of, tensors))
            and {device} == set(map(device_of, tensors))
            and all(map(Tensor.is_contiguous, tensors))
            and list(map(Tensor.numel, tensors)) == counts
        ):
            return False
    return True


def _quantized_problem(
    moment: object, numel: int, scale_count: int, signed: bool, device: torch.device
) -> str:
    """Why a kernel may not read moment's codes and scales ("" if it may)."""
    if type(moment) is not QuantizedMoment:
        return f"a {type(moment).__name__}"
    if moment.signed != signed:
        return f"a moment of the {'signed' if moment.signed else 'unsigned'} map"
    for name, t, dtype, count in (
        ("codes", moment.codes, torch.uint8, numel),
        ("absmax", moment.absmax, torch.float32, scale_count),
    ):
        if type(t) not in PLAIN_TENSOR_TYPES:
            return f"{name} of type {type(t).__name__}, not a plain tensor"
        if t.layout != torch.strided or t.dtype != dtype or t.device != device:
            return f"{name} of {t.dtype} on {t.device} ({t.layout})"
        if t.numel() != count:
            return f"{name} of {t.numel()} elements where the parameter needs {count}"
        if not t.is_contiguous():
            return f"{name} with strides {t.stride()} (not contiguous)"


def check_quantized_row(
    params: Sequence[Tensor],
    row: str,
    moments: Sequence[object],
    signed: bool,
    positions: Sequence[int] | None = None,
) -> None:
    """check_quantized_addressable for one list (row names it, e.g. "exp_avg"), naming a
    refused moment by its index in the caller's lists (positions) where given: the
    Triton backend plans its 8-bit launches one list at a time."""
    for index, (moment, param) in enumerate(zip(moments, params, strict=True)):
        scales = absmax_shape(param.shape)
        problem = _quantized_problem(
            moment, param.numel(), scales[0] * scales[1], signed, param.device
        )
        if not problem and moment.codes.shape != param.shape:  # type: ignore[attr-defined]
            shapes = tuple(moment.codes.shape), tuple(param.shape)  # type: ignore[attr-defined]
            problem = "codes of shape {} beside a parameter of shape {}".format(*shapes)
        if problem:
            where = index if positions is None else positions[index]
            raise ValueError(
                f"Invalid {row}[{where}] for a fused kernel: {problem}. Allowed: a "
                f"QuantizedMoment (signed={signed}) of plain contiguous torch.uint8 codes "
                "shaped like its parameter and plain contiguous torch.float32 scales, one per "
                "block (core.quantization.absmax_shape), both on the parameter's device "
                "(fused=False also takes other layouts and tensor subclasses)."
            )
    return ""
