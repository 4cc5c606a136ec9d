"""8-bit state (core.quantization) through the Triton backend's quantized kernel, on CPU
tensors through Triton's interpreter, held to the loop backend.

Each step is compared from identical inputs: a fused twin is loaded from the loop's
state dict just before the step both take (tests/core/test_fused.py's pattern), so
nothing accumulates and every step is held to the same bound.

How close, as measured (the reasons are the loop's, not the kernel's): codes and scales
are bit-equal whenever the moment arithmetic is exact in both backends (EXACT_BETAS: β1,
β2 with 1 − β a power of two, dyadic gradients, no L2). Otherwise torch's CPU kernels
round differently from IEEE single operations on this machine: lerp and addcmul use
fused multiply-adds, and sqrt (ADOPT's denominator) is not correctly rounded (20% of
values one ulp off), while the kernel rounds every operation as written (but L2's
g + λθ, one fma as torch's add(alpha=) rounds it). Then m and v
differ by an ulp or two, scales by at most SCALE_ULPS or, where a block's new m nearly
cancels (a one-element block's scale is its |m|), 2^-20 of the tensor's largest scale,
as for full-precision moments, and a code only where x / absmax
lies within ulps of a midpoint (measured over every case of the table, fp32, 6 steps:
one code, by one step, in about 10^5). Parameters take the unquantized new moments in
both backends and stay within test_fused.py's bound (one ulp; 1e-6 in fp32).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

import core
from core.quantization import MIN_QUANTIZED_NUMEL, SIGNED_KEYS, QuantizedMoment
from tests.core.cases import BACKENDS, LR, Case, trajectory_cases
from tests.core.test_fused import _ulp, assert_state_close, assert_within_one_ulp
from tests.core.test_quantization import code_positions, largest_finite

SHAPES = [(4097,), (9, 520), (7,), (16, 6)]
"""Quantized: 1-D (16 blocks and one of 1 element, whose scale is its |m|) and rows of 520
(two blocks and one of 8 per row, so blocks start mid-vector); full precision: two small
tensors in the same step (the full-precision kernel's launch)."""
STEPS = 7
"""Past ADOPT's first call and RAdam's first rectified step (t = 6 with β2 = 0.99)."""
LR_ZERO_STEP = 3
DTYPES = {
    "fp32": (torch.float32, None),
    "bf16-kahan": (torch.bfloat16, True),
    "fp16-kahan": (torch.float16, True),
    "bf16": (torch.bfloat16, False),
}
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
SCALE_ULPS = 4
"""Bound on scales in ulps where the loop rounds differently (see above); measured: 4 with
L2 while the kernel rounded g + λθ twice (an ulp off, squared into v), 2 without, 1 for m."""
EXACT_BETAS = (0.875, 0.9375)
"""1 − β1 and 1 − β2 powers of two: with dyadic gradients every product in m and v is exact."""
CODE_FRACTION = 1e-3
"""Bound on the fraction of codes that may differ (each by one step) there."""


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The Triton backend with empty caches (the conftest routes CPU steps to it)."""
    from core.backends import triton as triton_backend

    for name in ("_plans", "_quantized_plans"):
        monkeypatch.setattr(triton_backend, name, type(getattr(triton_backend, name))())
    monkeypatch.setattr(triton_backend, "_blocks", {})
    monkeypatch.setattr(triton_backend, "_quantized_blocks", {})
    return triton_backend


class _Launches:
    """Wraps a kernel and counts its launches and their programs."""

    def __init__(self, kernel: Any) -> None:
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid: Any) -> Any:
        self.grids.append(grid)
        return self.kernel[grid]


def _gradient(shape: tuple[int, ...], generator: torch.Generator, dyadic: bool) -> Tensor:
    if dyadic:  # k / 1024, |k| < 200: squares and power-of-two multiples are exact
        return torch.randint(-199, 200, shape, generator=generator).float() / 1024
    return 0.1 * torch.randn(shape, generator=generator)


def paired_quantized_steps(
    case: Case,
    dtype: str,
    *,
    dyadic: bool = False,
    steps: int = STEPS,
    device: str = "cpu",
    **overrides: Any,
) -> Iterator[tuple[int, list[Tensor], Any, list[Tensor], Any, list[Tensor]]]:
    """The loop backend steps on CPU with state_precision="8bit"; before each step a
    Triton twin on `device` is loaded from its state dict and takes the same step. Yields
    (step, loop params, loop optimizer, twin params, twin optimizer, twin params before
    the step, on CPU)."""
    torch_dtype, kahan = DTYPES[dtype]
    kwargs = {"state_precision": "8bit", **overrides}
    if kahan is not None:
        kwargs["kahan_sum"] = kahan
    generator = torch.Generator().manual_seed(0)
    loop_params = [
        torch.randn(shape, generator=generator).to(torch_dtype).requires_grad_() for shape in SHAPES
    ]
    loop = case.make(loop_params, **kwargs, **BACKENDS["loop"])
    for step in range(steps):
        loop.param_groups[0]["lr"] = 0.0 if step == LR_ZERO_STEP else LR
        twin_params = [p.detach().to(device, copy=True).requires_grad_() for p in loop_params]
        twin = case.make(twin_params, **kwargs, **BACKENDS["triton"])
        twin.load_state_dict(copy.deepcopy(loop.state_dict()))
        before = [p.detach().clone() for p in loop_params]
        for a, b in zip(loop_params, twin_params, strict=True):
            grad = _gradient(a.shape, generator, dyadic).to(torch_dtype)
            a.grad, b.grad = grad.clone(), grad.to(device, copy=True)
        loop.step()
        twin.step()
        yield step, loop_params, loop, twin_params, twin, before


def _assert_scales_close(actual: Tensor, expected: Tensor, ulps: int, what: str) -> None:
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), f"{what}: NaN scales differ"
    _, exponent = torch.frexp(expected[~nan])
    ulp = torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent - 24)
    gap = (actual[~nan] - expected[~nan]).abs()
    slack = ulps * ulp + 2.0**-20 * largest_finite(expected)
    assert bool((gap <= slack).all()), f"{what}: {float((gap / ulp).max())} ulps apart"


def _assert_codes_close(
    actual: Tensor, expected: Tensor, signed: bool, fraction: float, what: str
) -> None:
    gap = (code_positions(actual, signed) - code_positions(expected, signed)).abs()
    assert int(gap.max()) <= (1 if fraction else 0), f"{what}: codes {int(gap.max())} apart"
    differing = int((gap > 0).sum())
    assert differing <= fraction * gap.numel(), f"{what}: {differing} codes differ"


def assert_quantized_step_matches(
    step: int,
    loop_params: list[Tensor],
    loop: Any,
    params: list[Tensor],
    optimizer: Any,
    before: list[Tensor],
    exact: bool,
) -> None:
    """Parameters within one ulp (fp32: 1e-6); codes and scales bit-equal when exact, else
    within SCALE_ULPS and CODE_FRACTION; full-precision moments as test_fused holds them."""
    for i, (a, b) in enumerate(zip(params, loop_params, strict=True)):
        where = f"step {step}, tensor {i} {tuple(a.shape)} {a.dtype}"
        actual = a.detach().cpu()
        if step == LR_ZERO_STEP:
            assert torch.equal(actual, before[i]), f"lr = 0 moved the parameter, {where}"
        assert_within_one_ulp(actual, b.detach(), f"parameter, {where}")
        state = {key: value.cpu() for key, value in optimizer.state[a].items()}
        loop_state = loop.state[b]
        assert state.keys() == loop_state.keys(), where
        quantized = a.numel() >= MIN_QUANTIZED_NUMEL
        assert quantized == ("exp_avg_codes" in state), where
        for key in MOMENTS:
            if f"{key}_codes" in state:
                codes, scales = state[f"{key}_codes"], state[f"{key}_absmax"]
                assert codes.dtype == torch.uint8 and scales.dtype == torch.float32, where
                expected_codes, expected_scales = (
                    loop_state[f"{key}_codes"],
                    loop_state[f"{key}_absmax"],
                )
                if exact:
                    assert torch.equal(codes, expected_codes), f"{key} codes, {where}"
                    assert torch.equal(scales, expected_scales), f"{key} scales, {where}"
                else:
                    _assert_codes_close(
                        codes, expected_codes, key in SIGNED_KEYS, CODE_FRACTION, f"{key}, {where}"
                    )
                    _assert_scales_close(scales, expected_scales, SCALE_ULPS, f"{key}, {where}")
            elif key in state:  # full precision (small tensors, ADOPT's v)
                assert_state_close(state[key], loop_state[key], f"{key}, {where}")
        if "kahan_comp" in state:  # the true parameters θ + k agree to θ's ulp
            true_value = actual.float() + state["kahan_comp"].float()
            loop_value = b.detach().float() + loop_state["kahan_comp"].float()
            assert bool(((true_value - loop_value).abs() <= _ulp(b.detach())).all()), where


def _case(case_id: str) -> Case:
    return next(case for case in trajectory_cases() if case.id == case_id)


EXACT_CASES = [
    ("Adam-none", "fp32"),
    ("Adam-decoupled-amsgrad", "fp32"),
    ("RAdam-fully_decoupled", "fp32"),
    ("NAdam-decoupled", "fp32"),
    ("AdamW-defaults", "bf16-kahan"),
    ("Adam-none-amsgrad", "fp16-kahan"),
]
"""Every Adam-family algorithm, AMSGrad, the decay modes that leave moments alone, each
parameter dtype."""


@pytest.mark.parametrize("device", ["triton"])
@pytest.mark.parametrize(("case_id", "dtype"), EXACT_CASES)
def test_exact_moment_arithmetic_gives_the_loops_codes_and_scales(
    device: str, case_id: str, dtype: str, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """β1 = 0.875 and β2 = 0.9375 (1 − β a power of two) and gradients k / 1024: every
    product in m and v is exact, so each sum rounds once in both backends, FMA or not,
    and the kernel must store exactly the loop's codes and scales (RAdam rectifies from
    t = 6 with this β2)."""
    launches = _Launches(backend._quantized_step_kernel)
    monkeypatch.setattr(backend, "_quantized_step_kernel", launches)
    for outcome in paired_quantized_steps(_case(case_id), dtype, dyadic=True, betas=EXACT_BETAS):
        assert_quantized_step_matches(*outcome, exact=True)
    # One launch a step of 16 blocks per program on CPU tensors: 2 programs for (4097,),
    # 2 for 9 rows of 3 blocks (27, padded to 32).
    assert launches.grids == [(4,)] * STEPS


GROUPING_CASES = [
    ("AdamW-defaults", "bf16-stochastic"),
    ("ADOPT-fully_decoupled", "bf16-stochastic"),
    ("Adam-decoupled-amsgrad", "fp32"),
    ("NAdam-fully_decoupled", "bf16-kahan"),
]
"""What a program's blocks address beyond θ, g, m and v, each once: the random bits of
stochastic rounding (parameters, m and v; by element index), ADOPT's full-precision v,
AMSGrad's v_max, Kahan's compensation."""
GROUPING_OPTIONS = {
    "bf16-stochastic": (torch.bfloat16, {"stochastic_rounding": True}),
    "fp32": (torch.float32, {}),
    "bf16-kahan": (torch.bfloat16, {"kahan_sum": True}),
}


@pytest.mark.parametrize("device", ["triton"])
@pytest.mark.parametrize(("case_id", "dtype"), GROUPING_CASES)
def test_the_blocks_a_gpu_program_takes_give_the_interpreters_bits(
    device: str, case_id: str, dtype: str, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interpreter runs 16 blocks per program (INTERPRETED_BLOCKS_PER_PROGRAM, a
    quarter of the programs), GPUs 4 (QUANTIZED_BLOCKS_PER_PROGRAM): both groupings give
    the same parameters, codes, scales and compensation, bit for bit, so what the other
    interpreted tests hold holds for the kernel GPUs launch. Tensors whose blocks fill
    neither grouping (17 blocks; 9 rows of 3), two steps (the second decodes the first's
    codes)."""
    launches = _Launches(backend._quantized_step_kernel)
    monkeypatch.setattr(backend, "_quantized_step_kernel", launches)
    torch_dtype, options = GROUPING_OPTIONS[dtype]
    groupings = (backend.QUANTIZED_BLOCKS_PER_PROGRAM, backend.INTERPRETED_BLOCKS_PER_PROGRAM)
    runs = []
    for per_program in groupings:
        monkeypatch.setattr(backend, "INTERPRETED_BLOCKS_PER_PROGRAM", per_program)
        generator = torch.Generator().manual_seed(0)
        params = [
            torch.randn(shape, generator=generator).to(torch_dtype).requires_grad_()
            for shape in SHAPES
        ]
        optimizer = _case(case_id).make(
            params, lr=LR, state_precision="8bit", **options, **BACKENDS["triton"]
        )
        for _ in range(2):
            for p in params:
                p.grad = _gradient(tuple(p.shape), generator, dyadic=False).to(torch_dtype)
            optimizer.step()
        runs.append((params, optimizer))
    assert launches.grids == [(12,)] * 2 + [(4,)] * 2
    (gpu_params, gpu), (params, interpreted) = runs
    for a, b in zip(params, gpu_params, strict=True):
        assert torch.equal(a.detach().view(torch.uint8), b.detach().view(torch.uint8))
        state, gpu_state = interpreted.state[a], gpu.state[b]
        assert state.keys() == gpu_state.keys()
        for key, value in state.items():
            assert torch.equal(value, gpu_state[key]), key


BOUNDED_CASES = [
    *(
        (case_id, dtype)
        for case_id in (
            "Adam-decoupled-amsgrad",
            "RAdam-l2",
            "NAdam-fully_decoupled",
            "ADOPT-fully_decoupled",
        )
        for dtype in ("fp32", "bf16-kahan", "fp16-kahan")
    ),
    ("ADOPT-l2-noclip", "bf16"),
    ("Adam-l2-amsgrad", "fp32"),
    ("AdamW-defaults", "bf16"),
]
"""Every algorithm in every dtype, every decay mode, AMSGrad, ADOPT with and without
clipping, 16-bit parameters without Kahan."""


@pytest.mark.parametrize("device", ["triton"])
@pytest.mark.parametrize(("case_id", "dtype"), BOUNDED_CASES)
def test_steps_match_the_loop_within_its_rounding(
    device: str, case_id: str, dtype: str, backend: Any
) -> None:
    for outcome in paired_quantized_steps(_case(case_id), dtype):
        assert_quantized_step_matches(*outcome, exact=False)


@pytest.mark.parametrize("device", ["triton"])
def test_non_finite_values_make_their_blocks_nan_as_the_loop_does(
    device: str, backend: Any
) -> None:
    """A NaN in one block's gradient and an inf in another's: those blocks' scales are
    NaN (every value reads back as NaN), the others' are untouched, as in the loop."""
    generator = torch.Generator().manual_seed(2)
    param = torch.randn(2, 2100, generator=generator)
    grad = torch.randint(-199, 200, param.shape, generator=generator).float() / 1024
    grad[0, 300] = float("nan")  # row 0, block 1
    grad[1, 2099] = float("inf")  # row 1, its last (short) block
    results = []
    for flags in (BACKENDS["loop"], BACKENDS["triton"]):
        p = param.clone().requires_grad_()
        optimizer = core.Adam([p], lr=LR, betas=(0.875, 0.9375), state_precision="8bit", **flags)
        p.grad = grad.clone()
        optimizer.step()
        results.append((p.detach(), optimizer.state[p]))
    (loop_param, loop_state), (param_after, state) = results
    for key in ("exp_avg", "exp_avg_sq"):
        scales = state[f"{key}_absmax"]
        assert scales.isnan().nonzero().tolist() == [[0, 1], [1, 8]], key
        assert torch.equal(state[f"{key}_codes"], loop_state[f"{key}_codes"]), key
        assert torch.equal(scales.nan_to_num(), loop_state[f"{key}_absmax"].nan_to_num()), key
    assert torch.equal(param_after.isnan(), loop_param.isnan())
    finite = ~loop_param.isnan()
    assert_within_one_ulp(param_after[finite], loop_param[finite], "parameter")


@pytest.mark.parametrize("device", ["triton"])
def test_plans_and_tables_are_kept_while_tensors_stay_put(
    device: str, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Second and later steps upload nothing: the quantized plan is found by its key; a
    layout that is not contiguous runs eagerly, beside the kernel, as the loop does."""
    launches = _Launches(backend._quantized_step_kernel)
    monkeypatch.setattr(backend, "_quantized_step_kernel", launches)
    generator = torch.Generator().manual_seed(4)
    shapes = [(4100,), (9, 520)]
    params = [torch.randn(s, generator=generator) for s in shapes]
    params.append(torch.randn(520, 9, generator=generator).t())  # not contiguous: eager
    loop_params = [p.clone().requires_grad_() for p in params]
    twin_params = [p.clone().requires_grad_() for p in params]
    assert not twin_params[2].is_contiguous()
    kwargs = {"lr": LR, "betas": (0.875, 0.9375), "state_precision": "8bit"}
    loop = core.AdamW(loop_params, **kwargs, **BACKENDS["loop"])
    twin = core.AdamW(twin_params, **kwargs, **BACKENDS["triton"])
    tables = []
    for _ in range(3):
        for a, b in zip(loop_params, twin_params, strict=True):
            grad = _gradient(tuple(a.shape), generator, dyadic=True)
            a.grad = grad.clone()
            if b.grad is None:
                b.grad = grad.clone()
            else:  # the same address every step, as a model's gradient buffers
                b.grad.copy_(grad)
        loop.step()
        twin.step()
        plans = [plan for plans in backend._quantized_plans.values() for plan in plans.values()]
        assert len(plans) == 1 and plans[0].eager == [2]
        tables.append((plans[0].launch.addresses, plans[0].launch.blocks))
    assert all(t[0] is tables[0][0] and t[1] is tables[0][1] for t in tables)
    assert len(launches.grids) == 3 and len(backend._quantized_blocks) == 1
    for a, b in zip(twin_params, loop_params, strict=True):
        for key in ("exp_avg_codes", "exp_avg_sq_codes", "exp_avg_absmax", "exp_avg_sq_absmax"):
            assert torch.equal(twin.state[a][key], loop.state[b][key]), key
        assert_within_one_ulp(a.detach(), b.detach(), "parameter")


def _quantized_lists() -> dict[str, list[Any]]:
    """Three parameters' lists as the optimizer hands them to a backend: a small one with
    full-precision moments, then two with 8-bit moments (so the step's index of the last,
    2, is not its index among the 8-bit ones)."""
    from core.quantization import quantized_state

    lists: dict[str, list[Any]] = {"param": [torch.zeros(7)], "grad": [torch.ones(7)]}
    lists["exp_avg"], lists["exp_avg_sq"] = [torch.zeros(7)], [torch.zeros(7)]
    for shape in ((4100,), (3, 1400)):
        param = torch.zeros(shape)
        lists["param"].append(param)
        lists["grad"].append(torch.ones(shape))
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            lists[key].append(QuantizedMoment(*quantized_state(param, None, signed), signed))
    return lists


def _replace(moment: QuantizedMoment, **changes: Any) -> QuantizedMoment:
    fields = {"codes": moment.codes, "absmax": moment.absmax, "signed": moment.signed}
    return QuantizedMoment(**{**fields, **changes})


@pytest.mark.bad_input
@pytest.mark.parametrize("device", ["triton"])
@pytest.mark.parametrize(
    ("which", "make", "message"),
    [
        (
            "exp_avg",
            lambda m: _replace(m, codes=m.codes.float()),
            r"exp_avg\[2\].*codes of torch\.float32 on cpu",
        ),
        (
            "exp_avg_sq",
            lambda m: _replace(m, absmax=m.absmax[:, :-1].contiguous()),
            r"exp_avg_sq\[2\].*absmax of 15 elements where the parameter needs 18",
        ),
        (
            "exp_avg",
            lambda m: _replace(m, codes=m.codes.t().contiguous().t()),
            r"exp_avg\[2\].*codes with strides \(1, 3\) \(not contiguous\)",
        ),
        (
            "exp_avg",
            lambda m: _replace(m, codes=m.codes.reshape(6, 700)),
            r"exp_avg\[2\].*codes of shape \(6, 700\) beside a parameter of shape \(3, 1400\)",
        ),
        (
            "exp_avg_sq",
            lambda m: _replace(m, signed=True),
            r"exp_avg_sq\[2\].*a moment of the signed map",
        ),
        (
            "exp_avg_sq",
            lambda m: m.dequantize().double(),
            r"exp_avg_sq\[2\].*Tensor of torch\.float64 on cpu",
        ),
        (
            "exp_avg",
            lambda m: _replace(m, absmax="scales"),
            r"exp_avg\[2\].*absmax of type str",
        ),
        (
            "exp_avg_sq",
            lambda m: _replace(m, codes=m.codes.to("meta")),
            r"exp_avg_sq\[2\].*codes of torch\.uint8 on meta",
        ),
    ],
    ids=[
        "float-codes",
        "short-absmax",
        "strided-codes",
        "reshaped",
        "sign",
        "tensor",
        "str",
        "meta",
    ],
)
def test_an_8bit_moment_the_kernel_cannot_address_is_refused_by_name(
    device: str, backend: Any, which: str, make: Any, message: str
) -> None:
    """Refused before anything is launched: no parameter or moment changes."""
    lists = _quantized_lists()
    lists[which][2] = make(lists[which][2])
    before = copy.deepcopy(lists)
    from tests.core.test_triton_launch import adam_step_of

    with pytest.raises(ValueError, match=rf"Invalid {message}.*Allowed: a (QuantizedMoment|plain)"):
        adam_step_of(backend, lists)
    for p, b in zip(lists["param"], before["param"], strict=True):
        assert torch.equal(p, b)
    first, saved = lists["exp_avg"][1], before["exp_avg"][1]
    assert torch.equal(first.codes, saved.codes) and torch.equal(first.absmax, saved.absmax)
