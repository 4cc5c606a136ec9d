"""Compute-precision bookkeeping shared by the eager backends.

bf16/fp16 tensors are updated in fp32 and rounded once at the end; with Kahan
summation the parameter is read as θ + k and written back as θ ← round(θ̃),
k ← round(θ̃ − θ), so the rounding error of every step is carried into the next.
Stochastic rounding (StochasticRounding in place of the Kahan buffer) is the memory-free
alternative: the update is rounded up or down at random, unbiased.
8-bit moments (core.quantization.QuantizedMoment) are dequantized into an fp32 working
copy and quantized back when stored, which makes the eager backends the reference for
the 8-bit format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from core.quantization import QuantizedMoment
from core.random_bits import MASK32, offset_key, rounding_uniforms, step_key, stream_key

LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


def working_copy(tensor: Tensor | QuantizedMoment) -> Tensor:
    """The tensor itself when its dtype can hold the math, else an fp32 copy of it."""
    if isinstance(tensor, QuantizedMoment):
        return tensor.dequantize()
    return tensor.float() if tensor.dtype in LOW_PRECISION_DTYPES else tensor


def load_param(param: Tensor, kahan_comp: Tensor | StochasticRounding | None) -> Tensor:
    """The parameter in compute precision, including its Kahan compensation."""
    if kahan_comp is None or isinstance(kahan_comp, StochasticRounding):
        return working_copy(param)
    return param.float().add_(kahan_comp)


def store(target: Tensor | QuantizedMoment, value: Tensor, draw: int | None = None) -> None:
    """Write a working copy back (a no-op when the math ran in place). draw: for m and v,
    the step's AdamStepCoefficients.state_draw (8-bit m and v round stochastically with
    it)."""
    if isinstance(target, QuantizedMoment):
        target.store(value, draw)
    elif value is not target:
        target.copy_(value)


def store_param(
    param: Tensor, value: Tensor, kahan_comp: Tensor | StochasticRounding | None
) -> None:
    """Round the updated parameter into place and keep what rounding lost in kahan_comp
    (or round it stochastically)."""
    if isinstance(kahan_comp, StochasticRounding):
        if value is not param:
            param.copy_(stochastic_round(value, param.dtype, kahan_comp))
        return
    store(param, value)
    if kahan_comp is not None:
        kahan_comp.copy_(value.sub_(param))


# -- stochastic rounding --------------------------------------------------------------------

MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}
MIN_EXPONENTS = {torch.bfloat16: -126, torch.float16: -14}
"""Stored mantissa bits and the smallest normal exponent of each 16-bit type: below it
the spacing of representable values stays 2^(min_exponent − mantissa_bits)."""


@dataclass(frozen=True, slots=True)
class StochasticRounding:
    """A parameter rounded stochastically instead of to nearest (in place of its Kahan
    buffer in a backend's kahan_comps list): unbiased, so small updates survive on
    average without a compensation buffer.

    The random bits are a hash of (seed, stream, step, element index), so a run
    reproduces and a resumed run continues bit for bit; stream tells parameters apart
    (the optimizer uses the parameter's position) and step is set for each step.
    """

    seed: int
    stream: int
    step: int = 0
    first_index: int = 0
    """The index of the tensor's first element in the whole parameter: a DTensor shard's
    offset (FSDP2's Shard(0)), so that a shard draws the bits its elements draw unsharded
    and a sharded run rounds as one process does."""

    def at_step(self, step: int) -> StochasticRounding:
        return StochasticRounding(self.seed, self.stream, step, self.first_index)

    def stream_key(self) -> int:
        """The 32-bit key of this parameter's stream, the same at every step (the Triton
        kernels hash in the step themselves: key() = mix32(stream_key() ^ step))."""
        return stream_key(self.seed, self.stream)

    def key(self) -> int:
        """The 32-bit key of this parameter's (or shard's) step: every element's bits
        derive from it."""
        return offset_key(step_key(self.stream_key(), self.step & MASK32), self.first_index)


def stochastic_round(values: Tensor, dtype: torch.dtype, rounding: StochasticRounding) -> Tensor:
    """fp32 values rounded to dtype up or down, up with probability equal to the distance
    from the value below in units of dtype's spacing there. Every operation is exact in
    fp32, so backends that follow these steps agree bit for bit. Non-finite values round
    to nearest; a value within one spacing of dtype's largest may round to infinity."""
    if dtype not in MANTISSA_BITS:
        return values.to(dtype)
    flat = values.reshape(-1)
    bits = flat.view(torch.int32).to(torch.int64)
    exponent = ((bits >> 23) & 0xFF) - 127
    exponent = exponent.clamp(min=MIN_EXPONENTS[dtype])
    # Scaling by 2^shift (up to 2^133 for bfloat16 subnormals) in two exact halves, as
    # neither half overflows fp32.
    shift = MANTISSA_BITS[dtype] - exponent
    first = torch.exp2((shift // 2).to(torch.float32))
    second = torch.exp2((shift - shift // 2).to(torch.float32))
    scaled = flat * first * second
    below = torch.floor(scaled)
    fraction = scaled - below
    uniforms = rounding_uniforms(rounding.key(), flat.numel(), flat.device)
    rounded = (below + (uniforms < fraction).to(torch.float32)) / first / second
    rounded = torch.where(flat.isfinite(), rounded, flat)
    return rounded.to(dtype).reshape(values.shape)
