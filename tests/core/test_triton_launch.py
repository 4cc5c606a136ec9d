"""The Triton backend's launch path, on CPU tensors through Triton's interpreter: which
launches a step makes, what it caches and re-uploads, what it refuses, and that tensors
whose addresses are not 16-byte aligned (the scalar kernels) step as the loop does."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch import Tensor

import core
from core.backends import host_checks
from core.coefficients import AdamStepCoefficients
from tests.core.cases import BACKENDS, LR, Case, one_case_per_algorithm
from tests.core.test_fused import assert_step_matches, paired_steps


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The Triton backend with empty caches (the conftest routes CPU steps to it), once
    the C++ host checks are built (or known not to build). A plan's key is their
    description of its tensors, bytes from the C++ checks and tuples from the Python
    fallback that steps use while the build runs in the background, so a build ending
    mid-test made every plan once more (seen in CI, between a test's second and third
    steps, with the kernel cache cold)."""
    from core.backends import triton as triton_backend

    host_checks.compiled_checks()  # waits for the build
    monkeypatch.setattr(triton_backend, "_plans", type(triton_backend._plans)())
    monkeypatch.setattr(triton_backend, "_blocks", {})
    return triton_backend


class _CountingLaunches:
    """Wraps the real kernel and records each launch's ALIGNED switch."""

    def __init__(self, kernel: Any) -> None:
        self.kernel, self.aligned = kernel, []

    def __getitem__(self, grid: Any) -> Any:
        launch = self.kernel[grid]

        def run(*args: Any, **kwargs: Any) -> Any:
            self.aligned.append(kwargs["ALIGNED"])
            return launch(*args, **kwargs)

        return run


def _tables(backend: Any) -> list[Tensor]:
    """Every device table the backend holds, in a stable order."""
    tables = [t.values for t in backend._blocks.values()]
    for plans in backend._plans.values():
        for plan in plans.values():
            tables += [launch.addresses.values for launch in plan.launches]
    return tables


def _offset(t: Tensor) -> Tensor:
    """A copy of t one element past a 16-byte boundary: dense, but not aligned."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype)
    return storage[1:].view(t.shape).copy_(t)


@pytest.mark.parametrize("device", ["triton"])
def test_one_launch_per_dtype_and_nothing_rebuilt_while_tensors_stay_put(
    device: str, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = _CountingLaunches(backend._step_kernel)
    monkeypatch.setattr(backend, "_step_kernel", counting)
    generator = torch.Generator().manual_seed(3)
    params = [torch.randn(17 * i + 1, generator=generator) for i in range(40)]
    params += [torch.randn(300, generator=generator).to(torch.bfloat16) for _ in range(10)]
    params = [p.requires_grad_() for p in params]
    optimizer = core.AdamW(params, lr=LR, **BACKENDS["fused"])

    def step(new_gradients: bool) -> list[Tensor]:
        for p in params:
            grad = torch.randn(p.shape, generator=generator).to(p.dtype)
            if new_gradients or p.grad is None:
                p.grad = grad
            else:
                p.grad.copy_(grad)
        optimizer.step()
        return _tables(backend)

    first = step(new_gradients=True)
    same = [step(new_gradients=False) for _ in range(2)]
    for p in params:  # gradients elsewhere: only the address tables are new
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype).clone()
    moved = step(new_gradients=False)
    assert counting.aligned == [True, True] * 4  # fp32 and bf16, all aligned, each step
    assert len(first) == 4  # two block tables, two address tables
    for tables in same:
        assert all(a is b for a, b in zip(tables, first, strict=True))
    assert moved[:2] == first[:2] and len(moved) == 6  # same block tables, new addresses


@pytest.mark.parametrize("device", ["triton"])
@pytest.mark.parametrize("case", one_case_per_algorithm(), ids=lambda c: c.id)
def test_unaligned_tensors_take_the_scalar_kernel_and_step_as_the_loop_does(
    device: str, case: Case, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every other tensor one element off a 16-byte boundary, sizes around the block:
    the aligned ones keep their vectorised launch, the others take a second one."""
    counting = _CountingLaunches(backend._step_kernel)
    monkeypatch.setattr(backend, "_step_kernel", counting)
    generator = torch.Generator().manual_seed(5)
    params = [
        torch.randn(size, generator=generator).to(dtype)
        for dtype in (torch.float32, torch.bfloat16)
        for size in (1, 1023, 1024, 1025, 2048)
    ]
    offsets = itertools.cycle([False, True])  # the same tensors every step

    def place(t: Tensor) -> Tensor:
        return _offset(t) if next(offsets) else t.clone()

    for step, expected, actual in paired_steps(case, "triton", params, steps=3, place=place):
        assert_step_matches(step, expected, actual)
    launches = counting.aligned
    assert len(launches) == 2 * 2 * 3 and sorted(launches) == [False] * 6 + [True] * 6


@pytest.mark.parametrize("device", ["triton"])
def test_gradient_release_keeps_a_plan_per_parameter(
    device: str, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One launch per parameter, 200 parameters: the second round re-uploads nothing (an
    LRU of 64 tables would have evicted every one of them)."""
    params = [torch.nn.Parameter(torch.randn(3 + i % 5)) for i in range(200)]
    optimizer = core.AdamW(params, lr=LR, gradient_release=True, **BACKENDS["fused"])
    rounds = []
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
            optimizer.step(param=p)  # what the release hook calls inside backward
            optimizer.zero_grad(param=p)
        rounds.append(_tables(backend))
    assert len(backend._plans) == 200
    # Gradients are freed and reallocated; where one came back elsewhere its parameter
    # has one more address table, and nothing else is new.
    kept = {id(t) for t in rounds[0]}
    assert len(kept & {id(t) for t in rounds[1]}) == len(rounds[0])
    assert len(backend._blocks) == 5  # one block table per distinct size, shared


def _coefficients() -> AdamStepCoefficients:
    return AdamStepCoefficients(
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        l2_weight_decay=0.0,
        param_decay=1.0,
        momentum_step=1e-3,
        grad_step=0.0,
        bias_correction2_sqrt=0.5,
        adaptive=True,
        amsgrad=False,
        update_params=True,
    )


def adam_step_of(backend: Any, lists: dict[str, list[Any]]) -> None:
    """The backend's Adam step over lists named as state keys, without AMSGrad or Kahan."""
    backend.adam_step(
        lists["param"],
        lists["grad"],
        lists["exp_avg"],
        lists["exp_avg_sq"],
        None,
        [None] * len(lists["param"]),
        _coefficients(),
    )


class _Subclass(Tensor):
    """A tensor subclass: its memory is real, but the kernel must not be handed one."""


@pytest.mark.bad_input
@pytest.mark.parametrize("device", ["triton"])
@pytest.mark.parametrize(
    ("which", "make", "message"),
    [
        ("param", lambda t: t.as_subclass(_Subclass), r"param\[1\].*_Subclass of torch\.float32"),
        ("exp_avg", lambda t: t.double(), r"exp_avg\[1\].*Tensor of torch\.float64 on cpu"),
        ("exp_avg_sq", lambda t: t.to("meta"), r"exp_avg_sq\[1\].*on meta"),
        ("grad", lambda t: t.as_subclass(_Subclass), r"grad\[1\].*_Subclass"),
    ],
    ids=["subclass-param", "dtype-state", "meta-state", "subclass-grad"],
)
def test_a_tensor_the_kernel_cannot_address_is_refused_by_name(
    device: str, backend: Any, which: str, make: Any, message: str
) -> None:
    lists = {
        name: [torch.zeros(4), torch.zeros(4)]
        for name in ("param", "grad", "exp_avg", "exp_avg_sq")
    }
    lists[which][1] = make(lists[which][1])
    before = [t.clone() for t in lists["param"]]
    with pytest.raises(ValueError, match=rf"Invalid {message}.*Allowed: a plain torch\.Tensor"):
        adam_step_of(backend, lists)
    for p, b in zip(lists["param"], before, strict=True):
        assert torch.equal(p.as_subclass(Tensor), b)


@pytest.mark.parametrize("device", ["triton"])
def test_a_tensor_of_another_dtype_at_a_planned_address_is_checked_again(
    device: str, backend: Any
) -> None:
    """A moment swapped for an int16 view of its own memory (same address, as many
    elements): the cached plan, keyed by addresses and sizes only, was reused unchecked and
    the kernel wrote it as float32, 2 bytes per element past its end. On a GPU the caching
    allocator hands an address back routinely."""
    lists = {name: [torch.zeros(4096)] for name in ("param", "grad", "exp_avg", "exp_avg_sq")}

    def step() -> None:
        adam_step_of(backend, lists)

    step()
    memory = lists["exp_avg"][0]
    after_it = memory.view(torch.int16)[4096:].fill_(7)
    lists["exp_avg"][0] = memory.view(torch.int16)[:4096]
    with pytest.raises(ValueError, match=r"Invalid exp_avg\[0\].*of torch\.int16"):
        step()
    assert bool((after_it == 7).all())


@pytest.mark.parametrize("device", ["triton"])
def test_fsdp2_parameters_find_their_plans_again_each_step(
    device: str, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DTensor parameters always take the full path, where the plans are looked up by
    each bucket's first local tensor: torch 2.13 gives a new local view each step, so
    keyed by the tensor every step planned (and uploaded its address table) again."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from tests.processes import gloo_group

    made = []
    make_plan = backend._make_plan
    monkeypatch.setattr(backend, "_make_plan", lambda *args: made.append(1) or make_plan(*args))
    with gloo_group():
        mesh = init_device_mesh("cpu", (1,))
        params = [
            torch.nn.Parameter(distribute_tensor(torch.randn(8), mesh, [Shard(0)]))
            for _ in range(4)
        ]
        grads = [distribute_tensor(torch.ones(8), mesh, [Shard(0)]) for _ in params]
        optimizer = core.AdamW([{"params": [p]} for p in params], lr=LR, **BACKENDS["fused"])
        per_step = []
        for _ in range(4):
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            made.clear()
            optimizer.step()
            per_step.append(len(made))
    assert per_step[0] == 4 and per_step[2:] == [0, 0]
