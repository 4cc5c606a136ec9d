"""Stochastic rounding of bf16/fp16 parameters: unbiased, reproducible from its seed,
the same on every backend, and a resumed run continues bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import core
from core.backends.precision import StochasticRounding, rounding_uniforms, stochastic_round
from core.random_bits import mix32
from tests.core.cases import BACKENDS, TRAINING_BACKENDS, one_case_per_algorithm

ALGORITHMS = {case.id: case for case in one_case_per_algorithm()}
LOW_PRECISION = [torch.bfloat16, torch.float16]


def test_uniforms_are_the_documented_hash_of_key_and_index() -> None:
    key = StochasticRounding(seed=7, stream=3, step=11).key()
    uniforms = rounding_uniforms(key, 1000, torch.device("cpu"))
    expected = [(mix32((i * 0x9E3779B1 + key) & 0xFFFFFFFF) >> 8) * 2.0**-24 for i in range(1000)]
    assert uniforms.tolist() == expected
    assert 0.45 < uniforms.mean().item() < 0.55
    other = StochasticRounding(seed=7, stream=4, step=11).key()
    assert other != key and StochasticRounding(seed=8, stream=3, step=11).key() != key


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_each_value_rounds_to_a_neighbour_up_with_the_probability_of_its_fraction(
    dtype: torch.dtype,
) -> None:
    generator = torch.Generator().manual_seed(0)
    values = (torch.rand(200_000, generator=generator) - 0.5) * 20
    values[:100] = torch.tensor(1e-6)  # fp16 subnormals; bf16 normal
    rounded = stochastic_round(values, dtype, StochasticRounding(0, 0, 1)).float()
    down = values.to(dtype).float()
    neighbour = torch.where(
        down > values,
        torch.nextafter(down.to(dtype), torch.tensor(-1e9, dtype=dtype)).float(),
        torch.where(
            down < values,
            torch.nextafter(down.to(dtype), torch.tensor(1e9, dtype=dtype)).float(),
            down,
        ),
    )
    low, high = torch.minimum(down, neighbour), torch.maximum(down, neighbour)
    assert ((rounded == low) | (rounded == high)).all()
    # unbiased: the mean error is far below round-to-nearest's mean absolute error
    spacing = (high - low).clamp_min(1e-30)
    relative = ((rounded - values) / spacing)[high > low]
    assert abs(relative.mean().item()) < 0.005
    # one fixed value: rounds up a quarter of the time
    quarter = torch.full((100_000,), 1.0 + 0.25 * 2.0 ** -(7 if dtype == torch.bfloat16 else 10))
    up = stochastic_round(quarter, dtype, StochasticRounding(1, 2, 3)).float() > 1
    assert 0.24 < up.float().mean().item() < 0.26


def test_non_finite_values_round_to_nearest() -> None:
    values = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, 1e-45])
    for dtype in LOW_PRECISION:
        rounded = stochastic_round(values, dtype, StochasticRounding(0, 0, 0)).float()
        assert rounded[0] == float("inf") and rounded[1] == -float("inf")
        assert rounded[2].isnan() and rounded[3] == 0


class Tiny(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(12, 64), nn.Tanh(), nn.Linear(64, 3)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def data(count: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(12, 3, generator=generator)
    batches = []
    for _ in range(count):
        x = torch.randn(16, 12, generator=generator)
        batches.append((x.to(dtype), torch.sin(x @ teacher)))
    return batches


def run(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list, start: int = 0) -> None:
    for x, y in batches[start:]:
        nn.functional.mse_loss(model(x).float(), y).backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("backend", ["default", *BACKENDS])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("case_id", list(ALGORITHMS))
def test_every_backend_rounds_as_the_loop_backend_does(
    case_id: str, dtype: torch.dtype, backend: str
) -> None:
    case = ALGORITHMS[case_id]
    batches = data(6, dtype)
    results = []
    for flags in ({"foreach": False, "fused": False}, BACKENDS.get(backend, {})):
        model = Tiny(dtype)
        run(model, case.make(model.parameters(), stochastic_rounding=True, **flags), batches)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_a_resumed_run_continues_bit_for_bit_and_the_seed_decides_the_run() -> None:
    dtype = torch.bfloat16
    batches = data(10, dtype)

    def make(model: nn.Module, seed: int = 5) -> core.AdamW:
        return core.AdamW(model.parameters(), lr=1e-3, stochastic_rounding=True, rounding_seed=seed)

    whole = Tiny(dtype)
    run(whole, make(whole), batches)
    first = Tiny(dtype)
    optimizer = make(first)
    run(first, optimizer, batches[:5])
    saved_model, saved = copy.deepcopy(first.state_dict()), copy.deepcopy(optimizer.state_dict())
    resumed = Tiny(dtype)
    resumed.load_state_dict(saved_model)
    resumed_optimizer = make(resumed, seed=0)
    resumed_optimizer.load_state_dict(saved)  # the checkpoint's seed wins, as lr does
    run(resumed, resumed_optimizer, batches, start=5)
    assert all(
        torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters(), strict=True)
    )
    other = Tiny(dtype)
    run(other, make(other, seed=6), batches)
    assert not all(
        torch.equal(a, b) for a, b in zip(whole.parameters(), other.parameters(), strict=True)
    )


def test_gradient_release_rounds_each_parameter_as_a_full_step_does() -> None:
    dtype = torch.bfloat16
    batches = data(5, dtype)
    results = []
    for release in (False, True):
        model = Tiny(dtype)
        optimizer = core.AdamW(
            model.parameters(), lr=1e-3, stochastic_rounding=True, gradient_release=release
        )
        if release:
            core.prepare_for_gradient_release(model, optimizer)
        run(model, optimizer, batches)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_small_updates_survive_in_bf16_as_they_do_with_kahan() -> None:
    """lr·update far below bf16's spacing: round to nearest loses every update, Kahan and
    stochastic rounding both track the fp32 run (measured: within 2% of its distance)."""
    batches = data(200, torch.bfloat16)
    reference = Tiny(torch.float32)
    start = [p.detach().clone() for p in reference.parameters()]
    run(
        reference, core.AdamW(reference.parameters(), lr=1e-4), [(x.float(), y) for x, y in batches]
    )
    moved = [(p - s).norm() for p, s in zip(reference.parameters(), start, strict=True)]
    distances = {}
    for name, options in {
        "nearest": {"kahan_sum": False},
        "kahan": {"kahan_sum": True},
        "stochastic": {"stochastic_rounding": True},
    }.items():
        model = Tiny(torch.bfloat16)
        run(model, core.AdamW(model.parameters(), lr=1e-4, **options), batches)
        distances[name] = max(
            float((p.float() - r).norm() / m)
            for p, r, m in zip(model.parameters(), reference.parameters(), moved, strict=True)
        )
    assert distances["stochastic"] < 0.5 * distances["nearest"]
    assert distances["kahan"] < 0.5 * distances["nearest"]


@pytest.mark.parametrize("released", [False, True], ids=["step", "step-param"])
@pytest.mark.parametrize("backend", TRAINING_BACKENDS)
def test_kahan_sum_false_beside_stochastic_rounding_keeps_it_on(
    backend: str, released: bool
) -> None:
    """kahan_sum=False with stochastic_rounding=True (a LightningCLI flag that turns Kahan
    off) rounded to nearest on every backend, silently: an update far below bf16's
    spacing never moved a weight. It rounds stochastically as without the flag."""
    results = {}
    for name, options in {
        "without": {"stochastic_rounding": True},
        "kahan_off": {"stochastic_rounding": True, "kahan_sum": False},
        "nearest": {"kahan_sum": False},
    }.items():
        param = nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
        flags = {**options, **TRAINING_BACKENDS[backend]}
        optimizer = core.AdamW([param], lr=1e-4, weight_decay=0.0, **flags)
        for _ in range(20):
            param.grad = torch.ones_like(param)
            if released:
                optimizer.step(param=param)
            else:
                optimizer.step()
        assert "kahan_comp" not in optimizer.state[param]
        results[name] = param.detach().clone()
    assert torch.equal(results["kahan_off"], results["without"])
    assert bool((results["nearest"] == 1.0).all())  # 1e-4 is below bf16's spacing at 1
    moved = float((1.0 - results["kahan_off"].float()).mean())  # 20 steps of lr each
    assert abs(moved - 20 * 1e-4) < 0.2 * 20 * 1e-4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stochastic_rounding": True, "kahan_sum": True}, "Invalid kahan_sum: True"),
        ({"stochastic_rounding": 1}, "Invalid stochastic_rounding: 1"),
        ({"stochastic_rounding": True, "rounding_seed": -1}, "Invalid rounding_seed: -1"),
        ({"rounding_seed": 2**32}, "Invalid rounding_seed: 4294967296"),
    ],
)
def test_bad_rounding_options_are_refused_by_name(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        core.AdamW(Tiny(torch.bfloat16).parameters(), lr=1e-3, **options)
