"""Every algorithm x decay mode x AMSGrad/clip x backend x dtype follows its reference."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.core.cases import BACKENDS, Case, make_batches, make_model, train, trajectory_cases

STEPS = 60
TOLERANCE = {torch.float64: 1e-7, torch.float32: 2e-6}
AGREEMENT_WITH_LOOP = {"foreach": 1e-7, "fused": 1e-6, "triton": 1e-6}
"""fp32 tolerance against the loop backend: foreach runs the same operations; the fused
kernels order them differently (one division per element) and torch's own fused kernel
uses fused multiply-adds, so they agree to a few ulps per step."""


def assert_params_close(actual: torch.nn.Module, expected: torch.nn.Module, atol: float) -> None:
    for (name, a), b in zip(actual.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


CHECKED_AGAINST_REFERENCES = ("loop", "foreach", "fused")
"""Triton (slow through its interpreter) is held to loop below, and loop to the references."""


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", CHECKED_AGAINST_REFERENCES)
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


@pytest.mark.parametrize("backend", list(AGREEMENT_WITH_LOOP))
@pytest.mark.parametrize("case", trajectory_cases(), ids=lambda c: c.id)
def test_backend_agrees_with_loop(case: Case, backend: str) -> None:
    """Parameters and every state tensor, and the state dict's layout, whichever backend."""
    runs = []
    for name in ("loop", backend):
        model = make_model(torch.float32)
        optimizer = case.make(model.parameters(), **BACKENDS[name])
        train(model, optimizer, make_batches(torch.float32, 30))
        runs.append((model, optimizer))
    (loop_model, loop_opt), (model, opt) = runs
    atol = AGREEMENT_WITH_LOOP[backend]
    assert_params_close(model, loop_model, atol)
    for p_loop, p in zip(loop_model.parameters(), model.parameters(), strict=True):
        assert opt.state[p].keys() == loop_opt.state[p_loop].keys()
        for key, value in loop_opt.state[p_loop].items():
            other = opt.state[p][key]
            assert (other.dtype, other.device, other.shape) == (
                value.dtype,
                value.device,
                value.shape,
            )
            torch.testing.assert_close(other, value, atol=atol, rtol=0, msg=key)
