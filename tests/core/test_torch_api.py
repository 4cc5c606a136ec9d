"""What code written for torch.optim does with an optimizer, done to adamkit's: replacing
the state table, load_state_dict hooks, torch-only flags in a param group, numpy scalars
from a scheduler, OneCycleLR. Each with default flags and every backend, against
torch.optim.AdamW where the math coincides."""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import core
from core import quantization
from core.backends import cpu_kernel
from tests.core.cases import TRAINING_BACKENDS, make_batches, make_model

HYPERPARAMETERS = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}
"""torch's AdamW defaults besides lr: the same update in both libraries."""


def _wide_model() -> nn.Module:
    """A 64 x 80 weight, so state_precision='8bit' quantizes it (4096 elements or more)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 80), nn.Tanh(), nn.Linear(80, 3)
    )


def _steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    count: int,
    between: Callable[[int], None] = lambda step: None,
) -> list[torch.Tensor]:
    """count steps over fixed batches, calling between(step) before each."""
    for step, (x, y) in enumerate(make_batches(torch.float32, count)):
        between(step)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("state_precision", ["full", "8bit"])
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_replaced_state_table_trains_on_as_a_cleared_one(
    backend: str, state_precision: str
) -> None:
    """`optimizer.state = defaultdict(dict)` (a common reset) used to crash the second
    step after it: the step memo read a counter only adamkit's own table has."""
    kwargs = {**HYPERPARAMETERS, **TRAINING_BACKENDS[backend], "state_precision": state_precision}
    runs = []
    for reset in ("replaced", "cleared", "torch"):
        model = _wide_model()
        if reset == "torch":
            if state_precision == "8bit":
                continue
            optimizer: Any = torch.optim.AdamW(model.parameters(), **HYPERPARAMETERS)
        else:
            optimizer = core.AdamW(model.parameters(), **kwargs)

        def restart(step: int, optimizer: Any = optimizer, reset: str = reset) -> None:
            if step == 3:
                if reset == "cleared":
                    optimizer.state.clear()
                else:
                    optimizer.state = collections.defaultdict(dict)

        runs.append(_steps(model, optimizer, 6, restart))
    for run in runs[1:]:
        for a, b in zip(runs[0], run, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_load_state_dict_hooks_run_in_torchs_order(backend: str) -> None:
    """A pre-hook sees the state dict before any check (here it upgrades a checkpoint
    whose first moment was saved as 'm'), and a post-hook sees the state as loaded, its
    changes kept (here it restarts the step count): as with torch.optim.AdamW. adamkit
    used to check the dict before the pre-hooks and to restore step counts after the
    post-hooks."""

    def rename(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        state = {
            i: {("exp_avg" if k == "m" else k): v for k, v in s.items()}
            for i, s in state_dict["state"].items()
        }
        return {**state_dict, "state": state}

    def restart_steps(optimizer: Any) -> None:
        for state in optimizer.state.values():
            state["step"] = torch.zeros_like(state["step"])

    source_model = make_model()
    source = torch.optim.AdamW(source_model.parameters(), **HYPERPARAMETERS)
    _steps(source_model, source, 3)
    old_format = copy.deepcopy(source.state_dict())
    for state in old_format["state"].values():
        state["m"] = state.pop("exp_avg")

    runs = []
    for make in (
        lambda params: torch.optim.AdamW(params, **HYPERPARAMETERS),
        lambda params: core.AdamW(params, **HYPERPARAMETERS, **TRAINING_BACKENDS[backend]),
    ):
        model = make_model()
        model.load_state_dict(source_model.state_dict())
        optimizer = make(model.parameters())
        optimizer.register_load_state_dict_pre_hook(rename)
        optimizer.register_load_state_dict_post_hook(restart_steps)
        optimizer.load_state_dict(copy.deepcopy(old_format))
        assert all(float(s["step"]) == 0 for s in optimizer.state.values())
        runs.append(_steps(model, optimizer, 3))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_state_dict_post_hooks_see_the_finished_dict(backend: str) -> None:
    """A post-hook that rewrites the groups to torch.optim.AdamW's keys (for code that
    validates them) failed with KeyError 'decouple_wd': core added its keys after the
    post-hooks ran, which also brought back any key a hook removed."""
    torch_keys = {"lr", "betas", "eps", "weight_decay", "amsgrad", "params"}

    def to_torch_keys(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        groups = [
            {k: v for k, v in g.items() if k in torch_keys} for g in state_dict["param_groups"]
        ]
        return {"state": state_dict["state"], "param_groups": groups}

    seen: list[set[str]] = []
    results = []
    for make in (
        lambda params: torch.optim.AdamW(params, **HYPERPARAMETERS),
        lambda params: core.AdamW(params, **HYPERPARAMETERS, **TRAINING_BACKENDS[backend]),
    ):
        model = make_model()
        optimizer = make(model.parameters())
        _steps(model, optimizer, 2)
        optimizer.register_state_dict_post_hook(
            lambda o, sd: seen.append(set(sd["param_groups"][0]))
        )
        optimizer.register_state_dict_post_hook(to_torch_keys)
        results.append(optimizer.state_dict())
    torch_saved, core_saved = results
    assert [set(g) for g in core_saved["param_groups"]] == [
        set(g) for g in torch_saved["param_groups"]
    ]
    assert seen[1] >= {"decoupled_weight_decay", "maximize", "capturable", "differentiable"}
    # what the hook kept is enough for torch to continue adamkit's run
    model = make_model()
    torch_optimizer = torch.optim.AdamW(model.parameters(), **HYPERPARAMETERS)
    torch_optimizer.load_state_dict(core_saved)
    _steps(model, torch_optimizer, 1)


@pytest.mark.bad_input
@pytest.mark.parametrize("flag", ["maximize", "capturable", "differentiable"])
@pytest.mark.parametrize("how", ["constructor group", "add_param_group", "set by hand"])
def test_torch_only_flags_in_a_group_are_refused_not_ignored(flag: str, how: str) -> None:
    """Not constructor arguments (a TypeError), but a group can carry them: maximize=True
    used to be ignored (the step minimized) and state_dict() saved it as False."""
    model = make_model()
    params = list(model.parameters())
    where = "param group 1" if how == "add_param_group" else "param group 0"
    message = re.escape(f"Invalid {flag} in {where}: True. Allowed: False (AdamW ")
    if how == "constructor group":
        with pytest.raises(ValueError, match=rf"^{message}"):
            core.AdamW([{"params": params, flag: True}], lr=1e-2)
        return
    optimizer = core.AdamW(params[:2], lr=1e-2)
    _steps(model, optimizer, 1)
    before = (copy.deepcopy(optimizer.state_dict()), [p.detach().clone() for p in params])
    if how == "add_param_group":
        with pytest.raises(ValueError, match=rf"^{message}"):
            optimizer.add_param_group({"params": params[2:], flag: True})
        assert len(optimizer.param_groups) == 1
        return
    optimizer.param_groups[0][flag] = True
    with pytest.raises(ValueError, match=rf"^{message}"):
        _steps(model, optimizer, 1)
    for p, saved in zip(params, before[1], strict=True):
        assert torch.equal(p, saved)
    assert optimizer.state_dict()["state"][0]["step"] == before[0]["state"][0]["step"]


def test_a_torch_checkpoint_with_capturable_groups_loads_and_continues() -> None:
    """capturable and differentiable say how torch stepped (CUDA graphs, autograd through
    the step), not what was learnt: dropped on load, so a checkpoint from a GPU run with
    capturable=True continues here as one without it."""
    source_model = make_model()
    source = torch.optim.AdamW(source_model.parameters(), **HYPERPARAMETERS)
    _steps(source_model, source, 3)
    saved = copy.deepcopy(source.state_dict())
    for group in saved["param_groups"]:
        group.update(capturable=True, differentiable=True)
    runs = []
    for cls in (torch.optim.AdamW, core.AdamW):
        model = make_model()
        model.load_state_dict(source_model.state_dict())
        optimizer = cls(model.parameters(), **HYPERPARAMETERS)
        optimizer.load_state_dict(
            copy.deepcopy(source.state_dict()) if cls is torch.optim.AdamW else saved
        )
        runs.append(_steps(model, optimizer, 3))
    assert not {"capturable", "differentiable"} & optimizer.param_groups[0].keys()
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_numpy_scalars_are_numbers(backend: str) -> None:
    """A LambdaLR whose lambda returns np.float32 (numpy's cosine, say), and np.float32
    betas: refused before as 'not a finite number'; now trained as their Python floats."""
    runs = []
    for scalar in (float, np.float32):
        model = make_model()
        optimizer = core.AdamW(
            model.parameters(),
            lr=1e-2,
            betas=(scalar(0.9), scalar(0.999)),
            **TRAINING_BACKENDS[backend],
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step, scalar=scalar: scalar(np.cos(0.1 * step))
        )
        runs.append(
            _steps(model, optimizer, 4, lambda step, s=schedule: s.step() if step else None)
        )
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


def test_one_cycle_sets_the_peak_fully_decoupled_decay_is_relative_to() -> None:
    """OneCycleLR writes its max_lr into every group, the key adamkit (as optimi) reads as
    the peak of the schedule for fully decoupled decay: the decay follows OneCycle's peak,
    whatever max_lr the optimizer was built with (documented). With zero gradients the
    step is the decay alone: θ · (1 − weight_decay · lr / max_lr), max_lr OneCycle's 0.1."""
    weight = nn.Parameter(torch.randn(4, 3))
    optimizer = core.AdamW([weight], lr=1e-3, weight_decay=1e-2, decouple_lr=True, max_lr=1e-3)
    torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    lr = optimizer.param_groups[0]["lr"]
    before = weight.detach().clone()
    weight.grad = torch.zeros_like(weight)
    optimizer.step()
    expected = before * (1 - 1e-2 * lr / 0.1)
    torch.testing.assert_close(weight.detach(), expected, atol=0, rtol=1e-6)
    assert not torch.allclose(weight.detach(), before * (1 - 1e-2 * lr / 1e-3))


_SCHEDULES: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 0.9**t),
    "MultiplicativeLR": lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda t: 0.8),
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [2, 5], gamma=0.3),
    "ConstantLR": lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=3),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.2, 1.0, total_iters=4),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.7),
    "PolynomialLR": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=6, power=2),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        o, T_0=3
    ),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [
            torch.optim.lr_scheduler.LinearLR(o, 0.25, 1.0, total_iters=3),
            torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8),
        ],
        milestones=[3],
    ),
    "ChainedScheduler": lambda o: torch.optim.lr_scheduler.ChainedScheduler(
        [
            torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=4),
            torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
        ]
    ),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0),
    # Both cycle the momentum too: torch writes betas[0] into each group every step.
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(
        o, base_lr=1e-3, max_lr=2e-2, step_size_up=2, cycle_momentum=True
    ),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=2e-2, total_steps=9),
}


def test_every_torch_scheduler_class_is_covered() -> None:
    """A torch release that adds a scheduler class fails here until it joins _SCHEDULES."""
    base = torch.optim.lr_scheduler.LRScheduler
    public = {
        name
        for name, value in vars(torch.optim.lr_scheduler).items()
        if isinstance(value, type)
        and not name.startswith("_")
        and (issubclass(value, base) or name == "ReduceLROnPlateau")
        and name not in {"LRScheduler", "_LRScheduler"}
    }
    assert public <= _SCHEDULES.keys(), sorted(public - _SCHEDULES.keys())


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize("schedule", list(_SCHEDULES))
def test_every_torch_scheduler_drives_adamkit_as_it_drives_torch(
    schedule: str, backend: str
) -> None:
    """Each torch.optim.lr_scheduler class over 8 steps: the same lr (and, where it cycles
    them, betas) in every group at every step, and the same parameters as torch.optim.AdamW."""
    runs = []
    for make in (
        lambda params: torch.optim.AdamW(params, **HYPERPARAMETERS),
        lambda params: core.AdamW(params, **HYPERPARAMETERS, **TRAINING_BACKENDS[backend]),
    ):
        model = make_model()
        optimizer = make(model.parameters())
        scheduler = _SCHEDULES[schedule](optimizer)
        seen: list[tuple[float, float]] = []

        def advance(
            step: int,
            o: torch.optim.Optimizer = optimizer,
            s: Any = scheduler,
            seen: list[tuple[float, float]] = seen,
        ) -> None:
            if step and schedule == "ReduceLROnPlateau":
                s.step(1.0)  # a loss that stops improving
            elif step:
                s.step()
            group = o.param_groups[0]
            seen.append((float(group["lr"]), float(group["betas"][0])))

        runs.append((_steps(model, optimizer, 8, advance), seen))
    (torch_params, torch_seen), (params, seen) = runs
    assert seen == torch_seen
    assert len({lr for lr, _ in seen}) > 1, "the schedule moved the lr"
    for a, b in zip(params, torch_params, strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0)


def _train_on(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Any], around_step: Any
) -> None:
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        with around_step():
            optimizer.step()


@pytest.mark.parametrize("state_precision", ["full", "8bit"])
@pytest.mark.parametrize("algorithm", ["AdamW", "NAdam"])
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_default_device_set_around_the_step_does_not_reach_it(
    backend: str, algorithm: str, state_precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.set_default_device puts every tensor made without a device there ('meta'
    here; a GPU's for CPU-offloaded parameters): host counters, the count torch's native
    kernel reads and the 8-bit code maps cached for the process were made there. The
    first step failed deep inside and left counters that refused every later step, fp32
    updates were skipped silently (torch's kernel on a meta count), a cached map broke
    every later 8-bit step of the process, and the fused 8-bit kernel read a map at
    address 0 (a crash). Fresh caches, first filled under the default device."""
    monkeypatch.setattr(
        quantization, "_host_values", functools.cache(quantization._host_values.__wrapped__)
    )
    monkeypatch.setattr(cpu_kernel, "map_words", functools.cache(cpu_kernel.map_words.__wrapped__))
    batches = make_batches(torch.float32, 4)
    runs = []
    for default in ("meta", None):
        model = _wide_model()
        optimizer = getattr(core, algorithm)(
            model.parameters(),
            lr=1e-2,
            state_precision=state_precision,
            **TRAINING_BACKENDS[backend],
        )
        _train_on(model, optimizer, batches, lambda device=default: torch.device(device or "cpu"))
        for state in optimizer.state.values():
            assert {value.device.type for value in state.values()} == {"cpu"}
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


FLATTENED = "flatten_optimizer_state_dict"


@pytest.mark.parametrize("state_precision", ["full", "8bit"])
@pytest.mark.parametrize("algorithm", ["AdamW", "Adam", "RAdam", "NAdam", "ADOPT"])
def test_a_flattened_distributed_checkpoint_resumes_exactly(
    algorithm: str, state_precision: str
) -> None:
    """torch.distributed.checkpoint's flattened optimizer state dict (torchtitan's default)
    loads only the group keys the live optimizer's groups hold: the 8-bit codes' format
    and the moments' family, kept only in saved dicts, were dropped there, so 8-bit state
    was refused as an older format and an Adam group holding a bool 'clip' key of the
    user's as ADOPT's. Default flags, as users build it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(**{FLATTENED: True})
    batches = make_batches(torch.float32, 4)
    kwargs: dict[str, Any] = {"lr": 1e-2, "state_precision": state_precision}
    if algorithm == "Adam":
        kwargs["amsgrad"] = True

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = _wide_model()
        groups = [{"params": list(model.parameters())}]
        if algorithm != "ADOPT":
            groups[0]["clip"] = True  # a key of the user's own, as torch keeps them
        return model, getattr(core, algorithm)(groups, **kwargs)

    uninterrupted_model, uninterrupted = build()
    _train_on(uninterrupted_model, uninterrupted, batches, contextlib.nullcontext)
    model, optimizer = build()
    _train_on(model, optimizer, batches[:2], contextlib.nullcontext)
    saved = get_optimizer_state_dict(model, optimizer, options=options)
    assert any(key.endswith(".state_code_format") for key in saved)
    resumed_model, resumed = build()
    resumed_model.load_state_dict(model.state_dict())
    set_optimizer_state_dict(resumed_model, resumed, saved, options=options)
    _train_on(resumed_model, resumed, batches[2:], contextlib.nullcontext)
    for a, b in zip(uninterrupted_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("state_precision", ["full", "8bit"])
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_stepped_model_converts_by_swapping_its_parameters(
    backend: str, state_precision: str
) -> None:
    """torch.utils.swap_tensors (module.to() under set_swap_module_params_on_conversion,
    to_empty, DTensor conversions) refuses a tensor with a weak reference: the Triton
    backend's plan caches held one to each bucket's first parameter, so after one step
    the model could not be converted. The conversion then trains on as on the loop."""
    batches = make_batches(torch.float32, 4)
    runs = []
    for flags in (TRAINING_BACKENDS[backend], {"foreach": False, "fused": False}):
        model = _wide_model()
        optimizer = core.AdamW(
            model.parameters(), lr=1e-2, state_precision=state_precision, **flags
        )
        _train_on(model, optimizer, batches[:2], contextlib.nullcontext)
        swapping = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            model.to(torch.float64)
        finally:
            torch.__future__.set_swap_module_params_on_conversion(swapping)
        _train_on(
            model,
            optimizer,
            [(x.double(), y.double()) for x, y in batches[2:]],
            contextlib.nullcontext,
        )
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
