"""Multi-threaded fused CPU steps: the kernels hand their shares to the runner they are
given (torch's parallel_for, from the host checks module) and run the shares on threads
of their own without one; every way gives the bits one thread gives, for the optimizer
as users build it (no backend flags) and with fused=True."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import core
from core.backends import cpu, cpu_kernel, host_checks

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler")

SHAPES = [(150_001,), (300, 257)]
"""227,101 elements: three shares of 65,536 or more, so two threads take two; a share
boundary inside the first tensor, and rows that end inside a 256-element block."""

CONFIGURATIONS = {
    "AdamW 8bit fp32": (core.AdamW, torch.float32, {"state_precision": "8bit"}),
    "RAdam fp32": (core.RAdam, torch.float32, {}),
    "AdamW bf16 Kahan": (core.AdamW, torch.bfloat16, {"kahan_sum": True}),
    "ADOPT 8bit bf16 stochastic": (
        core.ADOPT,
        torch.bfloat16,
        {"state_precision": "8bit", "stochastic_rounding": True, "rounding_seed": 3},
    ),
}
"""Each on the generated kernel: both entry points (full and 8-bit moments), both
parameter widths, Kahan and stochastic rounding (whose bits depend on element indices)."""

FLAGS = {"default flags": {}, "fused=True": {"fused": True}}


def _train(name: str, flags: dict[str, Any], threads: int, steps: int = 3) -> list[Tensor]:
    """Parameters and every state tensor after `steps` steps on `threads` threads."""
    cls, dtype, options = CONFIGURATIONS[name]
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=generator).to(dtype) for shape in SHAPES]
    optimizer = cls(params, lr=1e-2, weight_decay=1e-2, **options, **flags)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(dtype)
            optimizer.step()
    finally:
        torch.set_num_threads(previous)
    states = [t for p in params for t in optimizer.state[p].values() if isinstance(t, Tensor)]
    return [p.detach().clone() for p in params] + states


def _assert_same_bits(actual: list[Tensor], expected: list[Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a.flatten().view(torch.uint8), e.flatten().view(torch.uint8))


_RUNNER = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64)
_SHARE = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)


@pytest.fixture
def recording_runner(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """A runner written here (share_runner_t through ctypes) that records each call's
    share count and runs the shares last first, on this thread: what the kernels hand it
    must be whole, independent shares."""
    shares_seen: list[int] = []

    def run_shares(run: int, work: int, size: int, shares: int) -> None:
        shares_seen.append(shares)
        share = _SHARE(run)
        for j in reversed(range(shares)):
            share(work + j * size)

    callback = _RUNNER(run_shares)
    address = ctypes.cast(callback, ctypes.c_void_p).value
    monkeypatch.setattr(cpu_kernel, "share_runner", lambda: address)
    yield shares_seen
    del callback  # kept alive while the kernels may call it


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_kernels_hand_their_shares_to_the_runner(
    name: str, flags: str, recording_runner: list[int]
) -> None:
    one_thread = _train(name, FLAGS[flags], threads=1)
    assert recording_runner == []  # one thread: no runner
    two_threads = _train(name, FLAGS[flags], threads=2)
    assert recording_runner == [2, 2, 2]
    _assert_same_bits(two_threads, one_thread)


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_threads_of_the_kernels_own_give_one_threads_bits(
    name: str, flags: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where no runner is to be had (no C++ compiler, the build still running)."""
    monkeypatch.setattr(cpu_kernel, "share_runner", lambda: None)
    _assert_same_bits(_train(name, FLAGS[flags], threads=2), _train(name, FLAGS[flags], 1))


@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_torch_parallel_for_runs_the_shares(name: str, flags: str, threads: int) -> None:
    """Once the host checks module is loaded, multi-threaded calls run on torch's
    parallel_for, and give one thread's bits: two shares on two threads, and three on
    a team of four (one thread idle)."""
    module = host_checks.compiled_checks()  # waits for the build, loads the module
    if module is None:
        pytest.skip("the C++ host checks do not build here (see the warning)")
    if host_checks.torch_openmp_runtime() is None:
        pytest.skip("torch runs on no libgomp here: the kernels start their own threads")
    assert module.openmp_runtime() == host_checks.torch_openmp_runtime()  # type: ignore[attr-defined]
    assert cpu_kernel.share_runner() == module.share_runner()  # type: ignore[attr-defined]
    _assert_same_bits(_train(name, FLAGS[flags], threads), _train(name, FLAGS[flags], 1))


class _Module:
    """What torch_share_runner reads of a built module."""

    def __init__(self, runner: int | None, runtime: str | None) -> None:
        self.runner, self.runtime = runner, runtime

    def share_runner(self) -> int | None:
        return self.runner

    def openmp_runtime(self) -> str | None:
        return self.runtime


def test_a_runner_on_another_openmp_runtime_is_not_used(tmp_path: Path) -> None:
    """Its parallel regions would run on a second pool beside torch's, or serially: the
    kernels' own threads do better."""
    torch_runtime = host_checks.torch_openmp_runtime()
    if torch_runtime is None:
        pytest.skip("torch runs on no libgomp here")
    other = tmp_path / "libgomp.so.1"
    other.write_bytes(b"")
    assert host_checks.torch_share_runner(_Module(1234, torch_runtime)) == 1234
    assert host_checks.torch_share_runner(_Module(1234, str(other))) == 0
    assert host_checks.torch_share_runner(_Module(1234, None)) == 0  # built without OpenMP
    assert host_checks.torch_share_runner(_Module(None, torch_runtime)) == 0  # not OpenMP ATen


def test_python_host_checks_leave_the_kernels_their_own_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ADAMKIT_HOST_CHECKS=python: no C++ module is built or loaded for the runner."""
    monkeypatch.setenv("ADAMKIT_HOST_CHECKS", "python")
    monkeypatch.setattr(cpu_kernel, "_share_runner", None)

    def no_build(wait: bool = True) -> None:
        raise AssertionError("the C++ module was asked for")

    monkeypatch.setattr(host_checks, "compiled_checks", no_build)
    assert cpu_kernel.share_runner() is None
    _assert_same_bits(_train("AdamW 8bit fp32", {}, threads=2), _train("AdamW 8bit fp32", {}, 1))
