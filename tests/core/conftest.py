"""Route the "triton" backend of the test table to Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before core.backends.triton is imported (its kernels read it
when they are decorated); tests/conftest.py sets it, and core imports that module lazily.
"""

from __future__ import annotations

import pytest

import core.backends
from core.backends import cpu_kernel


def triton_unavailable_reason() -> str | None:
    """Why the Triton kernels cannot be tested here, or None."""
    backend = core.backends._triton_backend()
    if isinstance(backend, str):
        return backend
    if type(backend._step_kernel).__name__ != "InterpretedFunction":
        return "TRITON_INTERPRET=1 was not set before the Triton backend was imported"
    return None


@pytest.fixture(autouse=True)
def _triton_on_cpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests whose id names the triton backend run fused CPU steps through Triton."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or "triton" not in callspec.id.split("-"):
        return
    reason = triton_unavailable_reason()
    if reason is not None:
        pytest.skip(f"Triton backend not testable here: {reason}")
    monkeypatch.setattr(core.backends, "TRITON_DEVICE_TYPES", {"cpu"})


@pytest.fixture(params=["native", "avx2", "portable"])
def kernel_build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every build of the CPU kernels this machine runs: -march=native (AVX-512's rounding
    and 8-bit coding sixteen lanes at a time, on CPUs that have it), AVX2's eight lanes
    (where the CPU has AVX-512 too; where it has AVX2 only, native is that build), and
    the portable one, all in software."""
    if request.param == "avx2":
        flags = cpu_kernel._cpu_flags()
        if not flags >= cpu_kernel.AVX2_CPU_FLAGS:
            pytest.skip("this CPU lacks AVX2, FMA or F16C")
        if "avx512f" not in flags:
            pytest.skip("this CPU has no AVX-512: the native build is the AVX2 one")
        monkeypatch.setenv("ADAMKIT_PORTABLE_KERNELS", "avx2")
    if request.param == "portable":
        monkeypatch.setenv("ADAMKIT_PORTABLE_KERNELS", "1")
    return str(request.param)
