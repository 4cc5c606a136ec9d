"""Non-finite gradients with and without a GradScaler, and a long low-precision run."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import core
from tests.core.cases import (
    LR,
    TRAINING_BACKENDS,
    Case,
    make_batches,
    make_model,
    one_case_per_algorithm,
    trajectory_cases,
)

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


def _finiteness(t: torch.Tensor) -> str:
    """One character per element: '.' finite, 'n' NaN, '+'/'-' an infinity."""
    return "".join(
        "." if math.isfinite(x) else "n" if math.isnan(x) else "+" if x > 0 else "-"
        for x in t.detach().float().tolist()
    )


ADAM_LIKE = {
    "param": ".nnn....",
    "exp_avg": ".n+-....",
    "exp_avg_sq": ".n++....",
    "next": ".nnn....",
}
WITHOUT_SCALER = {
    # Gradient [g, NaN, +inf, -inf, g, g, g, g]: each element of a step is computed on its own,
    # so exactly the non-finite elements turn up in the moments and the parameter (inf/inf is
    # NaN), and NaN in a moment never decays away.
    "Adam-decoupled-amsgrad": {**ADAM_LIKE, "max_exp_avg_sq": ".n++...."},
    "RAdam-l2": ADAM_LIKE,
    "NAdam-decoupled": ADAM_LIKE,
    # ADOPT normalises by the previous second moment and clips: ±inf becomes ±bound, a finite
    # step, but the second moment is inf from now on, so the element's normalised gradients
    # are 0 (it stops learning). NaN goes through as in Adam.
    "ADOPT-fully_decoupled": {
        "param": ".n......",
        "exp_avg": ".n......",
        "exp_avg_sq": ".n++....",
        "next": ".n......",
    },
    # Unclipped, ±inf reaches m and the parameter (-lr·m: ∓inf), and the next step turns
    # those NaN (inf - inf).
    "ADOPT-none-noclip": {
        "param": ".n-+....",
        "exp_avg": ".n+-....",
        "exp_avg_sq": ".n++....",
        "next": ".nnn....",
    },
}
NON_FINITE_CASES = [
    *one_case_per_algorithm(),
    next(c for c in trajectory_cases() if c.id == "ADOPT-none-noclip"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize("case", NON_FINITE_CASES, ids=lambda c: c.id)
def test_without_a_scaler_non_finite_gradients_reach_state_and_parameters_alike_everywhere(
    case: Case, backend: str, dtype: torch.dtype
) -> None:
    """What the README documents, on every backend: no backend hides a NaN (Triton's
    maximum and minimum drop NaN unless told otherwise)."""
    generator = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.randn(8, generator=generator).to(dtype))
    optimizer = case.make([param], **TRAINING_BACKENDS[backend])
    for _ in range(8):
        param.grad = torch.randn(8, generator=generator).to(dtype)
        optimizer.step()
    grad = torch.randn(8, generator=generator)
    grad[1:4] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    param.grad = grad.to(dtype)
    optimizer.step()
    found = {"param": _finiteness(param)}
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in optimizer.state[param]:
            found[key] = _finiteness(optimizer.state[param][key])
    param.grad = torch.randn(8, generator=generator).to(dtype)
    optimizer.step()
    found["next"] = _finiteness(param)
    assert found == WITHOUT_SCALER[case.id]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_nan_in_amsgrads_maximum_beside_a_finite_v_stays(
    backend: str, dtype: torch.dtype
) -> None:
    """A NaN v_max beside a finite v (a diverged run's checkpoint, or an 8-bit v_max
    beside a full-precision v) stays NaN and takes its parameter with it, as
    torch.maximum does: a maximum that dropped NaN healed it silently. A NaN gradient
    cannot show this: it makes v NaN too."""
    generator = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.randn(8, generator=generator).to(dtype))
    optimizer = core.Adam([param], lr=LR, amsgrad=True, **TRAINING_BACKENDS[backend])
    param.grad = torch.randn(8, generator=generator).to(dtype)
    optimizer.step()
    optimizer.state[param]["max_exp_avg_sq"][5] = float("nan")
    for _ in range(2):
        param.grad = torch.randn(8, generator=generator).to(dtype)
        optimizer.step()
    state = optimizer.state[param]
    assert _finiteness(state["max_exp_avg_sq"]) == _finiteness(param) == ".....n.."
    assert _finiteness(state["exp_avg_sq"]) == "........"


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_an_infinite_float16_v_freezes_its_element(backend: str) -> None:
    """A gradient whose square overflows fp16 (5000² > 65504) makes v infinite; the
    kernels read that stored infinity back as infinity (as 65536 it moved the element
    on): the update m/√v is 0 there, as in the loop. 13 elements: the kernels' scalar
    tail; Kahan on, fp16's default (without it fp16 Adam runs torch's own fused kernel)."""
    generator = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.randn(13, generator=generator).to(torch.float16))
    optimizer = core.Adam([param], lr=LR, **TRAINING_BACKENDS[backend])
    param.grad = torch.randn(13, generator=generator).to(torch.float16)
    param.grad[3] = 5000.0
    optimizer.step()
    assert _finiteness(optimizer.state[param]["exp_avg_sq"]) == "...+........."
    before = param.detach().clone()
    param.grad = torch.randn(13, generator=generator).to(torch.float16)
    param.grad[3] = 1.0
    optimizer.step()
    assert float(param[3]) == float(before[3])


def _assert_compensation_is_a_rounding_residue(model: nn.Module, optimizer: core.AdamW) -> None:
    """Each Kahan compensation finite and never more than one ulp of its parameter."""
    for p in model.parameters():
        comp = optimizer.state[p]["kahan_comp"]
        assert bool(torch.isfinite(comp).all())
        ulp = torch.nextafter(p.detach().abs(), torch.full_like(p, float("inf"))) - p.detach().abs()
        assert bool((comp.abs() <= ulp).all()), "compensation drifted beyond a rounding residue"


def _long_run(
    dtype: torch.dtype, steps: int, after_each_step: Callable[..., None] | None = None
) -> tuple[list[float], nn.Module, core.AdamW]:
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
        if after_each_step is not None:
            after_each_step(model, optimizer)
    return losses, model, optimizer


@pytest.mark.slow
def test_twenty_thousand_bf16_kahan_steps_stay_finite_and_in_the_fp32_band() -> None:
    steps = 20_000
    fp32_losses, _, _ = _long_run(torch.float32, steps)
    # the compensation checked after every step, not only the last
    bf16_losses, _, _ = _long_run(torch.bfloat16, steps, _assert_compensation_is_a_rounding_residue)
    assert all(torch.isfinite(torch.tensor(bf16_losses)))
    band = fp32_losses[-1000:]
    # the bf16 forward pass itself adds noise, so the band is widened by 10% each way
    assert 0.9 * min(band) <= sum(bf16_losses[-1000:]) / 1000 <= 1.1 * max(band)
    assert bf16_losses[-1] < 0.2 * bf16_losses[0], "the model must have learned"
