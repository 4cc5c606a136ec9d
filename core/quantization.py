"""8-bit optimizer state: the one storage format every backend reads and writes.

A moment (m, v or AMSGrad's v_max) of a large parameter is kept as one 8-bit code per
element plus one fp32 scale (the block's largest magnitude, "absmax") per block of
BLOCK_SIZE elements, so m and v cost about 2.03 bytes per parameter instead of 8 (fp32).

The layout, which state dicts hold as it is:

- Rows are the parameter's first dimension (a 1-D parameter is one row). Blocks run
  along each row, BLOCK_SIZE elements at a time; a row's last block may be shorter.
  Blocks never straddle rows, so a shard of whole rows (FSDP2's Shard(0)) quantizes
  exactly the blocks the unsharded tensor would, and its scales shard with it.
- `<key>_codes`: uint8, the parameter's shape, element order row-major (logical order).
- `<key>_absmax`: float32 of shape (rows, blocks per row).

A value x of block b is stored as the code of the map value nearest to x / absmax_b, and
read back as map[code] · absmax_b (fp32). Maps are the dynamic ("tree") maps of the
8-bit optimizer literature (Dettmers et al. 2022): per decade 10^(d-6), d = 0..6, 2^d
(signed) or 2^(d+1) (unsigned) values linearly spaced in (0.1, 1], plus 0 and 1, so
relative precision is about the same from 1e-6 to 1 of the block's largest value. m is
signed; v and v_max are non-negative and use the unsigned map, with twice the values.

Nearest is decided against the midpoints between neighbouring map values (in fp32):
the code is the number of midpoints below x / absmax, which every backend computes the
same way, so all of them store the same codes. One exception keeps Adam's denominator
safe: a positive v is never stored as 0 (it takes the smallest positive code), so an
element whose v is tiny beside its block's largest cannot divide by eps alone. A block
holding a non-finite value reads back as NaN throughout.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import torch
from torch import Tensor

BLOCK_SIZE = 256
"""Elements per scale. Smaller blocks track local magnitudes better but spend more bytes
on scales (4 / BLOCK_SIZE per element): 256 costs 0.016 bytes per element per moment."""
MIN_QUANTIZED_NUMEL = 4096
"""Parameters with fewer elements keep full-precision state: they are a negligible share of
memory (biases, norms), and the most sensitive to quantization error."""
StatePrecision = Literal["full", "8bit"]
STATE_PRECISIONS = ("full", "8bit")
"""Values of the optimizers' state_precision option."""

QUANTIZABLE_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
"""Parameter dtypes whose moments may be 8-bit (decoded to fp32, the compute precision of
all three); float64, complex and integer parameters keep full-precision state."""

SIGNED_KEYS = frozenset({"exp_avg"})
"""Moments that can be negative; every other quantized moment (exp_avg_sq,
max_exp_avg_sq) is non-negative."""


@functools.cache
def dynamic_map_values(signed: bool) -> tuple[float, ...]:
    """The 256 values of the signed or unsigned dynamic map, ascending, in float64."""
    values = {0.0, 1.0}
    for decade in range(7):
        count = 2**decade if signed else 2 ** (decade + 1)
        scale = 10.0 ** (decade - 6)
        edges = [0.1 + 0.9 * i / count for i in range(count + 1)]
        for low, high in pairwise(edges):
            mean = scale * (low + high) / 2
            values.add(mean)
            if signed:
                values.add(-mean)
    ordered = tuple(sorted(values))
    assert len(ordered) == 256, len(ordered)
    return ordered


@functools.cache
def _host_tables(signed: bool) -> tuple[Tensor, Tensor]:
    """(map values, decision midpoints) as float32 CPU tensors."""
    values = torch.tensor(dynamic_map_values(signed), dtype=torch.float64)
    midpoints = (values[:-1] + values[1:]) / 2
    return values.float(), midpoints.float()


_device_tables: dict[tuple[bool, torch.device], tuple[Tensor, Tensor]] = {}


def code_tables(signed: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """(256 map values, 255 midpoints) as float32 tensors on device; what every backend
    decodes with and decides nearest by."""
    key = (signed, device)
    tables = _device_tables.get(key)
    if tables is None:
        tables = _device_tables[key] = tuple(t.to(device) for t in _host_tables(signed))  # type: ignore[assignment]
    return tables  # type: ignore[return-value]


def smallest_positive_code(signed: bool) -> int:
    """The code of the smallest positive map value."""
    return dynamic_map_values(signed).index(0.0) + 1


def block_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """(rows, elements per row) of the layout for a parameter of this shape."""
    numel = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (numel // rows if rows else 0)


def absmax_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """Shape of the scales of a moment of this shape: (rows, blocks per row)."""
    rows, row_length = block_shape(shape)
    return rows, -(-row_length // BLOCK_SIZE)


def _blocked(values: Tensor) -> Tensor:
    """values (fp32) as (rows, blocks, BLOCK_SIZE), the last block of each row zero-padded."""
    rows, row_length = block_shape(values.shape)
    blocks = -(-row_length // BLOCK_SIZE)
    flat = values.reshape(rows, row_length)
    padding = blocks * BLOCK_SIZE - row_length
    if padding:
        flat = torch.nn.functional.pad(flat, (0, padding))
    return flat.reshape(rows, blocks, BLOCK_SIZE)


def quantize(values: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """(codes, absmax) of values in the layout above: the readable reference."""
    blocked = _blocked(values.detach().float())
    absmax = blocked.abs().amax(dim=-1)
    absmax = torch.where(absmax.isfinite(), absmax, torch.full_like(absmax, math.nan))
    scale = absmax.unsqueeze(-1)
    normalized = torch.where(scale > 0, blocked / scale, torch.zeros_like(blocked))
    _, midpoints = code_tables(signed, values.device)
    codes = torch.bucketize(normalized, midpoints)
    if not signed:
        codes = torch.where(normalized > 0, codes.clamp(min=1), codes)
    rows, row_length = block_shape(values.shape)
    codes = codes.reshape(rows, -1)[:, :row_length].to(torch.uint8)
    return codes.reshape(values.shape), absmax


def dequantize(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """The fp32 values codes and absmax stand for, in the codes' shape."""
    values, _ = code_tables(signed, codes.device)
    rows, row_length = block_shape(codes.shape)
    decoded = values[codes.reshape(rows, row_length).long()]
    scales = absmax.repeat_interleave(BLOCK_SIZE, dim=-1)[:, :row_length]
    return (decoded * scales).reshape(codes.shape)


@dataclass(frozen=True, slots=True)
class QuantizedMoment:
    """One 8-bit moment of one parameter, as backends receive it in place of a tensor.

    Its two tensors are the optimizer's state (updated in place), so a backend writes the
    moment by quantizing into them.
    """

    codes: Tensor
    absmax: Tensor
    signed: bool

    def dequantize(self) -> Tensor:
        return dequantize(self.codes, self.absmax, self.signed)

    def store(self, values: Tensor) -> None:
        """Quantize values (the moment's new fp32 value) into codes and absmax."""
        codes, absmax = quantize(values, self.signed)
        self.codes.copy_(codes)
        self.absmax.copy_(absmax)

    def numel(self) -> int:
        return self.codes.numel()


def validate_state_precision(value: object, where: str = "") -> None:
    """Refuse an unknown state_precision by name (see STATE_PRECISIONS)."""
    if value not in STATE_PRECISIONS:
        raise ValueError(
            f"Invalid state_precision{where}: {value!r}. Allowed: 'full' (moments in the "
            "parameter's dtype) or '8bit' (block-wise 8-bit moments, core.quantization)."
        )


# -- optimizer state in this format (DTensor-aware) ------------------------------------------


def _dtensor_type() -> type | None:
    from core.backends.views import dtensor_type  # views imports this module

    return dtensor_type()


def quantizable(param: Tensor) -> str | None:
    """Why param's moments must stay full precision under state_precision='8bit', or None.

    Only float32, bfloat16 and float16 parameters qualify (QUANTIZABLE_DTYPES): every
    backend steps 8-bit moments in fp32, which a float64 parameter would be stepped
    beside in its own precision. DTensors qualify when their blocks are their shard's own
    (every placement Replicate or Shard(0), at least 2 dimensions); every rank decides
    alike, from the global size.
    """
    if param.numel() < MIN_QUANTIZED_NUMEL:
        return f"fewer than {MIN_QUANTIZED_NUMEL} elements"
    if param.dtype not in QUANTIZABLE_DTYPES:
        return f"dtype {param.dtype}"
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(param, dtensor):
        rows_only = all(
            placement.is_replicate() or (placement.is_shard() and placement.dim == 0)  # type: ignore[attr-defined]
            for placement in param.placements  # type: ignore[attr-defined]
        )
        if param.ndim < 2 or not rows_only:
            return "a DTensor sharded other than by rows (Shard(0))"
        return None
    if type(param) not in (Tensor, torch.nn.Parameter):
        return f"a tensor subclass ({type(param).__name__})"
    return None


def quantized_state(param: Tensor, values: Tensor | None, signed: bool) -> tuple[Tensor, Tensor]:
    """(codes, absmax) state tensors for a moment of param: values quantized (zeros when
    None), laid out like param (DTensors of the same placements for a DTensor)."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(param, dtensor):
        if values is None:
            return (
                torch.zeros(param.shape, dtype=torch.uint8, device=param.device),
                torch.zeros(absmax_shape(param.shape), dtype=torch.float32, device=param.device),
            )
        return quantize(values.to(param.device), signed)
    local_param = param.to_local()  # type: ignore[attr-defined]
    if values is None:
        local_codes = torch.zeros(local_param.shape, dtype=torch.uint8, device=local_param.device)
        local_absmax = torch.zeros(
            absmax_shape(local_param.shape), dtype=torch.float32, device=local_param.device
        )
    else:
        local_values = values.to_local() if isinstance(values, dtensor) else values  # type: ignore[attr-defined]
        local_codes, local_absmax = quantize(local_values, signed)
    return _like(local_codes, param, tuple(param.shape)), _like(
        local_absmax, param, absmax_shape(param.shape)
    )


def _like(local: Tensor, param: Tensor, shape: tuple[int, ...]) -> Tensor:
    """local as a DTensor with param's mesh and placements and the given global shape."""
    dtensor = _dtensor_type()
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return dtensor.from_local(  # type: ignore[union-attr]
        local,
        param.device_mesh,  # type: ignore[attr-defined]
        param.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=torch.Size(shape),
        stride=stride,
    )


def full_precision(codes: Tensor, absmax: Tensor, signed: bool, param: Tensor) -> Tensor:
    """The moment codes and absmax stand for, in param's dtype and layout (a DTensor for a
    DTensor parameter)."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(codes, dtensor):
        return dequantize(codes, absmax.to(codes.device), signed).to(param.dtype)
    local = dequantize(codes.to_local(), absmax.to_local(), signed).to(param.dtype)  # type: ignore[attr-defined]
    return _like(local, param, tuple(param.shape))


def moment_keys(key: str) -> tuple[str, str]:
    """The state keys of an 8-bit moment: codes and scales."""
    return f"{key}_codes", f"{key}_absmax"


def stored_moment(state: dict, key: str, param: Tensor) -> Tensor:
    """A moment in full precision whichever way it is stored (metrics, tests, exports)."""
    if key in state:
        return state[key]
    codes, absmax = moment_keys(key)
    return full_precision(state[codes], state[absmax], key in SIGNED_KEYS, param)


def moment_view(state: dict, key: str) -> Tensor | QuantizedMoment:
    """What a backend is handed for a moment: the tensor, or its 8-bit form."""
    value = state.get(key)
    if value is not None:
        return value
    codes, absmax = moment_keys(key)
    return QuantizedMoment(state[codes], state[absmax], key in SIGNED_KEYS)
