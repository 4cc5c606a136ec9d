"""`make gpu-check`: the GPU tests and the GPU benchmark on this machine's GPU, one table.

Uses the Python it runs in (which must already have CUDA torch and Triton, plus pytest
and hypothesis for the tests) from the repository root, so nothing is built or
installed. Kernels are compiled for the GPU (TRITON_INTERPRET=0). The full logs go to
.ci/reports/gpu-check.log; the table says what was measured against each target.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / ".ci" / "reports"
TEST_SECONDS, BENCHMARK_SECONDS = 300, 240
"""Limits that keep the whole check within 8 minutes on one datacenter GPU."""
RATIO_TARGET, BANDWIDTH_TARGET, LARGE = 1.1, 85, 1_000_000


def _missing() -> str | None:
    """Why this Python cannot run the check, or None."""
    for module in ("torch", "triton", "pytest", "hypothesis"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed in {sys.executable}"
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} in {sys.executable} finds no CUDA device"
    return None


def _run(command: list[str], timeout: float, log: list[str]) -> tuple[int, str, float]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    try:
        result = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as expired:
        code, output = -1, f"timed out after {timeout} s\n{expired.stdout or ''}"
    log += [f"$ {' '.join(command)}", output]
    return code, output, time.monotonic() - start


def _test_row(junit: Path, code: int, seconds: float) -> list[str]:
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if junit.exists():
        suite = ElementTree.parse(junit).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        assert suite is not None
        counts = {key: int(suite.get(key, 0)) for key in counts}
    failed = counts["failures"] + counts["errors"]
    passed = counts["tests"] - failed - counts["skipped"]
    measured = f"{passed} passed, {failed} failed, {counts['skipped']} skipped ({seconds:.0f} s)"
    ok = code == 0 and failed == 0 and passed > 0
    return ["GPU tests (tests/core/test_triton_gpu.py)", measured, "all pass", _yes(ok)]


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _benchmark_rows(output: str) -> list[list[str]]:
    """One row per core algorithm, dtype and shape from the benchmark's GPU tables."""
    rows, title = [], ""
    for line in output.splitlines():
        header = re.match(r"GPU (\w+): (\d+) tensors x ([\d,]+) parameters", line)
        if header:
            title, numel = line.removeprefix("GPU "), int(header.group(3).replace(",", ""))
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if title and len(cells) == 4 and cells[0].startswith("core "):
            ratio, bandwidth = float(cells[2]), float(cells[3])
            targets = f"<= {RATIO_TARGET}x"
            ok = ratio <= RATIO_TARGET
            if numel >= LARGE:
                targets += f", >= {BANDWIDTH_TARGET}%"
                ok = ok and bandwidth >= BANDWIDTH_TARGET
            measured = f"{ratio:.2f}x torch fused, {bandwidth:.0f}% of copy"
            rows.append([f"{title}: {cells[0]}", measured, targets, _yes(ok)])
        host = re.match(
            r"\| (30 tensors|300 tensors|gradient release.*?) \| (\d+) \| (\d+) \| (.*) \|", line
        )
        if host:
            name, step, backend, target = host.groups()
            ok = target.strip() == "-" or int(step) <= int(target)
            rows.append(
                [
                    f"host time, {name} (launch stubbed)",
                    f"{step} µs ({backend} in backend)",
                    "-" if target.strip() == "-" else f"<= {target} µs",
                    _yes(ok),
                ]
            )
    return rows


def main() -> int:
    reason = _missing()
    if reason:
        print(f"make gpu-check cannot run: {reason}. See README, 'GPU check'.")
        return 2
    REPORTS.mkdir(parents=True, exist_ok=True)
    junit = REPORTS / "gpu.xml"
    log: list[str] = []
    code, _, seconds = _run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/core/test_triton_gpu.py",
            "-q",
            f"--junitxml={junit}",
        ],
        TEST_SECONDS,
        log,
    )
    rows = [_test_row(junit, code, seconds)]
    bench_code, output, seconds = _run(
        [sys.executable, "examples/benchmark.py", "--device", "cuda"], BENCHMARK_SECONDS, log
    )
    rows += _benchmark_rows(output)
    if bench_code != 0:
        rows.append(
            ["GPU benchmark", f"exit {bench_code} after {seconds:.0f} s", "exit 0", "**no**"]
        )
    (REPORTS / "gpu-check.log").write_text("\n".join(log), encoding="utf-8")
    import torch

    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; logs in {REPORTS}\n")
    print("| check | measured | target | met |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0 if code == 0 and bench_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
