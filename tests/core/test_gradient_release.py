"""Gradient release equals ordinary training, and refuses what it cannot do."""

from __future__ import annotations

import copy
import gc
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

import core
from core.optimizer import step_released_param
from tests.core.cases import (
    LR,
    TRAINING_BACKENDS,
    Case,
    assert_unchanged,
    make_batches,
    make_model,
    one_case_per_algorithm,
    snapshot,
)
from tests.processes import gloo_group

STEPS = 24


def _apply_schedule(optimizer: torch.optim.Optimizer, step: int) -> None:
    """Warmup then decay, written into the live groups as a scheduler does."""
    for group in optimizer.param_groups:
        group["lr"] = group["max_lr"] * min(1.0, (step + 1) / 5) * 0.97**step


def _train_pair(case: Case, backend: dict, steps: int = STEPS) -> tuple:
    """Run ordinary and released training side by side on the same batches.

    Midway both optimizers go through a state_dict round trip (torch replaces the param
    groups) and then gain a new param group; the schedule must keep reaching both.
    """
    batches = make_batches(torch.float32, steps)
    runs = []
    for release in (False, True):
        model = make_model()
        extra = nn.Parameter(torch.zeros(3), requires_grad=False)  # trained from midway
        optimizer = case.make(model.parameters(), gradient_release=release, **backend)
        if release:
            core.prepare_for_gradient_release(model, optimizer)
        grads_seen = []
        for step, (x, y) in enumerate(batches):
            if step == steps // 3:
                optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
            if step == steps // 2:
                optimizer.add_param_group({"params": [extra.requires_grad_()], "lr": LR / 2})
            _apply_schedule(optimizer, step)
            loss = nn.functional.mse_loss(model(x) + extra, y)
            loss.backward()
            grads_seen.append([p.grad is None for p in [*model.parameters(), extra]])
            optimizer.step()
            optimizer.zero_grad()
        runs.append((model, extra, optimizer, grads_seen))
    return runs


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize("case", one_case_per_algorithm(), ids=lambda c: c.id)
def test_release_equals_ordinary_training_bit_for_bit(case: Case, backend: str) -> None:
    (model, extra, optimizer, _), (released_model, released_extra, released_opt, grads_seen) = (
        _train_pair(case, TRAINING_BACKENDS[backend])
    )
    for a, b in zip(
        [*model.parameters(), extra], [*released_model.parameters(), released_extra], strict=True
    ):
        assert torch.equal(a, b)
    assert all(all(none for none in step) for step in grads_seen), "release frees every gradient"
    assert float(extra.detach().abs().sum()) > 0, "the group added mid-run must have been trained"
    for p, q in zip(
        [*model.parameters(), extra], [*released_model.parameters(), released_extra], strict=True
    ):
        for key, value in optimizer.state[p].items():
            assert torch.equal(released_opt.state[q][key], value), key


def _train_while_groups_change(case: Case, backend: dict, release: bool) -> tuple:
    """Train while parameters leave and join the groups in place, still requiring grad:
    the first weight is taken out (layer freezing that leaves requires_grad on), then the
    first bias is swapped for a new parameter in its list (Composer's module surgery keeps
    the list's length), then a group is added, which rebuilds every lookup."""
    model = make_model()
    first_weight, first_bias, *_ = model.parameters()
    swapped_in = nn.Parameter(torch.zeros(3))
    added = nn.Parameter(torch.zeros(3))
    optimizer = case.make(model.parameters(), gradient_release=release, **backend)
    if release:
        core.prepare_for_gradient_release(model, optimizer)
    params = optimizer.param_groups[0]["params"]
    for step, (x, y) in enumerate(make_batches(torch.float32, 12)):
        if step == 3:
            params.remove(first_weight)
            del optimizer.state[first_weight]
        if step == 6:
            params[params.index(first_bias)] = swapped_in
            del optimizer.state[first_bias]
        if step == 9:
            optimizer.add_param_group({"params": [added], "lr": LR / 2})
        nn.functional.mse_loss(model(x) + swapped_in + added, y).backward()
        optimizer.step()
        optimizer.zero_grad()  # clears the groups' gradients only, as torch's does
    return [*model.parameters(), swapped_in, added]


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_release_leaves_parameters_taken_out_of_the_groups_alone(backend: str) -> None:
    """A release hook outlives its parameter's place in the groups: it must neither step the
    parameter with its old group's hyperparameters nor fail inside backward, but keep the
    gradient, as ordinary training keeps it for a parameter no optimizer holds."""
    case = one_case_per_algorithm()[0]
    ordinary = _train_while_groups_change(case, TRAINING_BACKENDS[backend], release=False)
    released = _train_while_groups_change(case, TRAINING_BACKENDS[backend], release=True)
    for a, b in zip(ordinary, released, strict=True):
        assert torch.equal(a, b)
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad)
    first_weight, first_bias = ordinary[:2]
    assert first_weight.grad is not None and first_bias.grad is not None, "kept, accumulating"
    assert float(released[-2].abs().sum()) > 0 and float(released[-1].abs().sum()) > 0


def _train_with_activation_checkpointing(
    case: Case, backend: dict, release: bool, reentrant: bool
) -> tuple[list[torch.Tensor], list[list[bool]]]:
    """One weight applied in two checkpointed segments: under reentrant checkpointing each
    segment's backward is an autograd run of its own, so that weight's gradient arrives in
    two parts, one hook call each."""
    torch.manual_seed(0)
    shared, head = nn.Linear(6, 6), nn.Linear(6, 3)
    model = nn.ModuleList([shared, head])
    optimizer = case.make(model.parameters(), gradient_release=release, **backend)
    if release:
        core.prepare_for_gradient_release(model, optimizer)
    kept = []
    for x, y in make_batches(torch.float32, 6):
        h = x.requires_grad_()  # reentrant checkpointing needs an input that requires grad
        for _ in range(2):
            h = torch.utils.checkpoint.checkpoint(
                lambda t: torch.tanh(shared(t)), h, use_reentrant=reentrant
            )
        nn.functional.mse_loss(head(h), y).backward()
        kept.append([p.grad is not None for p in model.parameters()])
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()], kept


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_release_under_activation_checkpointing_equals_ordinary_training(
    backend: str, reentrant: bool
) -> None:
    """Reentrant checkpointing hands a weight used in two segments its gradient in two
    parts: release stepped it once per part (two steps a batch from half-gradients, 0.03
    off after three batches). Gradients that arrive inside a nested backward are now left
    to optimizer.step(), with a warning; non-reentrant checkpointing releases as usual."""
    case = one_case_per_algorithm()[0]
    flags = TRAINING_BACKENDS[backend]
    ordinary, _ = _train_with_activation_checkpointing(case, flags, False, reentrant)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        released, kept = _train_with_activation_checkpointing(case, flags, True, reentrant)
    for a, b in zip(ordinary, released, strict=True):
        assert torch.equal(a, b)
    nested = [w for w in caught if "nested backward" in str(w.message)]
    if reentrant:
        assert len(nested) == 1 and "use_reentrant=False" in str(nested[0].message)
        assert all(step == [True, True, False, False] for step in kept), "head released"
    else:
        assert not nested and not any(any(step) for step in kept)


@pytest.mark.bad_input
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_gradient_after_its_release_step_is_refused(backend: str) -> None:
    """A weight used inside a reentrant checkpoint segment and again after it in the
    forward: its later use's gradient arrives first (outside the nested backward), so
    release stepped it from that part alone and the segment's part, arriving inside the
    nested backward, was left in .grad and dropped by the full step (0.26 off after three
    steps). The same for a backward run after the training backward with release paused
    (Lightning's LightningModule.on_after_backward). Both are refused by optimizer.step()
    before it changes anything; non-reentrant checkpointing trains exactly."""
    case = one_case_per_algorithm()[0]
    flags = TRAINING_BACKENDS[backend]

    def train(release: bool, reentrant: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        inner, outer = nn.Linear(6, 6), nn.Linear(6, 6)
        model = nn.ModuleList([inner, outer])
        optimizer = case.make(model.parameters(), gradient_release=release, **flags)
        if release:
            core.prepare_for_gradient_release(model, optimizer)
        for x, y in make_batches(torch.float32, 3):
            h = torch.utils.checkpoint.checkpoint(
                lambda t: outer(torch.tanh(inner(t))),
                x.requires_grad_(),
                use_reentrant=reentrant,
            )
            nn.functional.mse_loss(outer(h)[:, :3], y).backward()
            optimizer.step()
            optimizer.zero_grad()
        return model, optimizer

    ordinary, _ = train(release=False, reentrant=False)
    released, _ = train(release=True, reentrant=False)
    for a, b in zip(ordinary.parameters(), released.parameters(), strict=True):
        assert torch.equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the nested-backward warning
        with pytest.raises(RuntimeError, match=r"after release had stepped it.*use_reentrant"):
            train(release=True, reentrant=True)  # refused inside backward, at the first part

    torch.manual_seed(0)
    model = make_model()
    optimizer = case.make(model.parameters(), gradient_release=True, **flags)
    core.prepare_for_gradient_release(model, optimizer)
    (x, y), *_ = make_batches(torch.float32, 1)
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.release_paused = True
    nn.functional.mse_loss(model(x), y).backward()  # a callback's backward after the step's
    before = snapshot(model, optimizer)
    with pytest.raises(RuntimeError, match=r"parameter\(s\) of shape .* on_after_backward"):
        optimizer.step()
    assert_unchanged(model, optimizer, before)
    optimizer.zero_grad()  # the next training step starts clean
    optimizer.release_paused = False
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


@pytest.mark.bad_input
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize("how", ["flag-written", "parameter-moved"])
def test_release_turned_off_in_a_live_group_is_refused_until_its_hooks_are_removed(
    backend: str, how: str
) -> None:
    """gradient_release=False written into a released group (or a released parameter moved
    into a group without release): the hooks went on stepping and freeing its gradients,
    silently, and its state dict said False. Refused at the next backward before anything
    is stepped; after remove_gradient_release the group trains as ordinary groups do."""
    case = one_case_per_algorithm()[0]
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    groups = [{"params": [model.weight]}, {"params": [model.bias]}]
    if how == "parameter-moved":
        groups.append({"params": [], "gradient_release": False})
    optimizer = case.make(groups, gradient_release=True, **TRAINING_BACKENDS[backend])
    core.prepare_for_gradient_release(model, optimizer)
    batches = make_batches(torch.float32, 3)
    x, y = batches[0]
    nn.functional.mse_loss(model(x)[:, :3], y).backward()
    optimizer.step()
    optimizer.zero_grad()
    if how == "flag-written":
        optimizer.param_groups[1]["gradient_release"] = False
    else:
        optimizer.param_groups[2]["params"].append(optimizer.param_groups[1]["params"].pop())
    group = 1 if how == "flag-written" else 2
    before = snapshot(model, optimizer)
    x, y = batches[1]
    with pytest.raises(
        ValueError,
        match=rf"Invalid gradient_release in param group {group}: False\. Allowed: True "
        r"while release hooks step.*core\.remove_gradient_release\(model\)",
    ):
        nn.functional.mse_loss(model(x)[:, :3], y).backward()
    assert_unchanged(model, optimizer, before)
    core.remove_gradient_release(model)
    ordinary = copy.deepcopy(model)
    twin = dict(zip(model.parameters(), ordinary.parameters(), strict=True))
    reference = case.make(
        [{"params": [twin[p] for p in g["params"]]} for g in optimizer.param_groups],
        **TRAINING_BACKENDS[backend],
    )
    reference.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for x, y in batches[1:]:
        for trained, stepping in ((model, optimizer), (ordinary, reference)):
            stepping.zero_grad()
            nn.functional.mse_loss(trained(x)[:, :3], y).backward()
            stepping.step()
    for a, b in zip(model.parameters(), ordinary.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.bad_input
@pytest.mark.parametrize("step_each_microbatch", [True, False], ids=["step-each", "step-last"])
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_part_after_a_fold_is_refused_inside_backward(
    backend: str, step_each_microbatch: bool
) -> None:
    """With optimizer accumulation, a weight used inside a reentrant segment and after it
    was folded from its later use's part, and the segment's part, left in .grad, was folded
    as a micro-batch of its own by the next step() (or into the next fold): 0.014 off,
    silently. Refused inside the first such backward; a weight used only inside segments
    (every part nested, none folded by a hook) still trains."""
    case = one_case_per_algorithm()[0]

    def train(used_after: bool) -> None:
        torch.manual_seed(0)
        inner, head = nn.Linear(6, 6), nn.Linear(6, 3)
        model = nn.ModuleList([inner, head])
        optimizer = case.make(
            model.parameters(), gradient_release=True, **TRAINING_BACKENDS[backend]
        )
        core.prepare_for_gradient_release(model, optimizer)
        for index, (x, y) in enumerate(make_batches(torch.float32, 6)):
            optimizer.optimizer_accumulation = index % 3 < 2
            h = torch.utils.checkpoint.checkpoint(
                lambda t: torch.tanh(inner(t)), x.requires_grad_(), use_reentrant=True
            )
            if used_after:
                h = torch.tanh(inner(h))
            nn.functional.mse_loss(head(h)[:, :3], y).backward()
            if step_each_microbatch or not optimizer.optimizer_accumulation:
                optimizer.step()
                optimizer.zero_grad()
        assert {float(state["step"]) for state in optimizer.state.values()} == {2.0}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the nested-backward warning
        train(used_after=False)
        with pytest.raises(RuntimeError, match=r"after release had folded it from another part"):
            train(used_after=True)


def _ordinary_and_released(
    backend: str,
    steps: int,
    set_gradients: Callable[[nn.Module, torch.Tensor, torch.Tensor], None],
    after_prepare: Callable[[nn.Module], None] = lambda model: None,
) -> list[tuple[nn.Module, torch.optim.Optimizer]]:
    """Train the first algorithm's case without and with release (after_prepare runs on
    the model once prepared) on the same batches, each batch's gradients made by
    `set_gradients(model, x, y)`, a step and zero_grad after it."""
    case = one_case_per_algorithm()[0]
    runs = []
    for release in (False, True):
        model = make_model()
        optimizer = case.make(
            model.parameters(), gradient_release=release, **TRAINING_BACKENDS[backend]
        )
        if release:
            core.prepare_for_gradient_release(model, optimizer)
            after_prepare(model)
        for x, y in make_batches(torch.float32, steps):
            set_gradients(model, x, y)
            optimizer.step()
            optimizer.zero_grad()
        runs.append((model, optimizer))
    return runs


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_zero_gradients_filled_in_after_release_change_nothing(backend: str) -> None:
    """A loop that gives every parameter without a gradient a zero one before the step
    (to log, or to emulate set_to_none=False) trains as without release: a zero gradient
    after a parameter's release step adds nothing, so it is not refused as a late one."""

    def backward_then_fill_zeros(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        nn.functional.mse_loss(model(x), y).backward()
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    (ordinary, _), (released, _) = _ordinary_and_released(
        backend, steps=4, set_gradients=backward_then_fill_zeros
    )
    for a, b in zip(ordinary.parameters(), released.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_backward_no_step_closed_is_said_at_zero_grad(backend: str) -> None:
    """A GAN loop: the generator's loss reaches the discriminator's released parameters
    and steps them (ordinary training discards those gradients at the discriminator's next
    zero_grad). Release cannot tell such a backward from a training one until zero_grad()
    finds steps no optimizer.step() closed: said once there, with the remedies; a loop
    that steps after each backward says nothing."""
    case = one_case_per_algorithm()[0]
    flags = TRAINING_BACKENDS[backend]

    def gan(freeze: bool) -> list[warnings.WarningMessage]:
        torch.manual_seed(0)
        generator, critic = nn.Linear(3, 6), nn.Linear(6, 1)
        optimizers = []
        for module in (generator, critic):
            optimizer = case.make(module.parameters(), gradient_release=True, **flags)
            core.prepare_for_gradient_release(module, optimizer)
            optimizers.append(optimizer)
        generator_optimizer, critic_optimizer = optimizers
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                critic_optimizer.zero_grad()
                fake = generator(torch.randn(4, 3))
                (critic(fake.detach()).mean() - critic(torch.randn(4, 6)).mean()).backward()
                critic_optimizer.step()
                generator_optimizer.zero_grad()
                critic.requires_grad_(not freeze)
                (-critic(fake).mean()).backward()
                critic.requires_grad_(True)
                generator_optimizer.step()
        return [w for w in caught if "no optimizer.step() followed" in str(w.message)]

    (said,) = gan(freeze=False)
    assert "2 parameter(s)" in str(said.message) and "release_paused" in str(said.message)
    assert gan(freeze=True) == []


def test_two_optimizers_release_their_own_parameters_of_one_model() -> None:
    """A second prepare_for_gradient_release on the same model with another optimizer
    (the head with its own lr) removed the first optimizer's hooks: its parameters kept
    their gradients, with no word. Now each optimizer releases its own. A parameter another
    optimizer releases is refused through another module or add_param_group (each
    backward would step it with one of them only); a new optimizer prepared on the same
    model over the same parameters replaces the old one (a fit after one that raised)."""
    torch.manual_seed(0)
    model = make_model()
    body, head = list(model.parameters())[:-2], list(model.parameters())[-2:]
    first = core.AdamW(body, lr=LR, gradient_release=True)
    second = core.Adam(head, lr=LR, gradient_release=True)
    reference = copy.deepcopy(model)
    plain = [
        core.AdamW(list(reference.parameters())[:-2], lr=LR),
        core.Adam(list(reference.parameters())[-2:], lr=LR),
    ]
    core.prepare_for_gradient_release(model, first)
    core.prepare_for_gradient_release(model, second)
    core.prepare_for_gradient_release(model, second)  # again, at a fit start: replaces its own
    for x, y in make_batches(torch.float32, 3):
        nn.functional.mse_loss(model(x), y).backward()
        assert all(p.grad is None for p in model.parameters())
        nn.functional.mse_loss(reference(x), y).backward()
        for optimizer in (first, second, *plain):
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(reference.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)

    everything = core.AdamW(model.parameters(), lr=LR, gradient_release=True)
    taken = r"already released by another optimizer \((AdamW|Adam)\)"
    with pytest.raises(ValueError, match=taken):
        core.prepare_for_gradient_release(model[2], everything)
    with pytest.raises(ValueError, match=taken):
        second.add_param_group({"params": body[:1]})
    assert len(second.param_groups) == 1 and len(second.released_params) == 2
    core.prepare_for_gradient_release(model, everything)  # replaces both
    assert not first.released_params and not second.released_params
    assert everything.released_params == set(model.parameters())
    core.remove_gradient_release(model)
    assert not core.is_gradient_release_prepared(model) and not everything.released_params


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_gradient_no_hook_stepped_is_stepped_by_the_full_step(backend: str) -> None:
    """Gradients that reach released parameters without a hook call (computed with
    torch.autograd.grad or torch.func and set by hand): the full step skipped every
    released parameter with state, so each was updated at its first step only."""

    def gradients_set_by_hand(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        params = list(model.parameters())
        grads = torch.autograd.grad(nn.functional.mse_loss(model(x), y), params)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clamp(-0.05, 0.05)  # a clipped gradient, as per-sample tricks make

    (ordinary, _), (released, optimizer) = _ordinary_and_released(
        backend, steps=5, set_gradients=gradients_set_by_hand
    )
    for a, b in zip(ordinary.parameters(), released.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(float(state["step"]) == 5 for state in optimizer.state.values())


@pytest.mark.parametrize("release", [False, True], ids=["stepped", "released"])
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_an_accumulation_window_closes_for_a_parameter_its_last_microbatch_skipped(
    backend: str, release: bool
) -> None:
    """A branch used only in a window's first micro-batch (an expert no token of the last
    micro-batch reached): its window stayed open and it was never updated. It now closes
    at the window's last step, as ordinary accumulation (the gradients summed, one step)
    steps every parameter that had a gradient; with agreeing micro-batches both are exact."""
    case = one_case_per_algorithm()[0]
    flags = TRAINING_BACKENDS[backend]
    batches = make_batches(torch.float32, 4)
    results = []
    for accumulate in (False, True):
        model = make_model()
        side = nn.Linear(6, 3)
        params = [*model.parameters(), *side.parameters()]
        optimizer = case.make(params, gradient_release=release and accumulate, **flags)
        if release and accumulate:
            core.prepare_for_gradient_release(nn.ModuleList([model, side]), optimizer)
        for x, y in batches:
            for microbatch in range(2):  # the same micro-batch twice: agreeing gradients
                out = model(x) + (side(x) if microbatch == 0 else 0.0)
                optimizer.optimizer_accumulation = accumulate and microbatch == 0
                nn.functional.mse_loss(out, y).backward()
                if accumulate:  # each micro-batch folded by a step of its own
                    optimizer.step()
                    optimizer.zero_grad()
            if not accumulate:
                optimizer.step()
                optimizer.zero_grad()
        optimizer.optimizer_accumulation = False
        results.append(([p.detach().clone() for p in params], optimizer, params))
    (summed, _, _), (windowed, optimizer, params) = results
    for a, b in zip(summed, windowed, strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0)
    side_state = optimizer.state[params[-1]]
    assert float(side_state["step"]) == 4 and float(side_state["window_microbatches"]) == 0


def _windowed_run(
    case: Case, flags: dict[str, Any], release: bool, route: str | None
) -> list[torch.Tensor]:
    """Windows of two micro-batches (a side branch only in each window's first), with a
    checkpoint taken inside the third window and loaded into a fresh model and optimizer
    (route None: no checkpoint). "dropped" loses the windows' counts as
    torch.distributed.checkpoint's loader does; "reopened" then restores them.
    "full_state": a checkpoint between windows (before the third), through torch's
    full-state route (get/set_optimizer_state_dict with full_state_dict=True)."""
    batches = make_batches(torch.float32, 5)

    def build() -> tuple[nn.ModuleList, torch.optim.Optimizer]:
        modules = nn.ModuleList([make_model(), nn.Linear(6, 3)])
        optimizer = case.make(modules.parameters(), gradient_release=release, **flags)
        if release:
            core.prepare_for_gradient_release(modules, optimizer)
        return modules, optimizer

    modules, optimizer = build()
    for index, (x, y) in enumerate(batches):
        for microbatch in range(2):
            if route == "full_state" and index == 2 and microbatch == 0:
                options = StateDictOptions(full_state_dict=True)
                saved = copy.deepcopy(
                    (
                        modules.state_dict(),
                        get_optimizer_state_dict(modules, optimizer, options=options),
                    )
                )
                if release:
                    core.remove_gradient_release(modules)
                modules, optimizer = build()
                modules.load_state_dict(saved[0])
                set_optimizer_state_dict(modules, optimizer, saved[1], options=options)
            elif route not in (None, "full_state") and index == 2 and microbatch == 1:
                windows = {
                    i: c
                    for i, p in enumerate(modules.parameters())
                    for q, c in optimizer.open_windows().items()
                    if q is p
                }
                saved = copy.deepcopy((modules.state_dict(), optimizer.state_dict()))
                if release:
                    core.remove_gradient_release(modules)
                modules, optimizer = build()
                modules.load_state_dict(saved[0])
                if route != "state_dict":
                    for state in saved[1]["state"].values():
                        state.pop("window_microbatches", None)
                optimizer.load_state_dict(saved[1])
                if route == "reopened":
                    params = list(modules.parameters())
                    optimizer.reopen_windows({params[i]: c for i, c in windows.items()})
            model, side = modules
            out = model(x) + (side(x) if microbatch == 0 else 0.0)
            optimizer.optimizer_accumulation = microbatch == 0
            nn.functional.mse_loss(out, y).backward()
            optimizer.step()
            optimizer.zero_grad()
    if release:
        core.remove_gradient_release(modules)
    return [p.detach().clone() for p in modules.parameters()]


@pytest.mark.parametrize("release", [False, True], ids=["stepped", "released"])
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_an_open_window_resumes_from_a_checkpoint_exactly(backend: str, release: bool) -> None:
    """A checkpoint inside a window: load_state_dict restores its count, and where a loader
    drops it (torch.distributed.checkpoint loads only the keys a fresh optimizer has),
    open_windows/reopen_windows carry it; either way the run equals the uninterrupted one
    bit for bit, the side branch's window included (its last micro-batch has no gradient:
    it closed only after a window had been opened by this optimizer, so it stayed open
    after a load). Dropped, the window restarts and the runs part. Between windows torch's
    full-state route loads it too: state dicts leave closed windows' counters out (kept,
    they failed it with a KeyError, which every Composer FSDP2 full-state checkpoint of a
    run with optimizer accumulation hit)."""
    case = one_case_per_algorithm()[0]
    flags = TRAINING_BACKENDS[backend]
    uninterrupted = _windowed_run(case, flags, release, None)
    for route in ("state_dict", "reopened", "full_state"):
        resumed = _windowed_run(case, flags, release, route)
        for a, b in zip(uninterrupted, resumed, strict=True):
            assert torch.equal(a, b), route
    dropped = _windowed_run(case, flags, release, "dropped")
    assert not all(map(torch.equal, uninterrupted, dropped))


@pytest.mark.bad_input
def test_reopen_windows_refuses_what_it_cannot_restore_before_setting_any() -> None:
    model = make_model()
    params = list(model.parameters())
    optimizer = core.AdamW(model.parameters(), lr=LR)
    optimizer.optimizer_accumulation = True
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    fresh = core.AdamW(nn.Linear(2, 2).parameters(), lr=LR)
    cases = [
        ([(params[0], 1)], r"Invalid counts: a list\. Allowed: a dict \{parameter: count\}\."),
        ({"weight": 1}, r"Invalid counts key: 'weight'\. Allowed: a parameter of this AdamW\."),
        (
            {nn.Parameter(torch.zeros(16, 6)): 1},
            r"Invalid counts key: \(16, 6\)\. Allowed: a parameter of this AdamW\.",
        ),
        (
            {params[1]: 0},
            r"Invalid counts value of a parameter of shape \(16,\): 0\. Allowed: an int >= 1",
        ),
        ({params[1]: 1.0}, r"Invalid counts value .*: 1\.0\. Allowed: an int >= 1"),
        ({params[1]: True}, r"Invalid counts value .*: True\. Allowed: an int >= 1"),
        (
            {params[0]: 1, params[1]: 2},
            r"Invalid counts value of a parameter of shape \(16,\): 2\. Allowed: 1, the "
            r"window the state already holds\.",
        ),
    ]
    before = copy.deepcopy(optimizer.state_dict())
    for counts, message in cases:
        with pytest.raises(ValueError, match=message):
            optimizer.reopen_windows(counts)  # type: ignore[arg-type]
        assert str(optimizer.state_dict()) == str(before)
    with pytest.raises(ValueError, match=r"Allowed: a parameter with state: load the checkpoint"):
        fresh.reopen_windows({fresh.param_groups[0]["params"][0]: 1})
    nadam = core.NAdam(nn.Linear(2, 2).parameters(), lr=LR)
    with pytest.raises(ValueError, match=r"Allowed: none \(NAdam has no optimizer accumulation\)"):
        nadam.reopen_windows({nadam.param_groups[0]["params"][0]: 1})
    optimizer.reopen_windows({})  # nothing to reopen


class _SavesItsWeight(nn.Module):
    """A weight saved for backward by a node that runs after the weight's own gradient is
    complete (a stop-gradient use ahead of its ordinary one)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pre, self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(torch.tanh(self.pre(x)) @ self.a.weight.detach().T)
        return self.b(torch.tanh(self.a(h)))


@pytest.mark.bad_input
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_released_step_under_a_graph_that_saved_the_weight_is_refused_by_autograd(
    backend: str,
) -> None:
    """Released, the weight is updated before the node that saved it runs: loop and foreach
    (torch's in-place ops) made autograd refuse, while the fused kernels, writing through
    raw pointers, let backward use the updated weight silently. They now bump the version
    counter, so every backend gets autograd's error."""
    model = _SavesItsWeight()
    optimizer = core.AdamW(
        model.parameters(), lr=LR, gradient_release=True, **TRAINING_BACKENDS[backend]
    )
    core.prepare_for_gradient_release(model, optimizer)
    x, y = make_batches(torch.float32, 1)[0]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        nn.functional.mse_loss(model(x), y).backward()


def test_two_backward_passes_per_step_under_release_are_named_once() -> None:
    """Each backward under release makes a step of its own (ordinary training would sum
    the two gradients into one): said once, naming optimizer_accumulation."""
    model = make_model()
    optimizer = core.AdamW(model.parameters(), lr=LR, gradient_release=True)
    core.prepare_for_gradient_release(model, optimizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in make_batches(torch.float32, 3):
            for _ in range(2):
                nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    messages = [str(w.message) for w in caught if "second time" in str(w.message)]
    assert len(messages) == 1 and "optimizer_accumulation=True" in messages[0]
    assert all(float(state["step"]) == 6 for state in optimizer.state.values())


def test_remove_gradient_release_restores_ordinary_steps() -> None:
    model = make_model()
    optimizer = core.AdamW(model.parameters(), lr=LR, gradient_release=True)
    core.prepare_for_gradient_release(model, optimizer)
    assert core.is_gradient_release_prepared(model)
    core.remove_gradient_release(model)
    assert not core.is_gradient_release_prepared(model)
    x, y = make_batches(torch.float32, 1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("prepared_through", ["compiled", "plain"])
def test_release_prepared_through_a_compiled_model_is_found_through_the_plain_one(
    prepared_through: str,
) -> None:
    """torch.compile's wrapper holds the model as `_orig_mod`: preparing through one and
    removing through the other did nothing (hooks left, release went on, clipping stayed
    refused), and preparing again was refused as foreign hooks."""
    model = make_model()
    compiled = torch.compile(model, backend="eager")
    optimizer = core.AdamW(model.parameters(), lr=LR, gradient_release=True)
    first, other = (compiled, model) if prepared_through == "compiled" else (model, compiled)
    core.prepare_for_gradient_release(first, optimizer)
    assert core.is_gradient_release_prepared(other)
    core.prepare_for_gradient_release(other, optimizer)  # replaces the registration
    core.remove_gradient_release(other)
    assert not core.is_gradient_release_prepared(first)
    x, y = make_batches(torch.float32, 1)[0]
    nn.functional.mse_loss(compiled(x), y).backward()
    assert all(p.grad is not None for p in model.parameters()), "nothing released"
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def test_paused_release_keeps_gradients_for_an_ordinary_step() -> None:
    """What framework callbacks pause outside the backward passes that should step (other
    micro-batches, a backward another callback runs between batches): paused hooks
    accumulate gradients as if unhooked; unpaused, the next backward steps their sum,
    bit for bit the ordinary run's step."""
    batches = make_batches(torch.float32, 2)
    runs = []
    for release in (False, True):
        model = make_model()
        optimizer = core.AdamW(model.parameters(), lr=LR, gradient_release=release)
        if release:
            core.prepare_for_gradient_release(model, optimizer)
            optimizer.release_paused = True
        for index, (x, y) in enumerate(batches):
            optimizer.release_paused = release and index == 0
            nn.functional.mse_loss(model(x), y).backward()
            if release and index == 0:
                assert all(p.grad is not None for p in model.parameters()), "kept"
        if release:
            assert all(p.grad is None for p in model.parameters()), "stepped and freed"
        optimizer.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.bad_input
def test_release_paused_takes_a_bool() -> None:
    optimizer = core.AdamW([nn.Parameter(torch.zeros(2))], lr=LR, gradient_release=True)
    with pytest.raises(ValueError, match=r"Invalid release_paused: 1\b.*True or False"):
        optimizer.release_paused = 1  # type: ignore[assignment]
    assert optimizer.release_paused is False


def test_release_pre_hooks_see_each_released_gradient_before_it_is_freed() -> None:
    """What the monitors read gradients with: every released parameter's gradient, a
    group added later included, none of a parameter outside the optimizer, and nothing
    once the handle is removed."""
    model = make_model()
    outside, *trained = list(model.parameters())
    extra = nn.Parameter(torch.zeros(3))
    optimizer = core.AdamW(trained, lr=LR, gradient_release=True)
    core.prepare_for_gradient_release(model, optimizer)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = optimizer.register_release_pre_hook(lambda p: seen.append((p, p.grad.clone())))
    for step, (x, y) in enumerate(make_batches(torch.float32, 3)):
        expected = trained
        if step == 1:
            optimizer.add_param_group({"params": [extra]})
            expected = [*trained, extra]
        if step == 2:
            handle.remove()
        before = [p.detach().clone() for p in trained]
        loss = nn.functional.mse_loss(model(x) + extra, y)
        grads = torch.autograd.grad(loss, expected, retain_graph=True)
        seen.clear()
        loss.backward()
        if step == 2:
            assert not seen
        else:
            assert sorted(id(p) for p, _ in seen) == sorted(map(id, expected))
            for param, grad in zip(expected, grads, strict=True):
                (recorded,) = [g for p, g in seen if p is param]
                assert torch.equal(recorded, grad)
        assert all(p.grad is None for p in trained), "stepped and freed"
        assert not any(torch.equal(p, b) for p, b in zip(trained, before, strict=True))
        optimizer.step()  # closes the training step
        outside.grad = extra.grad = None


def test_release_pre_hook_takes_a_callable() -> None:
    optimizer = core.AdamW([nn.Parameter(torch.zeros(2))], lr=LR)
    with pytest.raises(TypeError, match="Invalid hook for register_release_pre_hook: 3"):
        optimizer.register_release_pre_hook(3)  # type: ignore[arg-type]
    assert not optimizer.release_pre_hooks


def test_release_without_hooks_warns_once_where_it_would_train() -> None:
    """gradient_release=True alone keeps every gradient (no hooks: nothing releases
    them); the first step that trains such a group says so, once. Not after release was
    used (remove_gradient_release's plain steps are deliberate), nor at lr 0 (torch.
    distributed.checkpoint's state-creation step)."""

    def steps(optimizer: core.AdamW, model: nn.Module, count: int) -> None:
        x, y = make_batches(torch.float32, 1)[0]
        for _ in range(count):
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()

    model = make_model()
    optimizer = core.AdamW(model.parameters(), lr=0.0, gradient_release=True)
    optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": LR})
    optimizer.param_groups[1]["gradient_release"] = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps(optimizer, model, 1)  # the released group's lr is 0
        optimizer.param_groups[0]["lr"] = LR
        steps(optimizer, model, 2)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages == [
        "AdamW: param group(s) [0] have gradient_release=True but no release hooks are "
        "registered, so this step ran after backward and every gradient was kept, as "
        "without release. Register them with core.prepare_for_gradient_release(model, "
        "optimizer), or add the GradientRelease callback (lightning_adam, or composer_adam: "
        "adamkit_gradient_release in an llm-foundry YAML's callbacks)."
    ]
    assert caught[0].filename == __file__  # points at the caller's step()

    model = make_model()
    optimizer = core.AdamW(model.parameters(), lr=LR, gradient_release=True)
    core.prepare_for_gradient_release(model, optimizer)
    core.remove_gradient_release(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steps(optimizer, model, 1)

    # The group checks come first: a bad lr is named as such (the warning's own reading
    # of lr used to fail first, with "could not convert string to float").
    model = make_model()
    optimizer = core.AdamW(model.parameters(), lr=LR, gradient_release=True)
    optimizer.param_groups[0]["lr"] = "abc"
    with pytest.raises(ValueError, match=r"Invalid lr in param group 0: 'abc'\. Allowed"):
        steps(optimizer, model, 1)


ACCUMULATING = {
    "AdamW": lambda params, release, **flags: core.AdamW(
        params, lr=LR, gradient_release=release, **flags
    ),
    "Adam-l2": lambda params, release, **flags: core.Adam(
        params, lr=LR, weight_decay=0.1, gradient_release=release, **flags
    ),
    "RAdam-l2": lambda params, release, **flags: core.RAdam(
        params, lr=LR, weight_decay=0.1, gradient_release=release, **flags
    ),
    "RAdam": lambda params, release, **flags: core.RAdam(
        params, lr=LR, gradient_release=release, **flags
    ),
}


def _accumulation_run(
    release: bool,
    microbatches: list,
    windows: int,
    optimizer_name: str = "AdamW",
    samples: list[int] | None = None,
    tell_shares: bool = True,
    flags: dict | None = None,
) -> tuple:
    """Losses scaled by 1/K, or by each micro-batch's share of `samples` (as Composer
    scales them), told to the optimizer when tell_shares."""
    model = make_model(torch.float64)
    optimizer = ACCUMULATING[optimizer_name](model.parameters(), release, **(flags or {}))
    if release:
        core.prepare_for_gradient_release(model, optimizer)
    counts = samples or [1] * len(microbatches)
    for _ in range(windows):
        for k, (x, y) in enumerate(microbatches):
            optimizer.optimizer_accumulation = release and k < len(microbatches) - 1
            if samples is not None and tell_shares:
                optimizer.microbatch_share = counts[k]
            share = counts[k] / sum(counts)
            (nn.functional.mse_loss(model(x), y) * share).backward()
        optimizer.microbatch_share = None
        optimizer.step()  # under release: steps nothing, closes the training step
        optimizer.zero_grad()
    return model, optimizer


def _released(case: Case, backend: dict, state_precision: str) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 80), nn.Tanh(), nn.Linear(80, 3))
    optimizer = case.make(
        model.parameters(), gradient_release=True, state_precision=state_precision, **backend
    )
    core.prepare_for_gradient_release(model, optimizer)
    return model, optimizer


@pytest.mark.parametrize("state_precision", ["full", "8bit"])
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize("case", one_case_per_algorithm(), ids=lambda c: c.id)
def test_released_training_resumes_from_a_distributed_checkpoint(
    case: Case, backend: str, state_precision: str, tmp_path: Any
) -> None:
    """Resume as Lightning's ModelParallelStrategy and Composer's FSDP2 do: DCP's
    get_optimizer_state_dict creates the load target's state with a zero-gradient step at
    lr 0, dcp.load fills it, set_optimizer_state_dict puts it back. The full step used to
    skip released parameters, so the target had no state and the run restarted its
    moments from zero (on more ranks, torch failed in set_optimizer_state_dict)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    inputs = torch.randn(6, 8, 64, generator=torch.Generator().manual_seed(1))

    def train(model: nn.Module, batches: torch.Tensor) -> None:
        for x in batches:
            model(x).square().mean().backward()  # each parameter steps inside backward

    model, optimizer = _released(case, TRAINING_BACKENDS[backend], state_precision)
    train(model, inputs[:3])
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=tmp_path)
    saved_model = copy.deepcopy(model.state_dict())
    train(model, inputs[3:])

    resumed, resumed_optimizer = _released(case, TRAINING_BACKENDS[backend], state_precision)
    resumed.load_state_dict(saved_model)
    target = {"optimizer": get_optimizer_state_dict(resumed, resumed_optimizer)}
    assert len(target["optimizer"]["state"]) == 4
    dcp.load(target, checkpoint_id=tmp_path)
    set_optimizer_state_dict(resumed, resumed_optimizer, optim_state_dict=target["optimizer"])
    train(resumed, inputs[3:])
    assert [float(s["step"]) for s in resumed_optimizer.state.values()] == [6.0] * 4
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_optimizer_accumulation_is_exact_when_microbatch_gradients_agree(backend: str) -> None:
    batch = make_batches(torch.float64, 1)[0]
    flags = TRAINING_BACKENDS[backend]
    reference, _ = _accumulation_run(False, [batch] * 4, windows=6, flags={"foreach": False})
    released, optimizer = _accumulation_run(True, [batch] * 4, windows=6, flags=flags)
    for a, b in zip(reference.parameters(), released.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0)
    assert all(float(s["step"]) == 6 for s in optimizer.state.values())


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize("samples", [[6, 2], [3, 3, 2], [1, 5, 2]], ids=str)
@pytest.mark.parametrize("optimizer_name", ["AdamW", "RAdam"])
def test_optimizer_accumulation_is_exact_with_unequal_microbatch_shares(
    optimizer_name: str, samples: list[int], backend: str
) -> None:
    """Micro-batches of unequal size (Composer's, when the batch is no multiple of the
    micro-batch size) whose losses are scaled by their share of the samples: told the
    shares, v grows by each one's share of the squared sum and the run is exact where
    the per-sample gradients agree; with equal weights it was several percent of the
    distance travelled off (RAdam's first steps use no v: only its exactness is held)."""
    batch = make_batches(torch.float64, 1)[0]
    microbatches = [batch] * len(samples)  # the same mean gradient per sample
    flags = TRAINING_BACKENDS[backend]
    arguments = (microbatches, 6, optimizer_name, samples)
    ordinary, _ = _accumulation_run(False, *arguments, flags=flags)
    told, optimizer = _accumulation_run(True, *arguments, flags=flags)
    untold, _ = _accumulation_run(True, *arguments, tell_shares=False, flags=flags)
    start = make_model(torch.float64)
    for p, q, r, s0 in zip(
        ordinary.parameters(),
        told.parameters(),
        untold.parameters(),
        start.parameters(),
        strict=True,
    ):
        torch.testing.assert_close(q, p, atol=1e-12, rtol=0)
        if optimizer_name == "AdamW":
            assert (r - p).norm() > 1e-3 * (p - s0).norm(), "equal weights are not exact"
    assert all(float(s["step"]) == 6 for s in optimizer.state.values())
    assert optimizer.microbatch_share is None


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_window_closed_without_a_share_forgets_its_shares(backend: str) -> None:
    """microbatch_share set back to None for a window's last micro-batch: the window's
    shares are forgotten with it, so the next window's v grows by its own squared sum
    (a share left behind weighed it twice here)."""
    generator = torch.Generator().manual_seed(4)
    first, second = (torch.randn(8, dtype=torch.float64, generator=generator) for _ in range(2))
    param = nn.Parameter(torch.zeros(8, dtype=torch.float64))
    optimizer = core.Adam([param], lr=LR, betas=(0.9, 0.99), **TRAINING_BACKENDS[backend])
    for accumulate, share in ((True, 2.0), (False, None)):
        optimizer.optimizer_accumulation, optimizer.microbatch_share = accumulate, share
        param.grad = first / 2
        optimizer.step()
    assert "window_shares" not in optimizer.state[param]
    earlier = optimizer.state[param]["exp_avg_sq"].clone()
    for accumulate in (True, False):
        optimizer.optimizer_accumulation, optimizer.microbatch_share = accumulate, 1.0
        param.grad = second / 2
        optimizer.step()
    torch.testing.assert_close(
        optimizer.state[param]["exp_avg_sq"], 0.99 * earlier + 0.01 * second**2, rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("samples", [[4, 4, 4], [6, 3, 2]], ids=str)
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_shares_are_each_parameters_own_when_it_skips_microbatches(
    backend: str, samples: list[int]
) -> None:
    """A parameter without a gradient in the first micro-batch (an expert its tokens did
    not reach) sums only the shares it folded: its v is ordinary accumulation's, as is
    that of one trained by every micro-batch (a window-wide count of earlier shares made
    the skipping one's v 1.5x)."""
    gradient = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    total = sum(samples)
    flags = TRAINING_BACKENDS[backend]
    every, skipping = (nn.Parameter(torch.zeros(64, dtype=torch.float64)) for _ in range(2))
    folded = core.AdamW([every, skipping], lr=LR, **flags)
    for k, share in enumerate(samples):
        folded.optimizer_accumulation = k < len(samples) - 1
        folded.microbatch_share = share
        every.grad = gradient * share / total
        skipping.grad = None if k == 0 else gradient * share / total
        folded.step()
    ordinary_every, ordinary_skipping = (
        nn.Parameter(torch.zeros(64, dtype=torch.float64)) for _ in range(2)
    )
    ordinary = core.AdamW([ordinary_every, ordinary_skipping], lr=LR, **flags)
    ordinary_every.grad = gradient.clone()
    ordinary_skipping.grad = gradient * (total - samples[0]) / total
    ordinary.step()
    for mine, reference in ((every, ordinary_every), (skipping, ordinary_skipping)):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                folded.state[mine][key], ordinary.state[reference][key], rtol=1e-12, atol=0
            )
        torch.testing.assert_close(mine, reference, rtol=1e-12, atol=0)
        assert float(folded.state[mine]["window_shares"]) == 0, "closed with the window"


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "share", [0, -1, float("nan"), float("inf"), 1e-46, 1e39, (1, 2), "ab", True]
)
def test_microbatch_share_is_checked_by_name(share: object) -> None:
    optimizer = core.AdamW([nn.Parameter(torch.zeros(2))], lr=LR)
    with pytest.raises(ValueError, match=r"Invalid microbatch_share: .* Allowed: None, or a"):
        optimizer.microbatch_share = share  # type: ignore[assignment]
    assert optimizer.microbatch_share is None
    param = torch.zeros(2)
    step, count, folded = torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0)
    with pytest.raises(ValueError, match=r"Invalid microbatch_share: "):
        core.adam(
            [param], [torch.ones(2)], [torch.zeros(2)], [torch.zeros(2)], None, [step],
            lr=LR, beta1=0.9, beta2=0.99, eps=1e-8, window_microbatches=[count],
            accumulate=True, window_shares=[folded], microbatch_share=share,
        )  # fmt: skip
    assert not param.any() and float(step) == float(count) == float(folded) == 0


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("lists", "share", "message"),
    [
        ({}, 2.0, "Invalid window_microbatches: None. Allowed: a list of 0-dim tensors when"),
        ({"window_microbatches": 1}, 2.0, "Invalid window_shares: None. Allowed: a list of"),
        ({"window_microbatches": 1, "window_shares": 1}, None, "Invalid window_shares: 'a list'"),
    ],
    ids=["share-without-counts", "share-without-shares", "shares-without-share"],
)
def test_functional_shares_come_with_their_lists(lists: dict, share: Any, message: str) -> None:
    """A share without the lists to sum it in was ignored silently, and shares without a
    share were left from a closed window into the next."""
    param, step = torch.zeros(2), torch.tensor(0.0)
    counters = {name: [torch.tensor(float(n))] for name, n in lists.items()}
    with pytest.raises(ValueError, match=re.escape(message)):
        core.adam(
            [param], [torch.ones(2)], [torch.zeros(2)], [torch.zeros(2)], None, [step],
            lr=LR, beta1=0.9, beta2=0.99, eps=1e-8, microbatch_share=share, **counters,
        )  # fmt: skip
    assert not param.any() and float(step) == 0


def test_reopened_windows_count_their_microbatches_as_equal_shares() -> None:
    """Shares of a closed window are no measure of a reopened one: dropped, so the next
    micro-batch counts the reopened ones as shares equal to its own."""
    param = nn.Parameter(torch.zeros(8, dtype=torch.float64))
    optimizer = core.AdamW([param], lr=LR)
    for k, share in enumerate([3.0, 3.0]):
        optimizer.optimizer_accumulation = k == 0
        optimizer.microbatch_share = share
        param.grad = torch.ones_like(param)
        optimizer.step()
    assert float(optimizer.state[param]["window_shares"]) == 0
    optimizer.reopen_windows({param: 2})
    assert "window_shares" not in optimizer.state[param]
    optimizer.optimizer_accumulation = True
    optimizer.microbatch_share = 5.0
    optimizer.step()
    assert float(optimizer.state[param]["window_shares"]) == 2 * 5.0 + 5.0


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize("optimizer_name", list(ACCUMULATING))
def test_optimizer_accumulation_first_moment_is_exact_and_second_carries_variance(
    optimizer_name: str, backend: str
) -> None:
    """Also with L2 decay, which must enter the window's gradient once, not per micro-batch."""
    microbatches = make_batches(torch.float64, 4)
    flags = TRAINING_BACKENDS[backend]
    reference, reference_opt = _accumulation_run(
        False, microbatches, 1, optimizer_name, flags={"foreach": False}
    )
    released, released_opt = _accumulation_run(True, microbatches, 1, optimizer_name, flags=flags)
    l2 = 0.1 if optimizer_name.endswith("-l2") else 0.0
    for p, q in zip(reference.parameters(), released.parameters(), strict=True):
        ordinary, folded = reference_opt.state[p], released_opt.state[q]
        torch.testing.assert_close(folded["exp_avg"], ordinary["exp_avg"], atol=1e-15, rtol=1e-12)
        # One window from zero: v = (1-β2)·Σ(2k-1)h_k² versus (1-β2)·(Σh_k)², where
        # h_1 = g_1 + λθ carries the L2 term and h_k = g_k after it.
        assert not torch.allclose(folded["exp_avg_sq"], ordinary["exp_avg_sq"])
        initial = dict(
            zip(reference.parameters(), make_model(torch.float64).parameters(), strict=True)
        )
        grads = []
        for k, (x, y) in enumerate(microbatches):
            model = make_model(torch.float64)
            (nn.functional.mse_loss(model(x), y) / 4).backward()
            grad = dict(zip(reference.parameters(), model.parameters(), strict=True))[p].grad
            grads.append(grad + l2 * initial[p].detach() if k == 0 else grad)
        expected = sum((2 * k + 1) * g * g for k, g in enumerate(grads)) * (1 - 0.99)
        torch.testing.assert_close(folded["exp_avg_sq"], expected, atol=1e-15, rtol=1e-10)


@pytest.mark.bad_input
@pytest.mark.parametrize("cls", [core.NAdam, core.ADOPT])
def test_optimizer_accumulation_refused_where_the_update_needs_the_whole_gradient(
    cls: type,
) -> None:
    param = nn.Parameter(torch.ones(3))
    optimizer = cls([param], lr=LR)
    optimizer.optimizer_accumulation = True
    param.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"Invalid optimizer_accumulation .*: True"):
        optimizer.step()
    assert len(optimizer.state[param]) == 0


@pytest.mark.bad_input
@pytest.mark.parametrize("value", ["no", 1, None, torch.tensor(True)])
def test_optimizer_accumulation_takes_only_a_bool(value: object) -> None:
    """'no' is truthy: it folded every micro-batch and never stepped."""
    optimizer = core.AdamW([nn.Parameter(torch.ones(3))], lr=LR)
    with pytest.raises(
        ValueError, match=r"Invalid optimizer_accumulation: .*Allowed: True or False"
    ):
        optimizer.optimizer_accumulation = value  # type: ignore[assignment]
    assert optimizer.optimizer_accumulation is False


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_zero_grad_forgets_the_steps_no_step_closed(backend: str) -> None:
    """After zero_grad() has said that hooks stepped a backward no step() closed, that
    training step is over: a later backward (here with release paused, so its gradients
    are kept) is stepped by step() as usual, not refused as a second gradient."""
    model = make_model()
    optimizer = core.AdamW(
        model.parameters(), lr=LR, gradient_release=True, **TRAINING_BACKENDS[backend]
    )
    core.prepare_for_gradient_release(model, optimizer)
    x, y = make_batches(torch.float32, 1)[0]
    nn.functional.mse_loss(model(x), y).backward()  # hooks step; no optimizer.step()
    with pytest.warns(RuntimeWarning, match="no optimizer.step\\(\\) followed"):
        optimizer.zero_grad()
    optimizer.release_paused = True
    nn.functional.mse_loss(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(float(s["step"]) == 2 for s in optimizer.state.values())


def test_a_parameter_a_hook_stepped_without_freeing_is_not_stepped_again() -> None:
    """step_released_param without freeing the gradient (DDP's communication hook keeps it
    in its bucket): the training step's step() skips that parameter and steps the rest."""
    stepped, left = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    optimizer = core.AdamW([stepped, left], lr=0.1, weight_decay=0.0, gradient_release=True)
    stepped.grad, left.grad = torch.ones(3), torch.ones(3)
    step_released_param(optimizer, stepped)
    assert stepped.grad is not None
    optimizer.step()
    assert float(optimizer.state[stepped]["step"]) == float(optimizer.state[left]["step"]) == 1
    assert torch.equal(stepped, left)


@pytest.mark.bad_input
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_grad_scaler_is_refused_before_backward_changes_anything(backend: str) -> None:
    """It was refused at scaler.step(), after backward had stepped every parameter (and
    made all the state) from the scaled gradient, neither unscaled nor checked for inf."""
    model = make_model()
    optimizer = core.AdamW(
        model.parameters(), lr=LR, gradient_release=True, **TRAINING_BACKENDS[backend]
    )
    core.prepare_for_gradient_release(model, optimizer)
    scaler = torch.amp.GradScaler("cpu")
    x, y = make_batches(torch.float32, 1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    for wrap in (lambda loss: loss, lambda loss: [loss], lambda loss: (loss,)):
        with pytest.raises(
            RuntimeError, match=r"GradScaler\.scale was given a loss whose backward"
        ):  # a loss, or a list or tuple of them, as scale() takes
            scaler.scale(wrap(nn.functional.mse_loss(model(x), y)))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not optimizer.state
    # Given the gradients some other way, step() still refuses the scaler.
    scaler.scale(torch.ones(()))  # what scale() does first: set the scale up
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="cannot be used with a GradScaler"):
        scaler.step(optimizer)


def test_a_grad_scaler_scales_other_models_and_disabled_ones_pass() -> None:
    """Only a loss that reaches released parameters is refused."""
    released, other = make_model(), nn.Linear(2, 2)
    optimizer = core.AdamW(released.parameters(), lr=LR, gradient_release=True)
    core.prepare_for_gradient_release(released, optimizer)
    x, y = make_batches(torch.float32, 1)[0]
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(other(torch.ones(1, 2)).sum()).backward()
    torch.testing.assert_close(other.weight.grad, torch.full((2, 2), 4.0))
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    disabled.scale(nn.functional.mse_loss(released(x), y)).backward()
    assert all(p.grad is None for p in released.parameters())  # released as usual
    optimizer.step()  # closes the released training step
    core.remove_gradient_release(released)
    optimizer.zero_grad()
    scaler.scale(nn.functional.mse_loss(released(x), y)).backward()  # once removed, as usual
    assert all(p.grad is not None for p in released.parameters())
    before = [p.detach().clone() for p in released.parameters()]
    scaler.step(optimizer)  # and the optimizer steps with the scaler as any other
    scaler.update()
    assert all(not torch.equal(a, b) for a, b in zip(before, released.parameters(), strict=True))


@pytest.mark.bad_input
def test_sparse_gradients_are_refused_inside_backward_before_any_change() -> None:
    embedding = nn.Embedding(10, 3, sparse=True)
    optimizer = core.AdamW(embedding.parameters(), lr=LR, gradient_release=True)
    core.prepare_for_gradient_release(embedding, optimizer)
    before = embedding.weight.detach().clone()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        embedding(torch.tensor([1, 2])).sum().backward()
    assert torch.equal(embedding.weight, before) and len(optimizer.state) == 0


@pytest.mark.bad_input
def test_parameters_with_existing_hooks_are_refused_unless_ignored() -> None:
    model = make_model()
    first = next(model.parameters())
    first.register_post_accumulate_grad_hook(lambda p: None)
    optimizer = core.AdamW(model.parameters(), lr=LR, gradient_release=True)
    with pytest.raises(ValueError, match="already carry post-accumulate-grad hooks"):
        core.prepare_for_gradient_release(model, optimizer)
    assert not core.is_gradient_release_prepared(model)
    core.prepare_for_gradient_release(model, optimizer, ignore_existing_hooks=True)
    assert core.is_gradient_release_prepared(model)


@pytest.mark.bad_input
def test_optimizer_without_gradient_release_is_refused() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="no param group with gradient_release=True"):
        core.prepare_for_gradient_release(model, core.AdamW(model.parameters(), lr=LR))
    with pytest.raises(TypeError, match="Allowed: an adamkit core optimizer"):
        core.prepare_for_gradient_release(model, torch.optim.AdamW(model.parameters()))


@pytest.mark.bad_input
def test_ddp_model_is_refused() -> None:
    with gloo_group():
        model = nn.parallel.DistributedDataParallel(make_model())
        optimizer = core.AdamW(model.parameters(), lr=LR, gradient_release=True)
        with pytest.raises(RuntimeError, match="before DDP averages it"):
            core.prepare_for_gradient_release(model, optimizer)


@pytest.mark.bad_input
def test_step_of_a_foreign_parameter_is_refused() -> None:
    optimizer = core.AdamW([nn.Parameter(torch.ones(2))], lr=LR)
    stranger = nn.Parameter(torch.ones(4))
    stranger.grad = torch.ones(4)
    with pytest.raises(ValueError, match="in none of this optimizer's param groups"):
        optimizer.step(param=stranger)


@pytest.mark.bad_input
@pytest.mark.parametrize("clip", ["clip_grad_norm_", "clip_grad_value_"])
def test_gradient_clipping_of_released_parameters_is_refused(clip: str) -> None:
    model, other = make_model(), nn.Linear(2, 2)
    optimizer = core.AdamW(model.parameters(), lr=LR, gradient_release=True)
    core.prepare_for_gradient_release(model, optimizer)
    x, y = make_batches(torch.float32, 1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="under gradient release"):
        getattr(torch.nn.utils, clip)(model.parameters(), 1.0)
    other(torch.ones(1, 2)).sum().backward()
    getattr(torch.nn.utils, clip)(other.parameters(), 1.0)  # other models clip as usual
    core.remove_gradient_release(model)
    model(x).sum().backward()
    getattr(torch.nn.utils, clip)(model.parameters(), 1.0)  # and so does this one once removed


@pytest.mark.bad_input
def test_preparing_again_over_a_foreign_hook_is_refused_and_leaves_release_working() -> None:
    """It dropped the working registration before it refused, leaving the model unreleased."""
    model = make_model()
    optimizer = core.AdamW(model.parameters(), lr=LR, gradient_release=True)
    core.prepare_for_gradient_release(model, optimizer)
    core.prepare_for_gradient_release(model, optimizer)  # its own hooks are not foreign
    next(model.parameters()).register_post_accumulate_grad_hook(lambda p: None)
    with pytest.raises(ValueError, match="already carry post-accumulate-grad hooks"):
        core.prepare_for_gradient_release(model, optimizer)
    assert core.is_gradient_release_prepared(model)
    x, y = make_batches(torch.float32, 1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    assert all(p.grad is None for p in model.parameters())  # stepped and freed in backward
    assert optimizer.state and all(p in optimizer.released_params for p in model.parameters())


@pytest.mark.bad_input
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_bad_group_under_release_is_refused_before_any_group_steps(backend: str) -> None:
    """Each hook checked only its own group: the last layer's group (reached first in
    backward) was stepped before the first layer's bad lr was refused."""
    first, last = nn.Linear(4, 4), nn.Linear(4, 2)
    model = nn.Sequential(first, nn.Tanh(), last)
    groups = [{"params": first.parameters()}, {"params": last.parameters()}]
    optimizer = core.AdamW(groups, lr=LR, gradient_release=True, **TRAINING_BACKENDS[backend])
    core.prepare_for_gradient_release(model, optimizer)
    x = torch.randn(3, 4)
    model(x).sum().backward()  # one good step, so later steps take the memoized path
    optimizer.step()  # steps nothing released; closes the training step
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="Invalid lr in param group 0: nan"):
        model(x).sum().backward()
    for param, kept in zip(model.parameters(), before, strict=True):
        assert torch.equal(param, kept)
    optimizer.param_groups[0]["lr"] = LR
    model(x).sum().backward()  # and the next backward trains again
    optimizer.step()
    assert not torch.equal(last.weight, before[2])


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "call",
    [
        lambda m, o: core.prepare_for_gradient_release(list(m.parameters()), o),
        lambda m, o: core.remove_gradient_release(m.parameters()),
        lambda m, o: core.is_gradient_release_prepared(None),
    ],
    ids=["prepare", "remove", "is_prepared"],
)
def test_release_functions_refuse_what_is_not_a_module(call: Any) -> None:
    model = make_model()
    optimizer = core.AdamW(model.parameters(), lr=LR, gradient_release=True)
    with pytest.raises(ValueError, match=r"Invalid model: a \w+\. Allowed: an nn.Module"):
        call(model, optimizer)


@pytest.mark.bad_input
@pytest.mark.parametrize("value", ["no", 1, None])
def test_ignore_existing_hooks_takes_only_a_bool(value: object) -> None:
    """ "no" was taken as True, registering over foreign hooks."""
    model = make_model()
    optimizer = core.AdamW(model.parameters(), lr=LR, gradient_release=True)
    with pytest.raises(ValueError, match=f"Invalid ignore_existing_hooks: {value!r}"):
        core.prepare_for_gradient_release(model, optimizer, ignore_existing_hooks=value)  # type: ignore[arg-type]
    assert not core.is_gradient_release_prepared(model)


def test_a_released_model_collected_without_removal_restores_torch() -> None:
    """torch's clipping functions stayed replaced for the rest of the process. In a fresh
    process: torch 2.7's distributed checkpoint caches models it saw (functools.cache), so
    in this one a model released by an earlier test may still be alive, and guarded."""
    script = """
import gc, torch, core
model = torch.nn.Linear(3, 3)
optimizer = core.AdamW(model.parameters(), lr=1e-3, gradient_release=True)
core.prepare_for_gradient_release(model, optimizer)
guarded = torch.nn.utils.clip_grad_norm_.__module__
del model, optimizer
gc.collect()
utils, scale = torch.nn.utils, torch.amp.GradScaler.scale
print(guarded, utils.clip_grad_norm_.__module__, utils.clip_grad_value_.__module__)
print(scale.__module__)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == [
        "core.gradient_release",
        "torch.nn.utils.clip_grad",
        "torch.nn.utils.clip_grad",
        "torch.amp.grad_scaler",
    ]


def test_release_through_a_collected_container_stays_guarded_and_removable() -> None:
    """Prepared through a container built for the call (nn.ModuleList([encoder, decoder]))
    and since collected: its hooks kept stepping, but clipping was no longer refused (it
    silently clipped nothing), another optimizer could release the same parameters, and no
    module could remove it. Removal through any module holding the parameters now works."""
    torch.manual_seed(0)
    encoder, decoder = nn.Linear(4, 4), nn.Linear(4, 2)
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = core.AdamW(params, lr=LR, gradient_release=True)
    core.prepare_for_gradient_release(nn.ModuleList([encoder, decoder]), optimizer)
    gc.collect()
    x, y = torch.randn(3, 4), torch.randn(3, 2)
    nn.functional.mse_loss(decoder(encoder(x)), y).backward()
    assert all(p.grad is None for p in params), "stepped and freed inside backward"
    optimizer.step()
    optimizer.zero_grad()
    with pytest.raises(RuntimeError, match=r"clip_grad_norm_ was called on parameters under"):
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
    other = core.AdamW(encoder.parameters(), lr=LR, gradient_release=True)
    with pytest.raises(ValueError, match=r"already released by another optimizer \(AdamW\)"):
        core.prepare_for_gradient_release(encoder, other)
    core.remove_gradient_release(nn.ModuleList([encoder, decoder]))
    assert not optimizer.released_params and not optimizer.gradient_release_registrations
    nn.functional.mse_loss(decoder(encoder(x)), y).backward()
    assert all(p.grad is not None for p in params), "kept for an ordinary step"
    torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)  # not released any more
    optimizer.step()


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_removing_release_from_a_part_of_the_prepared_model_steps_it_ordinarily(
    backend: str,
) -> None:
    """remove_gradient_release(model[0]) after preparing the whole model did nothing (the
    part was not the module registered): now the part's parameters keep their gradients
    for optimizer.step() while the rest stays released, bit for bit ordinary training."""
    kept = []

    def backward_noting_kept(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        nn.functional.mse_loss(model(x), y).backward()
        kept.append([p.grad is not None for p in model.parameters()])

    (ordinary, _), (released, _) = _ordinary_and_released(
        backend,
        steps=4,
        set_gradients=backward_noting_kept,
        after_prepare=lambda model: core.remove_gradient_release(model[0]),
    )
    for a, b in zip(ordinary.parameters(), released.parameters(), strict=True):
        assert torch.equal(a, b)
    part = len(list(released[0].parameters()))
    assert kept[-1] == [True] * part + [False] * (len(kept[-1]) - part)
    assert core.is_gradient_release_prepared(released)


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_release_ends_with_its_optimizer(backend: str) -> None:
    """An optimizer prepared on a live model and dropped without removal (a notebook
    building a new one): the model kept it alive through its registration, so its hooks
    went on stepping and freeing every gradient, and a new ordinary optimizer trained
    nothing (silently; 'a second step' warnings only). Now its hooks go with it, the
    guards come off, and a new optimizer trains as the reference and can be prepared."""
    flags = TRAINING_BACKENDS[backend]
    batches = make_batches(torch.float32, 3)
    model, reference = make_model(), make_model()
    old = core.AdamW(model.parameters(), lr=LR, gradient_release=True, **flags)
    core.prepare_for_gradient_release(model, old)
    del old
    gc.collect()
    assert torch.nn.utils.clip_grad_norm_.__module__ == "torch.nn.utils.clip_grad"
    assert not core.is_gradient_release_prepared(model)
    for trained in (model, reference):
        optimizer = core.AdamW(trained.parameters(), lr=LR, **flags)
        for x, y in batches:
            nn.functional.mse_loss(trained(x), y).backward()
            assert all(p.grad is not None for p in trained.parameters())
            optimizer.step()
            optimizer.zero_grad()
    pairs = zip(model.parameters(), reference.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    released = core.AdamW(model.parameters(), lr=LR, gradient_release=True, **flags)
    core.prepare_for_gradient_release(model, released)  # no leftover hook in the way
    assert core.is_gradient_release_prepared(model, released)


@pytest.mark.parametrize(
    "earlier",
    ["part", "container", "whole"],
)
def test_preparing_again_with_the_same_optimizer_replaces_its_release_elsewhere(
    earlier: str,
) -> None:
    """The same optimizer prepared before through another module (a part of the model, a
    container since collected, or the whole model before a part) was refused as foreign
    hooks; following the message (ignore_existing_hooks) hooked parameters twice."""
    model = make_model()
    optimizer = core.AdamW(model.parameters(), lr=LR, gradient_release=True)
    first = {"part": model[2], "container": nn.ModuleList([*model]), "whole": model}[earlier]
    second = model[2] if earlier == "whole" else model
    core.prepare_for_gradient_release(first, optimizer)
    del first
    gc.collect()
    core.prepare_for_gradient_release(second, optimizer)
    hooks = [len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()]
    assert hooks == [1] * len(hooks)
    assert core.is_gradient_release_prepared(model, optimizer)
    core.remove_gradient_release(model)
    assert not optimizer.released_params and not optimizer.gradient_release_registrations
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_is_gradient_release_prepared_sees_parameters_released_through_other_modules() -> None:
    """It read only whether the module itself had been prepared: False for a part of a
    prepared model, and for a model released through a container."""
    model = make_model()
    optimizer = core.AdamW(model.parameters(), lr=LR, gradient_release=True)
    other = core.AdamW(model.parameters(), lr=LR, gradient_release=True)
    core.prepare_for_gradient_release(nn.ModuleList([model[0]]), optimizer)
    gc.collect()
    assert core.is_gradient_release_prepared(model)
    assert core.is_gradient_release_prepared(model[0], optimizer)
    assert not core.is_gradient_release_prepared(model[2])
    assert not core.is_gradient_release_prepared(model, other)


@pytest.mark.bad_input
def test_is_gradient_release_prepared_takes_a_core_optimizer() -> None:
    model = make_model()
    torch_optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    with pytest.raises(TypeError, match=r"Invalid optimizer: torch\.optim\.adamw\.AdamW\."):
        core.is_gradient_release_prepared(model, torch_optimizer)


def test_a_group_added_under_release_hooks_its_trainable_parameters_only() -> None:
    """A group holding a frozen parameter beside trainable ones: torch refused to hook the
    frozen one after the trainable ones were hooked, and the group stayed added with them
    stepping inside backward unrecorded (clipping them clipped nothing, removing release
    crashed). Frozen parameters are left as prepare leaves them."""
    model = make_model()
    model[2].weight.requires_grad_(False)
    optimizer = core.AdamW(model[0].parameters(), lr=LR, gradient_release=True)
    core.prepare_for_gradient_release(model, optimizer)
    optimizer.add_param_group({"params": [model[2].bias, model[2].weight]})
    assert model[2].bias in optimizer.released_params
    assert model[2].weight not in optimizer.released_params
    with pytest.raises(RuntimeError, match=r"clip_grad_norm_ was called on parameters under"):
        torch.nn.utils.clip_grad_norm_([model[2].bias], 1.0)
    core.remove_gradient_release(model[2])
    assert model[2].bias not in optimizer.released_params
    assert all(not p._post_accumulate_grad_hooks for p in model[2].parameters())


def test_an_optimizer_collected_while_another_is_prepared_lets_it_prepare(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An earlier released optimizer in a reference cycle, unreachable but not yet
    collected, when the cyclic collector runs inside prepare (any allocation may start it):
    prepare had listed its registration and then failed on it with an internal
    AssertionError, leaving the new optimizer unprepared."""
    original = core.gradient_release._has_other_hooks

    def collecting(*args: Any) -> bool:
        gc.collect()  # what an allocation-triggered collection does at this point
        return original(*args)

    model = make_model()
    old = core.AdamW(model.parameters(), lr=LR, gradient_release=True)
    core.prepare_for_gradient_release(model, old)
    old.cycle = old  # collected only by the cyclic collector
    del old
    new = core.AdamW(model.parameters(), lr=LR, gradient_release=True)
    monkeypatch.setattr(core.gradient_release, "_has_other_hooks", collecting)
    core.prepare_for_gradient_release(model, new)
    assert [len(p._post_accumulate_grad_hooks) for p in model.parameters()] == [1] * 4
    assert core.is_gradient_release_prepared(model, new)
