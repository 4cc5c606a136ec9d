"""Stochastic rounding inside the Triton kernels (STOCHASTIC), on CPU tensors through
Triton's interpreter, held to the loop backend (precision.stochastic_round, the
reference) bit for bit.

Every operation of the rounding is exact in fp32 and the random bits are integer
hashes, so the kernels' parameters equal the loop's wherever the fp32 values they round
do. Those values themselves can differ in the last ulp (torch's CPU kernels contract
some operations, the kernels do not; test_fused.py), so each step is paired: the kernel
and the loop step from the same state, and fp32 twins of both show which values the
16-bit steps round; the rounding must agree bit for bit wherever those do (measured:
everywhere in these runs but a few elements of 8-bit fp16 NAdam).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import triton
import triton.language as tl
from torch import Tensor

from core.backends.precision import StochasticRounding, stochastic_round
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
SHAPES = [(1100,), (7, 3)]
"""Across a 1024-element block (a full block and a masked one) and a tiny tensor."""
QUANTIZED_SHAPES = [(4100,), (9, 520), (7,)]
"""Two with 8-bit state (blocks starting mid-vector), one kept in full precision (the
full-precision kernel beside the 8-bit one)."""
STEPS = 7
"""Past ADOPT's first call and RAdam's first rectified step (t = 6)."""
EXACT_BETAS = (0.875, 0.9375)
"""With 8-bit state: 1 − β powers of two and dyadic gradients make every product in m and
v exact, so the codes and scales are the loop's (test_quantized_triton.py), as the
parameters must be; otherwise torch's fused multiply-adds move a code now and then and
the runs part."""


class _Recorder:
    """Wraps a kernel and records each launch's STOCHASTIC."""

    def __init__(self, kernel: Any) -> None:
        self.kernel, self.stochastic = kernel, []

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> Any:
            self.stochastic.append(kwargs["STOCHASTIC"])
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The Triton backend with empty caches and recorded launches (the conftest routes
    CPU steps to it for tests whose id names triton)."""
    from core.backends import triton as triton_backend

    for name in ("_plans", "_quantized_plans", "_last_steps"):
        monkeypatch.setattr(triton_backend, name, type(getattr(triton_backend, name))())
    monkeypatch.setattr(triton_backend, "_blocks", {})
    monkeypatch.setattr(triton_backend, "_quantized_blocks", {})
    for name in ("_step_kernel", "_quantized_step_kernel"):
        monkeypatch.setattr(triton_backend, name, _Recorder(getattr(triton_backend, name)))
    return triton_backend


def _case(case_id: str) -> Case:
    return next(case for case in trajectory_cases() if case.id == case_id)


def _train(
    case: Case,
    dtype: torch.dtype,
    shapes: list[tuple[int, ...]],
    flags: dict[str, bool],
    *,
    release: bool = False,
    steps: int = STEPS,
    dyadic: bool = False,
    **kwargs: Any,
) -> tuple[list[Tensor], Any]:
    """The parameters after `steps` steps from fixed data (and the optimizer); release:
    each parameter stepped on its own (step(param=p)), as gradient release does; dyadic:
    gradients k / 1024, |k| < 200 (see EXACT_BETAS)."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator).to(dtype).requires_grad_() for s in shapes]
    optimizer = case.make(params, lr=LR, **kwargs, **flags)
    for _ in range(steps):
        for p in params:
            if dyadic:
                grad = torch.randint(-199, 200, p.shape, generator=generator) / 1024
            else:
                grad = 0.1 * torch.randn(p.shape, generator=generator)
            p.grad = grad.to(dtype)
        if release:
            for p in params:
                optimizer.step(param=p)
                optimizer.zero_grad(param=p)
        else:
            optimizer.step()
    return [p.detach() for p in params], optimizer


def _assert_equal(actual: list[Tensor], expected: list[Tensor], what: str) -> None:
    for i, (a, b) in enumerate(zip(actual, expected, strict=True)):
        differing = int((a.view(torch.int16) != b.view(torch.int16)).sum())
        assert differing == 0, f"{what}, tensor {i} {tuple(a.shape)}: {differing} differ"


def _ordered(t: Tensor) -> Tensor:
    """16-bit floats as integers in value order, so adjacent values differ by one."""
    bits = t.view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def _assert_paired_steps_match(
    case: Case, dtype: torch.dtype, shapes: list[tuple[int, ...]], **options: Any
) -> int:
    """The loop steps with stochastic rounding; before each step a Triton twin is loaded
    from its state and takes the same step, and so do fp32 twins of both backends, whose
    parameters are the values the 16-bit steps round. Wherever those agree, the twin's
    parameters must be the loop's bit for bit; elsewhere (torch's CPU kernels contract
    some operations, the kernels do not: test_fused.py) a neighbour. Returns how many
    elements were rounded from different values."""
    dyadic = options.pop("dyadic", False)
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator).to(dtype).requires_grad_() for s in shapes]
    kwargs = {"lr": LR, "stochastic_rounding": True, "rounding_seed": 11, **options}
    loop = case.make(params, **kwargs, **BACKENDS["loop"])
    from_different_values = 0
    for step in range(STEPS):
        grads = []
        for p in params:
            if dyadic:
                grad = torch.randint(-199, 200, p.shape, generator=generator) / 1024
            else:
                grad = 0.1 * torch.randn(p.shape, generator=generator)
            grads.append(grad.to(dtype))
        saved = copy.deepcopy(loop.state_dict())
        results = []
        for flags, twin_dtype in (
            (BACKENDS["triton"], dtype),
            (BACKENDS["loop"], torch.float32),
            (BACKENDS["triton"], torch.float32),
        ):
            # copy=True: a same-dtype .to() would share the loop's memory and step it twice
            twins = [p.detach().to(twin_dtype, copy=True).requires_grad_() for p in params]
            assert all(t.data_ptr() != p.data_ptr() for t, p in zip(twins, params, strict=True))
            twin = case.make(twins, **kwargs, **flags)
            twin.load_state_dict(copy.deepcopy(saved))
            for t, g in zip(twins, grads, strict=True):
                t.grad = g.to(twin_dtype)
            twin.step()
            results.append([t.detach() for t in twins])
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        loop.step()
        for i, (a, b, x, y) in enumerate(zip(results[0], params, *results[1:], strict=True)):
            where = f"step {step}, tensor {i} {tuple(a.shape)}"
            same = x == y
            b = b.detach()
            unexplained = int((same & (a.view(torch.int16) != b.view(torch.int16))).sum())
            assert unexplained == 0, f"{where}: {unexplained} rounded differently"
            gaps = (_ordered(a) - _ordered(b)).abs()
            assert int(gaps.max()) <= 1, f"{where}: {int(gaps.max())} ulps apart"
            from_different_values += int((~same).sum())
        assert all("step" in state for state in loop.state.values())
    return from_different_values


@pytest.mark.parametrize("device", ["triton"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case_id", CASES)
def test_the_kernel_rounds_as_the_loop_backend_bit_for_bit(
    device: str, case_id: str, dtype: str, backend: Any
) -> None:
    case = _case(case_id)
    _assert_paired_steps_match(case, DTYPES[dtype], SHAPES)
    # One stochastic launch a step for the 16-bit twin, one to nearest for the fp32 one.
    assert backend._step_kernel.stochastic == [True, False] * STEPS


@pytest.mark.parametrize("device", ["triton"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case_id", CASES)
def test_the_8bit_kernel_rounds_as_the_loop_backend_bit_for_bit(
    device: str, case_id: str, dtype: str, backend: Any
) -> None:
    """With EXACT_BETAS and dyadic gradients, so codes and scales agree (and the paired
    fp32 steps can tell which values the 16-bit steps round)."""
    case = _case(case_id)
    _assert_paired_steps_match(
        case,
        DTYPES[dtype],
        QUANTIZED_SHAPES,
        state_precision="8bit",
        betas=EXACT_BETAS,
        dyadic=True,
    )
    assert backend._quantized_step_kernel.stochastic == [True, False] * STEPS
    assert backend._step_kernel.stochastic == [True, False] * STEPS  # the small tensor


@pytest.mark.parametrize("device", ["triton"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_whole_runs_are_the_loops_and_not_round_to_nearest(
    device: str, dtype: str, backend: Any
) -> None:
    """Seven steps with nothing reloaded: the same parameters as the loop's (the steps'
    keys follow the step counter), and not those of rounding to nearest."""
    case = _case("AdamW-defaults")
    options = {"stochastic_rounding": True, "rounding_seed": 11}
    expected, _ = _train(case, DTYPES[dtype], SHAPES, BACKENDS["loop"], **options)
    actual, _ = _train(case, DTYPES[dtype], SHAPES, BACKENDS["triton"], **options)
    _assert_equal(actual, expected, dtype)
    assert backend._step_kernel.stochastic == [True] * STEPS
    nearest, _ = _train(case, DTYPES[dtype], SHAPES, BACKENDS["loop"])
    assert any(not torch.equal(a, b) for a, b in zip(actual, nearest, strict=True))


@pytest.mark.parametrize("device", ["triton"])
@pytest.mark.parametrize("state_precision", ["full", "8bit"])
def test_gradient_release_rounds_each_parameter_as_a_full_step_does(
    device: str, state_precision: str, backend: Any
) -> None:
    """step(param=p) per parameter: a launch per parameter, each with its own stream's
    bits, equal to one full step's launch (and to the loop)."""
    case = _case("AdamW-defaults")
    options: dict[str, Any] = {"stochastic_rounding": True, "state_precision": state_precision}
    if state_precision == "8bit":
        options.update(betas=EXACT_BETAS, dyadic=True)
    shapes = QUANTIZED_SHAPES if state_precision == "8bit" else SHAPES
    runs = [
        _train(
            case, torch.bfloat16, shapes, BACKENDS["triton"], release=release, steps=3, **options
        )[0]
        for release in (False, True)
    ]
    _assert_equal(runs[1], runs[0], "released")
    loop, _ = _train(case, torch.bfloat16, shapes, BACKENDS["loop"], steps=3, **options)
    _assert_equal(runs[0], loop, "full step")
    launches = backend._step_kernel.stochastic + backend._quantized_step_kernel.stochastic
    assert launches and all(launches)


@pytest.mark.parametrize("device", ["triton"])
def test_mixed_lists_and_layouts(device: str, backend: Any) -> None:
    """fp32 parameters beside bf16 and fp16 ones (rounded to nearest, in their own
    launch) and a transposed bf16 parameter (whose random bits follow its logical order:
    eager), all as the loop rounds them."""
    generator = torch.Generator().manual_seed(3)
    results = []
    for flags in (BACKENDS["loop"], BACKENDS["triton"]):
        generator.manual_seed(3)
        params = [
            torch.randn(1030, generator=generator).requires_grad_(),
            torch.randn(1030, generator=generator).bfloat16().requires_grad_(),
            torch.randn(33, generator=generator).half().requires_grad_(),
            torch.randn(40, 9, generator=generator).bfloat16().t().requires_grad_(),
        ]
        optimizer = _case("Adam-decoupled").make(params, stochastic_rounding=True, **flags)
        for _ in range(3):
            for p in params:
                p.grad = (0.1 * torch.randn(p.shape, generator=generator)).to(p.dtype)
            optimizer.step()
        results.append([p.detach() for p in params])
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=0)
    _assert_equal(results[1][1:], results[0][1:], "mixed")
    # Per step: fp32 to nearest, then bf16 and fp16 stochastically (dtype buckets).
    assert sorted(backend._step_kernel.stochastic) == [False] * 3 + [True] * 6


@triton.jit
def _round_values(values, out, key, N: tl.constexpr, DTYPE: tl.constexpr):
    from core.backends.triton import _round, _stochastic_round

    offsets = tl.arange(0, N)
    theta = tl.load(values + offsets)
    tl.store(out + offsets, _round(_stochastic_round(theta, offsets, key, DTYPE), DTYPE))


@triton.jit
def _key_of(addresses, out, step):
    from core.backends.triton import _rounding_key

    tl.store(out, _rounding_key(addresses, 1, 0, step).to(tl.int64))


@pytest.mark.parametrize("device", ["triton"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_edge_values_round_as_the_reference(device: str, dtype: str, backend: Any) -> None:
    """Subnormals of both formats, zeros, values near each format's largest (rounding up
    to infinity), powers of two, and non-finite values: bit for bit."""
    torch_dtype = DTYPES[dtype]
    edges = [0.0, -0.0, 1.0, -1.0, 2.0**-149, -(2.0**-140), 2.0**-133, 3e-39, 1e-6, 6e-8]
    edges += [3.3e38, -3.39e38, 65504.0, 65519.0, 65530.0, 7e4, 1e30, -(2.0**127)]
    edges += [float("inf"), -float("inf"), float("nan"), 0.1, -0.3, 1 + 2**-9]
    generator = torch.Generator().manual_seed(5)
    values = torch.cat([torch.tensor(edges), torch.randn(256, generator=generator) * 1e3])
    values = torch.cat([values, values * 1e-30, values * 1e-5])
    count = triton.next_power_of_2(values.numel())
    values = torch.cat([values, torch.zeros(count - values.numel())])
    rounding = StochasticRounding(seed=9, stream=4, step=3)
    expected = stochastic_round(values, torch_dtype, rounding)
    out = torch.empty(count, dtype=torch_dtype)
    key = rounding.key()
    _round_values[(1,)](
        values, out, key - (1 << 32) if key >= 1 << 31 else key, count, DTYPE=_dtype(torch_dtype)
    )
    # NaN's bits are torch's choice (0x7fc0 or, vectorised, 0xffff): any NaN will do.
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16))


def _dtype(dtype: torch.dtype) -> Any:
    from core.backends.triton import TRITON_DTYPES

    return TRITON_DTYPES[dtype]


@pytest.mark.parametrize("device", ["triton"])
@pytest.mark.parametrize("step", [0, 1, 2**31 - 1, 2**31 + 5, 2**32 + 7, 3 * 2**40])
def test_the_kernel_key_is_the_references_at_every_step(
    device: str, step: int, backend: Any
) -> None:
    """The step travels as an int32 of its bits modulo 2^32, the stream key in the table."""
    rounding = StochasticRounding(seed=2**32 - 1, stream=77, step=step)
    addresses = torch.tensor([0] * 5 + [rounding.stream_key()], dtype=torch.int64)
    out = torch.zeros(1, dtype=torch.int64)
    _key_of[(1,)](addresses, out, backend._step_argument(step))
    assert int(out) == rounding.key()
