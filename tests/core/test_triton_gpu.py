"""The Triton backend on a GPU, held to the loop backend on CPU.

Run by `make gpu-check` (TRITON_INTERPRET=0: with the interpreter on, as in `make test`,
kernels would not be compiled for the GPU). Without a CUDA device every "cuda" test is
skipped with that reason; the "triton" variants run the same test code on CPU tensors
through Triton's interpreter, on a subset of the table, so the tests themselves are
exercised everywhere.

What the GPU kernels promise (a decision, see README "Triton (GPU)"): the tolerance the
interpreter is held to. Contraction is off and subnormals are kept, so every operation
rounds as written; parameters and state then stay within one ulp of the loop backend per
16-bit step (from identical inputs) and within 1e-6 in fp32.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import core
from tests.core.cases import (
    BACKENDS,
    LR,
    Case,
    make_batches,
    make_model,
    one_case_per_algorithm,
    trajectory_cases,
)
from tests.core.test_fused import _ulp, assert_state_close, assert_within_one_ulp
from tests.core.test_quantized_triton import DTYPES

STEPS = 8
LR_ZERO_STEP = 4
"""A step the schedule takes at lr = 0: parameters must not move (UPDATE off)."""


def _cuda_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (the GPU tests run with `make gpu-check` on a GPU machine)"
    backend = core.backends._triton_backend()
    if isinstance(backend, str):
        return backend
    if type(backend._step_kernel).__name__ == "InterpretedFunction":
        return "TRITON_INTERPRET=1 interprets the kernels: run with TRITON_INTERPRET=0"
    return None


@pytest.fixture(autouse=True)
def _needs_cuda(request: pytest.FixtureRequest) -> None:
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "cuda" in callspec.id.split("-"):
        reason = _cuda_unavailable_reason()
        if reason is not None:
            pytest.skip(reason)


def _table() -> list[tuple[str, Case, str]]:
    """(device, case, dtype): the whole table on cuda, a subset through the interpreter."""
    on_gpu = [("cuda", c, d) for c in trajectory_cases() for d in DTYPES]
    radam, *_, adopt = one_case_per_algorithm()
    return [*on_gpu, ("triton", radam, "fp32"), ("triton", adopt, "bf16-kahan")]


def _mixed_params(dtype: torch.dtype) -> list[Tensor]:
    """Sizes around the 1024-element block, empty, transposed and strided tensors."""
    generator = torch.Generator().manual_seed(7)
    params = [
        torch.randn(size, generator=generator).to(dtype)
        for size in (0, 1, 7, 1023, 1024, 1025, 2049, 4099)
    ]
    params.append(torch.randn(9, 5, generator=generator).to(dtype).t())
    params.append(torch.randn(6, 10, generator=generator).to(dtype)[:, ::3])
    return params


def _place(device: str) -> Any:
    """The twin's copy of a parameter, in the same layout (strided ones included); every
    third contiguous one a few bytes off a 16-byte boundary, so both kernels run."""
    target = "cpu" if device == "triton" else device
    counter = itertools.count()

    def place(t: Tensor) -> Tensor:
        if t.is_contiguous() and t.numel() and next(counter) % 3 == 2:
            storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=target)
            return storage[1:].view(t.shape).copy_(t)
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=target).copy_(t)

    return place


def paired_device_steps(
    case: Case, device: str, dtype: str, steps: int = STEPS
) -> Iterator[tuple[int, list[Tensor], Any, list[Tensor], Any, list[Tensor]]]:
    """The loop backend on CPU steps; before each step a fused twin on `device` is loaded
    from the loop's state dict and takes the same step from the same inputs. Yields
    (step, loop params, loop optimizer, twin params, twin optimizer, params before)."""
    torch_dtype, kahan = DTYPES[dtype]
    kwargs = {} if kahan is None else {"kahan_sum": kahan}
    generator = torch.Generator().manual_seed(0)
    loop_params = [p.requires_grad_() for p in _mixed_params(torch_dtype)]
    loop = case.make(loop_params, **kwargs, **BACKENDS["loop"])
    place = _place(device)
    for step in range(steps):
        if step == LR_ZERO_STEP:
            loop.param_groups[0]["lr"] = 0.0
        elif step == LR_ZERO_STEP + 1:
            loop.param_groups[0]["lr"] = LR
        twin_params = [place(p.detach()).requires_grad_() for p in loop_params]
        twin = case.make(twin_params, **kwargs, **BACKENDS["fused"])
        twin.load_state_dict(copy.deepcopy(loop.state_dict()))
        before = [p.detach().cpu().clone() for p in twin_params]
        for a, b in zip(loop_params, twin_params, strict=True):
            grad = (0.1 * torch.randn(a.shape, generator=generator)).to(a.dtype)
            a.grad = torch.empty_like(a).copy_(grad)
            b.grad = torch.empty_like(b).copy_(grad)
        loop.step()
        twin.step()
        yield step, loop_params, loop, twin_params, twin, before


@pytest.mark.parametrize(
    ("device", "case", "dtype"), _table(), ids=lambda v: v if isinstance(v, str) else v.id
)
def test_table_steps_match_the_cpu_loop(device: str, case: Case, dtype: str) -> None:
    for step, loop_params, loop, params, optimizer, before in paired_device_steps(
        case, device, dtype
    ):
        for i, (a, b) in enumerate(zip(params, loop_params, strict=True)):
            where = f"step {step}, tensor {i} {tuple(a.shape)} {a.dtype}"
            actual = a.detach().cpu()
            if step == LR_ZERO_STEP:
                assert torch.equal(actual, before[i]), f"lr = 0 moved the parameter, {where}"
            assert_within_one_ulp(actual, b.detach(), f"parameter, {where}")
            state, loop_state = optimizer.state[a], loop.state[b]
            assert state.keys() == loop_state.keys(), where
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in state:
                    assert_state_close(state[key].cpu(), loop_state[key], f"{key}, {where}")
            if "kahan_comp" in state:
                true_value = actual.float() + state["kahan_comp"].cpu().float()
                loop_value = b.detach().float() + loop_state["kahan_comp"].float()
                assert bool(((true_value - loop_value).abs() <= _ulp(b.detach())).all()), where


def _train(
    case: Case, device: str, *, release: bool, round_trip: bool, steps: int = 6
) -> tuple[nn.Module, Any]:
    """A small model trained on `device` with the fused backend; optionally with gradient
    release, and through a state-dict round trip into a new optimizer midway."""
    target = "cpu" if device == "triton" else device
    model = make_model().to(target)
    make = lambda: case.make(model.parameters(), gradient_release=release, **BACKENDS["fused"])  # noqa: E731
    optimizer = make()
    if release:
        core.prepare_for_gradient_release(model, optimizer)
    for step, (x, y) in enumerate(make_batches(torch.float32, steps)):
        if round_trip and step == steps // 2:
            saved = copy.deepcopy(optimizer.state_dict())
            if release:
                core.remove_gradient_release(model)
            optimizer = make()
            optimizer.load_state_dict(saved)
            if release:
                core.prepare_for_gradient_release(model, optimizer)
        loss = nn.functional.mse_loss(model(x.to(target)), y.to(target))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


@pytest.mark.parametrize(
    ("device", "case"),
    [("cuda", c) for c in one_case_per_algorithm()] + [("triton", one_case_per_algorithm()[-1])],
    ids=lambda v: v if isinstance(v, str) else v.id,
)
def test_gradient_release_and_a_state_dict_round_trip_change_no_bit(
    case: Case, device: str
) -> None:
    """One launch per parameter inside backward, and a resumed optimizer, give exactly
    the bits of one launch per step without interruption."""
    reference, _ = _train(case, device, release=False, round_trip=False)
    for release, round_trip in ((True, False), (False, True), (True, True)):
        model, _ = _train(case, device, release=release, round_trip=round_trip)
        for a, b in zip(model.parameters(), reference.parameters(), strict=True):
            assert torch.equal(a, b), (release, round_trip)


@pytest.mark.parametrize("device", ["cuda", "triton"])
def test_optimizer_accumulation_matches_the_foreach_backend(device: str) -> None:
    """Gradient release with optimizer accumulation: the first micro-batch of each window
    runs the kernel, later ones the foreach backend (continues_window)."""
    target = "cpu" if device == "triton" else device
    models = []
    for flags in (BACKENDS["fused"], BACKENDS["foreach"]):
        model = make_model().to(target)
        optimizer = core.AdamW(model.parameters(), lr=LR, gradient_release=True, **flags)
        core.prepare_for_gradient_release(model, optimizer)
        microbatches = make_batches(torch.float32, 3)
        for _ in range(3):
            for k, (x, y) in enumerate(microbatches):
                optimizer.optimizer_accumulation = k < len(microbatches) - 1
                loss = nn.functional.mse_loss(model(x.to(target)), y.to(target)) / 3
                loss.backward()
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def _adamw_step_result(device: torch.device, streams: list[Any] | None = None) -> list[Tensor]:
    """Parameters after three AdamW steps; step i runs on streams[i] (None: the default)."""
    generator = torch.Generator().manual_seed(11)
    params = [nn.Parameter(torch.randn(n, generator=generator).to(device)) for n in (5, 1024, 3000)]
    optimizer = core.AdamW(params, lr=LR, **BACKENDS["fused"])
    for stream in streams or [None] * 3:
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(device)
        if stream is None:
            optimizer.step()
            continue
        default = torch.cuda.default_stream(device)
        stream.wait_stream(default)
        with torch.cuda.stream(stream):
            optimizer.step()
        default.wait_stream(stream)
    return [p.detach().cpu() for p in params]


@pytest.mark.parametrize("device", ["cuda"])
def test_steps_on_other_streams_give_the_same_bits(device: str) -> None:
    """Tables uploaded on one stream and read on another, both ways round."""
    expected = _adamw_step_result(torch.device(device))
    side = torch.cuda.Stream()
    for streams in ([None, side, None], [side, None, side]):
        actual = _adamw_step_result(torch.device(device), streams)
        for a, b in zip(actual, expected, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", ["cuda"])
def test_parameters_on_another_gpu_than_the_current_one(device: str) -> None:
    """The launch and its tables go to the parameters' device, whatever device is current."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    expected = _adamw_step_result(torch.device("cuda", 0))
    with torch.cuda.device(0):
        actual = _adamw_step_result(torch.device("cuda", 1))
    for a, b in zip(actual, expected, strict=True):
        assert torch.equal(a, b)


def _quantized_table() -> list[tuple[str, str, str]]:
    """(device, case id, dtype) for 8-bit state: the whole table on cuda, one case through
    the interpreter (tests/core/test_quantized_triton.py runs more there)."""
    on_gpu = [("cuda", c.id, d) for c in trajectory_cases() for d in DTYPES]
    return [*on_gpu, ("triton", "NAdam-l2", "bf16-kahan")]


@pytest.mark.parametrize(("device", "case_id", "dtype"), _quantized_table())
def test_8bit_state_steps_match_the_cpu_loop(device: str, case_id: str, dtype: str) -> None:
    """The quantized kernel on the GPU, held to the loop as the interpreter is (see
    test_quantized_triton.py for the bounds and why)."""
    from tests.core.test_quantized_triton import (
        assert_quantized_step_matches,
        paired_quantized_steps,
    )

    case = next(c for c in trajectory_cases() if c.id == case_id)
    target = "cpu" if device == "triton" else device
    for outcome in paired_quantized_steps(case, dtype, device=target):
        assert_quantized_step_matches(*outcome, exact=False)


def _exact_quantized_table() -> list[tuple[str, str, str]]:
    from tests.core.test_quantized_triton import EXACT_CASES

    return [("cuda", case_id, dtype) for case_id, dtype in EXACT_CASES]


@pytest.mark.parametrize(("device", "case_id", "dtype"), _exact_quantized_table())
def test_8bit_state_exact_arithmetic_gives_the_loops_codes_and_scales(
    device: str, case_id: str, dtype: str
) -> None:
    """Where the moment arithmetic is exact in both backends, the GPU stores the loop's
    codes and scales bit for bit (test_quantized_triton.py's exact case)."""
    from tests.core.test_quantized_triton import (
        EXACT_BETAS,
        assert_quantized_step_matches,
        paired_quantized_steps,
    )

    case = next(c for c in trajectory_cases() if c.id == case_id)
    for outcome in paired_quantized_steps(
        case, dtype, dyadic=True, device=device, betas=EXACT_BETAS
    ):
        assert_quantized_step_matches(*outcome, exact=True)
