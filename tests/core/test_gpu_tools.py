"""The GPU benchmark's and `make gpu-check`'s code paths that run without a GPU: argument
checks, the host-time table (measured here), and the summary table's reading of the
benchmark's rows against the targets."""

from __future__ import annotations

import importlib.util
import re
import sys
from types import ModuleType

import pytest
import torch

from tests.processes import ROOT, exit_of_script, run_worker


def _module(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.replace("/", "_"), ROOT / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def host_time_output() -> str:
    command = [sys.executable, "examples/benchmark.py", "--host-time-only", "--quick"]
    return run_worker(command, timeout=300).stdout


def test_host_time_table_times_each_step_kind(host_time_output: str) -> None:
    rows = re.findall(r"^\| ([^|]+?) \| (\d+) \| (\d+) \| ([^|]+?) \|$", host_time_output, re.M)
    assert [row[0] for row in rows] == [
        "30 tensors",
        "300 tensors",
        "gradient release, per parameter",
        "8-bit state, 300 tensors",
        "8-bit state, gradient release, per parameter",
    ]
    # Both columns are timed, each the best of its own repeats: on a busy machine the
    # backend's part can come out above the whole step's, so only their presence is held.
    for _, step, backend, _ in rows:
        assert int(step) > 0 and int(backend) > 0
    assert [row[3] for row in rows] == ["-", "200", "20", "-", "-"]


def test_gpu_check_reads_rows_against_the_targets(host_time_output: str) -> None:
    benchmark, check = _module("examples/benchmark.py"), _module(".ci/gpu_check.py")
    copy = 4e12  # bytes/s
    lines = benchmark.gpu_header("fp32", 20, 1_000_000)
    # 28 B x 20M params in 0.16 ms is 87.5% of 4 TB/s; in 0.2 ms 70%.
    lines.append(benchmark.gpu_row("core AdamW Triton", 0.16e-3, 0.15e-3, 28 * 20e6, copy))
    lines.append(benchmark.gpu_row("core RAdam Triton", 0.2e-3, 0.15e-3, 28 * 20e6, copy))
    lines += benchmark.gpu_header("bf16", 200, 1000)  # small tensors: no bandwidth target
    lines.append(benchmark.gpu_row("core NAdam Triton (Kahan)", 1e-3, 1e-3, 18 * 2e5, copy))
    rows = check._benchmark_rows("\n".join([*lines, host_time_output]))
    assert rows[0] == [
        "fp32: 20 tensors x 1,000,000 parameters: core AdamW Triton",
        "1.07x torch fused, 88% of copy",
        "<= 1.1x, >= 85%",
        "yes",
    ]
    assert rows[1][1:] == ["1.33x torch fused, 70% of copy", "<= 1.1x, >= 85%", "**no**"]
    assert rows[2][2:] == ["<= 1.1x", "yes"]
    assert [row[0] for row in rows[3:]] == [
        "host time, 30 tensors (launch stubbed)",
        "host time, 300 tensors (launch stubbed)",
        "host time, gradient release, per parameter (launch stubbed)",
    ]


@pytest.mark.bad_input
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_a_gpu_cuda_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, stderr = exit_of_script("examples/benchmark.py", ["--device", "cuda"], monkeypatch)
    assert code == 2
    assert "argument --device: invalid value 'cuda': torch finds no CUDA device" in stderr
    assert "allowed: 'cpu'" in stderr
    code, stdout, _ = exit_of_script(".ci/gpu_check.py", [], monkeypatch)
    assert code == 2
    assert "make gpu-check cannot run:" in stdout and "finds no CUDA device" in stdout


@pytest.mark.bad_input
def test_an_unknown_device_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, stderr = exit_of_script("examples/benchmark.py", ["--device", "tpu"], monkeypatch)
    assert code == 2
    assert "argument --device: invalid value 'tpu'; allowed: 'cpu', 'cuda'" in stderr
