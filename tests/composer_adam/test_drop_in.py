"""composer_adam.DecoupledAdamW against composer.optim.DecoupledAdamW in a real Trainer."""

from __future__ import annotations

import copy
import functools
import logging
import re
import warnings

import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from composer.optim import DecoupledAdamW as ComposerAdamW

import composer_adam
import core
from tests.composer_adam.harness import (
    LR,
    STEPS,
    ReferenceUpdateNorms,
    assert_same_parameters,
    logged,
    make_model,
    train,
    with_backends,
)
from tests.core.configuration_cases import BACKENDS

CONFIGS = {
    "decay": {"weight_decay": 1e-4},
    "amsgrad": {"weight_decay": 1e-4, "amsgrad": True},
    "no-decay": {"weight_decay": 0.0},
}


@functools.cache
def composer_run(config: str) -> tuple[Trainer, InMemoryLogger]:
    """Composer's DecoupledAdamW on one config: the same reference for every backend of
    ours, so trained once per config."""
    return train(
        lambda p: ComposerAdamW(p, lr=LR, **CONFIGS[config]), callbacks=[ReferenceUpdateNorms()]
    )


@pytest.mark.parametrize(("config", "backend"), with_backends(list(CONFIGS)))
def test_same_parameters_and_metrics_as_composer(config: str, backend: str) -> None:
    theirs, their_log = composer_run(config)
    ours, our_log = train(
        lambda p: composer_adam.DecoupledAdamW(p, lr=LR, **CONFIGS[config], **BACKENDS[backend])
    )
    assert (
        their_log.data["loss/train/total"][-1][1] < 0.7 * their_log.data["loss/train/total"][0][1]
    )
    assert_same_parameters(ours.state.model, theirs.state.model)

    for prefix in ("l2_norm/moment", "l2_norm/param", "l2_norm/grad"):
        mine, reference = logged(our_log, prefix), logged(their_log, prefix)
        assert mine.keys() == reference.keys() and len(mine) >= 4
        for key, series in mine.items():
            assert len(series) == STEPS
            assert series == pytest.approx(reference[key], rel=1e-5, abs=1e-7), key
    updates = logged(our_log, "l2_norm/update")
    assert len(updates) == 4
    for key, series in updates.items():
        name = key.removeprefix("l2_norm/update/")
        assert series == pytest.approx(
            logged(their_log, f"reference/update/{name}")[f"reference/update/{name}"], rel=1e-5
        )
        if config == "no-decay":  # Composer's own metric is right without decay and AMSGrad
            assert series == pytest.approx(logged(their_log, key)[key], rel=1e-5)


def test_defaults_and_signature_match_composer() -> None:
    import inspect

    ours = inspect.signature(composer_adam.DecoupledAdamW.__init__).parameters
    theirs = inspect.signature(ComposerAdamW.__init__).parameters
    for name, parameter in theirs.items():
        assert ours[name].default == parameter.default, name
    assert list(ours)[: len(theirs)] == list(theirs)
    # Composer's arguments keep Composer's positional order; adamkit's own are keyword-only.
    assert all(ours[name].kind is parameter.kind for name, parameter in theirs.items())
    assert all(p.kind is p.KEYWORD_ONLY for name, p in ours.items() if name not in theirs)
    for cls in (composer_adam.DecoupledRAdam, composer_adam.DecoupledNAdam):
        parameters = inspect.signature(cls.__init__).parameters.values()
        positional = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert positional == ["self", "params", "lr", "betas", "eps", "weight_decay"]
    adamw_ours = inspect.signature(composer_adam.DecoupledAdamW.adamw).parameters
    assert list(adamw_ours) == list(inspect.signature(ComposerAdamW.adamw).parameters)

    # The rest of the family: Composer's defaults, ADOPT its own betas and eps (README),
    # and each algorithm's own argument with core's (torch's) default.
    def defaults(function: object) -> dict[str, object]:
        return {
            name: p.default
            for name, p in inspect.signature(function).parameters.items()
            if p.default is not p.empty
        }

    composers = defaults(ComposerAdamW.__init__)
    adopt_own = {"betas": (0.9, 0.9999), "eps": 1e-6}
    for cls, core_cls, own in (
        (composer_adam.DecoupledRAdam, core.RAdam, {}),
        (composer_adam.DecoupledNAdam, core.NAdam, {"momentum_decay": None}),
        (composer_adam.DecoupledADOPT, core.ADOPT, {**adopt_own, "clip": None}),
    ):
        found, cores = defaults(cls.__init__), defaults(core_cls.__init__)
        for name in ("lr", "betas", "eps", "weight_decay"):
            assert found[name] == own.get(name, composers[name]), (cls.__name__, name)
        for name, value in own.items():
            assert found[name] == (cores[name] if value is None else value), (cls.__name__, name)
    # adamkit's own keyword-only arguments keep core's defaults in every class (Kahan on
    # for 16-bit parameters, full-precision state, rounding seed 0, the fastest backend).
    for cls, core_cls in (
        (composer_adam.DecoupledAdamW, core.AdamW),
        (composer_adam.DecoupledRAdam, core.RAdam),
        (composer_adam.DecoupledNAdam, core.NAdam),
        (composer_adam.DecoupledADOPT, core.ADOPT),
    ):
        found, cores = defaults(cls.__init__), defaults(core_cls.__init__)
        extras = [name for name, p in inspect.signature(cls.__init__).parameters.items()
                  if p.kind is p.KEYWORD_ONLY]  # fmt: skip
        assert {"kahan_sum", "state_precision", "rounding_seed", "fused"} <= set(extras)
        for name in extras:
            assert found[name] == cores[name], (cls.__name__, name)
    for amsgrad in (False, True):  # Composer's class keeps it as an attribute too
        params = [torch.nn.Parameter(torch.ones(2))]
        theirs = ComposerAdamW(params, amsgrad=amsgrad)
        assert composer_adam.DecoupledAdamW(params, amsgrad=amsgrad).amsgrad is theirs.amsgrad


@pytest.mark.parametrize("amsgrad", [False, True])
def test_functional_adamw_matches_composers(amsgrad: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    tensors = [torch.randn(5, 7, generator=generator) for _ in range(4)]
    runs = []
    for cls in (ComposerAdamW, composer_adam.DecoupledAdamW):
        params = [t.clone() for t in tensors]
        exp_avgs = [torch.zeros_like(t) for t in tensors]
        exp_avg_sqs = [torch.zeros_like(t) for t in tensors]
        maxima = [torch.zeros_like(t) for t in tensors]
        steps = [torch.tensor(0.0) for _ in tensors]
        for step in range(5):
            grads = [
                torch.randn(5, 7, generator=torch.Generator().manual_seed(step)) for _ in tensors
            ]
            for s in steps:
                s += 1
            cls.adamw(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                maxima,
                steps,
                amsgrad=amsgrad,
                beta1=0.9,
                beta2=0.95,
                lr=0.01 * (1 - step / 10),
                initial_lr=0.01,
                weight_decay=0.1,
                eps=1e-8,
            )
        runs.append((params, exp_avgs, exp_avg_sqs, maxima, [float(s) for s in steps]))
    for theirs, ours in zip(*runs, strict=True):
        if isinstance(theirs[0], float):
            assert theirs == ours
        else:
            for a, b in zip(theirs, ours, strict=True):
                torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


def test_initial_lr_is_recorded_per_group_and_high_decay_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = make_model()
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    with caplog.at_level(logging.WARNING):
        optimizer = composer_adam.DecoupledAdamW(
            [{"params": first}, {"params": second, "lr": 0.5}], lr=0.1, weight_decay=1e-3
        )
    assert "weight_decay=0.001" in caplog.text
    assert [g["initial_lr"] for g in optimizer.param_groups] == [0.1, 0.5]
    caplog.clear()
    composer_adam.DecoupledAdamW(first, weight_decay=9e-4)
    ComposerAdamW(first, weight_decay=9e-4)
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING):
        ComposerAdamW(first, weight_decay=1e-3)  # Composer logs from the same value
    assert "weight_decay=0.001" in caplog.text


def test_core_warnings_name_the_callers_line_not_the_adapter() -> None:
    """ADOPT's float16 warning pointed at composer_adam/optimizers.py, whose __init__
    calls core's: users saw the adapter's line, not theirs."""
    half = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    with pytest.warns(UserWarning, match=r"clip=False with float16") as caught:
        composer_adam.DecoupledADOPT([half], lr=1e-3, clip=False)
    assert caught[0].filename == __file__


def test_a_tensor_lr_follows_a_warmup_from_zero_as_a_float_lr_does() -> None:
    """torch's schedulers write a tensor lr in place; initial_lr (the decay's reference and
    the scheduler's base lr) is a copy, so a warmup from 0 trains as with a float lr.
    Composer's own class keeps the same tensor there and stays at lr 0 for good."""
    runs = []
    for lr in (1e-2, torch.tensor(1e-2), torch.tensor(1e-2)):
        model = make_model()
        optimizer = composer_adam.DecoupledAdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        if len(runs) == 2:  # added as a group, the other way a group gets its initial_lr
            params = list(model.parameters())
            optimizer = composer_adam.DecoupledAdamW(params[:1], lr=lr, weight_decay=1e-4)
            optimizer.add_param_group({"params": params[1:], "lr": torch.tensor(1e-2)})
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 4))
        for step in range(8):
            for p in model.parameters():
                p.grad = torch.full_like(p, 0.1 * (step + 1))
            optimizer.step()
            warmup.step()
        assert [float(g["initial_lr"]) for g in optimizer.param_groups] == pytest.approx(
            [1e-2] * len(optimizer.param_groups)
        )
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(
        not torch.equal(a, b) for a, b in zip(runs[0], make_model().parameters(), strict=True)
    )
    for run in runs[1:]:
        for a, b in zip(run, runs[0], strict=True):
            torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


def test_step_hooks_run_once_per_step() -> None:
    """A step() override in the Composer classes was wrapped by torch with the hooks, as
    was core's step it called once any core.Adam existed: every pre- and post-hook ran
    twice (a hook halving the gradients halved them twice)."""
    core.Adam([torch.nn.Parameter(torch.ones(2))], lr=0.1)  # torch wraps core.Adam.step now
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = composer_adam.DecoupledAdamW([param], lr=0.1)
    calls: list[str] = []
    optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *_: calls.append("post"))
    param.grad = torch.ones(4)
    optimizer.step()
    assert calls == ["pre", "post"]


def _functional_step(step: object) -> torch.Tensor:
    param = torch.zeros(4, 3)
    composer_adam.DecoupledAdamW.adamw(
        [param], [torch.ones(4, 3)], [torch.zeros(4, 3)], [torch.zeros(4, 3)], [], [step],
        amsgrad=False, beta1=0.9, beta2=0.95, lr=1e-3, initial_lr=1e-3, weight_decay=1e-5,
        eps=1e-8,
    )  # fmt: skip
    return param


@pytest.mark.bad_input
@pytest.mark.parametrize("step", [torch.tensor(0.0), 0.5, float("nan"), "3"])
def test_functional_adamw_refuses_a_step_not_yet_counted_by_name(step: object) -> None:
    """A step of 0 (not incremented first, as Composer's form expects) was refused as
    "-1.0" under a rule that allows 0; a plain number failed with AttributeError."""
    with pytest.raises(
        ValueError,
        match=re.escape(f"Invalid state_steps[0] for DecoupledAdamW.adamw: {step!r}. Allowed: ")
        + r"a finite step count >= 1",
    ):
        _functional_step(step)
    assert torch.equal(_functional_step(2.0), _functional_step(torch.tensor(2.0)))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_an_added_group_takes_its_initial_lr_at_its_first_step_as_composer(backend: str) -> None:
    """A layer added with lr 0 and warmed up by hand: Composer records the group's
    initial_lr at its first step() (with gradients or not); recorded at add_param_group
    (0), the decay stayed the full weight_decay per step (0.093 off Composer's after five
    steps), and recorded at the group's first step with gradients, a later lr (0.155 off
    with the added layer unused for two steps)."""
    ours = functools.partial(composer_adam.DecoupledAdamW, **BACKENDS[backend])
    for unused_steps in (0, 2):
        runs = []
        for cls in (ComposerAdamW, ours):
            kept, added = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
            optimizer = cls([kept], lr=1e-2, weight_decay=1e-2)
            optimizer.add_param_group({"params": [added], "lr": 0.0})
            for step in range(1, 7):
                optimizer.param_groups[1]["lr"] = 1e-3 * step
                kept.grad = torch.zeros(4)  # only the decay moves the parameters
                added.grad = torch.zeros(4) if step > unused_steps else None
                optimizer.step()
            assert optimizer.param_groups[1]["initial_lr"] == 1e-3
            runs.append(added.detach().clone())
        torch.testing.assert_close(runs[1], runs[0], atol=1e-7, rtol=0)


@pytest.mark.bad_input
def test_bad_initial_lr_is_refused_before_any_change() -> None:
    model = make_model()
    optimizer = composer_adam.DecoupledAdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = copy.deepcopy(list(model.parameters()))
    optimizer.param_groups[0]["initial_lr"] = -1.0
    with pytest.raises(ValueError, match=r"initial_lr in param group 0: -1.0. Allowed: a finite"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert not optimizer.state


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("kahan_sum", [None, False])
def test_bf16_parameters_get_kahan_compensation(kahan_sum: bool | None, backend: str) -> None:
    model = make_model(dtype=torch.bfloat16)
    fp32 = torch.nn.Linear(3, 3)
    optimizer = composer_adam.DecoupledAdamW(
        [*model.parameters(), *fp32.parameters()], kahan_sum=kahan_sum, **BACKENDS[backend]
    )
    for p in optimizer.param_groups[0]["params"]:
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    for p in model.parameters():
        assert ("kahan_comp" in optimizer.state[p]) == (kahan_sum is None)
    assert all("kahan_comp" not in optimizer.state[p] for p in fp32.parameters())


def _reduced_metrics(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """What OptimizerMonitor gets from the optimizer under FSDP: report, pre-reduce, reduce."""
    found: dict = {}
    for name, param in model.named_parameters():
        optimizer.report_per_parameter_metrics(param, name, found)
    return optimizer.dist_reduce_metrics(optimizer.pre_reduce_metrics(found))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_reduced_metrics_have_composers_types_and_values(
    monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """Composer's dist_reduce_metrics returns Python floats for l2 norms; so must ours.

    Composer builds a zero on torch.cuda.current_device() as the default of a dict lookup,
    evaluated even when unused, so on a machine without a GPU its real method can only
    run with that one call pointed at the CPU; everything else is Composer's own code.
    """
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    results = []
    for cls, flags in ((ComposerAdamW, {}), (composer_adam.DecoupledAdamW, BACKENDS[backend])):
        model = make_model()
        optimizer = cls(model.parameters(), lr=LR, weight_decay=0.0, **flags)
        for step in range(3):
            optimizer.zero_grad()
            x = torch.randn(8, 10, generator=torch.Generator().manual_seed(step))
            model.module(x).square().mean().backward()
            optimizer.step()
        results.append(_reduced_metrics(optimizer, model.module))
    theirs, ours = results
    assert ours.keys() == theirs.keys() and len(ours) == 16
    for key, value in ours.items():
        assert type(value) is type(theirs[key]) is float, key
        assert value == pytest.approx(theirs[key], rel=1e-5), key


def test_a_composer_checkpoint_loads_without_a_warning() -> None:
    """Composer's DecoupledAdamW groups carry no decouple_lr, as torch's do, but they are
    Composer's decay: the class that reads them as Composer's says nothing at load (core's
    classes warn, since a torch checkpoint looks the same)."""
    params = [torch.nn.Parameter(torch.ones(4))]
    theirs = ComposerAdamW(params, lr=1e-3, weight_decay=1e-4)
    params[0].grad = torch.ones(4)
    theirs.step()
    ours = composer_adam.DecoupledAdamW([torch.nn.Parameter(torch.ones(4))], lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["weight_decay"] == 1e-4
