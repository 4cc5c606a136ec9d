"""Compute-precision bookkeeping shared by the eager backends.

bf16/fp16 tensors are updated in fp32 and rounded once at the end; with Kahan
summation the parameter is read as θ + k and written back as θ ← round(θ̃),
k ← round(θ̃ − θ), so the rounding error of every step is carried into the next.
8-bit moments (core.quantization.QuantizedMoment) are dequantized into an fp32 working
copy and quantized back when stored, which makes the eager backends the reference for
the 8-bit format.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.quantization import QuantizedMoment

LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


def working_copy(tensor: Tensor | QuantizedMoment) -> Tensor:
    """The tensor itself when its dtype can hold the math, else an fp32 copy of it."""
    if isinstance(tensor, QuantizedMoment):
        return tensor.dequantize()
    return tensor.float() if tensor.dtype in LOW_PRECISION_DTYPES else tensor


def load_param(param: Tensor, kahan_comp: Tensor | None) -> Tensor:
    """The parameter in compute precision, including its Kahan compensation."""
    if kahan_comp is None:
        return working_copy(param)
    return param.float().add_(kahan_comp)


def store(target: Tensor | QuantizedMoment, value: Tensor) -> None:
    """Write a working copy back (a no-op when the math ran in place)."""
    if isinstance(target, QuantizedMoment):
        target.store(value)
    elif value is not target:
        target.copy_(value)


def store_param(param: Tensor, value: Tensor, kahan_comp: Tensor | None) -> None:
    """Round the updated parameter into place and keep what rounding lost in kahan_comp."""
    store(param, value)
    if kahan_comp is not None:
        kahan_comp.copy_(value.sub_(param))
