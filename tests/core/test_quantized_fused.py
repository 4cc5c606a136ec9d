"""The fused CPU backend's 8-bit state (cpu_kernel.c built with Q8) against the loop backend,
the format's reference (dequantize, step in fp32, quantize by core.quantization).

Every step is compared from identical inputs: a fused twin is loaded from the loop's state
dict just before each of 24 steps. What agrees exactly and what does not, and why:

- The encoding itself (absmax, |x| · (1 / absmax), nearest code) is exact: the kernel's codes equal
  core.quantization.quantize on the same fp32 values, midpoints and their neighbours
  included (test_kernel_encoding_equals_the_reference_on_every_midpoint).
- The new moments are the fused kernel's fp32 arithmetic, which agrees with torch's to
  rounding, not bit for bit (torch's vectorised lerp uses fused multiply-adds; the kernel
  multiplies by 1 / bias_correction2_sqrt). So a block's absmax may differ by a few ulps,
  and an element whose value lies within rounding of a midpoint may take the neighbouring
  code. Bounds: absmax within 2^-20 relative, codes at most one step apart and in at most
  one element in a thousand (measured: well under that, see MAX_CODE_FLIP_FRACTION).
- ADOPT keeps v in full precision (core.adopt): its kernel is built with V_8BIT=0, so its
  8-bit m and its v in the parameter's dtype step in the same pass, v rounded as the
  full-precision kernels round it (assert_state_close).
- Parameters are updated from the unquantized new moments in both backends, so they differ
  by the same rounding: 16-bit parameters within one ulp (the true value θ + k within one
  ulp with Kahan), fp32 within 1e-6 absolute, as tests/core/test_fused.py holds the
  full-precision kernels.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

import core
from core.backends import cpu_kernel
from core.backends.views import check_quantized_addressable
from core.quantization import (
    SIGNED_KEYS,
    QuantizedMoment,
    code_map,
    dequantize,
    map_values,
    midpoints,
    moment_bits,
    moment_keys,
    quantize,
    quantized_state,
)
from core.random_bits import rounding_bits
from tests.core.stochastic_cases import EXACT_BETAS
from tests.core.test_fused import assert_state_close, assert_within_one_ulp
from tests.core.test_quantization import code_positions, largest_finite

pytestmark = pytest.mark.skipif(cpu_kernel.compiler() is None, reason="no C compiler")

LR = 1e-2
STEPS = 24
"""Past ADOPT's first call and RAdam's non-adaptive early steps (adaptive from t = 6)."""
MAX_CODE_FLIP_FRACTION = 1e-3
ABSMAX_RELATIVE = 2.0**-20
"""absmax bound, relative to the block's absmax or to the tensor's largest: a block of one
element has that element's |m| for absmax, and where the new m nearly cancels (β1·m
against (1 − β1)·g), an ulp of its inputs is many of it, as for full-precision moments
(test_fused's one ulp plus 2^-20 of the tensor's largest value)."""
FP32_PARAMETER_GAP = 4e-6
"""fp32 parameters near 3 have ulps of 2.4e-7: a few ulps of rounding, as between the
full-precision kernels and the loop (measured up to FP32_PARAMETER_GAP / 2 with L2 decay,
whose gradient g + λθ carries θ's rounding into the step). Where θ is larger than ~30 the
bound is one ulp of θ instead (measured under 0.82 ulp: unclipped ADOPT with L2)."""
SHAPES = [(300, 70), (20, 600), (4100,), (5000,), (33,), (8, 8)]
"""Rows shorter than a block, rows of 2 blocks and a partial one, 1-D tensors of 17 and 20
blocks (the last partial), and two tensors under MIN_QUANTIZED_NUMEL that keep full-precision
moments in the same group (a mixed bucket)."""

CASES: dict[str, tuple[type[core.AdamFamilyOptimizer], dict[str, Any]]] = {
    "Adam-l2": (core.Adam, {"weight_decay": 0.1}),
    "AdamW-amsgrad": (core.AdamW, {"weight_decay": 0.1, "amsgrad": True}),
    "AdamW-fully-decoupled": (core.AdamW, {"weight_decay": 1e-3, "decouple_lr": True}),
    "RAdam-decoupled": (core.RAdam, {"weight_decay": 0.1, "decouple_wd": True}),
    "NAdam-l2": (core.NAdam, {"weight_decay": 0.1}),
    "ADOPT-clip-decoupled": (core.ADOPT, {"weight_decay": 0.1, "decouple_wd": True}),
    "ADOPT-clip-l2": (core.ADOPT, {"weight_decay": 0.1}),
    "ADOPT-unclipped-l2": (core.ADOPT, {"weight_decay": 0.1, "clip": False}),
    "ADOPT-unclipped-fully-decoupled": (
        core.ADOPT,
        {"weight_decay": 1e-3, "decouple_lr": True, "clip": False},
    ),
}
ADOPT_CASES = [case for case in CASES if case.startswith("ADOPT")]
PRECISIONS: dict[str, tuple[torch.dtype, bool]] = {
    "fp32": (torch.float32, False),
    "bf16": (torch.bfloat16, False),
    "bf16-kahan": (torch.bfloat16, True),
    "fp16": (torch.float16, False),
    "fp16-kahan": (torch.float16, True),
}
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _make(case: str, precision: str, lr: float = LR) -> Callable[..., core.AdamFamilyOptimizer]:
    cls, kwargs = CASES[case]
    kahan = PRECISIONS[precision][1]
    return lambda params, **flags: cls(
        params, lr=lr, kahan_sum=kahan, state_precision="8bit", **kwargs, **flags
    )


def _params(dtype: torch.dtype) -> list[Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator).to(dtype) for shape in SHAPES]


def paired_steps(
    make: Callable[..., core.AdamFamilyOptimizer], params: list[Tensor], steps: int = STEPS
) -> Iterator[tuple[list[Tensor], Any, list[Tensor], Any]]:
    """The loop backend's steps, each repeated by a fused twin loaded from the loop's state
    just before it (so each step is compared from identical inputs)."""
    generator = torch.Generator().manual_seed(1)
    loop_params = [p.clone().requires_grad_() for p in params]
    loop = make(loop_params, foreach=False, fused=False)
    for _ in range(steps):
        twin_params = [p.detach().clone().requires_grad_() for p in loop_params]
        twin = make(twin_params, fused=True)
        # the state itself: every tensor as the loop left it, nothing converted on load
        for a, b in zip(loop_params, twin_params, strict=True):
            twin.state[b] = copy.deepcopy(loop.state[a])
        for a, b in zip(loop_params, twin_params, strict=True):
            grad = (0.1 * torch.randn(a.shape, generator=generator)).to(a.dtype)
            a.grad, b.grad = grad.clone(), grad.clone()
        loop.step()
        twin.step()
        yield loop_params, loop, twin_params, twin


class Differences:
    """Code flips and absmax gaps, summed over a run."""

    def __init__(self) -> None:
        self.codes = 0
        self.flipped = 0
        self.blocks = 0
        self.absmax_exact = 0
        self.parameter_gap = 0.0

    def add(self, key: str, where: str, state: dict, loop_state: dict) -> None:
        codes, absmax = moment_keys(key)
        signed = key in SIGNED_KEYS
        gap = (
            code_positions(state[codes], signed) - code_positions(loop_state[codes], signed)
        ).abs()
        assert int(gap.max()) <= 1, f"{key} codes {int(gap.max())} steps apart, {where}"
        self.codes += gap.numel()
        self.flipped += int((gap > 0).sum())
        ours, theirs = state[absmax], loop_state[absmax]
        assert ours.dtype == torch.float32 and ours.shape == theirs.shape, where
        torch.testing.assert_close(
            ours,
            theirs,
            rtol=ABSMAX_RELATIVE,
            atol=ABSMAX_RELATIVE * largest_finite(theirs),
            equal_nan=True,
            msg=f"{key}, {where}",
        )
        self.blocks += ours.numel()
        self.absmax_exact += int((ours == theirs).sum())


def _compare(
    loop_params: list[Tensor], loop: Any, params: list[Tensor], twin: Any, counts: Differences
) -> None:
    for i, (a, b) in enumerate(zip(params, loop_params, strict=True)):
        where = f"tensor {i} {tuple(a.shape)} {a.dtype}"
        state, loop_state = twin.state[a], loop.state[b]
        assert state.keys() == loop_state.keys(), where
        if a.dtype == torch.float32:
            gaps = (a.detach() - b.detach()).abs()
            gap = float(gaps.max())
            counts.parameter_gap = max(counts.parameter_gap, gap)
            # unclipped ADOPT with L2 grows θ to hundreds (g / |g0| is heavy-tailed early
            # on): there one ulp of θ is the bound
            _, exponent = torch.frexp(b.detach())
            ulp = torch.ldexp(torch.ones_like(gaps), exponent - 24)
            excess = float((gaps - ulp.clamp(min=FP32_PARAMETER_GAP)).max())
            assert excess <= 0, f"parameter {gap} ({excess} beyond), {where}"
        else:
            assert_within_one_ulp(a.detach(), b.detach(), f"parameter, {where}")
        if "kahan_comp" in state:
            true_value = a.detach().float() + state["kahan_comp"].float()
            loop_value = b.detach().float() + loop_state["kahan_comp"].float()
            ulp = (b.detach().float().abs() * 2.0**-7).clamp(min=2.0**-24)
            assert bool(((true_value - loop_value).abs() <= ulp).all()), where
        for key in MOMENTS:
            if moment_keys(key)[0] in state:
                counts.add(key, where, state, loop_state)
            elif key in state and state[key].dtype == torch.float32:
                # one ulp where unclipped ADOPT's m and v grow far above 1
                torch.testing.assert_close(
                    state[key], loop_state[key], atol=1e-6, rtol=2.0**-23, msg=f"{key}, {where}"
                )
            elif key in state:
                assert_state_close(state[key], loop_state[key], f"{key}, {where}")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", CASES)
def test_every_step_matches_the_loop_backend(case: str, precision: str) -> None:
    counts = Differences()
    for step in paired_steps(_make(case, precision), _params(PRECISIONS[precision][0])):
        _compare(*step, counts)
    assert counts.codes > 0 and counts.flipped <= MAX_CODE_FLIP_FRACTION * counts.codes, (
        f"{counts.flipped} of {counts.codes} codes differ"
    )
    print(f"{case} {precision}: {counts.flipped} of {counts.codes} codes differ by one, "
          f"{counts.absmax_exact} of {counts.blocks} absmax equal, "
          f"fp32 parameter gap {counts.parameter_gap:.2g}")  # fmt: skip


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_blocks_of_one_element_match_the_loop_backend(precision: str) -> None:
    """A tensor's last block may hold one element: its absmax is that element's |m|, ulps
    apart between backends where m nearly cancels (up to ~100 measured), within the
    absolute part of the bound. Decoupled decay: L2's g + λθ, which may cancel too, is the
    README's case of steps that rounding sets."""
    generator = torch.Generator().manual_seed(3)
    params = [torch.randn(shape, generator=generator) for shape in ((4097,), (17, 257))]
    counts = Differences()
    make = _make("AdamW-fully-decoupled", precision)
    for step in paired_steps(make, [p.to(PRECISIONS[precision][0]) for p in params], steps=8):
        _compare(*step, counts)
    assert counts.blocks > 0 and counts.flipped <= MAX_CODE_FLIP_FRACTION * counts.codes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("cls", "full_moments"),
    [(core.AdamW, frozenset()), (core.ADOPT, frozenset({"exp_avg_sq"}))],
    ids=["AdamW", "ADOPT"],
)
def test_the_fused_kernel_runs_the_quantized_parameters(
    monkeypatch: pytest.MonkeyPatch,
    cls: type[core.AdamFamilyOptimizer],
    full_moments: frozenset[str],
    dtype: torch.dtype,
) -> None:
    """Quantized parameters go to the Q8 kernel, by fused=True and by default (fused=None),
    never to the loop backend; full-precision ones in the same group to the usual kernels.
    ADOPT's kernel keeps v in full precision, its first call (INIT) included."""
    from core.backends import loop

    calls: list[tuple[int, frozenset[str]]] = []
    loop_calls: list[int] = []
    call = cpu_kernel.PreparedCall.call

    def recorded(self: cpu_kernel.PreparedCall, config: Any, *args: Any) -> None:
        if config.quantized:  # every kernel call, memoized steps' too, goes through call
            calls.append((self.count, config.full_moments))
        call(self, config, *args)

    monkeypatch.setattr(cpu_kernel.PreparedCall, "call", recorded)
    for name in ("adam_step", "adopt_step"):
        step = getattr(loop, name)
        monkeypatch.setattr(loop, name, lambda *a, step=step: (loop_calls.append(1), step(*a))[1])
    for flags in ({"fused": True}, {}):
        params = [p.requires_grad_() for p in _params(dtype)]
        optimizer = cls(params, lr=LR, state_precision="8bit", **flags)
        for _ in range(2):
            for p in params:
                p.grad = torch.ones_like(p)
            optimizer.step()
    assert calls == [(4, full_moments)] * 4 and not loop_calls


def _assert_moment_close(fused: Any, loop: Any, signed: bool, name: str) -> None:
    """Full-precision moments as the fused tests hold them; 8-bit ones within one code."""
    if isinstance(loop, Tensor):
        assert_state_close(fused, loop, name)
        return
    gaps = code_positions(fused.codes, signed) - code_positions(loop.codes, signed)
    assert int(gaps.abs().max()) <= 1, name


@pytest.mark.parametrize("full_m", [False, True], ids=["8bit-m", "full-m"])
def test_mixed_moment_patterns_take_one_kernel_each(full_m: bool) -> None:
    """Parameters of one group whose moments are stored differently (8-bit v for one, full
    for another; m 8-bit or full for all) are bucketed by pattern, each bucket one kernel,
    as the loop steps them. With m full, only a later list tells the patterns apart."""
    generator = torch.Generator().manual_seed(8)
    params = [torch.randn(s, generator=generator) for s in SHAPES[:3]]
    grads = [0.1 * torch.randn(p.shape, generator=generator) for p in params]
    m = [
        0.01 * g if full_m else QuantizedMoment(*quantized_state(p, 0.01 * g, True), True)
        for p, g in zip(params, grads, strict=True)
    ]
    v = [
        QuantizedMoment(*quantized_state(params[0], grads[0] ** 2, False), False),
        grads[1] ** 2,
        QuantizedMoment(*quantized_state(params[2], grads[2] ** 2, False), False),
    ]
    results = []
    for fused in (False, True):
        ps = [p.clone() for p in params]
        exp_avgs, exp_avg_sqs, steps = _clone_lists((m, v, [torch.tensor(1.0) for _ in ps]))
        core.adopt(
            ps, grads, exp_avgs, exp_avg_sqs, steps, lr=LR, beta1=0.9, beta2=0.9999, eps=1e-6,
            foreach=False, fused=fused,
        )  # fmt: skip
        results.append((ps, exp_avgs, exp_avg_sqs))
    (loop_ps, loop_m, loop_v), (fused_ps, fused_m, fused_v) = results
    for i in range(3):
        torch.testing.assert_close(fused_ps[i], loop_ps[i], atol=FP32_PARAMETER_GAP, rtol=0)
        _assert_moment_close(fused_m[i], loop_m[i], True, f"exp_avg[{i}]")
        _assert_moment_close(fused_v[i], loop_v[i], False, f"exp_avg_sq[{i}]")


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_8bit_v_beside_full_m_rounds_stochastically_as_the_loop_backend(amsgrad: bool) -> None:
    """A functional call may hand 8-bit v beside full-precision m (one of the patterns
    above). The kernel's key for the 8-bit moments' random bits then comes from v, so v
    rounds stochastically as the loop rounds it: with EXACT_BETAS and dyadic gradients
    every new v is exact in fp32, and its codes and scales must be the loop's bit for bit
    over several steps. Keyed from m alone (a tensor here), v was rounded to nearest:
    4019 of 8780 codes apart after four steps, parameters 4e-4 off."""
    generator = torch.Generator().manual_seed(8)
    shapes = [(4100,), (9, 520)]
    values = [torch.randn(s, generator=generator) for s in shapes]
    grads = [
        [torch.randint(-199, 200, s, generator=generator) / 1024 for s in shapes] for _ in range(4)
    ]
    results = []
    for fused in (False, True):
        params = [v.clone() for v in values]
        exp_avgs = [torch.zeros(s) for s in shapes]
        exp_avg_sqs = [
            QuantizedMoment(*quantized_state(p, None, False), False, stream=7 + i)
            for i, p in enumerate(params)
        ]
        maxima = [QuantizedMoment(*quantized_state(p, None, False), False) for p in params]
        steps = [torch.tensor(0.0) for _ in params]
        for step_grads in grads:
            core.adam(
                params, step_grads, exp_avgs, exp_avg_sqs, maxima, steps, lr=LR,
                beta1=EXACT_BETAS[0], beta2=EXACT_BETAS[1], eps=1e-8, amsgrad=amsgrad,
                foreach=False, fused=fused,
            )  # fmt: skip
        results.append((params, exp_avgs, exp_avg_sqs, maxima))
    (loop_ps, loop_m, loop_v, loop_max), (fused_ps, fused_m, fused_v, fused_max) = results
    for i in range(len(shapes)):
        torch.testing.assert_close(fused_ps[i], loop_ps[i], atol=FP32_PARAMETER_GAP, rtol=0)
        assert torch.equal(fused_m[i], loop_m[i]), f"exp_avg[{i}]"
        for name, ours, theirs in (("exp_avg_sq", fused_v, loop_v), ("max", fused_max, loop_max)):
            assert torch.equal(ours[i].codes, theirs[i].codes), f"{name}[{i}] codes"
            assert torch.equal(ours[i].absmax, theirs[i].absmax), f"{name}[{i}] scales"


@pytest.mark.parametrize("case", ["AdamW-amsgrad", "ADOPT-clip-decoupled"])
def test_lr_zero_updates_only_the_moments(case: str) -> None:
    counts = Differences()
    params = _params(torch.bfloat16)
    for loop_params, loop, twin_params, twin in paired_steps(
        _make(case, "bf16-kahan", lr=0.0), params, steps=3
    ):
        _compare(loop_params, loop, twin_params, twin, counts)
        for p, original in zip(twin_params, params, strict=True):
            assert torch.equal(p.detach(), original)


def test_twenty_steps_alone_stay_with_the_loop_backend() -> None:
    """Without reloading, rounding differences compound only through the rare code that
    differs by one step: parameters stay within a small share of one step (lr)."""
    make = _make("AdamW-amsgrad", "fp32")
    generator = torch.Generator().manual_seed(2)
    runs = []
    for flags in ({"foreach": False, "fused": False}, {"fused": True}):
        params = [p.requires_grad_() for p in _params(torch.float32)]
        optimizer = make(params, **flags)
        generator.manual_seed(2)
        for _ in range(STEPS):
            for p in params:
                p.grad = 0.1 * torch.randn(p.shape, generator=generator)
            optimizer.step()
        runs.append((params, optimizer))
    (loop_params, loop), (params, fused) = runs
    flipped = total = 0
    for a, b in zip(params, loop_params, strict=True):
        torch.testing.assert_close(a, b, atol=0.1 * LR, rtol=0)
        for key in MOMENTS:
            codes = moment_keys(key)[0]
            if codes in fused.state[a]:
                gap = fused.state[a][codes].int() - loop.state[b][codes].int()
                flipped += int((gap != 0).sum())
                total += gap.numel()
    assert flipped <= 0.01 * total, (flipped, total)


def _functional_lists(params: list[Tensor]) -> tuple[list, list, list, list]:
    """(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps) as QuantizedMoments over fresh state,
    seeded with random moments so the first step decodes something."""
    generator = torch.Generator().manual_seed(3)
    lists: tuple[list, list, list, list] = ([], [], [], [])
    for p in params:
        m = 0.01 * torch.randn(p.shape, generator=generator)
        v = 1e-4 * torch.rand(p.shape, generator=generator)
        lists[0].append(QuantizedMoment(*quantized_state(p, m, True), True))
        lists[1].append(QuantizedMoment(*quantized_state(p, v, False), False))
        lists[2].append(QuantizedMoment(*quantized_state(p, v, False), False))
        lists[3].append(torch.tensor(0.0))
    return lists


def _clone_lists(lists: tuple[list, ...]) -> tuple[list, ...]:
    return tuple(
        [
            QuantizedMoment(x.codes.clone(), x.absmax.clone(), x.signed)
            if isinstance(x, QuantizedMoment)
            else x.clone()
            for x in values
        ]
        for values in lists
    )


@pytest.mark.parametrize("algorithm", ["adam", "adopt"])
def test_functional_form_takes_quantized_moments(algorithm: str) -> None:
    params = [torch.randn(s, generator=torch.Generator().manual_seed(4)) for s in SHAPES[:4]]
    grads = [0.1 * torch.randn_like(p) for p in params]
    state = _functional_lists(params)
    results = []
    for fused in (False, True):
        ps = [p.clone() for p in params]
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = _clone_lists(state)
        for _ in range(3):
            if algorithm == "adam":
                core.adam(
                    ps, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr=LR, beta1=0.9,
                    beta2=0.99, eps=1e-8, amsgrad=True, weight_decay=0.1, foreach=False,
                    fused=fused,
                )  # fmt: skip
            else:
                core.adopt(
                    ps, grads, exp_avgs, exp_avg_sqs, steps, lr=LR, beta1=0.9, beta2=0.9999,
                    eps=1e-6, foreach=False, fused=fused,
                )  # fmt: skip
        results.append((ps, exp_avgs, exp_avg_sqs))
    (loop_ps, *loop_moments), (fused_ps, *fused_moments) = results
    for a, b in zip(fused_ps, loop_ps, strict=True):
        # three steps without reloading: a v code one step apart (rounding at a midpoint,
        # as in test_twenty_steps_alone_stay_with_the_loop_backend) moves one element by a
        # share of lr (measured 1.1e-4 = 0.011 lr under a multi-threaded suite)
        torch.testing.assert_close(a, b, atol=0.1 * LR, rtol=0)
    for ours, theirs in zip(fused_moments, loop_moments, strict=True):
        for x, y in zip(ours, theirs, strict=True):
            assert (
                int(
                    (code_positions(x.codes, x.signed) - code_positions(y.codes, y.signed))
                    .abs()
                    .max()
                )
                <= 1
            )
            torch.testing.assert_close(x.absmax, y.absmax, rtol=1e-5, atol=0)


# -- the encoding on its own -------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_kernel_encoding_equals_the_reference_on_every_midpoint(
    signed: bool, kernel_build: str
) -> None:
    """Every midpoint (ties round up) and both its float neighbours, zeros, tiny and
    subnormal values, at absmax 1 and scaled; blocks with NaN or infinity, and blocks of
    subnormals. Every build: AVX-512's and AVX2's code sixteen values at a time in
    floating point (AVX2 in two vectors of eight), the portable one each value in
    integers."""
    points = torch.cat([midpoints(signed), -midpoints(signed)])
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    values = torch.cat(
        [
            points,
            torch.nextafter(points, up),
            torch.nextafter(points, down),
            torch.rand(20000, generator=torch.Generator().manual_seed(5)) * 2 - 1,
            torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-40, -1e-40, 1.0, -1.0]),
        ]
    )
    if not signed:
        values = values.abs()
    rows = []
    for scale in (1.0, 0.37, 1e-3):
        padded = torch.nn.functional.pad(values, (0, -values.numel() % 255)).reshape(-1, 255)
        # a 1 first in each block makes its absmax the scale itself
        rows.append(torch.cat([torch.ones(padded.shape[0], 1), padded], 1).flatten() * scale)
    rows.append(torch.tensor([1.0, float("nan")] * 200))
    rows.append(torch.tensor([float("-inf"), 0.5] * 200))
    rows.append(torch.zeros(300))
    rows.append(torch.full((300,), -1e-39))
    # beside a scale of 1e30, |x| · (1 / absmax) underflows fp32 (v keeps its smallest code)
    rows.append(torch.tensor([1e30, 1e-16, -1e-16, 3e-17, 1e-20, 0.0, 5e-15, -1e-45] * 50))
    if not signed:
        rows[-1] = rows[-1].abs()
    for row in rows:
        codes, absmax = cpu_kernel.quantize_as_kernels_do(row.contiguous(), signed)
        expected_codes, expected_absmax = quantize(row, signed)
        assert torch.equal(codes, expected_codes), int((codes != expected_codes).sum())
        torch.testing.assert_close(absmax, expected_absmax, rtol=0, atol=0, equal_nan=True)


def _ties_below_the_smallest_value(key: int) -> Tensor:
    """Blocks of m (absmax 1) whose elements but the first each sit exactly on their draw's
    threshold below the map's smallest value s, a = u·s (u: the element's own uniform
    from its 16 bits under key), where u < a/s is false: 0, not the smallest code. Random
    values land there almost never, and a kernel comparing with <= rounded them all up."""
    count = 4 * 256
    uniform = (moment_bits(rounding_bits(key, count, torch.device("cpu")), True) >> 16).double()
    smallest = float(map_values(True, torch.device("cpu"))[code_map(True).smallest_code])
    row = (uniform / 65536.0 * smallest).float()
    row[::256] = 1.0
    return row


@pytest.mark.parametrize("key", [0, 0x9E3779B1, 2**32 - 1])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_kernel_stochastic_encoding_equals_the_reference(
    signed: bool, key: int, kernel_build: str
) -> None:
    """m's and v's stochastic rounding (core.quantization, step 4), every build: each
    midpoint and its float neighbours, random values (for m below its smallest value too,
    where it rounds to that value or 0 at random), zeros, tiny and subnormal values, the
    block's top (1, which no draw may round past), scaled; NaN and infinite blocks. The
    kernels draw element i's bits from its offset in the row, as the reference does."""
    points = midpoints(signed)
    generator = torch.Generator().manual_seed(6)
    values = torch.cat(
        [
            points,
            torch.nextafter(points, torch.tensor(2.0)),
            torch.nextafter(points, torch.tensor(0.0)),
            torch.rand(20000, generator=generator),
            torch.rand(2000, generator=generator) * 2.0**-11,
            torch.tensor([0.0, 1e-30, 1e-40, 1.0, 1.0 - 2.0**-24]),
        ]
    )
    if signed:
        values = torch.where(torch.rand(values.shape, generator=generator) < 0.5, -values, values)
    padded = torch.nn.functional.pad(values, (0, -values.numel() % 255)).reshape(-1, 255)
    rows = [
        torch.cat([torch.ones(padded.shape[0], 1), padded], 1).flatten() * scale
        for scale in (1.0, 0.37, 3e-7)
    ]
    rows.append(values[:1000])  # a partial last block, and blocks whose top is not 1
    rows.append(torch.tensor([1.0, float("nan")] * 200))
    rows.append(torch.tensor([float("inf"), 0.5] * 200))
    rows.append(torch.tensor([1e30, 1e-16, 3e-17, 1e-20, 0.0, 5e-15, 1e-45] * 50))  # underflow
    if signed:
        rows.append(_ties_below_the_smallest_value(key))
    for row in rows:
        codes, absmax = cpu_kernel.quantize_as_kernels_do(row.contiguous(), signed, key)
        expected_codes, expected_absmax = quantize(row, signed, key)
        assert torch.equal(codes, expected_codes), int((codes != expected_codes).sum())
        torch.testing.assert_close(absmax, expected_absmax, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_kernel_decoding_equals_the_reference_for_every_code(
    signed: bool, kernel_build: str
) -> None:
    """Every code, in full blocks and in a row's last partial block (the lanes the native
    build decodes in software), at scales from subnormal-producing to huge, NaN and 0."""
    generator = torch.Generator().manual_seed(3)
    codes = torch.cat([torch.arange(256), torch.randperm(256, generator=generator)])
    # 3 blocks, the last of 77: its last 13 lanes (AVX-512's software lanes; AVX2, eight
    # codes per vector, leaves the last 5) hold the smallest codes of both maps, the
    # unused ones and m's signed ones
    ends = torch.tensor([0, 1, 2, 3, 4, 127, 128, 129, 130, 131, 200, 254, 255])
    codes = torch.cat([codes, torch.arange(64), ends]).to(torch.uint8)
    for scales in ([1.0, 0.37, 3e-3], [2.0**-126, 1e30, 3.0e38], [float("nan"), 0.0, 5.0]):
        absmax = torch.tensor([scales])
        values = cpu_kernel.dequantize_as_kernels_do(codes, absmax, signed)
        expected = dequantize(codes, absmax, signed)
        same = values.view(torch.int32) == expected.view(torch.int32)
        same |= values.isnan() & expected.isnan()
        assert bool(same.all()), f"{kernel_build} build, scales {scales}: {codes[~same]}"


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("call", "name", "found"),
    [
        (lambda: cpu_kernel.quantize_as_kernels_do(torch.zeros(300, device="meta"), True),
         "values", "a torch.float32 tensor on meta of shape (300,)"),
        (lambda: cpu_kernel.quantize_as_kernels_do(torch.zeros(300, 2)[:, 0], False),
         "values", "shape (300,)"),
        (lambda: cpu_kernel.quantize_as_kernels_do([0.5] * 300, True),  # type: ignore[arg-type]
         "values", "a list"),
        (lambda: cpu_kernel.dequantize_as_kernels_do(
            torch.zeros(300, dtype=torch.int16), torch.ones(1, 2), True),
         "codes", "a torch.int16 tensor"),
        (lambda: cpu_kernel.dequantize_as_kernels_do(
            torch.zeros(300, dtype=torch.uint8), torch.ones(1, 1), False),
         "absmax", "shape (1, 1)"),
        (lambda: cpu_kernel.dequantize_as_kernels_do(
            torch.zeros(300, dtype=torch.uint8), torch.ones(1, 4)[:, ::2], False),
         "absmax", "shape (1, 2)"),
    ],
    ids=["meta-values", "strided-values", "list", "int16-codes", "short-absmax",
         "strided-absmax"],
)  # fmt: skip
def test_coding_hooks_refuse_what_c_cannot_read_by_name(
    call: Callable[[], object], name: str, found: str
) -> None:
    """The test hooks hand raw addresses to C as the step does: a tensor elsewhere than
    CPU memory (meta's address is 0), of another dtype, shape or layout, or no tensor at
    all is refused by name first."""
    with pytest.raises(ValueError, match=rf"Invalid {name}: .*{re.escape(found)}"):
        call()


def _kernel_inputs(**replace: Any) -> dict[str, Any]:
    """Valid arguments of run_quantized for two parameters, with some replaced."""
    params = [torch.randn(20, 300), torch.randn(5000)]
    arguments: dict[str, Any] = {
        "params": params,
        "grads": [torch.randn_like(p) for p in params],
        "exp_avgs": [QuantizedMoment(*quantized_state(p, None, True), True) for p in params],
        "exp_avg_sqs": [QuantizedMoment(*quantized_state(p, None, False), False) for p in params],
        "max_exp_avg_sqs": None,
        "kahan_comps": None,
    }
    arguments.update(replace)
    return arguments


def _run(arguments: dict[str, Any]) -> None:
    switches = tuple((name, name in ("UPDATE", "ADAPTIVE")) for name in cpu_kernel.SWITCHES)
    config = cpu_kernel.KernelConfig("adam", torch.float32, switches, quantized=True)
    coefficients = [0.1, 0.99, 0.01, 1e-8, 0.0, 1.0, LR, 0.0, 1.0, 0.0]
    cpu_kernel.run_quantized(config, **arguments, coefficients=coefficients)


def _first_v(codes: Tensor, absmax: Tensor) -> Callable[[dict[str, Any]], None]:
    """Replace the first parameter's exp_avg_sq by one of these codes and scales."""

    def replace(arguments: dict[str, Any]) -> None:
        arguments["exp_avg_sqs"][0] = QuantizedMoment(codes, absmax, False)

    return replace


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda arguments: arguments.__setitem__(key, value)


BYTES = torch.uint8


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("replace", "message"),
    [
        (
            _first_v(torch.zeros(20, 300, dtype=torch.int8), torch.zeros(20, 2)),
            r"exp_avg_sq\[0\] .*codes of torch.int8",
        ),
        (
            _first_v(torch.zeros(20, 300, dtype=BYTES), torch.zeros(20, 3)),
            r"exp_avg_sq\[0\] .*absmax of 60 elements where the parameter needs 40",
        ),
        (
            _first_v(torch.zeros(20, 300, dtype=BYTES), torch.zeros(20, 2).double()),
            r"exp_avg_sq\[0\] .*absmax of torch.float64",
        ),
        (
            _first_v(torch.zeros(300, 20, dtype=BYTES).t(), torch.zeros(20, 2)),
            r"exp_avg_sq\[0\] .*codes with strides \(1, 20\) \(not contiguous\)",
        ),
        (
            _first_v(torch.zeros(20, 300, dtype=BYTES), torch.zeros(2, 20).t()),
            r"exp_avg_sq\[0\] .*absmax with strides \(1, 20\) \(not contiguous\)",
        ),
        (
            lambda arguments: arguments["exp_avg_sqs"].pop(),
            r"exp_avg_sqs for a quantized fused kernel: 1 moments for 2 parameters",
        ),
        (
            lambda arguments: arguments.__setitem__("exp_avgs", arguments["exp_avg_sqs"]),
            r"exp_avg\[0\] .*a moment of the unsigned map",
        ),
        (
            _set("exp_avgs", [torch.zeros(20, 300), torch.zeros(5000)]),
            r"exp_avg\[0\] .*: a Tensor",
        ),
        (
            _set("params", [torch.randn(300, 20).t(), torch.randn(5000)]),
            r"param\[0\] .*: shape \(20, 300\) with strides \(1, 20\)",
        ),
        (
            _set("grads", [torch.randn(20, 300), torch.randn(5000).double()]),
            r"grad\[1\] .*float64",
        ),
        (_set("state_keys", [7]), r"Invalid state_keys: 1 values for 2 tensors"),
        *[
            (
                _set("state_keys", [7, key]),
                rf"Invalid state_keys: {key!r} for tensor 1\. Allowed: each an int in \[0, 2\^32\)",
            )
            for key in (1 << 32, 2.0, -1)
        ],
        (_set("state_keys", [7, 8, 9]), r"Invalid state_keys: 3 values for 2 tensors"),
    ],
    ids=[
        "int8-codes",
        "absmax-size",
        "float64-absmax",
        "non-contiguous-codes",
        "non-contiguous-absmax",
        "too-few-moments",
        "wrong-map",
        "full-precision-moment",
        "non-contiguous-param",
        "grad-dtype",
        "state-keys-count",
        "state-key-too-large",
        "state-key-float",
        "state-key-negative",
        "state-keys-too-many",
    ],
)
def test_bad_kernel_inputs_are_refused_by_name(
    replace: Callable[[dict[str, Any]], None], message: str
) -> None:
    arguments = _kernel_inputs()
    replace(arguments)
    with pytest.raises(ValueError, match=message):
        _run(arguments)


def _copy(moment: QuantizedMoment) -> QuantizedMoment:
    return dataclasses.replace(moment, codes=moment.codes.clone(), absmax=moment.absmax.clone())


def _quantized_config(
    dtype: torch.dtype = torch.float32, *switches: str, **fields: Any
) -> cpu_kernel.KernelConfig:
    on = ("UPDATE", "ADAPTIVE", *switches)
    flags = tuple((name, name in on) for name in cpu_kernel.SWITCHES)
    return cpu_kernel.KernelConfig("adam", dtype, flags, quantized=True, **fields)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            _quantized_config(torch.float64),
            r"Invalid config for 8-bit moments: .* dtype torch\.float64",
        ),
        (
            _quantized_config(full_moments=frozenset({"exp_avg_typo"})),
            r"Invalid config for 8-bit moments: .*full_moments \['exp_avg_typo'\]",
        ),
    ],
    ids=["float64", "unknown-moment"],
)
def test_a_quantized_configuration_no_kernel_builds_is_refused_by_name(
    config: cpu_kernel.KernelConfig, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        cpu_kernel.run_quantized(config, **_kernel_inputs(), coefficients=[0.0] * 10)


@pytest.mark.bad_input
def test_a_bad_kahan_buffer_beside_8bit_moments_is_refused_by_name() -> None:
    """bf16 parameters with Kahan and 8-bit m, v: the buffers are checked as on the
    full-precision path (one of a single element was written past its end: a crash)."""
    arguments = _kernel_inputs()
    arguments["params"] = [p.bfloat16() for p in arguments["params"]]
    arguments["grads"] = [g.bfloat16() for g in arguments["grads"]]
    arguments["kahan_comps"] = [torch.zeros(1, dtype=torch.bfloat16), torch.zeros(5000).bfloat16()]
    before = [p.clone() for p in arguments["params"]]
    with pytest.raises(ValueError, match=r"kahan_comp\[0\].* 1 elements beside a parameter"):
        cpu_kernel.run_quantized(
            _quantized_config(torch.bfloat16, "KAHAN"),
            **arguments,
            coefficients=[0.1, 0.99, 0.01, 1e-8, 0.0, 1.0, LR, 0.0, 1.0, 0.0],
        )
    assert all(torch.equal(a, b) for a, b in zip(arguments["params"], before, strict=True))


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "config",
    [
        _quantized_config(full_moments=frozenset({"exp_avg_sq"})),
        dataclasses.replace(_quantized_config(), algorithm="adopt"),
        dataclasses.replace(_quantized_config(), quantized=False),
        _quantized_config(torch.float32, "KAHAN"),
    ],
    ids=["full-v", "adopt", "full-precision", "kahan"],
)
def test_a_prepared_8bit_call_refuses_another_kind_of_kernel_after_a_good_call(
    config: cpu_kernel.KernelConfig,
) -> None:
    """A step memo calls again what it prepared, looking its kernel up per configuration:
    after one good call, a configuration that reads v as full precision (its codes as
    floats: a crash), another algorithm, full-precision moments or Kahan buffers is
    checked and refused, not run by the prepared kernel; one differing only in DECAY runs
    as a fresh call does."""
    arguments = _kernel_inputs()
    coefficients = [0.1, 0.99, 0.01, 1e-8, 0.0, 0.99, LR, 0.0, 1.0, 0.0]
    prepared = cpu_kernel.prepare(_quantized_config(), **arguments)
    prepared.call(_quantized_config(), arguments["grads"], coefficients)
    params = [p.clone() for p in arguments["params"]]
    with pytest.raises(ValueError, match=r"Invalid config .* for a call prepared with"):
        prepared.call(config, arguments["grads"], coefficients)
    assert all(torch.equal(a, b) for a, b in zip(arguments["params"], params, strict=True))
    fresh = {
        **arguments,
        "params": [p.clone() for p in params],
        "exp_avgs": [_copy(m) for m in arguments["exp_avgs"]],
        "exp_avg_sqs": [_copy(v) for v in arguments["exp_avg_sqs"]],
    }
    decayed = _quantized_config(torch.float32, "DECAY")
    prepared.call(decayed, arguments["grads"], coefficients)
    cpu_kernel.run_quantized(decayed, **fresh, coefficients=coefficients)
    for got, want in zip(arguments["params"], fresh["params"], strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(arguments["params"][0], params[0])


@pytest.mark.bad_input
def test_more_8bit_moments_than_parameters_are_refused_by_name() -> None:
    moment = QuantizedMoment(torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 1), True)
    with pytest.raises(ValueError, match="2 moments for 1 parameters"):
        check_quantized_addressable(
            [torch.zeros(4, 64)], [[moment, moment], None, None], torch.device("cpu")
        )


def _adopt_inputs(**replace: Any) -> dict[str, Any]:
    """Valid arguments of run_quantized for ADOPT's two parameters (8-bit m, full v), with
    some replaced."""
    arguments = _kernel_inputs()
    arguments["exp_avg_sqs"] = [torch.rand_like(p) for p in arguments["params"]]
    arguments.update(replace)
    return arguments


def _run_adopt(arguments: dict[str, Any]) -> None:
    switches = tuple((name, name == "UPDATE") for name in cpu_kernel.SWITCHES)
    config = cpu_kernel.KernelConfig(
        "adopt", torch.float32, switches, quantized=True, full_moments=frozenset({"exp_avg_sq"})
    )
    coefficients = [0.1, 0.9999, 1e-4, 1e-6, 0.0, 1.0, LR, 0.0, 1.0, 0.0]
    cpu_kernel.run_quantized(config, **arguments, coefficients=coefficients)


def _replace_v(index: int, value: Any) -> Callable[[dict[str, Any]], None]:
    def replace(arguments: dict[str, Any]) -> None:
        arguments["exp_avg_sqs"][index] = value

    return replace


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("replace", "message"),
    [
        (
            _replace_v(1, torch.rand(5000, dtype=torch.float64)),
            r"Invalid exp_avg_sq\[1\] for a fused kernel: a Tensor of torch.float64 on cpu",
        ),
        (
            _replace_v(0, torch.rand(20, 300, dtype=torch.bfloat16)),
            r"Invalid exp_avg_sq\[0\] for a fused kernel: a Tensor of torch.bfloat16 on cpu",
        ),
        (
            _replace_v(1, torch.rand(4999)),
            r"Invalid exp_avg_sq\[1\] .*a tensor of 4999 elements beside a parameter of 5000",
        ),
        (
            _replace_v(0, torch.rand(300, 20).t()),
            r"Invalid exp_avg_sq\[0\] .*strides \(1, 20\) beside a parameter with strides",
        ),
        (
            _replace_v(
                0, QuantizedMoment(*quantized_state(torch.zeros(20, 300), None, False), False)
            ),
            r"Invalid exp_avg_sq\[0\] for a fused kernel: a QuantizedMoment",
        ),
        (
            _set("exp_avgs", [torch.zeros(20, 300), torch.zeros(5000)]),
            r"Invalid exp_avg\[0\] for a quantized fused kernel: a Tensor",
        ),
    ],
    ids=["float64-v", "bf16-v", "v-size", "v-strides", "8bit-v", "full-m"],
)
def test_bad_mixed_kernel_inputs_are_refused_by_name_before_any_write(
    replace: Callable[[dict[str, Any]], None], message: str
) -> None:
    """ADOPT's kernel (8-bit m, full v): a full v of the wrong dtype, size or layout beside
    the 8-bit m is refused by check_addressable's rules, an 8-bit one where the kernel
    takes a full one (and the reverse) by name, before anything is written."""
    arguments = _adopt_inputs()
    replace(arguments)
    before = copy.deepcopy(arguments)
    with pytest.raises(ValueError, match=message):
        _run_adopt(arguments)
    for key in ("params", "exp_avgs", "exp_avg_sqs"):
        for ours, theirs in zip(arguments[key], before[key], strict=True):
            if isinstance(ours, QuantizedMoment):
                assert torch.equal(ours.codes, theirs.codes)
                assert torch.equal(ours.absmax, theirs.absmax)
            else:
                assert torch.equal(ours, theirs)


@pytest.mark.bad_input
def test_state_keys_for_a_kernel_without_8bit_moments_are_refused() -> None:
    """A full-precision kernel has no m or v to round stochastically: keys for them are
    refused by name rather than ignored (ADOPT's, with only m 8-bit, takes them)."""
    switches = tuple((name, name == "UPDATE") for name in cpu_kernel.SWITCHES)
    params = [torch.zeros(300)]
    lists = [params, [torch.ones(300)], [torch.zeros(300)], [torch.zeros(300)], None, None]
    with pytest.raises(ValueError, match=r"Invalid state_keys for a kernel without 8-bit m or v"):
        cpu_kernel.run(
            cpu_kernel.KernelConfig("adam", torch.float32, switches),
            *lists,  # type: ignore[arg-type]
            [0.1, 0.99, 0.01, 1e-8, 0.0, 1.0, LR, 0.0, 1.0, 0.0],
            state_keys=[1],
        )
    assert params[0].eq(0).all()
    arguments = _adopt_inputs(state_keys=[1, 2])
    _run_adopt(arguments)
    assert all(bool(p.isfinite().all()) for p in arguments["params"])


@pytest.mark.bad_input
@pytest.mark.parametrize("key", [-1, 1 << 32, 0.5, "7"])
def test_the_stochastic_coding_hook_refuses_a_key_that_is_no_uint32(key: object) -> None:
    with pytest.raises(ValueError, match=r"Invalid key: .*Allowed: None or an int in \[0, 2\^32\)"):
        cpu_kernel.quantize_as_kernels_do(torch.ones(300), False, key)  # type: ignore[arg-type]


def test_the_unreplaced_mixed_kernel_inputs_are_accepted() -> None:
    """_adopt_inputs as they are run (so the refusals above refuse only what they replace)."""
    arguments = _adopt_inputs()
    _run_adopt(arguments)
    assert all(bool(p.isfinite().all()) for p in arguments["params"])


@pytest.mark.bad_input
def test_a_state_of_the_wrong_size_is_refused_by_the_optimizer() -> None:
    params = [torch.randn(20, 300).requires_grad_()]
    optimizer = core.AdamW(params, lr=LR, state_precision="8bit", fused=True)
    params[0].grad = torch.ones_like(params[0])
    optimizer.step()
    optimizer.state[params[0]]["exp_avg_absmax"] = torch.zeros(20, 1)
    # The optimizer's own check of state against its parameter's shape, before the kernel's.
    with pytest.raises(
        ValueError,
        match=r"Invalid state of params\[0\] in param group 0: exp_avg_absmax of shape "
        r"\(20, 1\) beside a parameter of shape \(20, 300\)\. Allowed: shape \(20, 2\)",
    ):
        optimizer.step()


def test_non_contiguous_parameters_take_the_loop_backend() -> None:
    """What the kernel cannot address (a transposed parameter) steps as the loop backend
    does, exactly, beside one it can."""
    generator = torch.Generator().manual_seed(6)
    base = [torch.randn(300, 20, generator=generator).t(), torch.randn(5000)]
    runs = []
    for flags in ({"foreach": False, "fused": False}, {"fused": True}):
        params = [p.detach().clone().requires_grad_() for p in base]
        params[0] = base[0].t().clone().t().requires_grad_()  # transposed, as in base
        optimizer = core.AdamW(params, lr=LR, state_precision="8bit", **flags)
        for p in params:
            p.grad = torch.ones_like(p)
        for _ in range(3):
            optimizer.step()
        runs.append(params)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "key", ["exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"]
)
@pytest.mark.parametrize("flags", [{}, {"fused": True}], ids=["default", "fused"])
def test_8bit_state_set_in_another_layout_steps_as_the_loop_backend(key: str, flags: dict) -> None:
    """Codes or scales put into the state by hand in another memory layout (here the same
    values transposed in memory, as a strided view) pass the step's state checks, which
    ask for their shape and dtype: the parameter then steps in the loop backend, bit for
    bit as fused=False does from the same state, since the kernels run blocks along the
    memory of contiguous codes and scales. Sent to the kernel because the rest of its list
    fit, such a moment would have check_quantized_addressable refuse the whole step. (The
    Triton backend refuses such state by name, before any update.)"""
    generator = torch.Generator().manual_seed(0)
    value = torch.randn(16, 1024, generator=generator)
    twins = []
    for backend_flags in ({"foreach": False, "fused": False}, flags):
        param = value.clone().requires_grad_()
        twins.append((param, core.AdamW([param], lr=LR, state_precision="8bit", **backend_flags)))
    (loop_param, loop), (param, optimizer) = twins
    loop_param.grad = torch.randn(16, 1024, generator=generator)
    loop.step()
    with torch.no_grad():
        param.copy_(loop_param)
    optimizer.load_state_dict(loop.state_dict())  # the same state, contiguous again
    for p, twin in twins:
        twin.state[p][key] = twin.state[p][key].t().contiguous().t()
    for _ in range(3):
        grad = torch.randn(16, 1024, generator=generator)
        for p, twin in twins:
            p.grad = grad.clone()
            twin.step()
    assert not optimizer.state[param][key].is_contiguous()  # as set: stepped in place
    assert torch.equal(param, loop_param)


@pytest.mark.skipif(
    not hasattr(torch.Tensor, "grad_dtype"), reason="gradients of another dtype need grad_dtype"
)
@pytest.mark.parametrize(
    "flags", [{}, {"fused": True}, {"fused": True}], ids=["default", "fused", "triton"]
)
def test_a_gradient_of_another_dtype_than_its_8bit_parameter_runs_eagerly(flags: dict) -> None:
    """bf16 gradients of fp32 weights (grad_dtype=None) with 8-bit state: the parameter
    whose gradient has its dtype takes the kernel, the other the eager path, as with
    full-precision state. The fused CPU backend (the default on CPU) refused the step
    naming the gradient; the Triton backend, before it, refused it too."""
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(8, 1024, generator=generator) for _ in range(2)]
    twins = []
    for backend_flags in ({"foreach": False, "fused": False}, flags):
        params = [v.clone().requires_grad_() for v in values]
        params[1].grad_dtype = None  # type: ignore[attr-defined]
        twins.append((params, core.AdamW(params, lr=LR, state_precision="8bit", **backend_flags)))
    for _ in range(3):
        grads = [torch.randn(8, 1024, generator=generator) for _ in values]
        for params, optimizer in twins:
            params[0].grad = grads[0].clone()
            params[1].grad = grads[1].to(torch.bfloat16)
            optimizer.step()
    (loop_params, _), (params, _) = twins
    for i, (p, expected) in enumerate(zip(params, loop_params, strict=True)):
        assert_within_one_ulp(p.detach(), expected.detach(), f"parameter {i}")
