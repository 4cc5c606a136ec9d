"""Non-finite gradients under a GradScaler, and a long low-precision run."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import core
from tests.core.cases import LR, make_batches, make_model

ALL_CLASSES = [core.Adam, core.AdamW, core.RAdam, core.NAdam, core.ADOPT]


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_grad_scaler_skips_steps_with_inf_and_leaves_everything_untouched(cls: type) -> None:
    """fp16 training (Lightning "16-mixed") relies on the scaler skipping overflowed steps."""
    batches = make_batches(torch.float32, 8)
    overflow_step = 4

    reference = make_model()
    reference_opt = cls(reference.parameters(), lr=LR)
    for step, (x, y) in enumerate(batches):
        if step == overflow_step:
            continue  # the skipped step must leave no trace at all
        reference_opt.zero_grad()
        nn.functional.mse_loss(reference(x), y).backward()
        reference_opt.step()

    model = make_model()
    optimizer = cls(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        if step == overflow_step:
            next(model.parameters()).grad[0, 0] = float("inf")
            params_before = [p.detach().clone() for p in model.parameters()]
            state_before = copy.deepcopy(optimizer.state_dict())
        scaler.step(optimizer)
        scaler.update()
        if step == overflow_step:
            assert scaler.get_scale() == 2.0**9
            for p, before in zip(model.parameters(), params_before, strict=True):
                assert torch.equal(p, before)
            for index, state in state_before["state"].items():
                for key, value in state.items():
                    assert torch.equal(optimizer.state_dict()["state"][index][key], value)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)  # power-of-two scaling unscales exactly


def _long_run(dtype: torch.dtype, steps: int) -> tuple[list[float], nn.Module, core.AdamW]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=generator)
    teacher = torch.randn(4, 1, generator=generator)
    y = torch.sin(x @ teacher) + 0.1 * torch.randn(256, 1, generator=generator)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
    optimizer = core.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x.to(dtype)).float(), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, model, optimizer


@pytest.mark.slow
def test_twenty_thousand_bf16_kahan_steps_stay_finite_and_in_the_fp32_band() -> None:
    steps = 20_000
    fp32_losses, _, _ = _long_run(torch.float32, steps)
    bf16_losses, model, optimizer = _long_run(torch.bfloat16, steps)
    assert all(torch.isfinite(torch.tensor(bf16_losses)))
    band = fp32_losses[-1000:]
    # the bf16 forward pass itself adds noise, so the band is widened by 10% each way
    assert 0.9 * min(band) <= sum(bf16_losses[-1000:]) / 1000 <= 1.1 * max(band)
    assert bf16_losses[-1] < 0.2 * bf16_losses[0], "the model must have learned"
    for p in model.parameters():
        comp = optimizer.state[p]["kahan_comp"]
        assert bool(torch.isfinite(comp).all())
        # the compensation is a rounding residue: never more than one ulp of the parameter
        ulp = torch.nextafter(p.detach().abs(), torch.full_like(p, float("inf"))) - p.detach().abs()
        assert bool((comp.abs() <= ulp).all()), "compensation drifted beyond a rounding residue"
