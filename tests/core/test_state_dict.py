"""Checkpoints: resume continues identically, and state dicts interchange with torch.optim."""

from __future__ import annotations

import copy

import pytest
import torch

import core
from tests.core.cases import (
    BACKENDS,
    EPS,
    LR,
    TINY_EPS,
    Case,
    assert_unchanged,
    make_batches,
    make_model,
    one_case_per_algorithm,
    snapshot,
    train,
)

TOTAL = 40


def _resumed_run(
    case: Case, save_backend: dict, load_backend: dict
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(uninterrupted model, model resumed from a mid-run checkpoint through deepcopied dicts)."""
    batches = make_batches(torch.float32, TOTAL)
    full = make_model()
    train(full, case.make(full.parameters(), **save_backend), batches, total=TOTAL)

    first = make_model()
    optimizer = case.make(first.parameters(), **save_backend)
    train(first, optimizer, batches[: TOTAL // 2], total=TOTAL)
    model_state = copy.deepcopy(first.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())

    resumed = make_model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(model_state)
    resumed_optimizer = case.make(resumed.parameters(), **load_backend)
    resumed_optimizer.load_state_dict(optimizer_state)
    for key, value in load_backend.items():  # the backend is the resumer's, not the checkpoint's
        assert all(group[key] == value for group in resumed_optimizer.param_groups)
    train(resumed, resumed_optimizer, batches[TOTAL // 2 :], start=TOTAL // 2, total=TOTAL)
    return full, resumed


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case", one_case_per_algorithm(), ids=lambda c: c.id)
def test_resume_continues_bit_for_bit(case: Case, backend: str) -> None:
    full, resumed = _resumed_run(case, BACKENDS[backend], BACKENDS[backend])
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


SWITCHES = [
    ("loop", "foreach"),
    ("loop", "fused"),
    ("fused", "loop"),
    ("loop", "triton"),
    ("triton", "loop"),
]


@pytest.mark.parametrize(("saved_by", "loaded_by"), SWITCHES, ids=lambda name: name)
@pytest.mark.parametrize("case", one_case_per_algorithm(), ids=lambda c: c.id)
def test_switching_backend_at_resume_continues(case: Case, saved_by: str, loaded_by: str) -> None:
    """Turning fused on or off mid-run through a state dict continues the same trajectory."""
    full, resumed = _resumed_run(case, BACKENDS[saved_by], BACKENDS[loaded_by])
    atol = 1e-7 if {saved_by, loaded_by} <= {"loop", "foreach"} else 1e-6
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=atol, rtol=0)


INTERCHANGE = {
    "Adam-l2": (torch.optim.Adam, core.Adam, {"weight_decay": 0.1, "eps": EPS}),
    "Adam-amsgrad": (torch.optim.Adam, core.Adam, {"amsgrad": True, "eps": EPS}),
    "AdamW": (torch.optim.AdamW, core.AdamW, {"weight_decay": 0.1, "eps": EPS}),
    "AdamW-amsgrad": (
        torch.optim.AdamW,
        core.AdamW,
        {"weight_decay": 0.1, "amsgrad": True, "eps": EPS},
    ),
    "NAdam-l2": (torch.optim.NAdam, core.NAdam, {"weight_decay": 0.1, "eps": EPS}),
    "RAdam": (torch.optim.RAdam, core.RAdam, {"eps": TINY_EPS}),
}


@pytest.mark.parametrize("direction", ["torch_to_core", "core_to_torch"])
@pytest.mark.parametrize("name", list(INTERCHANGE))
def test_state_dict_interchange_with_torch(name: str, direction: str) -> None:
    """A checkpoint of one continues in the other exactly as the first would have gone on.

    The receiving optimizer is built with its own defaults: the hyperparameters must come
    from the loaded param groups, as they do between torch optimizers.
    """
    torch_class, core_class, kwargs = INTERCHANGE[name]
    kwargs = {"lr": LR, "betas": (0.9, 0.99), **kwargs}
    writer, reader = (
        (torch_class, core_class) if direction == "torch_to_core" else (core_class, torch_class)
    )
    batches = make_batches(torch.float64, TOTAL)

    model = make_model(torch.float64)
    optimizer = writer(model.parameters(), **kwargs)
    train(model, optimizer, batches[: TOTAL // 2], total=TOTAL)
    model_state = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    train(model, optimizer, batches[TOTAL // 2 :], start=TOTAL // 2, total=TOTAL)

    resumed = make_model(torch.float64, seed=7)
    resumed.load_state_dict(model_state)
    reader_optimizer = reader(resumed.parameters(), lr=LR)
    reader_optimizer.load_state_dict(optimizer_state)
    train(resumed, reader_optimizer, batches[TOTAL // 2 :], start=TOTAL // 2, total=TOTAL)

    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=0)


def test_loaded_host_scalars_stay_float32_on_cpu() -> None:
    """torch casts state to the parameter's dtype on load; step and mu_product must not be."""
    model = make_model(torch.bfloat16)
    optimizer = core.NAdam(model.parameters(), lr=LR)
    train(model, optimizer, make_batches(torch.bfloat16, 3))
    state_dict = copy.deepcopy(optimizer.state_dict())
    expected = [float(s["mu_product"]) for s in state_dict["state"].values()]
    fresh = core.NAdam(model.parameters(), lr=LR)
    fresh.load_state_dict(state_dict)
    for state, mu_product in zip(fresh.state.values(), expected, strict=True):
        for key in ("step", "mu_product"):
            assert state[key].dtype == torch.float32 and state[key].device.type == "cpu"
        assert float(state["mu_product"]) == mu_product
        assert state["kahan_comp"].dtype == torch.bfloat16


@pytest.mark.bad_input
def test_state_dict_with_missing_keys_is_refused_before_loading() -> None:
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, sgd, make_batches(torch.float32, 2))
    optimizer = core.AdamW(model.parameters(), lr=LR)
    train(model, optimizer, make_batches(torch.float32, 2))
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=r"lacks \['step', 'exp_avg', 'exp_avg_sq'\]"):
        optimizer.load_state_dict(sgd.state_dict())
    assert_unchanged(model, optimizer, before)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("writer", "reader", "message"),
    [
        (core.ADOPT, core.NAdam, "from an ADOPT-type optimizer, whose exp_avg averages normalised"),
        (core.ADOPT, core.Adam, "Allowed: the state of torch.optim.Adam/AdamW/NAdam/RAdam or"),
        (core.AdamW, core.ADOPT, "from an Adam-type optimizer, whose exp_avg averages gradients"),
        (torch.optim.Adam, core.ADOPT, "Allowed: the state of adamkit's ADOPT"),
    ],
    ids=["ADOPT-to-NAdam", "ADOPT-to-Adam", "AdamW-to-ADOPT", "torch-Adam-to-ADOPT"],
)
def test_state_dict_of_the_other_moment_family_is_refused_before_loading(
    writer: type, reader: type, message: str
) -> None:
    """ADOPT's exp_avg averages normalised gradients, Adam's the gradients themselves: the
    shapes and keys agree, so only this check stops a resume taking steps of the wrong size
    (ADOPT state loaded into Adam moved the parameters about 15x further than Adam's own)."""
    model = make_model()
    source = writer(model.parameters(), lr=LR)
    train(model, source, make_batches(torch.float32, 3))
    optimizer = reader(model.parameters(), lr=LR)
    train(model, optimizer, make_batches(torch.float32, 2))
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=rf"Invalid state_dict for {reader.__name__}: .*{message}"):
        optimizer.load_state_dict(source.state_dict())
    assert_unchanged(model, optimizer, before)
    assert optimizer.state_dict()["param_groups"] == before[1]["param_groups"]


@pytest.mark.bad_input
def test_state_dict_with_wrong_shapes_is_refused() -> None:
    model, other = make_model(), torch.nn.Linear(3, 6)
    source = core.Adam(list(other.parameters()) * 1, lr=LR)
    other(torch.randn(2, 3)).sum().backward()
    source.step()
    target = core.Adam(list(model.parameters())[:2], lr=LR)
    with pytest.raises(ValueError, match="has shape"):
        target.load_state_dict(source.state_dict())
