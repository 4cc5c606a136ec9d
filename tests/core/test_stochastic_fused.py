"""Stochastic rounding inside the generated CPU kernels (cpu_kernel.c's STOCHASTIC), held
to the loop backend (precision.stochastic_round, the reference) bit for bit.

As in test_stochastic_triton.py: every operation of the rounding is exact in fp32 and the
random bits are integer hashes, so the kernel's parameters equal the loop's wherever the
fp32 values they round do. Those values can differ in the last ulp (torch's CPU kernels
contract some operations, the generated kernels do not; test_fused.py), so each step is
paired: the kernel and the loop step from the same state, and fp32 twins of both (the
fp32 kernel twin through the generated kernel too, not torch's native fused Adam) show
which values the 16-bit steps round; the rounding must agree bit for bit wherever those
do, and be at most one 16-bit step apart elsewhere.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor

from core.backends import cpu, cpu_kernel, loop
from core.backends.kernel_arguments import SWITCHES, adam_arguments
from core.backends.precision import StochasticRounding, stochastic_round
from tests.core.cases import BACKENDS, LR, Case, trajectory_cases

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler")

CASES = [
    "Adam-none-amsgrad",
    "AdamW-defaults",
    "RAdam-l2",
    "NAdam-decoupled",
    "ADOPT-fully_decoupled",
]
"""Adam (with AMSGrad), AdamW, RAdam, NAdam and ADOPT, with the decay modes between them."""
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = [(4100,), (70, 65), (7, 3)]
"""Past AVX-512's 256-element blocks with a remainder, a 2-D one, and a tiny tensor."""
QUANTIZED_SHAPES = [(4100,), (9, 520), (7,)]
"""Two with 8-bit state (blocks starting mid-row), one kept in full precision (the
full-precision kernel beside the 8-bit one)."""
STEPS = 7
"""Past ADOPT's first call and RAdam's first rectified step (t = 6)."""
EXACT_BETAS = (0.875, 0.9375)
"""With 8-bit state: 1 − β powers of two and dyadic gradients make every product in m and
v exact, so the codes and scales are the loop's (test_quantized_fused.py)."""


class _Recorder:
    """Wraps cpu_kernel.run or run_quantized and records each call's config.stochastic."""

    def __init__(self, function: Any) -> None:
        self.function, self.stochastic = function, []

    def __call__(self, config: cpu_kernel.KernelConfig, *args: Any, **kwargs: Any) -> Any:
        self.stochastic.append(config.stochastic)
        return self.function(config, *args, **kwargs)


@pytest.fixture
def kernels(monkeypatch: pytest.MonkeyPatch) -> dict[str, _Recorder]:
    """Recorded kernel calls; fp32 Adam/AdamW steps take the generated kernel as 16-bit
    ones do (not torch's native fused kernel), so fp32 twins compute what they round."""
    recorders = {name: _Recorder(getattr(cpu_kernel, name)) for name in ("run", "run_quantized")}
    for name, recorder in recorders.items():
        monkeypatch.setattr(cpu_kernel, name, recorder)

    def generated_adam(lists: Any, c: Any) -> None:
        assert cpu.STRICT._generated(lists, lists[0][0].dtype, adam_arguments(c, False))

    monkeypatch.setattr(cpu, "_native_adam", generated_adam)
    return recorders


def _no_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the loop backend was called")

    monkeypatch.setattr(loop, "adam_step", refuse)
    monkeypatch.setattr(loop, "adopt_step", refuse)


def _case(case_id: str) -> Case:
    return next(case for case in trajectory_cases() if case.id == case_id)


def _grad(shape: tuple[int, ...], generator: torch.Generator, dyadic: bool) -> Tensor:
    if dyadic:
        return torch.randint(-199, 200, shape, generator=generator) / 1024
    return 0.1 * torch.randn(shape, generator=generator)


def _train(
    case: Case,
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
    optimizer = case.make(params, lr=LR, **kwargs, **flags)
    for _ in range(steps):
        for p in params:
            p.grad = _grad(p.shape, generator, dyadic).to(dtype)
        if release:
            for p in params:
                optimizer.step(param=p)
                optimizer.zero_grad(param=p)
        else:
            optimizer.step()
    return [p.detach() for p in params]


def _assert_equal(actual: list[Tensor], expected: list[Tensor], what: str) -> None:
    for i, (a, b) in enumerate(zip(actual, expected, strict=True)):
        differing = int((a.view(torch.int16) != b.view(torch.int16)).sum())
        assert differing == 0, f"{what}, tensor {i} {tuple(a.shape)}: {differing} differ"


def _ordered(t: Tensor) -> Tensor:
    """16-bit floats as integers in value order, so adjacent values differ by one."""
    bits = t.view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def _assert_paired_steps_match(
    case: Case,
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
    reference = case.make(params, **kwargs, **BACKENDS["loop"])
    from_different_values = 0
    for step in range(STEPS):
        grads = [_grad(p.shape, generator, dyadic).to(dtype) for p in params]
        saved = copy.deepcopy(reference.state_dict())
        results = []
        for twin_flags, twin_dtype in (
            (flags, dtype),
            (BACKENDS["loop"], torch.float32),
            (flags, torch.float32),
        ):
            # A copy: .to() of the same dtype would share the reference's storage.
            twins = [p.detach().to(twin_dtype, copy=True).requires_grad_() for p in params]
            twin = case.make(twins, **kwargs, **twin_flags)
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
            gaps = (_ordered(a) - _ordered(b)).abs()
            assert int(gaps.max()) <= 1, f"{where}: {int(gaps.max())} ulps apart"
            from_different_values += int((~same).sum())
            assert a.data_ptr() != b.data_ptr()
    # Measured: 1-2% of the elements (NAdam's the most); the rest are compared bit for bit.
    total = STEPS * sum(p.numel() for p in params)
    assert from_different_values <= 0.05 * total, f"{from_different_values} of {total}"
    return from_different_values


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case_id", CASES)
def test_the_kernel_rounds_as_the_loop_backend_bit_for_bit(
    case_id: str, dtype: str, kernels: dict[str, _Recorder]
) -> None:
    _assert_paired_steps_match(_case(case_id), DTYPES[dtype], SHAPES, BACKENDS["fused"])
    # One stochastic call a step for the 16-bit twin, one to nearest for the fp32 one.
    assert kernels["run"].stochastic == [True, False] * STEPS


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case_id", CASES)
def test_the_8bit_kernel_rounds_as_the_loop_backend_bit_for_bit(
    case_id: str, dtype: str, kernels: dict[str, _Recorder]
) -> None:
    """With EXACT_BETAS and dyadic gradients, so codes and scales agree."""
    _assert_paired_steps_match(
        _case(case_id),
        DTYPES[dtype],
        QUANTIZED_SHAPES,
        BACKENDS["fused"],
        state_precision="8bit",
        betas=EXACT_BETAS,
        dyadic=True,
    )
    assert kernels["run_quantized"].stochastic == [True, False] * STEPS
    assert kernels["run"].stochastic == [True, False] * STEPS  # the small tensor


@pytest.mark.parametrize("state_precision", ["full", "8bit"])
def test_threads_split_tensors_without_moving_element_indices(
    state_precision: str, kernels: dict[str, _Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tensors large enough for two threads (shares starting inside a tensor) round as the
    loop does, and as one thread does."""
    options: dict[str, Any] = {}
    if state_precision == "8bit":
        options = {"state_precision": "8bit", "betas": EXACT_BETAS, "dyadic": True}
    shapes = [(150_001,), (70_000,)]
    case = _case("AdamW-defaults")
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _assert_paired_steps_match(case, torch.bfloat16, shapes, BACKENDS["fused"], **options)
        two = _train(case, torch.bfloat16, shapes, BACKENDS["fused"], steps=2, **options)
        torch.set_num_threads(1)
        one = _train(case, torch.bfloat16, shapes, BACKENDS["fused"], steps=2, **options)
    finally:
        torch.set_num_threads(previous)
    _assert_equal(two, one, "two threads")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("state_precision", ["full", "8bit"])
def test_the_default_backend_runs_the_kernel_not_the_loop(
    dtype: str, state_precision: str, kernels: dict[str, _Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No backend flags: the generated kernel, stochastically, the same parameters as
    fused=True; and not those of rounding to nearest."""
    options: dict[str, Any] = {"stochastic_rounding": True, "rounding_seed": 5}
    shapes = SHAPES
    if state_precision == "8bit":
        options.update(state_precision="8bit", betas=EXACT_BETAS, dyadic=True)
        shapes = QUANTIZED_SHAPES
    case = _case("AdamW-defaults")
    strict = _train(case, DTYPES[dtype], shapes, BACKENDS["fused"], **options)
    nearest = _train(case, DTYPES[dtype], shapes, BACKENDS["fused"], steps=STEPS)
    for recorder in kernels.values():
        recorder.stochastic.clear()
    _no_loop(monkeypatch)
    default = _train(case, DTYPES[dtype], shapes, {}, **options)
    _assert_equal(default, strict, "default")
    calls = kernels["run"].stochastic + kernels["run_quantized"].stochastic
    assert calls and all(calls)
    assert any(not torch.equal(a, b) for a, b in zip(default, nearest, strict=True))


@pytest.mark.parametrize("state_precision", ["full", "8bit"])
def test_gradient_release_rounds_each_parameter_as_a_full_step_does(
    state_precision: str, kernels: dict[str, _Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """step(param=p) per parameter: a kernel call per parameter with its own key, equal to
    one full step's call."""
    case = _case("AdamW-defaults")
    options: dict[str, Any] = {"stochastic_rounding": True, "state_precision": state_precision}
    if state_precision == "8bit":
        options.update(betas=EXACT_BETAS, dyadic=True)
    shapes = QUANTIZED_SHAPES if state_precision == "8bit" else SHAPES
    _no_loop(monkeypatch)
    runs = [
        _train(case, torch.bfloat16, shapes, BACKENDS["fused"], release=release, steps=3, **options)
        for release in (False, True)
    ]
    _assert_equal(runs[1], runs[0], "released")
    calls = kernels["run"].stochastic + kernels["run_quantized"].stochastic
    assert calls and all(calls)


def test_mixed_lists_and_layouts(kernels: dict[str, _Recorder]) -> None:
    """fp32 and float64 parameters beside bf16 and fp16 ones (rounded to nearest, in their
    own calls) and transposed and channels-last bf16 ones with gradients of their layout
    (dense, but their random bits follow the logical index: the loop path), all as the
    loop rounds them."""
    generator = torch.Generator().manual_seed(3)
    results = []
    for flags in (BACKENDS["loop"], BACKENDS["fused"]):
        generator.manual_seed(3)
        params = [
            torch.randn(4100, generator=generator).requires_grad_(),
            torch.randn(4100, generator=generator).bfloat16().requires_grad_(),
            torch.randn(33, generator=generator).half().requires_grad_(),
            torch.randn(40, 9, generator=generator).bfloat16().t().requires_grad_(),
            torch.randn(30, generator=generator).double().requires_grad_(),
            torch.randn(2, 3, 4, 5, generator=generator)
            .bfloat16()
            .to(memory_format=torch.channels_last)
            .requires_grad_(),
        ]
        optimizer = _case("Adam-decoupled").make(params, stochastic_rounding=True, **flags)
        for _ in range(3):
            for p in params:
                grad = torch.empty_like(p)  # the parameter's layout
                p.grad = grad.copy_(0.1 * torch.randn(p.shape, generator=generator))
            optimizer.step()
        results.append([p.detach() for p in params])
    assert not results[1][3].is_contiguous() and not results[1][5].is_contiguous()
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(results[1][4], results[0][4], atol=1e-12, rtol=0)
    _assert_equal(results[1][3:4] + results[1][5:], results[0][3:4] + results[0][5:], "layouts")
    for a, b in zip(results[1][1:3], results[0][1:3], strict=True):
        assert int((_ordered(a) - _ordered(b)).abs().max()) <= 1
    # Per step: fp32 and float64 to nearest, then bf16 and fp16 stochastically.
    assert sorted(kernels["run"].stochastic) == [False] * 6 + [True] * 6


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("step", [3, 2**31 + 5])
def test_edge_values_round_as_the_reference(dtype: str, step: int) -> None:
    """Subnormals of both formats, zeros, values near each format's largest (rounding up
    to infinity), powers of two, and non-finite values: bit for bit (any NaN for NaN)."""
    torch_dtype = DTYPES[dtype]
    edges = [0.0, -0.0, 1.0, -1.0, 2.0**-149, -(2.0**-140), 2.0**-133, 3e-39, 1e-6, 6e-8]
    edges += [3.3e38, -3.39e38, 3.4028234e38, 65504.0, 65519.0, 65530.0, 7e4, 1e30]
    edges += [-(2.0**127), float("inf"), -float("inf"), float("nan"), 0.1, -0.3, 1 + 2**-9]
    generator = torch.Generator().manual_seed(5)
    values = torch.cat([torch.tensor(edges), torch.randn(256, generator=generator) * 1e3])
    values = torch.cat([values, values * 1e-30, values * 1e-5, values * 1e-38])
    rounding = StochasticRounding(seed=9, stream=4, step=step)
    expected = stochastic_round(values, torch_dtype, rounding)
    out = cpu_kernel.round_stochastically_as_kernels_do(values, torch_dtype, rounding.key())
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16))


def _config(dtype: torch.dtype, stochastic: bool, kahan: bool = False) -> Any:
    switches = tuple((name, name == "UPDATE" or (kahan and name == "KAHAN")) for name in SWITCHES)
    return cpu_kernel.KernelConfig("adam", dtype, switches, stochastic=stochastic)


@pytest.mark.parametrize(
    ("dtype", "stochastic", "keys", "message"),
    [
        (torch.bfloat16, True, [1], "Invalid keys: 1 values for 2 tensors"),
        (torch.bfloat16, True, None, "Invalid keys for a kernel built with STOCHASTIC=1"),
        (torch.bfloat16, False, [1, 2], "Invalid keys for a kernel built with STOCHASTIC=0"),
        (torch.bfloat16, True, [1, 2**32], "Invalid keys: each must be an int"),
        (torch.float32, True, [1, 2], "Invalid config: stochastic=True"),
    ],
)
def test_bad_keys_are_refused_before_any_address_is_read(
    dtype: torch.dtype, stochastic: bool, keys: list[int] | None, message: str
) -> None:
    """The tensors are on the meta device (no addresses at all): the keys are refused
    first, by name."""
    tensors = [torch.empty(4, dtype=dtype, device="meta") for _ in range(2)]
    lists = [tensors, tensors, tensors, tensors, None, None]
    with pytest.raises(ValueError, match=message):
        cpu_kernel.run(_config(dtype, stochastic), *lists, [0.0] * 10, keys=keys)  # type: ignore[arg-type]
