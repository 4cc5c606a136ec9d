"""What the stochastic-rounding kernel tests (test_stochastic_fused.py for the generated
CPU kernels, test_stochastic_triton.py for Triton) share: the cases, the edge values, and
the paired-step check that holds a kernel to the loop backend's reference rounding.

Every operation of the rounding is exact in fp32 and the random bits are integer hashes,
so a kernel's parameters equal the loop's wherever the fp32 values they round do. Those
values themselves can differ in the last ulp (torch's CPU kernels contract some
operations, the kernels do not; test_fused.py), so each step is paired: the kernel and
the loop step from the same state, and fp32 twins of both show which values the 16-bit
steps round; the rounding must agree bit for bit wherever those do, and be at most one
16-bit step apart elsewhere.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from tests.core.cases import BACKENDS, LR, Case, trajectory_cases

CASES = [
    "Adam-none-amsgrad",
    "AdamW-defaults",
    "RAdam-l2",
    "NAdam-decoupled",
    "ADOPT-fully_decoupled",
]
"""Adam (with AMSGrad), AdamW, RAdam, NAdam and ADOPT, with the decay modes between them."""
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZED_SHAPES = [(4100,), (9, 520), (7,)]
"""Two with 8-bit state (blocks starting mid-row), one kept in full precision (the
full-precision kernel beside the 8-bit one)."""
STEPS = 7
"""Past ADOPT's first call and RAdam's first rectified step (t = 6)."""
EXACT_BETAS = (0.875, 0.9375)
"""With 8-bit state: 1 − β powers of two and dyadic gradients make every product in m and
v exact, so the codes and scales are the loop's (test_quantized_fused.py,
test_quantized_triton.py); otherwise torch's fused multiply-adds move a code now and then
and the runs part."""
DIFFERENT_VALUES_AT_MOST = 0.05
"""Of the element-steps, those whose rounded fp32 values differ between the backends
(measured 1-2%, NAdam's the most); the rest are compared bit for bit."""


def case(case_id: str) -> Case:
    return next(c for c in trajectory_cases() if c.id == case_id)


def grad(shape: tuple[int, ...], generator: torch.Generator, dyadic: bool) -> Tensor:
    """A gradient; dyadic: k / 1024 with |k| < 200 (see EXACT_BETAS)."""
    if dyadic:
        return torch.randint(-199, 200, shape, generator=generator) / 1024
    return 0.1 * torch.randn(shape, generator=generator)


def train(
    optimizer_case: Case,
    dtype: torch.dtype,
    shapes: list[tuple[int, ...]],
    flags: dict[str, Any],
    *,
    release: bool = False,
    steps: int = STEPS,
    dyadic: bool = False,
    **kwargs: Any,
) -> list[Tensor]:
    """The parameters after `steps` steps from fixed data; release: each parameter
    stepped on its own (step(param=p)), as gradient release does."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator).to(dtype).requires_grad_() for s in shapes]
    optimizer = optimizer_case.make(params, lr=LR, **kwargs, **flags)
    for _ in range(steps):
        for p in params:
            p.grad = grad(p.shape, generator, dyadic).to(dtype)
        if release:
            for p in params:
                optimizer.step(param=p)
                optimizer.zero_grad(param=p)
        else:
            optimizer.step()
    return [p.detach() for p in params]


def assert_equal(actual: list[Tensor], expected: list[Tensor], what: str) -> None:
    """16-bit tensors equal bit for bit."""
    for i, (a, b) in enumerate(zip(actual, expected, strict=True)):
        differing = int((a.view(torch.int16) != b.view(torch.int16)).sum())
        assert differing == 0, f"{what}, tensor {i} {tuple(a.shape)}: {differing} differ"


def ordered(t: Tensor) -> Tensor:
    """16-bit floats as integers in value order, so adjacent values differ by one."""
    bits = t.view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def edge_values() -> Tensor:
    """Subnormals of both formats, zeros, values near each format's largest (rounding up
    to infinity), powers of two and non-finite values, and random ones at several scales."""
    edges = [0.0, -0.0, 1.0, -1.0, 2.0**-149, -(2.0**-140), 2.0**-133, 3e-39, 1e-6, 6e-8]
    edges += [3.3e38, -3.39e38, 3.4028234e38, 65504.0, 65519.0, 65530.0, 7e4, 1e30]
    edges += [-(2.0**127), float("inf"), -float("inf"), float("nan"), 0.1, -0.3, 1 + 2**-9]
    generator = torch.Generator().manual_seed(5)
    values = torch.cat([torch.tensor(edges), torch.randn(256, generator=generator) * 1e3])
    return torch.cat([values, values * 1e-30, values * 1e-5, values * 1e-38])


def representable_values(dtype: torch.dtype) -> list[float]:
    """Values dtype holds exactly (normal, subnormal, its largest, negative ones): rounded
    stochastically each is kept whatever its random bits, all-zero bits too (the first
    element's under key 0: its input to the hash is 0), where `uniform <= fraction` would
    move it one ulp up."""
    info = torch.finfo(dtype)
    return [1.0, -3.0, 0.375, info.max, -info.max, info.tiny, info.tiny / 8, -info.tiny / 8]


def assert_rounded_as_reference(out: Tensor, expected: Tensor) -> None:
    """Bit for bit; NaN's bits are torch's choice (0x7fc0 or, vectorised, 0xffff), so any
    NaN will do."""
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16))


def assert_paired_steps_match(
    optimizer_case: Case,
    dtype: torch.dtype,
    shapes: list[tuple[int, ...]],
    flags: dict[str, Any],
    **options: Any,
) -> int:
    """The loop steps with stochastic rounding; before each step a kernel twin (`flags`)
    is loaded from its state and takes the same step, and so do fp32 twins of both
    backends, whose parameters are the values the 16-bit steps round. Wherever those
    agree the twin's parameters must be the loop's bit for bit, elsewhere a neighbour.
    Returns how many elements were rounded from different values."""
    dyadic = options.pop("dyadic", False)
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator).to(dtype).requires_grad_() for s in shapes]
    kwargs = {"lr": LR, "stochastic_rounding": True, "rounding_seed": 11, **options}
    reference = optimizer_case.make(params, **kwargs, **BACKENDS["loop"])
    from_different_values = 0
    for step in range(STEPS):
        grads = [grad(p.shape, generator, dyadic).to(dtype) for p in params]
        saved = copy.deepcopy(reference.state_dict())
        results = []
        for twin_flags, twin_dtype in (
            (flags, dtype),
            (BACKENDS["loop"], torch.float32),
            (flags, torch.float32),
        ):
            # A copy: .to() of the same dtype would share the reference's storage.
            twins = [p.detach().to(twin_dtype, copy=True).requires_grad_() for p in params]
            assert all(t.data_ptr() != p.data_ptr() for t, p in zip(twins, params, strict=True))
            twin = optimizer_case.make(twins, **kwargs, **twin_flags)
            twin.load_state_dict(copy.deepcopy(saved))
            for t, g in zip(twins, grads, strict=True):
                t.grad = g.to(twin_dtype)
            twin.step()
            results.append([t.detach() for t in twins])
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        reference.step()
        for i, (a, b, x, y) in enumerate(zip(results[0], params, *results[1:], strict=True)):
            where = f"step {step}, tensor {i} {tuple(a.shape)}"
            same = x == y
            b = b.detach()
            unexplained = int((same & (a.view(torch.int16) != b.view(torch.int16))).sum())
            assert unexplained == 0, f"{where}: {unexplained} rounded differently"
            gaps = (ordered(a) - ordered(b)).abs()
            assert int(gaps.max()) <= 1, f"{where}: {int(gaps.max())} ulps apart"
            from_different_values += int((~same).sum())
    total = STEPS * sum(p.numel() for p in params)
    allowed = DIFFERENT_VALUES_AT_MOST * total
    assert from_different_values <= allowed, f"{from_different_values} of {total}"
    return from_different_values
