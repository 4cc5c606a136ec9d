"""Every algorithm x decay mode x AMSGrad/clip x backend x dtype follows its reference."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.core.cases import BACKENDS, Case, make_batches, make_model, train, trajectory_cases

STEPS = 60
TOLERANCE = {torch.float64: 1e-7, torch.float32: 2e-6}


def assert_params_close(actual: torch.nn.Module, expected: torch.nn.Module, atol: float) -> None:
    for (name, a), b in zip(actual.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case", trajectory_cases(), ids=lambda c: c.id)
def test_trajectory_matches_reference(case: Case, backend: str, dtype: torch.dtype) -> None:
    model = make_model(dtype)
    reference_model = copy.deepcopy(model)
    batches = make_batches(dtype, STEPS)
    optimizer = case.make(model.parameters(), **BACKENDS[backend])
    reference = case.reference(list(reference_model.parameters()))

    losses = train(model, optimizer, batches)
    train(reference_model, reference, batches)

    assert losses[-1] < 0.7 * losses[0], "the run must actually train for the check to mean much"
    assert_params_close(model, reference_model, TOLERANCE[dtype])
    for state in optimizer.state.values():
        assert state["step"].dtype == torch.float32 and state["step"].device.type == "cpu"
        assert state["step"].dim() == 0 and float(state["step"]) == STEPS


@pytest.mark.parametrize("case", trajectory_cases(), ids=lambda c: c.id)
def test_loop_and_foreach_agree(case: Case) -> None:
    runs = []
    for backend in BACKENDS.values():
        model = make_model(torch.float32)
        optimizer = case.make(model.parameters(), **backend)
        train(model, optimizer, make_batches(torch.float32, 30))
        runs.append((model, optimizer))
    (loop_model, loop_opt), (foreach_model, foreach_opt) = runs
    assert_params_close(foreach_model, loop_model, 1e-7)
    for p_loop, p_foreach in zip(loop_model.parameters(), foreach_model.parameters(), strict=True):
        for key, value in loop_opt.state[p_loop].items():
            torch.testing.assert_close(foreach_opt.state[p_foreach][key], value, atol=1e-7, rtol=0)
