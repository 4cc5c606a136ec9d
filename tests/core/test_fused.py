"""The fused backends (CPU, and Triton through its interpreter) against the loop backend.

fp32 trajectories are checked in test_trajectories.py (to 1e-6 of loop, and against the
references); here every step of bf16/fp16 runs is checked to one ulp, from the loop's
own state each time, and odd layouts, the `fused` flag and the kernels' contracts.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

import core
import core.backends
from core.backends import cpu, cpu_kernel, grouping
from core.gradient_release import prepare_for_gradient_release, remove_gradient_release
from tests.core.cases import (
    BACKENDS,
    FUSED_BACKENDS,
    LR,
    TRAINING_BACKENDS,
    Case,
    make_batches,
    make_model,
    one_case_per_algorithm,
    train,
    trajectory_cases,
)
from tests.triton_interpreter import interpreter_rounds_fma_once

LOW_PRECISION = [torch.bfloat16, torch.float16]
STEPS = 8
"""Enough for ADOPT's first call, RAdam's first rectified step (t = 6) and Kahan residues."""


def _shapes_across_blocks() -> list[tuple[int, ...]]:
    """A small model's shapes plus one tensor spanning two of Triton's 1024-element blocks."""
    return [(16, 6), (16,), (3, 16), (3,), (1100,)]


def _ordered(t: Tensor) -> Tensor:
    """16-bit floats as integers in value order, so adjacent values differ by one."""
    bits = t.view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def assert_within_one_ulp(actual: Tensor, expected: Tensor, what: str) -> None:
    if actual.dtype in LOW_PRECISION:
        gaps = (_ordered(actual) - _ordered(expected)).abs()
        distance = int(gaps.max()) if gaps.numel() else 0
        assert distance <= 1, f"{what}: {distance} ulps apart"
    else:
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0, msg=what)


def assert_state_close(actual: Tensor, expected: Tensor, what: str) -> None:
    """One ulp, or fp32 rounding of the tensor's scale: a moment that cancels to almost
    nothing (m after a sign change) keeps only the rounding noise of its inputs."""
    if actual.dtype not in LOW_PRECISION or actual.numel() == 0:
        assert_within_one_ulp(actual, expected, what)
        return
    slack = _ulp(expected) + 2.0**-20 * expected.float().abs().max()
    gap = (actual.float() - expected.float()).abs()
    assert bool((gap <= slack).all()), f"{what}: off by {float((gap - slack).max())} beyond"


def _ulp(t: Tensor) -> Tensor:
    """The spacing of t's dtype at each of t's values (in fp32): at 0 and among subnormals,
    the subnormals' (frexp's exponent alone gave 0 a spacing of 2^-11 in fp16, and fp16
    subnormals less than theirs, 2^-24)."""
    mantissa_bits = {torch.bfloat16: 8, torch.float16: 11}[t.dtype]
    subnormal_spacing = torch.finfo(t.dtype).smallest_normal * 2.0 ** (1 - mantissa_bits)
    _, exponent = torch.frexp(t.float())
    spacing = torch.ldexp(torch.ones_like(t, dtype=torch.float32), exponent - mantissa_bits)
    return torch.where(t == 0, subnormal_spacing, spacing.clamp_min(subnormal_spacing))


def paired_steps(
    case: Case,
    backend: str,
    params: list[Tensor],
    steps: int = STEPS,
    place: Callable[[Tensor], Tensor] = Tensor.clone,
    gradients: Sequence[Sequence[Tensor]] | None = None,
) -> Iterator[tuple[int, Any, Any]]:
    """Step the loop backend, and each time a fused twin loaded from the loop's state dict
    just before the same step, so every step is compared from identical inputs (and
    switching backends through a state dict is exercised at every step). `place` makes
    the twin's copy of a parameter (another layout or address); `gradients`, one list per
    step, replaces `steps` random ones."""
    generator = torch.Generator().manual_seed(0)
    loop_params = [p.clone().requires_grad_() for p in params]
    loop = case.make(loop_params, **BACKENDS["loop"])
    for step in range(steps if gradients is None else len(gradients)):
        twin_params = [place(p.detach()).requires_grad_() for p in loop_params]
        twin = case.make(twin_params, **TRAINING_BACKENDS[backend])
        twin.load_state_dict(copy.deepcopy(loop.state_dict()))
        for i, (a, b) in enumerate(zip(loop_params, twin_params, strict=True)):
            if gradients is None:
                grad = 0.1 * torch.randn(a.shape, generator=generator)
            else:
                grad = gradients[step][i]
            # as autograd lays gradients out: like their (dense) parameter
            a.grad, b.grad = torch.empty_like(a).copy_(grad), torch.empty_like(b).copy_(grad)
        loop.step()
        twin.step()
        yield step, (loop_params, loop), (twin_params, twin)


def assert_step_matches(step: int, expected: Any, actual: Any) -> None:
    (loop_params, loop), (params, optimizer) = expected, actual
    for i, (a, b) in enumerate(zip(params, loop_params, strict=True)):
        where = f"step {step}, tensor {i} {tuple(a.shape)} {a.dtype}"
        assert_within_one_ulp(a.detach(), b.detach(), f"parameter, {where}")
        state, loop_state = optimizer.state[a], loop.state[b]
        assert state.keys() == loop_state.keys(), where
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in state:
                assert_state_close(state[key], loop_state[key], f"{key}, {where}")
        if "kahan_comp" in state:  # the true parameters θ + k agree to θ's ulp
            true_value = a.detach().float() + state["kahan_comp"].float()
            loop_value = b.detach().float() + loop_state["kahan_comp"].float()
            assert bool(((true_value - loop_value).abs() <= _ulp(b.detach())).all()), where


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("case", trajectory_cases(), ids=lambda c: c.id)
def test_low_precision_steps_within_one_ulp_of_loop(
    case: Case, backend: str, dtype: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=generator).to(dtype) for s in _shapes_across_blocks()]
    for step, expected, actual in paired_steps(case, backend, params):
        assert_step_matches(step, expected, actual)


@pytest.mark.parametrize("kahan", [False, True], ids=["plain", "kahan"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("case", one_case_per_algorithm(), ids=lambda c: c.id)
def test_bfloat16_subnormals_step_as_the_loop_steps_them(
    case: Case, backend: str, kahan: bool
) -> None:
    """Parameters, gradients and moments below bfloat16's smallest normal (1.2e-38), with
    an lr that keeps them there: Triton's interpreter widened such values wrongly (5.7e-39
    read as 1.1e-38, 60 of their ulps) until the kernels widened bfloat16 by hand."""
    generator = torch.Generator().manual_seed(2)
    params = [(1e-38 * torch.randn(300, generator=generator)).bfloat16()]
    gradients = [[(1e-39 * torch.randn(300, generator=generator)).bfloat16()] for _ in range(3)]
    tiny = {"lr": 1e-38, "eps": 1e-30, "kahan_sum": kahan}
    tiny_case = dataclasses.replace(case, core_kwargs={**case.core_kwargs, **tiny})
    assert bool((params[0].abs() < torch.finfo(torch.bfloat16).smallest_normal).any())
    for step, expected, actual in paired_steps(tiny_case, backend, params, gradients=gradients):
        assert_step_matches(step, expected, actual)


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize(
    ("name", "dtype"),
    [("RAdam", torch.float32), ("NAdam", torch.float32), ("Adam", torch.bfloat16)],
    ids=["RAdam-fp32", "NAdam-fp32", "Adam-bf16"],
)
def test_a_first_beta_of_zero_makes_m_the_gradient_exactly(
    name: str, dtype: torch.dtype, backend: str
) -> None:
    """m moves by torch.lerp's form for weights of 0.5 and more (from the gradient's end),
    exact at both ends: with β1 = 0, m is the gradient itself on every backend (every
    other test's β1 is 0.9, so the kernels' other form was never run; the small-weight
    form left m an ulp off)."""
    generator = torch.Generator().manual_seed(5)
    param = torch.nn.Parameter(torch.randn(300, generator=generator).to(dtype))
    optimizer = getattr(core, name)([param], lr=LR, betas=(0.0, 0.99), **TRAINING_BACKENDS[backend])
    for _ in range(3):
        param.grad = torch.randn(300, generator=generator).to(dtype)
        optimizer.step()
        assert torch.equal(optimizer.state[param]["exp_avg"], param.grad)


@pytest.mark.parametrize("backend", ["default", *FUSED_BACKENDS])  # default: as users build it
@pytest.mark.parametrize("case_id", ["Adam-l2", "RAdam-l2", "NAdam-l2", "ADOPT-l2"])
def test_a_gradient_that_nearly_cancels_its_l2_term_steps_as_the_loop_steps_it(
    case_id: str, backend: str
) -> None:
    """g = −λθ + 1e-7·noise, as near the stationary point of an L2-regularised loss: g + λθ
    keeps a few bits, and steps of lr·(g + λθ)/eps follow them. The kernels rounded the
    sum twice (multiply, then add) and torch's add(alpha=) once, so a first step differed
    by 5.9e-5 (Adam, Triton) and NAdam by 9.2e-3 after three; they now round it once too.
    Two steps of the same gradient: ADOPT's first call only sets v."""
    if backend == "triton" and not interpreter_rounds_fma_once():
        pytest.skip("this Triton's interpreter rounds tl.fma twice (3.3: numpy's a * b + c)")
    case = next(c for c in trajectory_cases() if c.id == case_id)
    case = dataclasses.replace(case, core_kwargs={**case.core_kwargs, "eps": 1e-6})
    generator = torch.Generator().manual_seed(4)
    theta = torch.randn(300, generator=generator)
    decay = case.core_kwargs["weight_decay"]
    cancelling = (-(decay * theta.double())).float() + 1e-7 * torch.randn(300, generator=generator)
    twice = [[cancelling]] * 2
    for step, expected, actual in paired_steps(case, backend, [theta], gradients=twice):
        assert_step_matches(step, expected, actual)


@pytest.mark.parametrize("case_id", ["RAdam-l2", "NAdam-l2", "ADOPT-l2"])  # not torch's kernel
def test_portable_builds_round_the_l2_sum_as_the_fma_instruction_does(
    case_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Builds for a target without an FMA instruction (portable x86-64) round g + λθ once
    with the C library's fmaf: bit for bit the native build's instruction, on sums that
    nearly cancel (a few bits left), on ordinary ones, and on sums just below and above a
    float midpoint by less than a double ulp, which a sum in double would round to the
    midpoint and then to the even neighbour, the wrong one half the time."""
    if "fma" not in cpu_kernel._cpu_flags():
        pytest.skip("this CPU has no FMA instruction for the native build to use")
    decay = 1 + 2.0**-20  # a float32, so l2·θ is the exact product the cases below need
    base = next(c for c in trajectory_cases() if c.id == case_id)
    case = dataclasses.replace(base, core_kwargs={**base.core_kwargs, "weight_decay": decay})
    generator = torch.Generator().manual_seed(5)
    theta = torch.randn(4096, generator=generator)
    noise = torch.randn(4096, generator=generator) * torch.logspace(-9, 0, 4096)
    gradient = (-(decay * theta.double())).float() + noise.float()
    # g = 1 + 2^-23 (odd) and l2·θ = 2^-24·(1 ∓ 2^-40): g + l2·θ is a hair below (above)
    # the midpoint 1 + 3·2^-24, so once rounded it is 1 + 2^-23 (1 + 2^-22); rounded
    # in double first it is the midpoint, then 1 + 2^-22 both times. Signs mirrored too.
    near_midpoint = torch.tensor([2.0**-24 * (1 - 2.0**-20), 2.0**-24 * (1 + 2.0**-20)])
    theta[:4] = torch.cat([near_midpoint, -near_midpoint])
    gradient[:4] = torch.tensor([1.0, 1.0, -1.0, -1.0]) * (1 + 2.0**-23)
    runs: list[list[dict[str, Tensor]]] = []
    for setting in ("0", "1"):
        monkeypatch.setenv("ADAMKIT_PORTABLE_KERNELS", setting)
        param = theta.clone().requires_grad_()
        optimizer = case.make([param], fused=True)
        runs.append([])
        for _ in range(5):  # each step: a moment's ulp of step 1 is lost in v by step 5
            param.grad = gradient.clone()
            optimizer.step()
            state = {key: value.clone() for key, value in optimizer.state[param].items()}
            runs[-1].append({"param": param.detach().clone(), **state})
    for step, (native, portable) in enumerate(zip(*runs, strict=True)):
        for key, value in native.items():
            assert torch.equal(value, portable[key]), (step, key)


def _bit_patterns_for_rounding() -> Tensor:
    """float32 bit patterns: every sign, exponent and top mantissa bits (the upper 16),
    each with low halves on and around the round-to-nearest-even boundaries of bfloat16
    (bit 15) and float16 normals (bit 12), plus random ones. This covers zeros,
    subnormals, the overflow edge, infinities and NaNs of both targets."""
    low = [0, 1, 0x0FFF, 0x1000, 0x1001, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0xC000]
    low += [0xEFFF, 0xF000, 0xFFFF]
    low += torch.randint(0, 1 << 16, (8,), generator=torch.Generator().manual_seed(3)).tolist()
    upper = torch.arange(1 << 16, dtype=torch.int64) << 16
    bits = (upper[:, None] | torch.tensor(low, dtype=torch.int64)[None, :]).flatten()
    return bits.to(torch.int32).view(torch.float32)  # int64 → int32 wraps the sign bit in


def _every_bit_pattern() -> Iterator[Tensor]:
    """All 2^32 float32 bit patterns, 2^26 at a time."""
    chunk = 1 << 26
    for start in range(0, 1 << 32, chunk):
        yield (
            torch.arange(start, start + chunk, dtype=torch.int64)
            .to(torch.int32)
            .view(torch.float32)
        )


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_kernel_rounding_equals_torchs_conversion_bit_for_bit(
    dtype: torch.dtype, kernel_build: str
) -> None:
    """The rounding every fused step does to store θ, k, m and v. ADAMKIT_EXHAUSTIVE_ROUNDING=1
    checks all 2^32 patterns instead (about 70 s per dtype and build)."""
    exhaustive = os.environ.get("ADAMKIT_EXHAUSTIVE_ROUNDING", "") not in ("", "0")
    chunks = _every_bit_pattern() if exhaustive else iter([_bit_patterns_for_rounding()])
    for values in chunks:
        ours, torchs = cpu_kernel.round_as_kernels_do(values, dtype), values.to(dtype)
        both_nan = ours.isnan() & torchs.isnan()  # NaN payloads are not kept, as in torch
        differs = (ours.view(torch.int16) != torchs.view(torch.int16)) & ~both_nan
        first = values[differs][:5].view(torch.int32).tolist()
        assert not bool(differs.any()), f"{kernel_build}: differ for bit patterns {first}"


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("case", one_case_per_algorithm(), ids=lambda c: c.id)
def test_portable_and_native_kernel_builds_both_step_within_one_ulp(
    case: Case, dtype: torch.dtype, kernel_build: str
) -> None:
    """The software rounding is what CPUs without AVX-512 run; it is held to the loop
    backend on this machine as well, with Kahan compensation included."""
    generator = torch.Generator().manual_seed(4)
    params = [torch.randn(s, generator=generator).to(dtype) for s in _shapes_across_blocks()]
    kahan = dataclasses.replace(case, core_kwargs={**case.core_kwargs, "kahan_sum": True})
    for step, expected, actual in paired_steps(kahan, "fused", params):
        assert_step_matches(step, expected, actual)


def _mixed_group(backend: str) -> list[Tensor]:
    """Sizes around the block size, empty tensors, every dtype, and layouts that are dense
    but not contiguous (transposed, channels-last) or not dense at all (a strided slice)."""
    generator = torch.Generator().manual_seed(2)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    if backend == "fused":
        dtypes.append(torch.float64)
    params = [
        torch.randn(size, generator=generator).to(dtype)
        for dtype in dtypes
        for size in (0, 1, 7, 1023, 1025, 2049)
    ]
    params.append(torch.randn(9, 5, generator=generator).t())
    params.append(
        torch.randn(2, 3, 4, 5, generator=generator).to(memory_format=torch.channels_last)
    )
    params.append(torch.randn(6, 10, generator=generator)[:, ::3])
    params.append(torch.randn(0, 4, generator=generator).to(torch.bfloat16))
    return params


@pytest.mark.parametrize("kahan_sum", [None, False], ids=["kahan", "no-kahan"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("case", one_case_per_algorithm(), ids=lambda c: c.id)
def test_many_tensors_of_mixed_sizes_dtypes_and_layouts_in_one_group(
    case: Case, backend: str, kahan_sum: bool | None
) -> None:
    """Every dtype in one group, each bucketed on its own. kahan_sum=False rounds every
    parameter to nearest, so rounding no longer tells the 16-bit parameters from the
    full-precision ones: only their dtype splits the buckets (one kernel per dtype).
    Handed whole to the fused CPU backend's float32 kernel, RAdam, NAdam and ADOPT
    refused the bfloat16 parameters ("Invalid param[..] for a fused kernel")."""
    case = dataclasses.replace(case, core_kwargs={**case.core_kwargs, "kahan_sum": kahan_sum})
    for step, expected, actual in paired_steps(case, backend, _mixed_group(backend), steps=3):
        assert_step_matches(step, expected, actual)


def test_a_fused_cpu_step_allocates_at_most_one_parameter_sized_temporary() -> None:
    """Every allocation a step makes, summed, bounds its peak extra memory from above.
    (The Triton kernels keep everything in registers; the interpreter cannot show that.)"""
    params = [torch.randn(256, 256).requires_grad_() for _ in range(3)]
    params += [torch.randn(256, 256).to(torch.bfloat16).requires_grad_()]
    for p in params:
        p.grad = torch.randn_like(p)
    for case in one_case_per_algorithm():
        optimizer = case.make(params, **BACKENDS["fused"])
        optimizer.step()  # state exists from here on
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiled:
            optimizer.step()
        allocated = sum(
            max(event.cpu_memory_usage, 0)
            for event in profiled.profiler.function_events
            if not event.cpu_children
        )
        assert allocated <= 256 * 256 * 4, (case.id, allocated)


# -- the fused flag --------------------------------------------------------------------------


def _loop_model_after(case: Case, **flags: Any) -> torch.nn.Module:
    model = make_model()
    train(model, case.make(model.parameters(), **flags), make_batches(torch.float32, 8))
    return model


@pytest.mark.bad_input
def test_fused_and_foreach_together_are_refused() -> None:
    with pytest.raises(ValueError, match=r"Invalid fused: True\. Allowed: None or False when"):
        core.AdamW([torch.nn.Parameter(torch.ones(2))], lr=LR, fused=True, foreach=True)
    with pytest.raises(ValueError, match=r"Invalid fused: True\."):
        core.backends.select_backend([torch.ones(2)], foreach=True, fused=True)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ([torch.nn.Parameter(torch.ones(2, device="meta"))], "no fused backend exists for 'meta'"),
        (
            [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2, device="meta"))],
            "must share one device",
        ),
    ],
    ids=["unsupported-device", "mixed-devices"],
)
def test_fused_true_where_impossible_is_refused_at_construction(
    params: list[Tensor], reason: str
) -> None:
    with pytest.raises(ValueError, match=rf"Invalid fused in param group 0: True\. .*{reason}"):
        core.RAdam(params, lr=LR, fused=True)
    optimizer = core.RAdam(params, lr=LR)  # None: the eager backends take it
    assert optimizer.param_groups[0]["fused"] is None


@pytest.mark.bad_input
def test_fused_true_without_a_compiler_is_refused_before_any_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = make_model()
    optimizer = core.NAdam(model.parameters(), lr=LR, fused=True)
    before = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setattr(cpu, "available", lambda: False)
    x, y = make_batches(torch.float32, 1)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(ValueError, match=r"Invalid fused in param group 0: True.*C compiler"):
        optimizer.step()
    assert len(optimizer.state) == 0
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({}, "fused"),
        ({"fused": True}, "fused"),
        ({"fused": False}, "loop"),
        ({"foreach": True}, "foreach"),
        ({"foreach": False}, "loop"),
        ({"fused": False, "foreach": True}, "foreach"),
    ],
    ids=str,
)
def test_backend_choice_on_cpu(flags: dict[str, bool], expected: str) -> None:
    """None everywhere picks the fused backend; an explicit foreach or fused=False wins."""
    chosen = core.backends.select_backend(
        [torch.ones(2)], foreach=flags.get("foreach"), fused=flags.get("fused")
    )
    backends = {
        "loop": core.backends.loop,
        "foreach": core.backends.foreach,
        "fused": cpu.STRICT if flags.get("fused") else cpu.DEFAULT,
    }
    assert chosen is backends[expected]


@pytest.fixture
def failing_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """A compiler found on PATH that fails every build ("false"), an empty kernel cache
    and no library loaded yet, so each kernel a step needs is built, and refused."""
    monkeypatch.setenv("ADAMKIT_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_loaded", {})
    monkeypatch.setattr(cpu_kernel, "_scalars_unavailable", False)  # restored after the test
    monkeypatch.setattr(cpu_kernel, "compiler", lambda: ("false",))


@pytest.mark.bad_input
@pytest.mark.usefixtures("failing_compiler")
def test_an_unbuildable_kernel_falls_back_by_default_and_fails_when_forced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cpu, "_warned", False)
    case = next(c for c in trajectory_cases() if c.id == "RAdam-decoupled")
    with pytest.warns(RuntimeWarning, match="fused CPU kernel is unavailable"):
        fallback = _loop_model_after(case)
    reference = _loop_model_after(case, foreach=False)
    for a, b in zip(fallback.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="fused=True: false could not build"):
        _loop_model_after(case, fused=True)


@pytest.mark.usefixtures("failing_compiler")
def test_an_unbuildable_kernel_falls_back_with_stochastic_rounding_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bf16 rounded stochastically, by default, where no kernel builds: the fallback
    rounds as the loop backend does (the same bits), not to nearest."""
    monkeypatch.setattr(cpu, "_warned", False)
    runs = []
    for flags in ({}, {"foreach": False, "fused": False}):
        param = torch.nn.Parameter(torch.randn(64, generator=torch.Generator().manual_seed(0)))
        param.data = param.data.bfloat16()
        optimizer = core.AdamW([param], lr=1e-3, stochastic_rounding=True, **flags)
        for step in range(3):
            grad = 0.1 * torch.randn(64, generator=torch.Generator().manual_seed(step))
            param.grad = grad.bfloat16()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                optimizer.step()
        runs.append(param.detach())
    assert torch.equal(*runs)


@pytest.mark.bad_input
@pytest.mark.usefixtures("failing_compiler")
def test_a_forced_step_whose_kernel_fails_to_build_changes_nothing() -> None:
    """fp32 parameters go to torch's native kernel, bf16 ones to a generated kernel that a
    compiler found on PATH fails to build: the fp32 bucket was updated before the failure
    (moments and parameter, not its count), and a retried step applied its gradient twice."""
    runs = []
    for fused in (True, False):
        torch.manual_seed(0)
        params = [
            torch.nn.Parameter(torch.randn(64)),
            torch.nn.Parameter(torch.randn(64).bfloat16()),
        ]
        optimizer = core.AdamW(params, lr=1e-2, fused=fused)
        for p in params:
            p.grad = torch.randn_like(p)
        if fused:
            before = [p.detach().clone() for p in params]
            with pytest.raises(
                RuntimeError, match=r"(?s)fused=True: false could not build .*nothing was updated"
            ):
                optimizer.step()
            assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
            # nor is the state it made kept (it was, empty, until 2026-12-07)
            assert not any(p in optimizer.state for p in params)
            optimizer.param_groups[0]["fused"] = False  # the retry
        optimizer.step()
        if fused:  # a later step refused the same way keeps the state it found
            kept = copy.deepcopy(optimizer.state_dict()["state"])
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.param_groups[0]["fused"] = True
            with pytest.raises(RuntimeError, match="nothing was updated"):
                optimizer.step()
            after = optimizer.state_dict()["state"]
            assert after.keys() == kept.keys()
            for index, state in kept.items():
                assert after[index].keys() == state.keys()
                assert all(torch.equal(after[index][k], v) for k, v in state.items())
            optimizer.param_groups[0]["fused"] = False
        runs.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.bad_input
@pytest.mark.usefixtures("failing_compiler")
def test_a_released_step_whose_kernel_fails_to_build_names_what_earlier_hooks_stepped() -> None:
    """Under gradient release each hook steps one parameter: the fp32 layer's hook ran
    torch's native kernel before the bf16 layer's kernel failed to build, so "nothing was
    updated" was false (and a retried batch would step the fp32 layer twice)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8).bfloat16(), torch.nn.Linear(8, 8))
    optimizer = core.AdamW(model.parameters(), lr=1e-2, fused=True, gradient_release=True)
    prepare_for_gradient_release(model, optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        with pytest.raises(
            RuntimeError,
            match=r"(?s)fused=True: false could not build .*this parameter was not updated, "
            r"but release hooks .* already stepped or folded 2 parameter",
        ):
            model[1](model[0](torch.randn(4, 8).bfloat16()).float()).sum().backward()
    finally:
        remove_gradient_release(model)
    changed = [not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)]
    assert changed == [False, False, True, True]


@pytest.mark.bad_input
@pytest.mark.parametrize("frees_gradient", [True, False], ids=["frees", "keeps"])
@pytest.mark.usefixtures("failing_compiler")
def test_a_released_fold_then_step_of_one_parameter_counts_once_before_a_build_failure(
    frees_gradient: bool,
) -> None:
    """With optimizer accumulation, a hook folds a micro-batch into the window: a fold by a
    hook that keeps the gradient (DDP's communication hook) went uncounted, so the error
    said "nothing was updated", and a parameter folded, then stepped, counted twice."""
    from core.optimizer import step_released_param

    plain = torch.nn.Parameter(torch.randn(8))  # the loop backend: no kernel to build
    half = torch.nn.Parameter(torch.randn(8).bfloat16())  # a generated kernel, which fails
    groups = [{"params": [plain], "fused": False}, {"params": [half], "fused": True}]
    optimizer = core.AdamW(groups, lr=1e-2, gradient_release=True)
    optimizer.optimizer_accumulation = True
    plain.grad = torch.ones(8)
    assert step_released_param(optimizer, plain, frees_gradient=frees_gradient)
    optimizer.optimizer_accumulation = False  # the window's last micro-batch
    plain.grad, half.grad = torch.ones(8), torch.ones(8).bfloat16()
    assert step_released_param(optimizer, plain, frees_gradient=frees_gradient)
    with pytest.raises(RuntimeError, match=r"already stepped or folded 1 parameter\(s\)"):
        step_released_param(optimizer, half, frees_gradient=frees_gradient)
    assert float(optimizer.state[plain]["step"]) == 1
    # a fold alone, then the failure inside the same micro-batch
    optimizer = core.AdamW(groups, lr=1e-2, gradient_release=True)
    optimizer.optimizer_accumulation = True
    plain.grad, half.grad = torch.ones(8), torch.ones(8).bfloat16()
    assert step_released_param(optimizer, plain, frees_gradient=frees_gradient)
    with pytest.raises(RuntimeError, match=r"already stepped or folded 1 parameter\(s\)"):
        step_released_param(optimizer, half, frees_gradient=frees_gradient)


def _assert_falls_back_by_default_and_is_refused_when_forced(
    message: str, refusal: str | None = None
) -> None:
    """With the kernel unavailable for the reason `message` matches: default flags warn and
    step as the loop backend does; fused=True is refused for the reason `refusal` matches
    (default: message) when the optimizer is built, and by a step of a group switched to
    it, before any state is made (on 8-bit moments, which only adamkit's own kernel steps,
    never torch's). The step used to make the state and then fail inside the build."""
    case = next(c for c in trajectory_cases() if c.id == "RAdam-decoupled")
    with pytest.warns(RuntimeWarning, match=message):
        fallback = _loop_model_after(case)
    reference = _loop_model_after(case, foreach=False)
    for a, b in zip(fallback.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    param = torch.nn.Parameter(torch.randn(5000, generator=torch.Generator().manual_seed(1)))
    param.grad = torch.ones_like(param)
    refused = r"Allowed: None or False here: the fused CPU backend can build no kernel: "
    refused += refusal or message
    with pytest.raises(ValueError, match=r"Invalid fused in param group 0: True\. " + refused):
        core.AdamW([param], lr=LR, fused=True, state_precision="8bit")
    optimizer = core.AdamW([param], lr=LR, fused=False, state_precision="8bit")
    optimizer.param_groups[0]["fused"] = True  # by hand, as a framework might
    before = param.detach().clone()
    with pytest.raises(ValueError, match=r"Invalid fused in param group 0: True\. " + refused):
        optimizer.step()
    assert torch.equal(param, before)
    assert not optimizer.state


@pytest.mark.bad_input
def test_a_kernel_cache_that_cannot_be_a_directory_falls_back_by_default_and_fails_when_forced(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """ADAMKIT_KERNEL_CACHE below a file: the step must not die of the OSError."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    monkeypatch.setenv("ADAMKIT_KERNEL_CACHE", str(a_file / "kernels"))
    monkeypatch.setattr(cpu_kernel, "_loaded", {})
    monkeypatch.setattr(cpu_kernel, "_scalars_unavailable", False)  # restored after the test
    monkeypatch.setattr(cpu, "_warned", False)
    message = r"the kernel cache .*a-file/kernels cannot be written"
    message += r" \(set ADAMKIT_KERNEL_CACHE to a writable directory\)"
    refusal = r"the kernel cache .*a-file/kernels cannot be a directory \(.*a-file is a file; "
    refusal += r"set ADAMKIT_KERNEL_CACHE to a directory\)"
    _assert_falls_back_by_default_and_is_refused_when_forced(message, refusal)
    assert list(tmp_path.iterdir()) == [a_file]


@pytest.mark.bad_input
def test_an_avx2_build_on_a_cpu_without_avx2_is_refused_not_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ADAMKIT_PORTABLE_KERNELS=avx2 on a CPU that lacks AVX2 (its flags replaced here)
    would build code that stops the process: the default falls back to the loop backend
    with a warning naming the setting, fused=True refuses before anything changes."""
    monkeypatch.setenv("ADAMKIT_PORTABLE_KERNELS", "avx2")
    monkeypatch.setattr(cpu_kernel, "_cpu_flags", lambda: frozenset({"sse2", "avx", "fma"}))
    monkeypatch.setattr(cpu_kernel, "_scalars_unavailable", False)  # restored after the test
    monkeypatch.setattr(cpu, "_warned", False)
    message = r"ADAMKIT_PORTABLE_KERNELS='avx2': this CPU lacks avx2, f16c\b.*'1' \(portable\)"
    with pytest.raises(cpu_kernel.KernelUnavailable, match=message):
        cpu_kernel.arch_choices()
    _assert_falls_back_by_default_and_is_refused_when_forced(message)


@pytest.mark.bad_input
def test_an_unknown_portable_kernels_setting_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A misspelt target must not be built silently as the slowest (portable) code."""
    monkeypatch.setenv("ADAMKIT_PORTABLE_KERNELS", "avx512")
    monkeypatch.setattr(cpu_kernel, "_scalars_unavailable", False)  # restored after the test
    monkeypatch.setattr(cpu, "_warned", False)
    message = r"ADAMKIT_PORTABLE_KERNELS='avx512' is not a setting; allowed: unset or '0' "
    message += r"\(native\), '1' \(portable\) or 'avx2'"
    with pytest.raises(cpu_kernel.KernelUnavailable, match=message):
        cpu_kernel.arch_choices()
    _assert_falls_back_by_default_and_is_refused_when_forced(message)


@pytest.mark.parametrize(
    ("setting", "portable"),
    [("", False), ("0", False), ("off", False), ("1", True), (" True ", True), ("YES", True)],
)
def test_portable_kernels_settings_read_as_environment_switches(
    monkeypatch: pytest.MonkeyPatch, setting: str, portable: bool
) -> None:
    monkeypatch.setenv("ADAMKIT_PORTABLE_KERNELS", setting)
    assert cpu_kernel.arch_choices() == (((),) if portable else (("-march=native",), ()))


def test_loading_a_state_dict_keeps_this_optimizers_backend_flags() -> None:
    model = make_model()
    source = core.AdamW(model.parameters(), lr=LR, fused=True)
    train(model, source, make_batches(torch.float32, 2))
    target = core.AdamW(model.parameters(), lr=LR, fused=False, foreach=True)
    target.load_state_dict(source.state_dict())
    assert (target.param_groups[0]["fused"], target.param_groups[0]["foreach"]) == (False, True)


def test_without_a_compiler_the_default_still_runs_torchs_kernels_and_the_loop_silently(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("ADAMKIT_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_loaded", {})
    monkeypatch.setattr(cpu_kernel, "_scalars_unavailable", False)  # restored after the test
    monkeypatch.setattr(cpu_kernel, "compiler", lambda: None)
    native = []
    monkeypatch.setattr(cpu, "_native_adam", lambda *args: native.append(args) or True)
    assert core.backends.select_backend([torch.ones(2)], foreach=None, fused=None) is cpu.DEFAULT
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no compiler is an expected setup, not news
        model = make_model()
        adamw = next(c for c in trajectory_cases() if c.id == "AdamW-defaults")
        train(model, adamw.make(model.parameters()), make_batches(torch.float32, 1))
        assert len(native) == 1  # torch's kernel took the AdamW step
        nadam = next(c for c in trajectory_cases() if c.id == "NAdam-l2")
        default = _loop_model_after(nadam)
    loop = _loop_model_after(nadam, foreach=False)
    for a, b in zip(default.parameters(), loop.parameters(), strict=True):
        assert torch.equal(a, b)  # NAdam ran the loop backend


@pytest.fixture
def compiler_lookup_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[None]:
    """$CC read afresh (compiler() caches it), kernels built into an empty cache."""
    monkeypatch.setenv("ADAMKIT_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_loaded", {})
    monkeypatch.setattr(cpu_kernel, "_scalars_unavailable", False)  # restored after the test
    monkeypatch.setattr(cpu, "_warned", False)
    cpu_kernel.compiler.cache_clear()
    cpu_kernel._toolchain_identity.cache_clear()
    yield
    cpu_kernel.compiler.cache_clear()  # read again with $CC restored
    cpu_kernel._toolchain_identity.cache_clear()


def test_cc_may_be_a_command_line_with_a_launcher(
    monkeypatch: pytest.MonkeyPatch, compiler_lookup_again: None, tmp_path: Any
) -> None:
    """CC="ccache gcc" is common; `env` stands in for the launcher here. The default flags
    and fused=True both build with it and step on its kernel."""
    compiler = next(name for name in cpu_kernel.C_COMPILERS if shutil.which(name))
    monkeypatch.setenv("CC", f"env {compiler}")
    assert cpu_kernel.compiler() == (shutil.which("env"), compiler)
    case = next(c for c in trajectory_cases() if c.id == "RAdam-decoupled")
    reference = _loop_model_after(case, foreach=False)
    for flags in ({}, {"fused": True}):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # built and run: no fallback warning
            stepped = _loop_model_after(case, **flags)
        for a, b in zip(stepped.parameters(), reference.parameters(), strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-6)
    assert list(tmp_path.glob("adamkit_adam_*.so")), "built into the test's kernel cache"


@pytest.mark.bad_input
def test_a_cc_that_names_no_command_is_news_not_a_silent_fallback(
    monkeypatch: pytest.MonkeyPatch, compiler_lookup_again: None
) -> None:
    monkeypatch.setenv("CC", "gcc-that-is-not-installed -O2")
    assert cpu_kernel.compiler() is None and cpu_kernel.compiler_misconfigured()
    case = next(c for c in trajectory_cases() if c.id == "RAdam-decoupled")
    message = r"CC='gcc-that-is-not-installed -O2' is not a command on PATH"
    with pytest.warns(RuntimeWarning, match=message):
        fallback = _loop_model_after(case)
    reference = _loop_model_after(case, foreach=False)
    for a, b in zip(fallback.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=f"Invalid fused in param group 0: True.*{message}"):
        _loop_model_after(case, fused=True)


@pytest.mark.bad_input
def test_no_home_directory_falls_back_by_default_and_is_refused_when_forced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HOME unset under a user id without a passwd entry (a container run with an arbitrary
    --user): Path.home() raised RuntimeError out of every step, fused=False included."""
    for variable in ("ADAMKIT_KERNEL_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)

    def no_home() -> None:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(cpu_kernel.Path, "home", staticmethod(no_home))
    monkeypatch.setattr(cpu_kernel, "_loaded", {})
    monkeypatch.setattr(cpu_kernel, "_scalars_unavailable", False)  # restored after the test
    monkeypatch.setattr(cpu, "_warned", False)
    message = r"the kernel cache has no place: no home directory \(Could not determine home "
    message += r"directory\.\) and neither ADAMKIT_KERNEL_CACHE nor XDG_CACHE_HOME is set"
    _assert_falls_back_by_default_and_is_refused_when_forced(message)


@pytest.mark.bad_input
def test_a_cc_on_path_that_does_not_run_falls_back_by_default(
    monkeypatch: pytest.MonkeyPatch, compiler_lookup_again: None, tmp_path: Any
) -> None:
    """A CC wrapper script whose interpreter is gone: running it raised FileNotFoundError
    out of the step (its --version was read outside the build's error handling)."""
    script = tmp_path / "cc-wrapper"
    script.write_text("#!/nonexistent/interpreter\n")
    script.chmod(0o755)
    monkeypatch.setenv("CC", str(script))
    case = next(c for c in trajectory_cases() if c.id == "RAdam-decoupled")
    message = rf"{script} could not build the fused kernel .*\n{script} does not run: "
    with pytest.warns(RuntimeWarning, match=message):
        fallback = _loop_model_after(case)
    reference = _loop_model_after(case, foreach=False)
    for a, b in zip(fallback.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match=f"fused=True: {message}"):
        _loop_model_after(case, fused=True)
    assert not list(tmp_path.glob("*.so"))


def test_cached_kernels_are_readable_by_every_user(
    compiler_lookup_again: None, tmp_path: Any
) -> None:
    """A cache warmed by one user (a container image built as root, a team's shared
    ADAMKIT_KERNEL_CACHE) could not be loaded by any other: libraries were left 0711."""
    case = next(c for c in trajectory_cases() if c.id == "RAdam-decoupled")
    _loop_model_after(case, fused=True)
    libraries = list(tmp_path.glob("adamkit_*.so"))
    assert libraries and {library.stat().st_mode & 0o777 for library in libraries} == {0o755}


def _gapped(values: Tensor) -> Tensor:
    """Shape (4, 3) with strides (6, 2): every other element of a (4, 6) buffer."""
    return values.reshape(4, 6).clone()[:, ::2]


def _permuted(values: Tensor) -> Tensor:
    """Dense but not contiguous: a (4, 2, 3) view of a (2, 3, 4) tensor."""
    return values.reshape(2, 3, 4).clone().permute(2, 0, 1)


def _transposed(values: Tensor) -> Tensor:
    """A (6, 4) view of a (4, 6) tensor: strides (1, 6)."""
    return values.reshape(4, 6).clone().t()


def _contiguous_as(values: Tensor) -> Tensor:
    """The transposed view's shape, contiguous."""
    return values.reshape(6, 4).clone()


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param((_gapped, _gapped), id="all-gapped-alike"),
        pytest.param((_permuted, _permuted), id="all-permuted-alike"),
        pytest.param((_transposed, _contiguous_as), id="transposed-param"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uncommon_layouts_step_as_the_loop_backend_and_leave_gaps_alone(
    layout: tuple[Callable[[Tensor], Tensor], ...], dtype: torch.dtype
) -> None:
    """Strided tensors reach the fused path as whole memory spans when their layouts
    allow: every tensor of a step gapped alike, or dense in another dimension order; and
    a transposed parameter (m and v made like it) with a contiguous gradient. A flat pass
    over a gapped span would write its gaps, one over unlike layouts would pair elements
    wrongly: each must equal the loop backend, and the gaps keep their values."""
    place, place_grad = layout
    generator = torch.Generator().manual_seed(5)
    values = [torch.randn(24, generator=generator).to(dtype) for _ in range(2)]
    results = []
    for fused in (False, True):
        param, grad = place(values[0]), place_grad(values[1])
        moments = [place(torch.zeros_like(values[0])) for _ in range(2)]  # laid out as θ
        for _ in range(3):
            core.adam(
                [param], [grad], [moments[0]], [moments[1]], None, [torch.tensor(0.0)],
                lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, fused=fused,
            )  # fmt: skip
        results.append((param, *moments))
    for loop, fused, name in zip(*results, ("param", "exp_avg", "exp_avg_sq"), strict=True):
        assert fused.stride() == loop.stride()
        assert_within_one_ulp(fused, loop, f"{name}, {dtype}")
        if place is _gapped:  # the gaps of the buffer under the view are untouched
            gaps = fused._base[:, 1::2]
            expected = values[0].reshape(4, 6)[:, 1::2] if name == "param" else 0
            assert bool((gaps == expected).all()), name


def test_a_step_over_overlapping_views_writes_nothing_outside_them() -> None:
    """Views whose elements share memory (as_strided with strides smaller than their
    extents) are no dense span: a flat pass sized by their element count (30) would
    write past the 18 elements they cover."""
    buffers = [torch.full((40,), 0.5) for _ in range(4)]
    views = [b.as_strided((2, 3, 5), (1, 2, 3)) for b in buffers]
    core.adam(
        [views[0]], [views[1]], [views[2]], [views[3]], None, [torch.tensor(0.0)],
        lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, fused=True,
    )  # fmt: skip
    assert bool(buffers[0][:18].ne(0.5).any())  # stepped
    for buffer in buffers:
        assert bool(buffer[18:].eq(0.5).all())


def test_a_group_with_kahan_buffers_for_some_parameters_only_steps_as_the_loop() -> None:
    """kahan_comps may hold None beside buffers (a parameter added without one): such a
    list is split by what each parameter has, not handed whole to one kernel."""
    results = []
    for fused in (False, True):
        params = [torch.full((4,), 1.0, dtype=torch.bfloat16) for _ in range(2)]
        grads = [torch.full_like(p, 0.5) for p in params]
        moments = [[torch.zeros_like(p) for p in params] for _ in range(2)]
        comps = [torch.zeros_like(params[0]), None]
        for _ in range(3):
            core.adam(
                params, grads, *moments, None, [torch.tensor(0.0) for _ in params],
                lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, kahan_comps=comps, fused=fused,
            )  # fmt: skip
        results.append([*params, comps[0]])
    for fused, loop in zip(results[1], results[0], strict=True):
        assert_within_one_ulp(fused, loop, "kahan present for one parameter of two")


def test_a_bucket_takes_only_its_own_indices_of_every_list() -> None:
    """Buckets pick their tensors by index from every list of a step: a bucket missing
    one index must not take the whole list (its tensors would be stepped twice)."""
    lists = [["a", "b", "c"], None, [1, 2, 3]]
    assert grouping.take_all(lists, [0, 2]) == [["a", "c"], None, [1, 3]]
    assert grouping.take_all(lists, [1]) == [["b"], None, [2]]
    whole = grouping.take_all(lists, [0, 1, 2])
    assert whole == lists and whole[0] is not lists[0]  # new lists, as every bucket gets
