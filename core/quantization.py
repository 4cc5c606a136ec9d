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

The maps ("tapered binary", CodeMap): a code stands for a binary float relative to its
block's absmax, with the most mantissa bits for the binades just below the block's top and
fewer further down, where an optimizer's moments matter least: m (signed: a sign bit and
127 magnitudes) has 5 mantissa bits in the two binades below 1, then 4, 3, 2, 1, 0 for
each next pair, down to 2^-12; v and v_max (non-negative, 255 magnitudes) have 5 bits in
the four binades below 1, then 4, 3, 2, 1, 0 for each next four, down to 2^-24. Both hold
0 and 1 (the block's largest element itself) exactly. Measured against the dynamic
("tree") maps of Dettmers et al. 2022 over 200 steps (tests/core/test_quantization.py),
they keep the trajectories closer, and unlike those maps a code is found from a value's
bits with a few integer operations (no search, no division per element), which made the
fused CPU kernel's 8-bit step about four times faster.

Encoding, bit for bit the same in every backend:
1. The block's scale s is its largest magnitude, NaN if any element is not finite, and 0
   if it is below 2^-126 (a block of zeros or fp32 subnormals reads back as zeros).
2. Each magnitude is normalised as a = |x| · fp32(1 / s): one rounded reciprocal per
   block and one rounded product per element (0 where s is 0 or NaN).
3. The code is a's nearest map value (ties up); values below the smallest map value
   round to it or to 0, whichever is nearer, except that a positive v or v_max never
   takes code 0 (it takes the smallest positive code), so an element whose v is tiny
   beside its block's largest cannot divide by eps alone. m's sign is bit 7 (never on a
   zero). Converting state (loading, switching precision) and v_max use this rule.
4. An optimizer step writes m and v rounded stochastically between their two
   neighbouring map values instead: unbiased, so they follow in expectation what rounded
   to nearest they could not. Each step moves v by (1 − β2) of itself, under half a code
   step at β2 ≥ 0.99, so nearest v grew on noisy gradients but never shrank (3x full
   precision's, 600 steps after its gradients shrank 10x, at β2 = 0.999); and an m below
   about 2^-8 of its block's scale, where codes are coarse, stopped decaying when its
   gradient became 0, so the element kept moving for good (at 0.5 lr per step after
   3000 steps once v could shrink). With t = code + 1, a lies at a real t-position T
   between codes (T's fp32 bits: a's shifted right by the map's group bits, plus a
   constant; cpu_kernel.c's encode_offset); in fp32, T has s = 23 − floor(log2 T)
   fraction bits, and with M its 24-bit significand, t = floor((M + r) / 2^s) where r
   is the top s bits of the moment's 32 random bits R. One hash per element serves both
   moments (moment_bits): with h the element's bits (core.random_bits.rounding_bits:
   element i's index in the moment's row-major order, under QuantizedMoment.key; a
   shard's elements by their index in the whole moment, so FSDP2 draws what one process
   does and a run resumed on another number of ranks continues alike), v's R is h's
   high 16 bits and m's its low 16, each followed by 16 zeros: a probability resolved
   to 2^-16 of a code step (the position's bits below that are dropped, a bias under
   2^-16 of a step), for half the hashing. Below the smallest value m takes the
   smallest code if u < a / smallest value (an fp32 product by a power of two, exact),
   with u = (R >> 8) · 2^-24, else 0, so an m whose gradient stopped reaches 0; v keeps
   the smallest code (rule 3).

A code reads back as map[code] · s (fp32), which is exact but for that product.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from core.random_bits import offset_key, rounding_bits, step_key, stream_key

BLOCK_SIZE = 256
"""Elements per scale. Smaller blocks track local magnitudes better but spend more bytes
on scales (4 / BLOCK_SIZE per element): 256 costs 0.016 bytes per element per moment."""
MIN_QUANTIZED_NUMEL = 4096
"""Parameters with fewer elements keep full-precision state: they are a negligible share of
memory (biases, norms), and the most sensitive to quantization error."""
StatePrecision = Literal["full", "8bit"]
STATE_PRECISIONS = ("full", "8bit")
"""Values of the optimizers' state_precision option."""
CODE_FORMAT = 2
"""Version of the code maps, kept in every param group of an optimizer with 8-bit state
(key CODE_FORMAT_KEY), so that state saved with other maps is refused on load instead of
being read with the wrong meaning. Format 1 (adamkit before this key) used dynamic maps."""
CODE_FORMAT_KEY = "state_code_format"

QUANTIZABLE_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
"""Parameter dtypes whose moments may be 8-bit (decoded to fp32, the compute precision of
all three); float64, complex and integer parameters keep full-precision state."""

SIGNED_KEYS = frozenset({"exp_avg"})
"""Moments that can be negative; every other quantized moment (exp_avg_sq,
max_exp_avg_sq) is non-negative."""
STOCHASTIC_KEYS = frozenset({"exp_avg", "exp_avg_sq"})
"""Moments an optimizer step rounds stochastically (step 4 above): m and v. v_max only
ever grows, as rounding to nearest lets it."""
_STREAM_SALT = 0x5BD1E995
"""Sets the moments' streams apart from the parameters' own (stochastic rounding of
16-bit θ draws from stream_key(seed, position) too)."""
MOMENT_BITS_MASK = 0xFFFF0000
"""The 16 bits of an element's random bits a moment rounds with, at the top of a 32-bit
word (moment_bits)."""


def stochastic_stream(seed: int, position: int) -> int:
    """The key of the stream of the moments' random bits for the parameter at this
    position among its optimizer's (seed: its group's rounding_seed): the same in every
    run and after a resume, as stochastic rounding of parameters."""
    return stream_key(seed ^ _STREAM_SALT, position)


def moment_bits(bits: Tensor, signed: bool) -> Tensor:
    """The random bits R one moment rounds with (step 4 above), from its elements' 32 bits
    (int64): v (unsigned) takes the high 16, m (signed) the low 16, so one hash serves
    both and they draw independently of each other."""
    return ((bits << 16) if signed else bits) & MOMENT_BITS_MASK


@dataclass(frozen=True)
class CodeMap:
    """A tapered binary map, defined by integer arithmetic on a magnitude code c.

    With t = c + 1 and E = floor(log2 t), code c stands for the fp32 number whose bits are
    ((exponent_base + E·2^group_bits) << 23) + ((t − 2^E) << (23 + group_bits − E)):
    each group E spans 2^group_bits binades with E − group_bits mantissa bits each, and
    the groups run up to the top code (t = 2^top_group), which is exactly 1. Codes below
    smallest_code (t below 2^smallest_group) are not used and read as 0. A signed map's
    codes carry the sign in bit 7; an unsigned map never stores a positive value as 0.
    """

    signed: bool
    group_bits: int
    top_group: int
    smallest_group: int

    @property
    def exponent_base(self) -> int:
        return 127 - (self.top_group << self.group_bits)

    @property
    def largest_code(self) -> int:
        return (1 << self.top_group) - 1

    @property
    def smallest_code(self) -> int:
        return (1 << self.smallest_group) - 1

    @property
    def lowest_exponent(self) -> int:
        """The fp32 exponent (biased) of the smallest map value."""
        return self.exponent_base + (self.smallest_group << self.group_bits)


SIGNED_MAP = CodeMap(signed=True, group_bits=1, top_group=7, smallest_group=1)
"""m: sign bit 7; magnitudes 1/4096 .. 1, 5 mantissa bits at the top."""
UNSIGNED_MAP = CodeMap(signed=False, group_bits=2, top_group=8, smallest_group=2)
"""v, v_max: magnitudes 2^-24 .. 1, 5 mantissa bits at the top (codes 1 and 2 unused)."""


def code_map(signed: bool) -> CodeMap:
    return SIGNED_MAP if signed else UNSIGNED_MAP


def magnitude_bits(magnitude: Tensor, spec: CodeMap) -> Tensor:
    """The fp32 bits (int32) magnitude codes stand for, by CodeMap's rule."""
    t = magnitude.to(torch.int32) + 1
    group = (t.float().view(torch.int32) >> 23) - 127  # floor(log2 t), exact for t <= 256
    bits = ((spec.exponent_base + (group << spec.group_bits)) << 23) + (
        (t - (1 << group)) << (23 + spec.group_bits - group)
    )
    return torch.where(magnitude >= spec.smallest_code, bits, torch.zeros_like(bits))


@functools.cache
def _host_values(signed: bool) -> Tensor:
    codes = torch.arange(256, dtype=torch.int32, device="cpu")
    spec = code_map(signed)
    if not signed:
        return magnitude_bits(codes, spec).view(torch.float32)
    values = magnitude_bits(codes & 0x7F, spec).view(torch.float32)
    return torch.where(codes >= 128, -values, values)


_device_values: dict[tuple[bool, torch.device], Tensor] = {}
"""map_values on each device, copied there once (every step decodes with them)."""


def map_values(signed: bool, device: torch.device | None = None) -> Tensor:
    """The 256 fp32 values the codes stand for (before scaling by the block's absmax)."""
    if device is None or device.type == "cpu":
        return _host_values(signed)
    values = _device_values.get((signed, device))
    if values is None:
        values = _device_values[(signed, device)] = _host_values(signed).to(device)
    return values


def midpoints(signed: bool) -> Tensor:
    """The normalized magnitudes (fp32, exact) at which the code changes: midpoints
    between neighbouring map values used by the encoding, ascending (tests probe them)."""
    spec = code_map(signed)
    values = _host_values(signed)[: spec.largest_code + 1].double()
    used = torch.cat([values[:1], values[spec.smallest_code :]])
    return ((used[:-1] + used[1:]) / 2).float()


def magnitude_codes(normalized: Tensor, spec: CodeMap, random: Tensor | None = None) -> Tensor:
    """The magnitude code of each normalized magnitude a in [0, 2) (fp32), found from a's
    bits: the nearest map value (ties up; a >= 1 takes the largest code). Under an unsigned
    map every a > 0 takes at least the smallest code. random (int64, 32 random bits per
    element, in normalized's shape): round stochastically between the two neighbouring
    map values instead (step 4 above), where a is at least the smallest."""
    bits = normalized.view(torch.int32)
    exponent = bits >> 23
    base, group_bits = spec.exponent_base, spec.group_bits
    group = ((exponent - base) >> group_bits).clamp(spec.smallest_group, spec.top_group - 1)
    shift = 23 + group_bits - group
    offset = bits - ((base + (group << group_bits)) << 23)
    if random is None:  # the half step rounds to nearest
        codes = (1 << group) + ((offset + (1 << (shift - 1))) >> shift) - 1
    else:  # the position without its group_bits lowest bits, plus its own random bits
        fraction_bits = shift - group_bits
        addend = (random >> (32 - fraction_bits).long()).int()
        codes = (1 << group) + (((offset >> group_bits) + addend) >> fraction_bits) - 1
    codes = torch.where(exponent >= 127, spec.largest_code, codes)
    lowest = spec.lowest_exponent
    if not spec.signed:
        rounds_up = torch.ones_like(exponent, dtype=torch.bool)
    elif random is None:
        rounds_up = exponent >= lowest - 1
    else:
        uniform = (random >> 8).float() * 2.0**-24
        rounds_up = uniform < normalized * 2.0 ** (127 - lowest)
    below = rounds_up.int() * spec.smallest_code
    codes = torch.where(exponent < lowest, below, codes)
    return torch.where(bits == 0, 0, codes)


def block_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """(rows, elements per row) of the layout for a parameter of this shape. A row's
    length does not depend on how many rows there are: a rank's FSDP2 shard with no rows
    of a (4, 1100) weight has scales of shape (0, 5), as its DTensor's other shards."""
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, math.prod(shape)


def absmax_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """Shape of the scales of a moment of this shape: (rows, blocks per row)."""
    rows, row_length = block_shape(shape)
    return rows, -(-row_length // BLOCK_SIZE)


def _block_width(row_length: int) -> int:
    """Elements per block as the reference lays them out: BLOCK_SIZE, or the whole row
    where a row is shorter (a (4096, 8) weight then costs 8 elements per block, not 256
    of which 248 are padding: 32 times less work for the same codes)."""
    return min(BLOCK_SIZE, max(row_length, 1))


def _blocked(values: Tensor) -> Tensor:
    """values (fp32, or random bits) as (rows, blocks, width) (width: _block_width), the
    last block of each row zero-padded."""
    rows, row_length = block_shape(values.shape)
    width = _block_width(row_length)
    blocks = -(-row_length // width)
    flat = values.reshape(rows, row_length)
    padding = blocks * width - row_length
    if padding:
        flat = torch.nn.functional.pad(flat, (0, padding))
    return flat.reshape(rows, blocks, width)


SMALLEST_SCALE = 2.0**-126
"""Blocks whose largest magnitude is below this (fp32's smallest normal) are stored as 0."""


def quantize(values: Tensor, signed: bool, key: int | None = None) -> tuple[Tensor, Tensor]:
    """(codes, absmax) of values in the layout above: the readable reference. key: round
    stochastically with the bits of this key (step 4 above)."""
    blocked = _blocked(values.detach().float())
    absmax = blocked.abs().amax(dim=-1)
    absmax = torch.where(absmax.isfinite(), absmax, torch.full_like(absmax, math.nan))
    absmax = torch.where(absmax < SMALLEST_SCALE, torch.zeros_like(absmax), absmax)
    usable = (absmax > 0).unsqueeze(-1)
    inverse = torch.where(usable, 1.0 / absmax.unsqueeze(-1), torch.zeros_like(blocked[..., :1]))
    normalized = torch.where(usable, blocked.abs() * inverse, torch.zeros_like(blocked))
    random = None
    if key is not None:
        random = rounding_bits(key, values.numel(), values.device).reshape(values.shape)
        random = _blocked(moment_bits(random, signed))
    spec = code_map(signed)
    codes = magnitude_codes(normalized, spec, random)
    if signed:
        codes = torch.where((blocked < 0) & (codes > 0), codes | 0x80, codes)
    else:  # a nonzero v whose |x| · fp32(1 / absmax) underflowed to 0 is still positive
        nonzero = usable & (blocked != 0)
        codes = torch.where(nonzero, codes.clamp(min=spec.smallest_code), codes)
    row_length = block_shape(values.shape)[1]
    codes = codes.flatten(1)[:, :row_length].to(torch.uint8)  # (rows, blocks * width)
    return codes.reshape(values.shape), absmax


def dequantize(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """The fp32 values codes and absmax stand for, in the codes' shape."""
    values = map_values(signed, codes.device)
    rows, row_length = block_shape(codes.shape)
    decoded = values[codes.reshape(rows, row_length).long()]
    scales = absmax.repeat_interleave(_block_width(row_length), dim=-1)[:, :row_length]
    return (decoded * scales).reshape(codes.shape)


@dataclass(frozen=True, slots=True)
class QuantizedMoment:
    """One 8-bit moment of one parameter, as backends receive it in place of a tensor.

    Its two tensors are the optimizer's state (updated in place), so a backend writes the
    moment by quantizing into them. Every backend rounds the m and v it writes
    (STOCHASTIC_KEYS) stochastically, with the bits of key(draw): stream is the key of
    the parameter's stream of random bits (stochastic_stream, shared by its m and v),
    and draw names the call (the coefficients' state_draw). v_max ignores stream.
    """

    codes: Tensor
    absmax: Tensor
    signed: bool
    stream: int = 0
    first_index: int = 0
    """The index of its first element in the whole moment: a shard's offset in its
    DTensor (FSDP2), so that a shard draws the bits its elements draw unsharded."""

    def dequantize(self) -> Tensor:
        return dequantize(self.codes, self.absmax, self.signed)

    def key(self, draw: int) -> int:
        """The key of the parameter's 8-bit m and v random bits (moment_bits) in the call
        named by draw, for this shard."""
        return offset_key(step_key(self.stream, draw), self.first_index)

    def store(self, values: Tensor, draw: int | None = None) -> None:
        """Quantize values (the moment's new fp32 value) into codes and absmax: rounded to
        nearest, or with draw (m and v) stochastically with the bits of key(draw)."""
        codes, absmax = quantize(values, self.signed, None if draw is None else self.key(draw))
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


FSDP1_FULL_PRECISION = (
    "an FSDP1 (FullyShardedDataParallel) flat parameter or a piece of one: FSDP1's optimizer "
    "state dict gathers every state tensor as if shaped like its parameter, which an 8-bit "
    "moment's scales are not, and each rank holds a piece of another size, so ranks would "
    "decide differently (use FSDP2, fully_shard, for 8-bit state)"
)
"""Why FSDP1's parameters keep full-precision state under state_precision='8bit'."""


def is_fsdp1_flattened(param: Tensor) -> bool:
    """Whether FSDP1 manages param: its flat parameter, or (use_orig_params=True) a view of
    one. FSDP1 marks both; FSDP2's DTensor parameters are not marked."""
    return bool(getattr(param, "_fsdp_flattened", False))


def quantizable(param: Tensor) -> str | None:
    """Why param's moments must stay full precision under state_precision='8bit', or None.

    Only float32, bfloat16 and float16 parameters qualify (QUANTIZABLE_DTYPES): every
    backend steps 8-bit moments in fp32, which a float64 parameter would be stepped
    beside in its own precision. Nor do parameters whose rows are so short that codes and
    a scale per row take as many bytes as the full moment (an (n, 1) fp32 weight: 5
    bytes per element against 4; bf16 up to rows of 4), which would cost memory, and
    accuracy, for nothing. DTensors qualify when their blocks are their shard's own
    (every placement Replicate or Shard(0), at least 2 dimensions); every rank decides
    alike, from the global size. FSDP1's flat parameters (and, with use_orig_params, the
    pieces of them it hands out as parameters) never qualify: see FSDP1_FULL_PRECISION.
    """
    if is_fsdp1_flattened(param):
        return FSDP1_FULL_PRECISION
    if param.numel() < MIN_QUANTIZED_NUMEL:
        return f"fewer than {MIN_QUANTIZED_NUMEL} elements"
    if param.dtype not in QUANTIZABLE_DTYPES:
        return f"dtype {param.dtype}"
    _, row_length = block_shape(param.shape)
    quantized_bytes = row_length + 4 * absmax_shape(param.shape)[1]
    if quantized_bytes >= row_length * param.element_size():
        return (
            f"rows of {row_length} element(s), whose 8-bit codes and fp32 block scale take "
            f"{quantized_bytes} bytes per row, no fewer than the "
            f"{row_length * param.element_size()} of a full-precision {param.dtype} moment"
        )
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


def laid_out_as(value: Tensor, like: Tensor) -> Tensor:
    """value (a whole, plain tensor of like's global shape) as a DTensor of like's mesh,
    placements and shape: this rank's part of it. For a moment that arrives whole where a
    DTensor parameter's state holds shards (torch's full-state loader hands state keys it
    did not find in the receiving optimizer through undistributed)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(
        like.shape,
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
    )
    part = tuple(
        slice(start, start + size) for start, size in zip(offset, local_shape, strict=True)
    )
    local = value[part].to(like.to_local().device).contiguous()  # type: ignore[attr-defined]
    return _like(local, like, tuple(like.shape))


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


def moment_view(state: dict, key: str, stream: int = 0) -> Tensor | QuantizedMoment:
    """What a backend is handed for a moment: the tensor, or its 8-bit form (stream: see
    QuantizedMoment)."""
    value = state.get(key)
    if value is not None:
        return value
    codes, absmax = moment_keys(key)
    return QuantizedMoment(state[codes], state[absmax], key in SIGNED_KEYS, stream)
