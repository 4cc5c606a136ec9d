"""Counter-based random bits: the same in every backend, every run and after a resume.

Stochastic rounding (of 16-bit parameters, core.backends.precision, and of 8-bit m and
v, core.quantization) draws each element's bits by hashing its index with a 32-bit key
derived from a seed, the tensor's stream and the step, never from a generator's state.
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B1
_MIX_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)


def mix32(value: int) -> int:
    """A 32-bit integer hash with good avalanche (xor-shift-multiply, two rounds)."""
    value ^= value >> 16
    value = (value * _MIX_MULTIPLIERS[0]) & MASK32
    value ^= value >> 15
    value = (value * _MIX_MULTIPLIERS[1]) & MASK32
    return value ^ (value >> 16)


def _multiply32(values: Tensor, constant: int) -> Tensor:
    """(values · constant) mod 2^32 for int64 values below 2^32, without int64 overflow."""
    low = (values & 0xFFFF) * constant
    high = ((values >> 16) * (constant & 0xFFFF)) << 16
    return (low + high) & MASK32


def _mix32_tensor(values: Tensor) -> Tensor:
    values = values ^ (values >> 16)
    values = _multiply32(values, _MIX_MULTIPLIERS[0])
    values = values ^ (values >> 15)
    values = _multiply32(values, _MIX_MULTIPLIERS[1])
    return values ^ (values >> 16)


def rounding_bits(key: int, count: int, device: torch.device) -> Tensor:
    """count random 32-bit values (int64): element i's is mix32(i·0x9E3779B1 + key), the
    bits every backend draws for element i under this key."""
    # index · GOLDEN stays below 2^63 for any count under 2^31: one exact int64 product
    index = torch.arange(count, dtype=torch.int64, device=device)
    index = _multiply32(index & MASK32, GOLDEN) if count > 1 << 31 else index * GOLDEN
    return _mix32_tensor((index + key) & MASK32)


def rounding_uniforms(key: int, count: int, device: torch.device) -> Tensor:
    """count uniform fp32 values in [0, 1), on a 2^-24 grid: element i's is
    rounding_bits' >> 8, scaled (the kernels compute the same)."""
    return (rounding_bits(key, count, device) >> 8).to(torch.float32) * 2.0**-24


def rounding_draw(step: float, microbatch: int = 1) -> int:
    """The 32-bit number naming one call's random bits for 8-bit m and v
    (core.quantization.QuantizedMoment.key): its step and, within an optimizer-accumulation
    window, its micro-batch, so no two roundings of one moment draw the same bits."""
    return mix32((int(step) & MASK32) ^ mix32(microbatch & MASK32))


def stream_key(seed: int, stream: int) -> int:
    """The 32-bit key of one tensor's stream of random bits, the same at every step."""
    return mix32(mix32(seed & MASK32) ^ (stream & MASK32))


def step_key(stream: int, draw: int) -> int:
    """The 32-bit key of one call on a stream (draw: the step, or rounding_draw's number):
    every element's bits derive from it (rounding_bits)."""
    return mix32((stream ^ draw) & MASK32)


def offset_key(key: int, offset: int) -> int:
    """The key under which element i draws the bits element i + offset draws under key
    (element i's input is i·0x9E3779B1 + key): how a shard draws its whole tensor's."""
    return (key + offset * GOLDEN) & MASK32
