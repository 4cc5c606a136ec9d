"""torch.compile: a compiled optimizer step is the eager step (it is kept out of the graph),
and a compiled model trains with an eager step, default flags and every backend."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from tests.core.configuration_cases import (
    BACKENDS,
    GLOBAL_BATCHES,
    OPTIMIZERS,
    make_model,
    warmup,
)


def _train(optimizer_name: str, flags: dict, compile_step: bool, compile_model: bool) -> list:
    model = make_model()
    optimizer = OPTIMIZERS[optimizer_name](model.parameters(), **flags)
    forward = torch.compile(model) if compile_model else model
    step = torch.compile(optimizer.step) if compile_step else optimizer.step
    for index, (x, y) in enumerate(GLOBAL_BATCHES):
        warmup(optimizer, index)  # step 0 at lr = 0, as a warmup from 0
        nn.functional.mse_loss(forward(x), y).backward()
        step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_compiled_step_equals_eager(optimizer_name: str, backend: str) -> None:
    torch._dynamo.reset()
    flags = BACKENDS[backend]
    eager = _train(optimizer_name, flags, compile_step=False, compile_model=False)
    compiled = _train(optimizer_name, flags, compile_step=True, compile_model=False)
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_compiled_model_trains_with_default_flags(optimizer_name: str) -> None:
    """Inductor may round the forward differently from eager, hence a small tolerance."""
    eager = _train(optimizer_name, {}, compile_step=False, compile_model=False)
    compiled = _train(optimizer_name, {}, compile_step=False, compile_model=True)
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_importing_core_leaves_dynamo_unloaded() -> None:
    """Keeping steps out of graphs must not load torch._dynamo (about 1.4 s) at import:
    processes that import core and never build an optimizer (spawned DataLoader workers,
    a script's --help) paid it. torch.optim loads it when an optimizer is built; so do we."""
    probe = "import sys, core; print('torch._dynamo' in sys.modules)"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "False"
