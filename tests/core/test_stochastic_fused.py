"""Stochastic rounding inside the generated CPU kernels (cpu_kernel.c's STOCHASTIC), held
to the loop backend (precision.stochastic_round, the reference) bit for bit wherever both
round the same fp32 values (stochastic_cases.assert_paired_steps_match). fp32 twins step
through the generated kernel too, not torch's native fused Adam.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from core.backends import cpu, cpu_kernel, loop
from core.backends.kernel_arguments import SWITCHES
from core.backends.precision import StochasticRounding, stochastic_round
from tests.core.cases import BACKENDS
from tests.core.stochastic_cases import (
    CASES,
    DTYPES,
    EXACT_BETAS,
    QUANTIZED_SHAPES,
    STEPS,
    assert_equal,
    assert_paired_steps_match,
    assert_rounded_as_reference,
    case,
    edge_values,
    ordered,
    representable_values,
    train,
)

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler")

SHAPES = [(4100,), (70, 65), (7, 3)]
"""Past AVX-512's 256-element blocks with a remainder, a 2-D one, and a tiny tensor."""


class _Recorder:
    """Records config.stochastic of each kernel call of one entry point (run: adamkit_step,
    run_quantized: adamkit_step_q8), memoized steps' calls included."""

    def __init__(self) -> None:
        self.stochastic: list[bool] = []


@pytest.fixture
def kernels(monkeypatch: pytest.MonkeyPatch) -> dict[str, _Recorder]:
    """Recorded kernel calls (every one goes through cpu_kernel.PreparedCall.call); fp32
    Adam/AdamW steps take the generated kernel as 16-bit ones do (not torch's native
    fused kernel), so fp32 twins compute what they round."""
    recorders = {"run": _Recorder(), "run_quantized": _Recorder()}
    call = cpu_kernel.PreparedCall.call

    def recorded(self: cpu_kernel.PreparedCall, config: Any, *args: Any, **kwargs: Any) -> None:
        recorders["run_quantized" if config.quantized else "run"].stochastic.append(
            config.stochastic
        )
        call(self, config, *args, **kwargs)

    monkeypatch.setattr(cpu_kernel.PreparedCall, "call", recorded)
    monkeypatch.setattr(cpu, "_native_adam", lambda lists, c: False)
    return recorders


def _no_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the loop backend was called")

    monkeypatch.setattr(loop, "adam_step", refuse)
    monkeypatch.setattr(loop, "adopt_step", refuse)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case_id", CASES)
def test_the_kernel_rounds_as_the_loop_backend_bit_for_bit(
    case_id: str, dtype: str, kernels: dict[str, _Recorder]
) -> None:
    assert_paired_steps_match(case(case_id), DTYPES[dtype], SHAPES, BACKENDS["fused"])
    # One stochastic call a step for the 16-bit twin, one to nearest for the fp32 one.
    assert kernels["run"].stochastic == [True, False] * STEPS


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case_id", CASES)
def test_the_8bit_kernel_rounds_as_the_loop_backend_bit_for_bit(
    case_id: str, dtype: str, kernels: dict[str, _Recorder]
) -> None:
    """With EXACT_BETAS and dyadic gradients, so codes and scales agree."""
    assert_paired_steps_match(
        case(case_id),
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
    adamw = case("AdamW-defaults")
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert_paired_steps_match(adamw, torch.bfloat16, shapes, BACKENDS["fused"], **options)
        two = train(adamw, torch.bfloat16, shapes, BACKENDS["fused"], steps=2, **options)
        torch.set_num_threads(1)
        one = train(adamw, torch.bfloat16, shapes, BACKENDS["fused"], steps=2, **options)
    finally:
        torch.set_num_threads(previous)
    assert_equal(two, one, "two threads")


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
    adamw = case("AdamW-defaults")
    strict = train(adamw, DTYPES[dtype], shapes, BACKENDS["fused"], **options)
    nearest = train(adamw, DTYPES[dtype], shapes, BACKENDS["fused"], steps=STEPS)
    for recorder in kernels.values():
        recorder.stochastic.clear()
    _no_loop(monkeypatch)
    default = train(adamw, DTYPES[dtype], shapes, {}, **options)
    assert_equal(default, strict, "default")
    calls = kernels["run"].stochastic + kernels["run_quantized"].stochastic
    assert calls and all(calls)
    assert any(not torch.equal(a, b) for a, b in zip(default, nearest, strict=True))


@pytest.mark.parametrize("state_precision", ["full", "8bit"])
def test_gradient_release_rounds_each_parameter_as_a_full_step_does(
    state_precision: str, kernels: dict[str, _Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """step(param=p) per parameter: a kernel call per parameter with its own key, equal to
    one full step's call."""
    adamw = case("AdamW-defaults")
    options: dict[str, Any] = {"stochastic_rounding": True, "state_precision": state_precision}
    if state_precision == "8bit":
        options.update(betas=EXACT_BETAS, dyadic=True)
    shapes = QUANTIZED_SHAPES if state_precision == "8bit" else SHAPES
    _no_loop(monkeypatch)
    runs = [
        train(adamw, torch.bfloat16, shapes, BACKENDS["fused"], release=release, steps=3, **options)
        for release in (False, True)
    ]
    assert_equal(runs[1], runs[0], "released")
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
        optimizer = case("Adam-decoupled").make(params, stochastic_rounding=True, **flags)
        for _ in range(3):
            for p in params:
                grad = torch.empty_like(p)  # the parameter's layout
                p.grad = grad.copy_(0.1 * torch.randn(p.shape, generator=generator))
            optimizer.step()
        results.append([p.detach() for p in params])
    assert not results[1][3].is_contiguous() and not results[1][5].is_contiguous()
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(results[1][4], results[0][4], atol=1e-12, rtol=0)
    assert_equal(results[1][3:4] + results[1][5:], results[0][3:4] + results[0][5:], "layouts")
    for a, b in zip(results[1][1:3], results[0][1:3], strict=True):
        assert int((ordered(a) - ordered(b)).abs().max()) <= 1
    # Per step: fp32 and float64 to nearest, then bf16 and fp16 stochastically.
    assert sorted(kernels["run"].stochastic) == [False] * 6 + [True] * 6


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("step", [3, 2**31 + 5])
def test_edge_values_round_as_the_reference(dtype: str, step: int) -> None:
    """Subnormals of both formats, zeros, values near each format's largest (rounding up
    to infinity), powers of two, and non-finite values: bit for bit (any NaN for NaN)."""
    torch_dtype = DTYPES[dtype]
    values = edge_values()
    rounding = StochasticRounding(seed=9, stream=4, step=step)
    expected = stochastic_round(values, torch_dtype, rounding)
    out = cpu_kernel.round_stochastically_as_kernels_do(values, torch_dtype, rounding.key())
    assert_rounded_as_reference(out, expected)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_a_representable_value_is_kept_even_by_all_zero_random_bits(dtype: str) -> None:
    torch_dtype = DTYPES[dtype]
    for value in representable_values(torch_dtype):
        out = cpu_kernel.round_stochastically_as_kernels_do(torch.tensor([value]), torch_dtype, 0)
        assert float(out) == value


def _config(dtype: torch.dtype, stochastic: bool, kahan: bool = False) -> Any:
    switches = tuple((name, name == "UPDATE" or (kahan and name == "KAHAN")) for name in SWITCHES)
    return cpu_kernel.KernelConfig("adam", dtype, switches, stochastic=stochastic)


@pytest.mark.parametrize(
    ("dtype", "kahan", "stochastic", "keys", "message"),
    [
        (torch.bfloat16, False, True, [1], "Invalid keys: 1 values for 2 tensors"),
        (torch.bfloat16, False, True, [1, 2, 3], "Invalid keys: 3 values for 2 tensors"),
        (torch.bfloat16, False, True, None, "Invalid keys for a kernel built with STOCHASTIC=1"),
        (torch.bfloat16, False, False, [1, 2], "Invalid keys for a kernel built with STOCHASTIC=0"),
        (
            torch.bfloat16,
            False,
            True,
            [1, 2**32],
            r"Invalid keys: 4294967296 for tensor 1\. Allowed: each an int in \[0, 2\^32\)",
        ),
        (torch.bfloat16, False, True, [1, -1], r"Invalid keys: -1 for tensor 1\. Allowed: each an"),
        (torch.bfloat16, False, True, [1, True], r"Invalid keys: True for tensor 1\. Allowed"),
        (torch.float32, False, True, [1, 2], "Invalid config: stochastic=True"),
        (torch.bfloat16, True, True, [1, 2], r"Invalid config: stochastic=True .* KAHAN=1"),
    ],
)
def test_bad_keys_are_refused_before_any_address_is_read(
    dtype: torch.dtype, kahan: bool, stochastic: bool, keys: list[int] | None, message: str
) -> None:
    """The tensors are on the meta device (no addresses at all): the keys are refused
    first, by name. A key wrapped to 32 bits, or True read as 1, would draw another
    key's bits; stochastic rounding with Kahan is no kernel the C source builds."""
    tensors = [torch.empty(4, dtype=dtype, device="meta") for _ in range(2)]
    lists = [tensors, tensors, tensors, tensors, None, tensors if kahan else None]
    with pytest.raises(ValueError, match=message):
        cpu_kernel.run(_config(dtype, stochastic, kahan), *lists, [0.0] * 10, keys=keys)  # type: ignore[arg-type]
