"""The table every core test runs over, in the manner of torch's OptimizerInfo.

A case is one algorithm with one weight-decay mode (and AMSGrad or clipping where the
algorithm has them), the kwargs that build the core optimizer, and the reference that
computes the same math: torch.optim where it coincides, tests/core/reference.py where not.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import core
from tests.core.reference import PaperADOPT

LR = 1e-2
WEIGHT_DECAY = 0.1
FULLY_DECOUPLED_WEIGHT_DECAY = 1e-3
TINY_EPS = 1e-10
EPS = 1e-3
"""Large enough that a misplaced eps (raw vs bias-corrected root) fails the float32 check."""
DECAY_MODES = ("none", "l2", "decoupled", "fully_decoupled")
BACKENDS = {
    "loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "triton": {"fused": True},
}
"""Constructor flags per backend. "triton" runs the Triton kernels on CPU tensors through
Triton's interpreter (conftest.py routes fused CPU steps there for tests named so)."""
TRAINING_BACKENDS = {"default": {}, **BACKENDS}
"""What tests of a training configuration run: the optimizer as users build it (no backend
flag: adamkit chooses) and each explicit backend."""
EAGER_BACKENDS = ("loop", "foreach")
FUSED_BACKENDS = ("fused", "triton")


@dataclass(frozen=True)
class Case:
    """One optimizer configuration and its reference."""

    id: str
    core_class: type[core.AdamFamilyOptimizer]
    core_kwargs: dict[str, Any]
    reference: Callable[[list[torch.Tensor]], Any] = field(repr=False)

    def make(self, params: Any, **overrides: Any) -> core.AdamFamilyOptimizer:
        return self.core_class(params, **{**self.core_kwargs, **overrides})


def _decay_kwargs(mode: str) -> dict[str, Any]:
    """Core kwargs for a weight-decay mode."""
    if mode == "none":
        return {"weight_decay": 0.0}
    if mode == "l2":
        return {"weight_decay": WEIGHT_DECAY, "decouple_wd": False}
    if mode == "decoupled":
        return {"weight_decay": WEIGHT_DECAY, "decouple_wd": True}
    return {"weight_decay": FULLY_DECOUPLED_WEIGHT_DECAY, "decouple_lr": True}


def _torch_decay(mode: str) -> tuple[float, bool]:
    """(weight_decay, decoupled) for torch.optim: fully decoupled is decoupled with λ/max_lr."""
    if mode == "none":
        return 0.0, False
    if mode == "fully_decoupled":
        return FULLY_DECOUPLED_WEIGHT_DECAY / LR, True
    return WEIGHT_DECAY, mode == "decoupled"


def _torch_adam(mode: str, amsgrad: bool, eps: float) -> Callable[[list[torch.Tensor]], Any]:
    weight_decay, decoupled = _torch_decay(mode)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return lambda params: cls(
        params, lr=LR, betas=(0.9, 0.99), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad
    )


def _torch_radam_nadam(cls: type, mode: str, eps: float) -> Callable[[list[torch.Tensor]], Any]:
    weight_decay, decoupled = _torch_decay(mode)
    return lambda params: cls(
        params,
        lr=LR,
        betas=(0.9, 0.99),
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled,
    )


def _paper_adopt(mode: str, clip: bool) -> Callable[[list[torch.Tensor]], Any]:
    weight_decay = {
        "none": 0.0,
        "fully_decoupled": FULLY_DECOUPLED_WEIGHT_DECAY,
    }.get(mode, WEIGHT_DECAY)
    return lambda params: PaperADOPT(
        params,
        lr=LR,
        betas=(0.9, 0.99),
        eps=EPS,
        weight_decay=weight_decay,
        decay_mode=mode,
        max_lr=LR,
        clip=clip,
    )


def trajectory_cases() -> list[Case]:
    """Every algorithm x weight-decay mode x AMSGrad/clip, with its reference."""
    cases = []
    for mode in DECAY_MODES:
        decay = _decay_kwargs(mode)
        for amsgrad in (False, True):
            cases.append(
                Case(
                    f"Adam-{mode}" + ("-amsgrad" if amsgrad else ""),
                    core.Adam,
                    {"lr": LR, "eps": EPS, "amsgrad": amsgrad, **decay},
                    _torch_adam(mode, amsgrad, EPS),
                )
            )
        cases.append(
            Case(
                f"RAdam-{mode}",
                core.RAdam,
                {"lr": LR, "eps": TINY_EPS, **decay},
                _torch_radam_nadam(torch.optim.RAdam, mode, TINY_EPS),
            )
        )
        cases.append(
            Case(
                f"NAdam-{mode}",
                core.NAdam,
                {"lr": LR, "eps": EPS, **decay},
                _torch_radam_nadam(torch.optim.NAdam, mode, EPS),
            )
        )
        for clip in (True, False):
            cases.append(
                Case(
                    f"ADOPT-{mode}" + ("" if clip else "-noclip"),
                    core.ADOPT,
                    {"lr": LR, "betas": (0.9, 0.99), "eps": EPS, "clip": clip, **decay},
                    _paper_adopt(mode, clip),
                )
            )
    cases.append(
        Case(
            "AdamW-defaults",
            core.AdamW,
            {"lr": LR, "eps": 1e-8},
            lambda params: torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.99), eps=1e-8),
        )
    )
    return cases


def one_case_per_algorithm() -> list[Case]:
    """A decayed configuration of each algorithm, for checks that do not depend on the mode."""
    wanted = {"Adam-decoupled-amsgrad", "RAdam-l2", "NAdam-decoupled", "ADOPT-fully_decoupled"}
    return [case for case in trajectory_cases() if case.id in wanted]


def lr_factor(step: int, total: int) -> float:
    """Warmup then cosine: every run changes lr each step, so decay scheduling is exercised."""
    return min(1.0, (step + 1) / 10) * (0.55 + 0.45 * math.cos(math.pi * step / total))


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def make_batches(
    dtype: torch.dtype, count: int, seed: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    teacher = 0.4 * torch.randn(6, 3, generator=generator, dtype=torch.float64)
    batches = []
    for _ in range(count):
        x = torch.randn(32, 6, generator=generator, dtype=torch.float64)
        y = torch.sin(x @ teacher) + 0.1 * torch.randn(
            32, 3, generator=generator, dtype=torch.float64
        )
        batches.append((x.to(dtype), y.to(dtype)))
    return batches


def set_lr(optimizer: Any, lr: float) -> None:
    if hasattr(optimizer, "param_groups"):
        for group in optimizer.param_groups:
            group["lr"] = lr
    else:
        optimizer.lr = lr


def train(
    model: nn.Module,
    optimizer: Any,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    start: int = 0,
    total: int | None = None,
) -> list[float]:
    """Train over batches with the scheduled lr; returns the losses."""
    total = total if total is not None else start + len(batches)
    losses = []
    for offset, (x, y) in enumerate(batches):
        set_lr(optimizer, LR * lr_factor(start + offset, total))
        for p in model.parameters():
            p.grad = None
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list, dict]:
    """Copies of the parameters and the optimizer state dict, for assert_unchanged."""
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(optimizer.state_dict())


def assert_unchanged(model: nn.Module, optimizer: torch.optim.Optimizer, before: tuple) -> None:
    """Parameters and optimizer state exactly as snapshot() found them."""
    params, state_dict = before
    for p, saved in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, saved)
    after = optimizer.state_dict()
    assert after["state"].keys() == state_dict["state"].keys()
    for key, state in state_dict["state"].items():
        for name, value in state.items():
            assert torch.equal(after["state"][key][name], value), name


def assert_load_refused(
    model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict, match: str
) -> tuple:
    """load_state_dict(saved) raises a ValueError matching `match` and changes nothing of
    the model or the optimizer; returns the snapshot taken before, for further checks."""
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=match):
        optimizer.load_state_dict(saved)
    assert_unchanged(model, optimizer, before)
    return before
