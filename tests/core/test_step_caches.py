"""What a step may reuse from the last one, and what must make it look again.

A step keeps, from one call to the next: the validated hyperparameters of each group
(core/optimizer.py), the address array of the step counters (cpu_kernel.py) and the
buckets and plans of a Triton step (triton.py). Each test here changes one thing those
are keyed on between steps, the same way in a loop-backend twin, and the step must
equal the twin's, as it would with nothing cached: a stale cache fails them.
"""

from __future__ import annotations

import copy
import functools
import gc
import math
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import core
from core import optimizer as optimizer_module
from core.backends import cpu_kernel, host_checks
from core.optimizer import step_released_param
from core.quantization import MIN_QUANTIZED_NUMEL, absmax_shape, stored_moment
from tests.core.cases import (
    BACKENDS,
    LR,
    TRAINING_BACKENDS,
    WEIGHT_DECAY,
    assert_unchanged,
    snapshot,
)
from tests.core.test_fused import assert_state_close, assert_within_one_ulp

COUNT = cpu_kernel.MIN_SCALARS + 4
"""Enough parameters for the step counters to take the C path (and its cache)."""

Twin = tuple[list[Tensor], core.AdamW]


@pytest.fixture(params=["compiled", "python"])
def each_host_checks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step-memo tests run with the C++ host checks and with their Python fallback
    (core.backends.host_checks)."""
    checks = host_checks.PYTHON_CHECKS
    if request.param == "compiled":
        compiled = host_checks.compiled_checks()  # waits for the build
        if compiled is None:
            pytest.skip("the C++ host checks do not build here (see the warning)")
        checks = compiled
    monkeypatch.setattr(optimizer_module, "host_checks", lambda: checks)


def _twins(backend: str, count: int = COUNT, **flags: Any) -> tuple[Twin, Twin]:
    """The loop backend and `backend`, on equal parameters of assorted sizes."""
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(5 + 37 * i, generator=generator) for i in range(count)]
    twins = []
    for name in ("loop", backend):
        params = [v.clone().requires_grad_() for v in values]
        twins.append((params, core.AdamW(params, lr=LR, **BACKENDS[name], **flags)))
    return twins[0], twins[1]


def _step(
    loop: Twin,
    other: Twin,
    seed: int,
    change: Callable[[list[Tensor], core.AdamW], None] | None = None,
    without_grad: frozenset[int] = frozenset(),
    released: bool = False,
    same_memory: bool = False,
    compare: Callable[[Twin, Twin, str], None] | None = None,
) -> None:
    """Give both the same gradients, apply `change` to both, step both (released: each
    parameter on its own, as gradient release does), compare (by default with
    _assert_equal). same_memory: gradients are copied into the last step's
    (zero_grad(set_to_none=False)), so every address a step depends on can stay the same."""
    generator = torch.Generator().manual_seed(seed)
    grads = [0.1 * torch.randn(p.shape, generator=generator) for p in loop[0]]
    for params, optimizer in (loop, other):
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if same_memory and p.grad is not None and i not in without_grad:
                p.grad.copy_(g)
                continue
            p.grad = None if i in without_grad else g.to(p.dtype, copy=True)  # its own
        if change is not None:
            change(params, optimizer)
        if released:
            for p in params:
                step_released_param(optimizer, p)
        else:
            optimizer.step()
    (compare or _assert_equal)(loop, other, f"step with seed {seed}")


def _assert_equal(loop: Twin, other: Twin, where: str) -> None:
    for i, (a, b) in enumerate(zip(other[0], loop[0], strict=True)):
        assert_within_one_ulp(a.detach(), b.detach(), f"parameter {i}, {where}")
        state, loop_state = other[1].state[a], loop[1].state[b]
        assert state.keys() == loop_state.keys(), f"state keys of {i}, {where}"
        for key, value in loop_state.items():
            if key == "step":
                assert float(state[key]) == float(value), f"step of {i}, {where}"
            else:
                assert_state_close(state[key], value, f"{key} of {i}, {where}")


# -- step counters (the address array of cpu_kernel's host-scalar calls) ---------------


@pytest.mark.parametrize("backend", ["fused", "triton"])
def test_step_counters_replaced_or_moved_between_steps_are_read_where_they_now_are(
    backend: str,
) -> None:
    loop, other = _twins(backend)
    _step(loop, other, seed=1)
    _step(loop, other, seed=2)

    def replace(params: list[Tensor], optimizer: core.AdamW) -> None:
        optimizer.state[params[0]]["step"] = torch.tensor(7.0)  # a new tensor

    def move(params: list[Tensor], optimizer: core.AdamW) -> None:
        for p in params[1:4]:  # same tensors, new memory
            optimizer.state[p]["step"].data = torch.tensor(11.0)

    _step(loop, other, seed=3, change=replace)
    _step(loop, other, seed=4, change=move)
    _step(loop, other, seed=5)


@pytest.mark.parametrize("backend", ["fused", "triton"])
def test_a_state_dict_loaded_mid_run_replaces_every_step_counter(backend: str) -> None:
    loop, other = _twins(backend)
    source_loop, source_other = _twins(backend)
    for seed in (1, 2, 3):  # the source runs ahead: its counters differ
        _step(source_loop, source_other, seed=seed)
    _step(loop, other, seed=4)

    def load(params: list[Tensor], optimizer: core.AdamW) -> None:
        source = source_loop if optimizer is loop[1] else source_other
        optimizer.load_state_dict(source[1].state_dict())

    _step(loop, other, seed=5, change=load)
    _step(loop, other, seed=6)
    assert float(other[1].state[other[0][0]]["step"]) == 5.0


def test_the_address_array_follows_a_counter_moved_in_place() -> None:
    counters = [torch.tensor(float(i)) for i in range(COUNT)]
    assert cpu_kernel.read_scalars(counters) == [float(i) for i in range(COUNT)]
    old_memory = counters[3].data  # keeps the old storage alive, to see it is left alone
    counters[3].data = torch.tensor(100.0)
    assert cpu_kernel.add_to_scalars(counters, 1.0)
    assert cpu_kernel.read_scalars(counters)[3] == 101.0
    assert float(old_memory) == 3.0
    counters[5] = torch.tensor(50.0)  # another tensor in the list
    assert cpu_kernel.read_scalars(counters)[5] == 50.0


# -- Triton step plans -------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["fused", "triton"])
def test_parameters_and_state_moved_between_steps_are_stepped_where_they_now_are(
    backend: str,
) -> None:
    loop, other = _twins(backend)
    _step(loop, other, seed=1)
    _step(loop, other, seed=2)

    def move(params: list[Tensor], optimizer: core.AdamW) -> None:
        params[0].data = params[0].data.clone()
        state = optimizer.state[params[1]]
        state["exp_avg"] = state["exp_avg"].clone()
        state["exp_avg_sq"].data = state["exp_avg_sq"].data.clone()

    _step(loop, other, seed=3, change=move)
    _step(loop, other, seed=4)


@pytest.mark.parametrize("backend", ["fused", "triton"])
def test_gradients_that_come_and_go_change_what_is_stepped(backend: str) -> None:
    loop, other = _twins(backend)
    _step(loop, other, seed=1)
    _step(loop, other, seed=2, without_grad=frozenset({0, 5, 6}))
    _step(loop, other, seed=3, without_grad=frozenset({1}))
    _step(loop, other, seed=4)


@pytest.mark.parametrize("backend", ["fused", "triton"])
def test_a_gradient_laid_out_differently_at_the_same_address_is_planned_again(
    backend: str,
) -> None:
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(6, 6, generator=generator) for _ in range(3)]
    twins = []
    for name in ("loop", backend):
        params = [v.clone().requires_grad_() for v in values]
        twins.append((params, core.AdamW(params, lr=LR, **BACKENDS[name])))
    loop, other = twins
    buffers = {id(params): [torch.empty(6, 6) for _ in params] for params, _ in twins}
    for seed, transpose in ((1, False), (2, False), (3, True), (4, False)):
        grads = [torch.randn(6, 6, generator=torch.Generator().manual_seed(seed)) for _ in values]
        for params, optimizer in (loop, other):
            for p, g, buffer in zip(params, grads, buffers[id(params)], strict=True):
                p.grad = (buffer.t() if transpose else buffer).copy_(g)  # the same memory
            optimizer.step()
        _assert_equal(loop, other, f"seed {seed}")


@pytest.mark.parametrize("backend", ["fused", "triton"])
def test_amsgrad_switched_on_mid_run_adds_its_buffer(backend: str) -> None:
    loop, other = _twins(backend)
    _step(loop, other, seed=1)

    def amsgrad(params: list[Tensor], optimizer: core.AdamW) -> None:
        optimizer.param_groups[0]["amsgrad"] = True

    _step(loop, other, seed=2, change=amsgrad)
    _step(loop, other, seed=3)
    assert "max_exp_avg_sq" in other[1].state[other[0][0]]


@pytest.mark.parametrize("backend", ["fused", "triton"])
def test_a_parameter_turned_bfloat16_between_steps_gets_a_kahan_buffer(backend: str) -> None:
    loop, other = _twins(backend)
    _step(loop, other, seed=1, without_grad=frozenset({2}))

    def to_bfloat16(params: list[Tensor], optimizer: core.AdamW) -> None:
        params[2].data = params[2].data.bfloat16()
        params[2].grad = params[2].grad.bfloat16()

    _step(loop, other, seed=2, change=to_bfloat16)
    assert "kahan_comp" in other[1].state[other[0][2]]
    _step(loop, other, seed=3)


@pytest.mark.parametrize("released", [False, True], ids=["step", "step-param"])
@pytest.mark.parametrize("backend", TRAINING_BACKENDS)
@pytest.mark.parametrize("written", [{"kahan_sum": False}, {"stochastic_rounding": True}])
def test_a_kahan_buffer_no_step_reads_is_dropped_as_a_resumed_run_drops_it(
    backend: str, released: bool, written: dict[str, bool]
) -> None:
    """Kahan turned off by writing into a live group: the buffer stayed, as large as the
    parameter, saved in every state dict, and came back stale when Kahan was turned on
    again, where a run resumed from a checkpoint starts it at zero."""
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(n, generator=generator).bfloat16() for n in (300, 5000)]
    grads = [[0.1 * torch.randn(v.shape, generator=generator).bfloat16() for v in values]]
    grads *= 6
    params = [v.clone().requires_grad_() for v in values]
    optimizer = core.AdamW(params, lr=LR, **TRAINING_BACKENDS[backend])

    def step(optimizer: core.AdamW, params: list[Tensor], grads: list[Tensor]) -> None:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
            if released:
                step_released_param(optimizer, p)
        optimizer.step()  # after released steps it steps nothing and closes the step

    for g in grads[:2]:
        step(optimizer, params, g)
    assert all("kahan_comp" in optimizer.state[p] for p in params)
    optimizer.param_groups[0].update(written)
    step(optimizer, params, grads[2])
    assert not any("kahan_comp" in optimizer.state[p] for p in params)
    assert not any("kahan_comp" in s for s in optimizer.state_dict()["state"].values())
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = core.AdamW(resumed_params, lr=LR, **TRAINING_BACKENDS[backend])
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for twin in (optimizer, resumed):  # Kahan back on: from zero, in both
        twin.param_groups[0].update(kahan_sum=None, stochastic_rounding=False)
    for g in grads[3:]:
        step(optimizer, params, g)
        step(resumed, resumed_params, g)
    for a, b in zip(params, resumed_params, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(optimizer.state[a]["kahan_comp"], resumed.state[b]["kahan_comp"])


# -- validated hyperparameters -----------------------------------------------------------


def _trained(**flags: Any) -> tuple[torch.nn.Module, core.AdamW]:
    """A model stepped twice, so its group has passed validation before."""
    model = torch.nn.Linear(4, 3)
    optimizer = core.AdamW(model.parameters(), lr=LR, **flags)
    for _ in range(2):
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
    model(torch.ones(2, 4)).sum().backward()
    return model, optimizer


# -- step memos (core.optimizer.StepMemo) ----------------------------------------------

MEMO_BACKENDS = ["default", "fused", "triton"]
"""The optimizer as users build it (no flags: the fused CPU backend here) and each fused
backend; loop and foreach twins of these tests are the reference."""


def _memo_twins(backend: str, released: bool = False, steps: int = 2) -> tuple[Twin, Twin]:
    """A loop twin that takes the full path every step (no memo: the reference) and an
    optimizer built with `backend`'s flags (none for "default"), after `steps` compared
    steps (seeds 1, 2, ...) with gradients kept at their addresses."""
    loop, other = _twins("loop")
    loop[1]._checked_memo = lambda *args: None  # type: ignore[method-assign]
    flags = {} if backend == "default" else BACKENDS[backend]
    other = (other[0], core.AdamW(other[0], lr=LR, **flags))
    for seed in range(1, steps + 1):
        _step(loop, other, seed=seed, released=released, same_memory=True)
    return loop, other


def _memos(optimizer: core.AdamW, released: bool) -> dict[int, Any]:
    return optimizer.__dict__.get("_param_memos" if released else "_step_memos", {})


@pytest.mark.usefixtures("each_host_checks")
@pytest.mark.parametrize("released", [False, True], ids=["step", "step-param"])
@pytest.mark.parametrize("backend", MEMO_BACKENDS)
def test_repeated_steps_reuse_their_memo_and_equal_the_loop_backend(
    backend: str, released: bool
) -> None:
    _, other = _memo_twins(backend, released, steps=4)
    memos = _memos(other[1], released)
    assert len(memos) == (len(other[0]) if released else 1)
    memo = next(iter(memos.values()))
    assert memo.backend is not None and memo.plan_key is None  # resolved; key per step


@pytest.mark.usefixtures("each_host_checks")
@pytest.mark.parametrize("released", [False, True], ids=["step", "step-param"])
@pytest.mark.parametrize("backend", MEMO_BACKENDS)
def test_state_replaced_removed_or_moved_between_memoized_steps_is_stepped_as_it_now_is(
    backend: str, released: bool
) -> None:
    loop, other = _memo_twins(backend, released)

    def reset(params: list[Tensor], optimizer: core.AdamW) -> None:
        optimizer.state[params[2]] = {}  # a whole entry replaced: made again

    def rescale(params: list[Tensor], optimizer: core.AdamW) -> None:
        state = optimizer.state[params[3]]
        state["exp_avg"] = state["exp_avg"] * 0.5  # a moment replaced
        # a moment restarted (removing one alone is refused: test_odd_parameters)
        optimizer.state[params[4]]["exp_avg_sq"] = torch.zeros_like(params[4])

    def move(params: list[Tensor], optimizer: core.AdamW) -> None:
        state = optimizer.state[params[5]]
        state["exp_avg_sq"].data = state["exp_avg_sq"].data * 2.0  # storage swapped in place
        state["step"].set_(torch.tensor(9.0))
        optimizer.state[params[6]]["exp_avg"].set_(torch.zeros(params[6].shape))
        params[7].data = params[7].data.clone()  # a parameter moved

    for seed, change in ((3, reset), (4, None), (5, rescale), (6, None), (7, move), (8, None)):
        _step(loop, other, seed=seed, change=change, released=released, same_memory=True)
    assert _memos(other[1], released)


def _remove_state(how: str, optimizer: core.AdamW, param: Tensor) -> None:
    """Remove param's state by one of the ways a dict allows."""
    if how == "del":
        del optimizer.state[param]
    elif how == "pop":
        optimizer.state.pop(param)
    elif how == "popitem":
        assert optimizer.state.popitem()[0] is param  # the one entry
    else:
        optimizer.state.clear()


@pytest.mark.usefixtures("each_host_checks")
@pytest.mark.parametrize("how", ["del", "pop", "popitem", "clear"])
@pytest.mark.parametrize("backend", MEMO_BACKENDS)
def test_a_state_removed_between_memoized_steps_restarts_its_parameter(
    backend: str, how: str
) -> None:
    """However the entry goes (del, pop, popitem, clear), the next step starts the
    parameter afresh and records it (a pop the memo did not see stepped the removed dict:
    the parameter then had no state at all)."""
    param = torch.nn.Parameter(torch.ones(64))
    optimizer = core.AdamW([param], lr=0.1, **TRAINING_BACKENDS[backend])
    for _ in range(3):
        param.grad = torch.ones(64)
        optimizer.step()
    _remove_state(how, optimizer, param)
    fresh = torch.nn.Parameter(param.detach().clone())
    reference = core.AdamW([fresh], lr=0.1, **TRAINING_BACKENDS[backend])
    for p, stepper in ((param, optimizer), (fresh, reference)):
        p.grad = torch.ones(64)
        stepper.step()
    assert float(optimizer.state[param]["step"]) == 1
    assert torch.equal(param, fresh)


@pytest.mark.usefixtures("each_host_checks")
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_parameter_appended_to_an_earlier_group_moves_the_later_streams(backend: str) -> None:
    """Stochastic rounding draws each parameter's stream from its place among all the
    optimizer's parameters: one appended in place to an earlier group moves the later
    group's, and a memoized step must round with the new streams, as a step whose memo
    a state write voided does (the memo checked only its own group's length)."""

    def second_step(void_memo: bool, append: bool = True) -> Tensor:
        torch.manual_seed(0)
        first, later, appended = (
            torch.nn.Parameter(torch.randn(n).bfloat16()) for n in (8, 4096, 8)
        )
        optimizer = core.Adam(
            [{"params": [first]}, {"params": [later]}],
            lr=1e-3,
            stochastic_rounding=True,
            kahan_sum=False,
            **TRAINING_BACKENDS[backend],
        )
        later.grad = torch.ones_like(later)
        optimizer.step()
        if append:
            optimizer.param_groups[0]["params"].append(appended)  # later: position 1 -> 2
        if void_memo:
            optimizer.state[later] = optimizer.state[later]  # a state write
        later.grad = torch.ones_like(later)
        optimizer.step()
        return later.detach()

    moved = second_step(void_memo=True)
    assert not torch.equal(moved, second_step(void_memo=True, append=False))  # streams moved
    assert torch.equal(second_step(void_memo=False), moved)


@pytest.mark.usefixtures("each_host_checks")
@pytest.mark.parametrize("backend", MEMO_BACKENDS)
def test_flags_changed_between_memoized_steps_take_effect(backend: str) -> None:
    loop, other = _memo_twins(backend)
    flags = dict(other[1].param_groups[0])
    _step(loop, other, seed=1, same_memory=True)
    _step(loop, other, seed=2, same_memory=True)

    def to_foreach(params: list[Tensor], optimizer: core.AdamW) -> None:
        optimizer.param_groups[0].update(fused=False, foreach=True)

    def back(params: list[Tensor], optimizer: core.AdamW) -> None:
        optimizer.param_groups[0].update(fused=flags["fused"], foreach=flags["foreach"])

    def amsgrad(params: list[Tensor], optimizer: core.AdamW) -> None:
        optimizer.param_groups[0]["amsgrad"] = True

    for seed, change in ((3, to_foreach), (4, back), (5, None), (6, amsgrad), (7, None)):
        _step(loop, other, seed=seed, change=change, same_memory=True)


@pytest.mark.skipif(
    not hasattr(torch.Tensor, "grad_dtype"), reason="gradients of another dtype need grad_dtype"
)
@pytest.mark.usefixtures("each_host_checks")
@pytest.mark.parametrize("backend", MEMO_BACKENDS)
def test_a_gradient_of_another_dtype_after_memoized_steps_takes_the_full_path(
    backend: str,
) -> None:
    """The full path steps a bfloat16 gradient of a float32 parameter (every backend:
    the fused ones run it eagerly)."""
    loop, other = _memo_twins(backend)

    def bfloat16_gradient(params: list[Tensor], optimizer: core.AdamW) -> None:
        """At the very address of the float32 gradient it replaces."""
        grad = params[3].grad
        values = grad.to(torch.bfloat16)
        params[3].grad_dtype = None  # type: ignore[attr-defined]
        params[3].grad = grad.view(torch.bfloat16)[: grad.numel()].copy_(values)

    _step(loop, other, seed=3, change=bfloat16_gradient, same_memory=True)
    _step(loop, other, seed=4, same_memory=True)


@pytest.mark.usefixtures("each_host_checks")
@pytest.mark.parametrize("released", [False, True], ids=["step", "step-param"])
@pytest.mark.parametrize("precision", ["full", "8bit"])
@pytest.mark.parametrize("backend", ["default", "fused"])
def test_a_memo_made_on_a_transposed_gradient_leaves_later_steps_to_the_kernel(
    backend: str, precision: str, released: bool
) -> None:
    """The step that makes a memo checked its gradients for the full path only, not as
    the memo checks those of later steps (dense, contiguous: gradient_addresses), so its
    buckets, which send a transposed gradient's parameter to the loop backend, are not
    the ones later steps reuse: those steps take the generated kernel (or torch's fused
    Adam), bit for bit as an optimizer resumed from the same state after that step does.
    Reusing them left the parameter on the loop backend for good (an ulp off after a few
    steps, and slower)."""
    generator = torch.Generator().manual_seed(0)
    value = torch.randn(96, 64, generator=generator)  # 8-bit: above MIN_QUANTIZED_NUMEL
    flags = {} if backend == "default" else BACKENDS[backend]
    flags = {**flags, "weight_decay": WEIGHT_DECAY, "state_precision": precision}
    params = [value.clone().requires_grad_()]
    optimizer = core.Adam(params, lr=LR, **flags)  # L2 decay: an ulp from the loop backend
    params[0].grad = torch.randn(64, 96, generator=generator).t()
    if released:
        step_released_param(optimizer, params[0])
    else:
        optimizer.step()
    resumed_params = [params[0].detach().clone().requires_grad_()]
    resumed = core.Adam(resumed_params, lr=LR, **flags)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    resumed_twin, twin = (resumed_params, resumed), (params, optimizer)
    for seed in range(2, 7):
        _step(resumed_twin, twin, seed=seed, released=released, compare=_assert_identical)
    assert _memos(optimizer, released)


@pytest.mark.parametrize("backend", MEMO_BACKENDS)
def test_a_moment_restrided_at_its_address_is_stepped_by_its_new_layout(backend: str) -> None:
    """exp_avg replaced by a transposed view of its own memory (same address, size and
    dtype; another layout), gradients kept at their addresses: the Triton backend reused
    the launch plan made for the contiguous moment, pairing m with θ and g by memory order
    (parameters 0.4 off the loop backend after three steps)."""
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(48, 64, generator=generator), torch.randn(300, generator=generator)]
    twins = []
    for flags in (BACKENDS["loop"], {} if backend == "default" else BACKENDS[backend]):
        params = [v.clone().requires_grad_() for v in values]
        twins.append((params, core.AdamW(params, lr=LR, **flags)))
    twins[0][1]._checked_memo = lambda *args: None  # type: ignore[method-assign]

    def restride(params: list[Tensor], optimizer: core.AdamW) -> None:
        state = optimizer.state[params[0]]
        state["exp_avg"] = state["exp_avg"].view(64, 48).t()

    for seed in range(1, 6):
        _step(twins[0], twins[1], seed, change=restride if seed == 3 else None, same_memory=True)


@pytest.mark.usefixtures("each_host_checks")
@pytest.mark.parametrize("backend", MEMO_BACKENDS)
def test_a_parameter_narrowed_in_place_after_memoized_steps_is_stepped_within_its_view(
    backend: str,
) -> None:
    """Parameter, gradient and moments narrowed to views at the same addresses: only the
    view is stepped (a plan kept for the old size would write past it)."""
    loop, other = _memo_twins(backend)

    def past_the_view(param: Tensor) -> Tensor:
        """The parameter's storage after its (narrowed) elements."""
        return torch.empty(0).set_(param.untyped_storage())[param.numel() :]

    tails = {}

    def narrow(params: list[Tensor], optimizer: core.AdamW) -> None:
        param, state = params[9], optimizer.state[params[9]]
        size = param.numel() // 2
        for tensor in (param, param.grad, state["exp_avg"], state["exp_avg_sq"]):
            tensor.data = tensor.data[:size]
        tails[id(optimizer)] = past_the_view(param).clone()

    _step(loop, other, seed=3, change=narrow, same_memory=True)
    for params, optimizer in (loop, other):
        after = past_the_view(params[9])
        assert torch.equal(after, tails[id(optimizer)]), "memory past the narrowed view changed"


QUANTIZED_SHAPES = (
    (16, 300, torch.float32),
    (37, torch.float32),
    (80, 64, torch.bfloat16),
    (5, 3, torch.bfloat16),
    (4200, torch.float32),
)
"""A group with state_precision='8bit' as models have them: parameters large enough to be
quantized (fp32, and bf16 with a Kahan buffer) beside small ones kept full (see
core.quantization.MIN_QUANTIZED_NUMEL), so each moment has rows in both forms."""


SMALL_QUANTIZED_SHAPES = ((16, 300, torch.float32), (37, torch.float32), (64, 64, torch.bfloat16))
"""The same mix at the smallest quantized size, for the interpreted Triton backend."""


def _twins_with_and_without_memos(
    backend: str, shapes: tuple[tuple[Any, ...], ...], reference_without: str, **options: Any
) -> tuple[Twin, Twin]:
    """(reference, other): AdamW twins with `backend`'s flags and `options` on equal
    parameters of `shapes` (each a shape, then a dtype); the reference's method
    `reference_without` answers None, so it never reuses (_checked_memo) or never makes
    (_new_memo) a memo."""
    generator = torch.Generator().manual_seed(0)
    twins = []
    for memos in (False, True):
        generator.manual_seed(0)
        params = [
            torch.randn(shape[:-1], generator=generator).to(shape[-1]).requires_grad_()
            for shape in shapes
        ]
        flags = {} if backend == "default" else BACKENDS[backend]
        optimizer = core.AdamW(params, lr=LR, **options, **flags)
        if not memos:
            setattr(optimizer, reference_without, lambda *args: None)
        twins.append((params, optimizer))
    return twins[0], twins[1]


def _quantized_memo_twins(
    backend: str, released: bool, shapes: tuple[tuple[Any, ...], ...] = QUANTIZED_SHAPES
) -> tuple[Twin, Twin]:
    """Twins with `backend`'s flags and 8-bit state, one without memos (the full path every
    step: the reference, which runs the very same kernels), after two compared steps."""
    reference, other = _twins_with_and_without_memos(
        backend, shapes, "_checked_memo", state_precision="8bit"
    )
    for seed in (1, 2):
        _quantized_step(reference, other, seed, released=released)
    return reference, other


def _assert_identical(reference: Twin, other: Twin, where: str) -> None:
    """Parameters and every state tensor (codes and scales included) bit for bit."""
    for i, (a, b) in enumerate(zip(other[0], reference[0], strict=True)):
        assert torch.equal(a, b), f"parameter {i}, {where}"
        state, expected = other[1].state[a], reference[1].state[b]
        assert state.keys() == expected.keys(), f"state keys of {i}, {where}"
        for key, value in expected.items():
            assert torch.equal(state[key], value), f"{key} of {i}, {where}"


_quantized_step = functools.partial(_step, same_memory=True, compare=_assert_identical)
"""_step for the 8-bit twins: gradients kept at their addresses, compared bit for bit."""


def _memos_reused(reference: Twin, other: Twin, released: bool, seeds: range) -> dict[int, Any]:
    """Step both at each seed; the memos after the first, which the others must reuse."""
    _quantized_step(reference, other, seeds[0], released=released)
    memos = dict(_memos(other[1], released))
    for seed in seeds[1:]:
        _quantized_step(reference, other, seed, released=released)
    assert _memos(other[1], released) == memos, "a memo was made again: none was reused"
    assert len(memos) == (len(other[0]) if released else 1)
    columns = set().union(*(memo.columns for memo in memos.values()))
    assert {"exp_avg_codes", "exp_avg_sq_absmax", "kahan_comp"} <= columns
    return memos


def _replace_codes(params: list[Tensor], optimizer: core.AdamW) -> None:
    state = optimizer.state[params[0]]
    state["exp_avg_codes"] = state["exp_avg_codes"].flip(0).contiguous()


def _move_scales(params: list[Tensor], optimizer: core.AdamW) -> None:
    state = optimizer.state[params[4]]
    state["exp_avg_sq_absmax"].data = state["exp_avg_sq_absmax"].data * 2.0


def _store_in_full(params: list[Tensor], optimizer: core.AdamW) -> None:
    """As a full-precision checkpoint entry would: quantized again by the step."""
    state = optimizer.state[params[2]]
    state["exp_avg"] = stored_moment(state, "exp_avg", params[2])
    del state["exp_avg_codes"], state["exp_avg_absmax"]


def _reshape_in_place(params: list[Tensor], optimizer: core.AdamW) -> None:
    """Twice the rows, half as long, every tensor at its address and of its size: the
    parameter and its gradient, each moment's codes and scales (rows of 300 elements, a
    block of 256 and one of 44, become rows of one block of 150). Blocks run along rows,
    so a plan kept for the old rows would decode and encode the wrong blocks."""
    param, state = params[0], optimizer.state[params[0]]
    rows, columns = param.shape
    shape = (2 * rows, columns // 2)
    param.data = param.data.view(shape)
    param.grad = param.grad.view(shape)
    for key in ("exp_avg", "exp_avg_sq"):
        state[f"{key}_codes"].data = state[f"{key}_codes"].data.view(shape)
        state[f"{key}_absmax"].data = state[f"{key}_absmax"].data.view(absmax_shape(shape))


def _state_precision(value: str) -> Callable[[list[Tensor], core.AdamW], None]:
    return lambda params, optimizer: optimizer.param_groups[0].__setitem__("state_precision", value)


QUANTIZED_CHANGES = (
    _replace_codes,
    None,
    _reshape_in_place,
    None,
    _move_scales,
    None,
    _store_in_full,
    None,
    _state_precision("full"),
    None,
    _state_precision("8bit"),
    None,
)
"""Changes to an 8-bit group between memoized steps, each followed by a plain step: each
must send the step down the full path (a memo that kept the old codes, scales or form
would write the old tensors or read stale ones, or step the old block layout)."""


@pytest.mark.usefixtures("each_host_checks")
@pytest.mark.parametrize("released", [False, True], ids=["step", "step-param"])
@pytest.mark.parametrize("backend", ["default", "fused"])
def test_8bit_steps_reuse_their_memo_and_follow_changed_state_bit_for_bit(
    backend: str, released: bool
) -> None:
    reference, other = _quantized_memo_twins(backend, released)
    _memos_reused(reference, other, released, range(3, 6))
    for seed, change in enumerate(QUANTIZED_CHANGES, start=6):
        _quantized_step(reference, other, seed, change, released=released)
    assert "exp_avg_codes" in other[1].state[other[0][2]]
    assert _memos(other[1], released)


@pytest.mark.parametrize("backend", ["triton"])  # the id routes the step to Triton (conftest)
def test_8bit_memos_on_the_triton_backend_follow_changed_codes_bit_for_bit(backend: str) -> None:
    """The same on the Triton backend, under gradient release (where memos matter most;
    the interpreter is slow, so a shorter run of changes on the smallest quantized
    tensors)."""
    released = True
    reference, other = _quantized_memo_twins(backend, released, SMALL_QUANTIZED_SHAPES)
    _memos_reused(reference, other, released, range(3, 5))
    changes = (_replace_codes, None, _reshape_in_place, None, _store_in_full, None)
    for seed, change in enumerate(changes, start=5):
        _quantized_step(reference, other, seed, change, released=released)


@pytest.mark.parametrize("released", [False, True], ids=["step", "step-param"])
@pytest.mark.parametrize("backend", TRAINING_BACKENDS)
@pytest.mark.parametrize("precision", ["full", "8bit"])
def test_what_a_step_keeps_is_freed_with_its_optimizer_without_a_collection(
    backend: str, released: bool, precision: str
) -> None:
    """Memos, plans and validated groups hold parameters and state: freed by reference
    counting when the optimizer goes, the state is replaced, or a group is removed, as
    torch.optim frees them. A Triton plan keyed by its memo held the memo (state
    and parameters) in a cycle until a full gc (device memory never triggers one); a
    removed group's record, and (8-bit) the stochastic-rounding streams of memoized
    steps, held its parameters for the optimizer's life."""
    core.AdamW([torch.zeros(1, requires_grad=True)], lr=LR)  # not a process's first optimizer
    gc.collect()
    gc.disable()
    try:
        params = [torch.randn(64, 80, requires_grad=True) for _ in range(3)]  # 8-bit sized
        optimizer = core.AdamW(
            [{"params": params[:2]}, {"params": params[2:]}],
            lr=LR,
            state_precision=precision,
            **TRAINING_BACKENDS[backend],
        )

        def train(optimizer: core.AdamW, released: bool = released) -> None:
            for _ in range(2):
                for p in optimizer.param_groups[0]["params"]:
                    p.grad = torch.ones_like(p)
                    if released:
                        step_released_param(optimizer, p)
                optimizer.step()

        train(optimizer)
        replaced = [weakref.ref(t) for s in optimizer.state.values() for t in s.values()]
        optimizer.state.clear()
        train(optimizer)
        assert not [r for r in replaced if r() is not None], "state replaced by clear()"
        removed = weakref.ref(params.pop())  # never stepped: no state holds it
        optimizer.param_groups.pop()
        train(optimizer, released=False)  # released steps' caches pruned by full steps too
        assert removed() is None, "the parameter of a removed group"
        kept = [weakref.ref(optimizer), *map(weakref.ref, params)]
        kept += [weakref.ref(t) for s in optimizer.state.values() for t in s.values()]
        del optimizer, params
        assert not [r for r in kept if r() is not None], "the optimizer, its params, state"
    finally:
        gc.enable()


@pytest.mark.usefixtures("each_host_checks")
@pytest.mark.parametrize("released", [False, True], ids=["step", "step-param"])
def test_memos_of_groups_and_parameters_no_longer_stepped_are_dropped(released: bool) -> None:
    """A memo holds its tensors' storages: groups replaced by load_state_dict, and
    parameters gone from the groups, lose theirs."""
    _, other = _memo_twins("default", released, steps=1)
    memos = _memos(other[1], released)
    held = next(iter(memos.values()))
    params, optimizer = other
    optimizer.load_state_dict(optimizer.state_dict())  # new group dicts
    optimizer.param_groups[0]["params"] = kept = params[:-1]  # as a framework may rebuild
    for p in kept:
        p.grad = torch.ones_like(p)
        if released:
            step_released_param(optimizer, p)
    optimizer.step()
    assert held not in memos.values()
    assert len(memos) == (len(kept) if released else 1)


@pytest.mark.usefixtures("each_host_checks")
@pytest.mark.bad_input
@pytest.mark.parametrize("backend", MEMO_BACKENDS)
def test_a_sparse_gradient_after_memoized_steps_is_refused_before_any_change(
    backend: str,
) -> None:
    model, optimizer = _trained(**({} if backend == "default" else BACKENDS[backend]))
    assert optimizer.__dict__.get("_step_memos")
    before = snapshot(model, optimizer)
    model.weight.grad = model.weight.grad.to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        optimizer.step()
    assert_unchanged(model, optimizer, before)


@pytest.mark.usefixtures("each_host_checks")
@pytest.mark.bad_input
@pytest.mark.parametrize("precision", ["full", "8bit"])
@pytest.mark.parametrize("backend", MEMO_BACKENDS)
def test_a_gradient_narrowed_in_place_after_memoized_steps_is_refused_before_any_change(
    backend: str, precision: str
) -> None:
    """A gradient that keeps its address but not its parameter's size: a kernel call kept
    for the memo would read past it, so the memo refuses it and the full path names it."""
    model = torch.nn.Linear(80, 64)  # a weight of 5120 elements: quantized under 8bit
    flags = {} if backend == "default" else BACKENDS[backend]
    optimizer = core.AdamW(model.parameters(), lr=LR, state_precision=precision, **flags)
    for _ in range(3):
        model(torch.ones(2, 80)).sum().backward()
        optimizer.step()
    assert optimizer.__dict__.get("_step_memos")
    model(torch.ones(2, 80)).sum().backward()
    before = snapshot(model, optimizer)
    model.weight.grad.data = model.weight.grad.data[:8]
    # Refused by the step's own check, before any backend (the memo sees the shape change).
    refused = r"Invalid grad of params\[0\] in param group 0: torch.float32 of shape \(8, 80\)"
    with pytest.raises((ValueError, RuntimeError), match=refused):
        optimizer.step()
    assert_unchanged(model, optimizer, before)


@pytest.mark.usefixtures("each_host_checks")
@pytest.mark.bad_input
@pytest.mark.parametrize("released", [False, True], ids=["step", "step-param"])
@pytest.mark.parametrize("reshaped", ["parameter", "moment"])
@pytest.mark.parametrize("precision", ["full", "8bit"])
@pytest.mark.parametrize("backend", TRAINING_BACKENDS)
def test_a_tensor_reshaped_in_place_after_memoized_steps_is_refused_before_any_change(
    backend: str, precision: str, reshaped: str, released: bool
) -> None:
    """`.data =` a view of the same elements in another shape with the same first
    dimension (same address, size and rows): the memo saw no change, so the fused
    backends stepped state laid out for the old shape and the eager ones failed halfway
    on torch's broadcast error, after the parameter listed first had been stepped."""
    first, second = (torch.nn.Parameter(torch.randn(4, 2048)) for _ in range(2))
    flags = BACKENDS.get(backend, {})
    optimizer = core.AdamW([first, second], lr=LR, state_precision=precision, **flags)
    for _ in range(3):
        first.grad, second.grad = torch.randn(4, 2048), torch.randn(4, 2048)
        optimizer.step()
    state = optimizer.state[second]
    key = "exp_avg" if precision == "full" else "exp_avg_codes"
    first.grad, second.grad = torch.randn(4, 2048), torch.randn(4, 2048)
    if reshaped == "parameter":
        second.data, second.grad = second.data.view(4, 2, 1024), second.grad.view(4, 2, 1024)
        refused = rf"{key} of shape \(4, 2048\) beside a parameter of shape \(4, 2, 1024\)"
    else:
        state[key].data = state[key].data.view(4, 2, 1024)
        refused = rf"{key} of shape \(4, 2, 1024\) beside a parameter of shape \(4, 2048\)"
    model = torch.nn.ParameterList([first, second])
    before = snapshot(model, optimizer)
    with pytest.raises(
        ValueError, match=r"Invalid state of params\[1\] in param group 0: " + refused
    ):
        if released:  # the first parameter's own hook steps it, as in a released backward
            step_released_param(optimizer, first)
            before = snapshot(model, optimizer)
            step_released_param(optimizer, second)
        else:
            optimizer.step()
    assert_unchanged(model, optimizer, before)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("name", "make_bad"),
    [
        ("betas", lambda group: group["betas"].__setitem__(1, 1.0)),
        ("lr", lambda group: group["lr"].fill_(math.nan)),
        ("decouple_wd", lambda group: group.__setitem__("decouple_wd", 1)),
        ("eps", lambda group: group.__setitem__("eps", -1.0)),
    ],
    ids=["betas-list-changed-in-place", "tensor-lr-changed-in-place", "flag-as-int", "eps"],
)
@pytest.mark.usefixtures("each_host_checks")
@pytest.mark.parametrize("released", [False, True], ids=["step", "step-param"])
def test_a_value_made_invalid_after_steps_is_refused_before_any_change(
    name: str, make_bad: Callable[[dict[str, Any]], None], released: bool
) -> None:
    model, optimizer = _trained()
    group = optimizer.param_groups[0]
    group["betas"], group["lr"] = list(group["betas"]), torch.tensor(LR)  # changeable in place
    optimizer.step()  # valid: passes, and is stepped with these values
    model(torch.ones(2, 4)).sum().backward()
    before = snapshot(model, optimizer)
    make_bad(group)
    with pytest.raises(ValueError, match=rf"Invalid {name} in param group 0"):
        if released:
            optimizer.step(param=model.weight)
        else:
            optimizer.step()
    assert_unchanged(model, optimizer, before)


@pytest.mark.usefixtures("each_host_checks")
@pytest.mark.bad_input
def test_groups_replaced_after_steps_are_validated_again() -> None:
    model, optimizer = _trained()
    saved = optimizer.state_dict()
    saved["param_groups"][0]["lr"] = -1.0
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=r"Invalid lr in param group 0 of the loaded state dict"):
        optimizer.load_state_dict(saved)
    assert_unchanged(model, optimizer, before)
    optimizer.step()  # the memo still holds: nothing was replaced
    before = snapshot(model, optimizer)
    optimizer.param_groups = [{**optimizer.param_groups[0], "lr": -2.0}]  # as a framework may
    with pytest.raises(ValueError, match=r"Invalid lr in param group 0: -2\.0"):
        optimizer.step()
    assert_unchanged(model, optimizer, before)


def _two_groups_trained(released: bool, **flags: Any) -> tuple[torch.nn.Module, core.AdamW]:
    """A Linear whose weight and bias are two param groups, stepped twice (memoized where
    the backend keeps a memo), released through hooks if asked."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    groups = [{"params": [model.weight]}, {"params": [model.bias]}]
    optimizer = core.AdamW(groups, lr=LR, gradient_release=released, **flags)
    if released:
        core.prepare_for_gradient_release(model, optimizer)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
    return model, optimizer


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("written", "message"),
    [
        (lambda params: None, r"Invalid params in param group 1: a NoneType"),
        (lambda params: params[0], r"Invalid params in param group 1: a tensor of shape \(3,\)"),
        (lambda params: [*params, "bias"], r"Invalid params\[1\] in param group 1: a str"),
        (lambda params: [*params, None], r"Invalid params\[1\] in param group 1: a NoneType"),
    ],
    ids=["none", "a-tensor", "a-name", "a-none-entry"],
)
@pytest.mark.parametrize("released", [False, True], ids=["step", "released-step"])
def test_params_written_by_hand_that_are_not_tensors_are_refused_before_any_change(
    written: Callable[[list[Tensor]], object], message: str, released: bool
) -> None:
    """A group's params replaced by hand with something add_param_group would refuse: a
    bare tensor stepped nothing (its rows have no gradients), silently; None and a
    non-tensor entry failed deep inside the step (TypeError, AttributeError)."""
    model, optimizer = _two_groups_trained(released)
    optimizer.zero_grad()
    before = snapshot(model, optimizer)
    group = optimizer.param_groups[1]
    kept = group["params"]
    group["params"] = written(kept)
    with pytest.raises(ValueError, match=message):
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
    if not isinstance(group["params"], Tensor):  # torch's zero_grad failed on it by itself
        with pytest.raises(ValueError, match=message):
            optimizer.zero_grad()
    group["params"] = kept
    assert_unchanged(model, optimizer, before)


@pytest.mark.bad_input
@pytest.mark.parametrize("backend", TRAINING_BACKENDS)
@pytest.mark.parametrize("where", ["same-group", "another-group", "the-group-again"])
@pytest.mark.parametrize("released", [False, True], ids=["ordinary", "released"])
def test_a_parameter_listed_again_by_editing_a_group_is_refused_before_any_change(
    backend: str, where: str, released: bool
) -> None:
    """Composer's module surgery edits group["params"] in place; a new module tied to a
    weight already trained lists that weight again, which each backend stepped twice, in
    its own order (foreach ended 5e-3 from the loop backend in a 4-step Composer run),
    without a word; under release its hook stepped it once, with the later group's lr."""
    model, optimizer = _two_groups_trained(released, **TRAINING_BACKENDS[backend])
    before = snapshot(model, optimizer)
    optimizer.zero_grad()
    if where == "the-group-again":  # both entries found the group's memo, before
        optimizer.param_groups.append(optimizer.param_groups[0])
        message = r"Invalid param group 2: the same dict as param group 0, so this step"
        if released:  # found by the hooks' index of the groups' parameters
            message = r"Invalid params\[0\] in param group 2: the same tensor as params\[0\]"
    else:
        group = 0 if where == "same-group" else 1  # weight is params[0] of group 0
        optimizer.param_groups[group]["params"].append(model.weight)
        index = len(optimizer.param_groups[group]["params"]) - 1
        message = (
            rf"Invalid params\[{index}\] in param group {group}: the same tensor as "
            r"params\[0\] of param group 0, so this step would update it twice"
        )
    with pytest.raises(ValueError, match=message):
        model(torch.ones(2, 4)).sum().backward()  # released: refused by the first hook
        optimizer.step()
    if where == "the-group-again":
        optimizer.param_groups.pop()
    else:
        optimizer.param_groups[group]["params"].pop()
    assert_unchanged(model, optimizer, before)
    optimizer.zero_grad()  # a refused backward may have stopped before some gradients
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    assert float(optimizer.state[model.weight]["step"]) == 3


# -- replayed released steps (core.optimizer._GroupReplay) ------------------------------

REPLAY_ALGORITHMS = {
    "adam": (core.Adam, {}),
    "adamw-amsgrad": (core.AdamW, {"amsgrad": True}),
    "radam": (core.RAdam, {"weight_decay": 0.1, "decouple_wd": True}),
    "nadam": (core.NAdam, {}),
    "adopt": (core.ADOPT, {}),
}
REPLAY_PARAMS = 4
"""fp32 and bf16 (Kahan-compensated) parameters of one group, in turn."""

ReplayTwin = tuple[list[Tensor], Any, list[bool]]


def _replay_twins(
    algorithm: str, backend: str, smallest: int = 5, **group: Any
) -> tuple[ReplayTwin, ReplayTwin]:
    """(an optimizer that never replays, one that may and records whether each released
    step was replayed), built with `backend`'s flags on equal parameters of `smallest`,
    smallest + 37, ... elements."""
    optimizer_class, flags = REPLAY_ALGORITHMS[algorithm]
    flags = {**flags, **({} if backend == "default" else BACKENDS[backend])}
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(smallest + 37 * i, generator=generator) for i in range(REPLAY_PARAMS)]
    twins = []
    for replays in (False, True):
        params = [
            v.to(torch.bfloat16 if i % 2 else torch.float32).requires_grad_()
            for i, v in enumerate(values)
        ]
        optimizer = optimizer_class([{"params": params, **group}], lr=LR, **flags)
        replayed: list[bool] = []
        original = optimizer._replayed

        def recording(
            *args: Any, original: Any = original, replayed: list = replayed, on: bool = replays
        ) -> bool:
            replayed.append(original(*args) if on else False)
            return replayed[-1]

        optimizer._replayed = recording
        twins.append((params, optimizer, replayed))
    return twins[0], twins[1]


def _released_step(
    twins: tuple[ReplayTwin, ...],
    seed: int,
    change: Callable[[Any], None] | None = None,
    before_param: int = 0,
    without_grad: int | None = None,
) -> list[bool]:
    """One step under gradient release on each twin (change applied before parameter
    before_param steps); the replaying twin's record of this step."""
    generator = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=generator) for p in twins[0][0]]
    for params, optimizer, replayed in twins:
        replayed.clear()
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            p.grad = None if i == without_grad else g.to(p.dtype, copy=True)
        for i, p in enumerate(params):
            if change is not None and i == before_param:
                change(optimizer)
            step_released_param(optimizer, p)
    for i, (a, b) in enumerate(zip(twins[1][0], twins[0][0], strict=True)):
        assert torch.equal(a, b), f"parameter {i}, step with seed {seed}"
        state, reference = twins[1][1].state[a], twins[0][1].state[b]
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(state[key], value), f"{key} of parameter {i}, seed {seed}"
    return list(twins[1][2])


def _set_lr(lr: float) -> Callable[[Any], None]:
    return lambda optimizer: optimizer.param_groups[0].__setitem__("lr", lr)


@pytest.mark.parametrize("backend", MEMO_BACKENDS)
@pytest.mark.parametrize("algorithm", list(REPLAY_ALGORITHMS))
def test_released_steps_replay_their_groups_step_bit_for_bit(algorithm: str, backend: str) -> None:
    """The parameters after the first of a released step take its coefficients and step
    counts; every way their inputs can differ sends them down the full path."""
    twins = _replay_twins(algorithm, backend)
    everyone_but_the_first = [False] + [True] * (REPLAY_PARAMS - 1)
    assert _released_step(twins, 1) == []  # memos are made
    # Each parameter's first state entry (step 1) outdated the memos made before it, and
    # a memo replays only after one recorded step of its own.
    assert _released_step(twins, 2) == [False]
    assert _released_step(twins, 3) == [False, False, False, True]
    # A scheduler's new lr, before the step and in its middle: recorded again.
    assert _released_step(twins, 4, _set_lr(LR / 2)) == everyone_but_the_first
    assert _released_step(twins, 5, _set_lr(LR / 4), before_param=2) == [
        False,
        True,
        False,
        True,
    ]
    # A parameter without a gradient falls a step behind: its steps are its own.
    skipped = 1
    replayed = _released_step(twins, 6, without_grad=skipped)
    assert replayed == [False, True, True]  # the skipped one never reaches _replayed
    replayed = _released_step(twins, 7)
    assert replayed == [False, False, False, True]  # behind, then back in step
    assert twins[1][1].state[twins[1][0][skipped]]["step"] == 6


@pytest.mark.parametrize("backend", MEMO_BACKENDS)
@pytest.mark.parametrize("algorithm", ["adamw-amsgrad", "adopt"])
def test_released_8bit_steps_replay_their_groups_step_bit_for_bit(
    algorithm: str, backend: str
) -> None:
    """As above with 8-bit moments (ADOPT: 8-bit m beside full v; AMSGrad: 8-bit v_max),
    fp32 and bf16 parameters large enough to be quantized."""
    twins = _replay_twins(algorithm, backend, smallest=MIN_QUANTIZED_NUMEL, state_precision="8bit")
    assert _released_step(twins, 1) == []
    assert "exp_avg_codes" in twins[1][1].state[twins[1][0][1]]
    assert _released_step(twins, 2) == [False]
    assert _released_step(twins, 3) == [False, False, False, True]
    assert _released_step(twins, 4, _set_lr(LR / 2)) == [False, True, True, True]


@pytest.mark.parametrize(
    ("variant", "expected"),
    [("tensor-lr", "changeable in place"), ("no-compiled-helpers", "no C helpers")],
)
def test_released_steps_are_not_replayed_where_the_twin_cannot_be_proven_equal(
    variant: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if variant == "no-compiled-helpers":
        monkeypatch.setattr(cpu_kernel, "_scalars_unavailable", True)
        twins = _replay_twins("adam", "default")
    else:
        twins = _replay_twins("adam", "default", lr=torch.tensor(LR))
    for seed in range(1, 4):
        assert not any(_released_step(twins, seed)), expected
    assert twins[1][1].__dict__.get("_group_replays") is None


@pytest.mark.parametrize("backend", ["default", "triton"])
def test_groups_stepped_in_turn_each_replay_their_own_step(backend: str) -> None:
    """Two groups of other hyperparameters, released alternately (as backward reaches
    them): each parameter takes its own group's coefficients."""
    optimizers = []
    for _ in range(2):
        params = [torch.randn(5 + 37 * i).requires_grad_() for i in range(4)]
        flags = {} if backend == "default" else BACKENDS[backend]
        optimizer = core.AdamW(
            [{"params": params[0::2]}, {"params": params[1::2], "lr": LR / 3, "weight_decay": 0}],
            lr=LR,
            **flags,
        )
        optimizers.append((params, optimizer))
    for params in zip(*(p for p, _ in optimizers), strict=True):
        params[1].data.copy_(params[0])
    optimizers[0][1]._replayed = lambda *args: False  # the reference
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        grads = [torch.randn(p.shape, generator=generator) for p in optimizers[0][0]]
        for params, optimizer in optimizers:
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            for p in params:
                step_released_param(optimizer, p)
        for a, b in zip(*(p for p, _ in optimizers), strict=True):
            assert torch.equal(a, b), f"seed {seed}"
    assert len(optimizers[1][1].__dict__["_group_replays"]) == 2


@pytest.mark.parametrize("backend", ["default", "triton"])
def test_a_parameter_left_inside_an_accumulation_window_is_not_replayed(backend: str) -> None:
    """Accumulation turned off mid-window leaves one parameter's micro-batch count
    behind: its next update continues the window, which its twins' coefficients do not."""
    twins = _replay_twins("adam", backend)
    for seed in range(1, 4):
        _released_step(twins, seed)
    for _, optimizer, _ in twins:
        optimizer.optimizer_accumulation = True
    _released_step(twins, 4, without_grad=0)
    _released_step(twins, 5, without_grad=0)
    for _, optimizer, _ in twins:
        optimizer.optimizer_accumulation = False
    # Parameter 0 updates from a fresh window; the others close theirs (three micro-batches).
    _released_step(twins, 6)
    _released_step(twins, 7)


# -- step memos of stochastically rounded groups ----------------------------------------

STOCHASTIC_SHAPES = ((16, 300, torch.bfloat16), (37, torch.bfloat16), (50, torch.float32))
"""A quantized bf16 parameter, a small bf16 one (full state) and an fp32 one (rounded to
nearest: nothing to round stochastically)."""


def _stochastic_twins(
    backend: str, state_precision: str, shapes: tuple[tuple[Any, ...], ...]
) -> tuple[Twin, Twin]:
    """Twins rounding bf16 parameters stochastically, one that never makes a memo (the
    reference: the same kernels, called on the full path with nothing vouched for)."""
    return _twins_with_and_without_memos(
        backend,
        shapes,
        "_new_memo",
        stochastic_rounding=True,
        rounding_seed=7,
        state_precision=state_precision,
    )


def _insert_group_before(params: list[Tensor], optimizer: core.AdamW) -> None:
    """A group of one parameter (never stepped: no gradient) before the others, so every
    stepped parameter's stream (its position) moves by one."""
    optimizer.param_groups.insert(0, {**optimizer.param_groups[0], "params": [torch.zeros(3)]})


def _group_holding(params: list[Tensor], optimizer: core.AdamW) -> dict[str, Any]:
    return next(g for g in optimizer.param_groups if any(p is params[0] for p in g["params"]))


def _reseed(params: list[Tensor], optimizer: core.AdamW) -> None:
    _group_holding(params, optimizer)["rounding_seed"] = 11


def _reorder_group(params: list[Tensor], optimizer: core.AdamW) -> None:
    """The group's first two parameters swapped: each takes the other's stream."""
    members = _group_holding(params, optimizer)["params"]
    members[0], members[1] = members[1], members[0]


STOCHASTIC_CHANGES = (None, _reseed, None, _insert_group_before, None, _reorder_group, None)


@pytest.mark.usefixtures("each_host_checks")
@pytest.mark.parametrize("state_precision", ["full", "8bit"])
@pytest.mark.parametrize("released", [False, True], ids=["step", "step-param"])
@pytest.mark.parametrize("backend", ["default", "fused"])
def test_stochastically_rounded_steps_reuse_their_memo_and_draw_each_steps_bits(
    backend: str, released: bool, state_precision: str
) -> None:
    """Memoized steps round at their own step number with each parameter's own stream,
    bit for bit as the full path does, and follow a changed seed and moved streams (a
    group inserted before, parameters reordered within the group)."""
    reference, other = _stochastic_twins(backend, state_precision, STOCHASTIC_SHAPES)
    for seed in (1, 2):  # the first released steps add states, which remakes earlier memos
        _quantized_step(reference, other, seed, released=released)
    memos = dict(_memos(other[1], released))
    assert len(memos) == (len(other[0]) if released else 1)
    for seed in (3, 4):
        _quantized_step(reference, other, seed, released=released)
    assert _memos(other[1], released) == memos, "a memo was made again: none was reused"
    assert all(memo.streams is not None for memo in memos.values())
    for seed, change in enumerate(STOCHASTIC_CHANGES, start=5):
        _quantized_step(reference, other, seed, change, released=released)
    assert _memos(other[1], released)


@pytest.mark.parametrize("backend", ["triton"])  # the id routes the step to Triton (conftest)
def test_stochastically_rounded_memos_on_the_triton_backend_draw_each_steps_bits(
    backend: str,
) -> None:
    """The same on the Triton backend, released (a shorter run: the interpreter is slow)."""
    shapes = ((16, 300, torch.bfloat16), (37, torch.bfloat16))
    reference, other = _stochastic_twins(backend, "8bit", shapes)
    for seed, change in enumerate((None, None, _insert_group_before, None), start=1):
        _quantized_step(reference, other, seed, change, released=True)
    assert _memos(other[1], True)
