"""Stochastic rounding inside the Triton kernels (STOCHASTIC), on CPU tensors through
Triton's interpreter, held to the loop backend (precision.stochastic_round, the
reference) bit for bit wherever both round the same fp32 values
(stochastic_cases.assert_paired_steps_match).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import triton
import triton.language as tl

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
    representable_values,
    train,
)

SHAPES = [(1100,), (7, 3)]
"""Across a 1024-element block (a full block and a masked one) and a tiny tensor."""


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


@pytest.mark.parametrize("device", ["triton"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case_id", CASES)
def test_the_kernel_rounds_as_the_loop_backend_bit_for_bit(
    device: str, case_id: str, dtype: str, backend: Any
) -> None:
    assert_paired_steps_match(case(case_id), DTYPES[dtype], SHAPES, BACKENDS["triton"])
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
    assert_paired_steps_match(
        case(case_id),
        DTYPES[dtype],
        QUANTIZED_SHAPES,
        BACKENDS["triton"],
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
    adamw = case("AdamW-defaults")
    options = {"stochastic_rounding": True, "rounding_seed": 11}
    expected = train(adamw, DTYPES[dtype], SHAPES, BACKENDS["loop"], **options)
    actual = train(adamw, DTYPES[dtype], SHAPES, BACKENDS["triton"], **options)
    assert_equal(actual, expected, dtype)
    assert backend._step_kernel.stochastic == [True] * STEPS
    nearest = train(adamw, DTYPES[dtype], SHAPES, BACKENDS["loop"])
    assert any(not torch.equal(a, b) for a, b in zip(actual, nearest, strict=True))


@pytest.mark.parametrize("device", ["triton"])
@pytest.mark.parametrize("state_precision", ["full", "8bit"])
def test_gradient_release_rounds_each_parameter_as_a_full_step_does(
    device: str, state_precision: str, backend: Any
) -> None:
    """step(param=p) per parameter: a launch per parameter, each with its own stream's
    bits, equal to one full step's launch (and to the loop)."""
    adamw = case("AdamW-defaults")
    options: dict[str, Any] = {"stochastic_rounding": True, "state_precision": state_precision}
    if state_precision == "8bit":
        options.update(betas=EXACT_BETAS, dyadic=True)
    shapes = QUANTIZED_SHAPES if state_precision == "8bit" else SHAPES
    runs = [
        train(
            adamw, torch.bfloat16, shapes, BACKENDS["triton"], release=release, steps=3, **options
        )
        for release in (False, True)
    ]
    assert_equal(runs[1], runs[0], "released")
    loop = train(adamw, torch.bfloat16, shapes, BACKENDS["loop"], steps=3, **options)
    assert_equal(runs[0], loop, "full step")
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
        optimizer = case("Adam-decoupled").make(params, stochastic_rounding=True, **flags)
        for _ in range(3):
            for p in params:
                p.grad = (0.1 * torch.randn(p.shape, generator=generator)).to(p.dtype)
            optimizer.step()
        results.append([p.detach() for p in params])
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=0)
    assert_equal(results[1][1:], results[0][1:], "mixed")
    # Per step: fp32 to nearest, then bf16 and fp16 stochastically (dtype buckets).
    assert sorted(backend._step_kernel.stochastic) == [False] * 3 + [True] * 6


@pytest.mark.parametrize("device", ["triton"])
def test_a_shards_offset_is_in_its_plan_and_a_new_offset_makes_a_new_plan(
    device: str, backend: Any
) -> None:
    """The table entry of a stochastically rounded tensor carries its shard's offset term
    beside its stream key (an FSDP2 shard's first_index), and a plan is made again when
    that offset changes, as when its seed or stream does."""
    param = torch.zeros(1030, dtype=torch.bfloat16)
    moments = [[torch.zeros_like(param)] for _ in range(3)]
    bucket: list[Any] = [[param], *moments, None, None]
    plans = []
    for first_index in (0, 4400, 4400):
        rounding = [StochasticRounding(seed=1, stream=2, first_index=first_index)]
        plan = backend._plan(bucket, rounding)
        (launch,) = plan.launches
        assert int(launch.addresses.values[-1]) == backend._stream_keys(rounding)[0]
        plans.append(plan)
    assert plans[0] is not plans[1] and plans[1] is plans[2]


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
    values = edge_values()
    count = triton.next_power_of_2(values.numel())
    values = torch.cat([values, torch.zeros(count - values.numel())])
    rounding = StochasticRounding(seed=9, stream=4, step=3)
    expected = stochastic_round(values, torch_dtype, rounding)
    out = torch.empty(count, dtype=torch_dtype)
    key = rounding.key()
    _round_values[(1,)](
        values, out, key - (1 << 32) if key >= 1 << 31 else key, count, DTYPE=_dtype(torch_dtype)
    )
    assert_rounded_as_reference(out, expected)


@pytest.mark.parametrize("device", ["triton"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_a_representable_value_is_kept_even_by_all_zero_random_bits(
    device: str, dtype: str, backend: Any
) -> None:
    torch_dtype = DTYPES[dtype]
    values = torch.tensor(representable_values(torch_dtype))
    out = torch.empty(2, dtype=torch_dtype)
    for value in values:  # each first, under key 0
        _round_values[(1,)](torch.stack([value, value]), out, 0, 2, DTYPE=_dtype(torch_dtype))
        assert float(out[0]) == float(value)


def _dtype(dtype: torch.dtype) -> Any:
    from core.backends.triton import TRITON_DTYPES

    return TRITON_DTYPES[dtype]


@pytest.mark.parametrize("device", ["triton"])
@pytest.mark.parametrize("first_index", [0, 1, 550 * 8, 3 * 2**31 + 2])
@pytest.mark.parametrize("step", [0, 1, 2**31 - 1, 2**31 + 5, 2**32 + 7, 3 * 2**40])
def test_the_kernel_key_is_the_references_at_every_step(
    device: str, step: int, first_index: int, backend: Any
) -> None:
    """The step travels as an int32 of its bits modulo 2^32; the stream key and a shard's
    offset term (StochasticRounding.first_index, FSDP2's Shard(0)) share one int64 entry
    of the table, whose high half may make it negative."""
    rounding = StochasticRounding(seed=2**32 - 1, stream=77, step=step, first_index=first_index)
    addresses = torch.tensor([0] * 5 + backend._stream_keys([rounding]), dtype=torch.int64)
    out = torch.zeros(1, dtype=torch.int64)
    _key_of[(1,)](addresses, out, backend._step_argument(step))
    assert int(out) == rounding.key()
