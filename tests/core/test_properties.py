"""Property-based checks over random shapes, dtypes, hyperparameters and backends."""

from __future__ import annotations

import copy
from typing import Any

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import core
from tests.core.cases import BACKENDS

ALGORITHMS = {
    "Adam": core.Adam,
    "AdamW": core.AdamW,
    "RAdam": core.RAdam,
    "NAdam": core.NAdam,
    "ADOPT": core.ADOPT,
}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@st.composite
def configurations(draw: st.DrawFn, allow_zero_lr: bool = True) -> dict[str, Any]:
    """An algorithm with valid random hyperparameters and a weight-decay mode."""
    name = draw(st.sampled_from(sorted(ALGORITHMS)))
    kwargs: dict[str, Any] = {
        "lr": draw(st.floats(0.0 if allow_zero_lr else 1e-5, 0.1)),
        "betas": (draw(st.floats(0.0, 0.99)), draw(st.floats(0.5, 0.9999))),
        "eps": draw(st.floats(1e-8, 1e-2)),
        "weight_decay": draw(st.floats(0.0, 0.2)),
    }
    mode = draw(st.sampled_from(["l2", "decoupled", "fully_decoupled"]))
    kwargs["decouple_wd"] = mode == "decoupled"
    kwargs["decouple_lr"] = mode == "fully_decoupled"
    if name in ("Adam", "AdamW"):
        kwargs["amsgrad"] = draw(st.booleans())
    if name == "ADOPT":
        kwargs["clip"] = draw(st.booleans())
    return {"name": name, "kwargs": kwargs}


@st.composite
def parameter_sets(draw: st.DrawFn, grad_limit: float = 1e3) -> dict[str, Any]:
    """A few tensors of random shapes (empty included) of one dtype, and gradients for 3 steps."""
    dtype = draw(st.sampled_from(DTYPES))
    if dtype == torch.float16:
        grad_limit = min(grad_limit, 200.0)  # g² must fit fp16 moments (max 65504)
    shapes = draw(
        st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=2), min_size=1, max_size=4)
    )
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-4, 1e-2, 1.0, grad_limit]))
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(*shape, generator=generator).to(dtype) for shape in shapes]
    grads = [
        [
            (torch.randn(*shape, generator=generator) * scale)
            .clamp(-grad_limit, grad_limit)
            .to(dtype)
            for shape in shapes
        ]
        for _ in range(3)
    ]
    return {"params": params, "grads": grads}


def _run(config: dict[str, Any], data: dict[str, Any], **flags: Any) -> tuple[list, Any]:
    params = [torch.nn.Parameter(p.clone()) for p in data["params"]]
    optimizer = ALGORITHMS[config["name"]](params, **config["kwargs"], **flags)
    for grads in data["grads"]:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    return params, optimizer


def _ulp(values: torch.Tensor) -> torch.Tensor:
    magnitude = values.detach().abs()
    return torch.nextafter(magnitude, torch.full_like(magnitude, float("inf"))) - magnitude


@given(config=configurations(), data=parameter_sets())
def test_all_backends_agree(config: dict[str, Any], data: dict[str, Any]) -> None:
    reference, _ = _run(config, data, **BACKENDS["loop"])
    for backend, flags in BACKENDS.items():
        params, _ = _run(config, data, **flags)
        for a, b in zip(reference, params, strict=True):
            if a.dtype in (torch.float64, torch.float32):
                # Relative to the tensor's scale: an element can be the small difference of
                # large updates, where a last-bit difference of the updates shows.
                scale = max(1.0, float(a.detach().abs().max())) if a.numel() else 1.0
                tolerance = (1e-12 if a.dtype == torch.float64 else 1e-6) * scale
                torch.testing.assert_close(b, a, atol=tolerance, rtol=0, msg=backend)
            else:
                # a NaN where the loop backend has one too is agreement (fp16 ADOPT can
                # overflow: see _fits_in_float16); anywhere else it fails the bound
                both_nan = a.isnan() & b.isnan()
                assert bool(((a - b).abs() <= _ulp(a)).logical_or(both_nan).all()), backend


def _fits_in_float16(config: dict[str, Any], data: dict[str, Any]) -> bool:
    """Whether ADOPT's normalised gradient g / max(√v, eps) surely fits float16 state:
    where a tiny g² rounds v to 0 in float16, an unclipped later step stores g / eps in m,
    which overflows (65504) for |g| / eps beyond it: infinite by the algorithm's own
    arithmetic, on every backend alike, not a backend's failure."""
    if config["name"] != "ADOPT" or data["params"][0].dtype != torch.float16:
        return True
    if config["kwargs"].get("clip"):
        return True
    largest = max(
        (float(g.abs().max()) for step in data["grads"] for g in step if g.numel()), default=0.0
    )
    return largest / config["kwargs"]["eps"] < 65504


@given(config=configurations(), data=parameter_sets())
def test_finite_input_gives_finite_parameters_and_state(
    config: dict[str, Any], data: dict[str, Any]
) -> None:
    assume(_fits_in_float16(config, data))
    params, optimizer = _run(config, data)
    for p in params:
        assert bool(torch.isfinite(p).all())
        for value in optimizer.state[p].values():
            assert bool(torch.isfinite(value).all())


@given(config=configurations(), data=parameter_sets())
def test_lr_zero_changes_nothing(config: dict[str, Any], data: dict[str, Any]) -> None:
    config = copy.deepcopy(config)
    config["kwargs"]["lr"] = 0.0
    params, _ = _run(config, data)
    for p, original in zip(params, data["params"], strict=True):
        assert torch.equal(p.detach(), original)


@given(
    config=configurations(allow_zero_lr=False),
    curvature_seed=st.integers(0, 2**31 - 1),
    size=st.integers(1, 64),
)
def test_each_step_descends_on_a_convex_quadratic(
    config: dict[str, Any], curvature_seed: int, size: int
) -> None:
    """f(θ) = ½·Σ a·(θ − c)² with a in [0.1, 10]: small steps from afar must lower f."""
    generator = torch.Generator().manual_seed(curvature_seed)
    curvature = 0.1 + 9.9 * torch.rand(size, generator=generator, dtype=torch.float64)
    center = torch.randn(size, generator=generator, dtype=torch.float64)
    start = center + torch.sign(torch.randn(size, generator=generator, dtype=torch.float64)) * (
        1 + torch.rand(size, generator=generator, dtype=torch.float64)
    )
    theta = torch.nn.Parameter(start.clone())
    kwargs = {**config["kwargs"], "lr": min(config["kwargs"]["lr"], 1e-2), "weight_decay": 0.0}
    optimizer = ALGORITHMS[config["name"]]([theta], **kwargs)

    def loss() -> torch.Tensor:
        return 0.5 * (curvature * (theta - center) ** 2).sum()

    previous = loss().item()
    for step in range(5):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
        current = loss().item()
        if config["name"] == "ADOPT" and step == 0:
            assert current == previous  # ADOPT's first call only seeds its second moment
        else:
            assert current < previous
        previous = current
