"""examples/benchmark.py --quick runs end to end and reports every row, as medians over
runs: a smoke test of the script the README's speed tables come from (its timings are
not asserted)."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
import warnings

import pytest

from core.backends import cpu_kernel
from tests.processes import ROOT, exit_of_script, run_worker

pytestmark = pytest.mark.slow
WITH_COMPOSER = importlib.util.find_spec("composer") is not None


def _rows(report: str) -> dict[str, list[dict[str, str]]]:
    """Table title -> its rows as {column: cell}: the step-time tables (fp32, bf16,
    Composer), each title's rows of every printing of it together."""
    tables: dict[str, list[dict[str, str]]] = {}
    columns: list[str] = []
    title = ""
    for line in report.splitlines():
        if re.match(r"^(fp32|bf16|Composer): ", line):
            title = line
            tables.setdefault(title, [])
        elif line and not line.startswith("|"):
            title = ""  # another table's title (8-bit, host work) or other text
        elif line.startswith("| optimizer"):
            columns = [cell.strip() for cell in line.strip("|").split("|")]
        elif line.startswith("| step |"):
            title = ""  # the host-time table (tests/core/test_gpu_tools.py reads it)
        elif title and line.startswith("| ") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            tables[title].append(dict(zip(columns, cells, strict=True)))
    return tables


def test_quick_benchmark_reports_every_contender_with_a_ratio() -> None:
    """The core tables in the main environment; in the Composer environment its own table
    only (--composer-only), the core rows being the same script the main one times. The
    medians of --runs 2 (the same code for every table) are checked there, where a second
    run of its one table costs a few seconds instead of the core tables' eleven."""
    runs = 2 if WITH_COMPOSER else 1
    command = [sys.executable, "examples/benchmark.py", "--quick", "--runs", str(runs)]
    result = run_worker([*command, *(["--composer-only"] if WITH_COMPOSER else [])], 600)
    output = result.stdout
    # the host-time table's released rows close each training step, as training does
    # (core warned there that release hooks stepped and no optimizer.step() followed)
    assert "Warning" not in result.stderr, result.stderr[-2000:]
    assert output.count("memory bandwidth:") == runs  # measured again for each run
    # the vector paths the kernels take: ratios differ several times between them
    labels = {"avx512": "AVX-512", "avx2": "AVX2", "software": "software"}
    assert f"cores, kernels: {labels[cpu_kernel.vector_path()]}" in output
    tables = _rows(output)  # each table twice with one run: as measured, then reported
    if runs > 1:
        tables = {title: rows for title, rows in tables.items() if f"median of {runs}" in title}
        assert tables, output[-3000:]
    for rows in tables.values():
        for row in rows:
            ratio = float(next(value for key, value in row.items() if key.startswith("vs ")))
            assert math.isfinite(ratio) and ratio > 0, row
            assert float(row["ms/step"]) > 0, row
    if WITH_COMPOSER:
        assert all(title.startswith("Composer") for title in tables), list(tables)
        composer = {row["optimizer"] for rows in tables.values() for row in rows}
        for suffix in ("", " amsgrad"):
            assert {
                f"composer DecoupledAdamW{suffix}",
                f"composer_adam DecoupledAdamW{suffix}",
            } <= composer
        return
    assert_eight_bit_rows(output, threads=1)  # the default: so [1] below runs only here
    fp32 = [rows for title, rows in tables.items() if title.startswith("fp32")]
    bf16 = [rows for title, rows in tables.items() if title.startswith("bf16")]
    assert len(fp32) == 2 and len(bf16) == 2, list(tables)
    names = [{row["optimizer"] for row in rows} for rows in fp32 + bf16]
    for algorithm in ("AdamW", "AdamW amsgrad", "RAdam", "NAdam", "ADOPT"):
        for backend in ("fused", "default", "foreach", "loop"):
            assert all(f"core {algorithm} {backend}" in table for table in names[:2])
    assert all("core AdamW Kahan fused, fp16 params" in table for table in names[2:])
    # The generated kernels (a cold cache) report their compile time where first built.
    compile_times = [float(r["compile s"]) for t in fp32 + bf16 for r in t if r["compile s"] != "-"]
    assert compile_times and all(seconds > 0 for seconds in compile_times)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--quick", "--runs", "0"], "argument --runs: invalid value 0; allowed: an integer >= 1"),
        (
            ["--eight-bit-only", "--threads", "0"],
            "argument --threads: invalid value 0; allowed: an integer >= 1",
        ),
        (
            ["--kernel-only", "--threads", "2"],
            "argument --threads: invalid value 2 with --kernel-only; allowed: 1",
        ),
        # Each of these was ignored silently: --kernel-only won over the others, and the
        # single-table modes take their own repeats and CPU kernels.
        (
            ["--eight-bit-only", "--kernel-only"],
            "argument --kernel-only: not allowed with argument --eight-bit-only",
        ),
        (
            ["--host-time-only", "--runs", "3"],
            "argument --runs: invalid value 3 with --host-time-only; allowed: 1",
        ),
        (
            ["--eight-bit-only", "--runs", "2"],
            "argument --runs: invalid value 2 with --eight-bit-only; allowed: 1",
        ),
        # The CPU kernels' tables with --device cuda: named on any machine, CUDA or not.
        (
            ["--kernel-only", "--device", "cuda"],
            "argument --device: invalid value 'cuda' with --kernel-only; allowed: 'cpu'",
        ),
        (
            ["--eight-bit-only", "--device", "cuda"],
            "argument --device: invalid value 'cuda' with --eight-bit-only; allowed: 'cpu'",
        ),
    ],
    ids=[
        "runs",
        "threads",
        "kernel-only-threads",
        "two-only-tables",
        "runs-host",
        "runs-8bit",
        "kernel-only-cuda",
        "8bit-cuda",
    ],
)
def test_bad_arguments_are_refused_by_name(
    arguments: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, stderr = exit_of_script("examples/benchmark.py", arguments, monkeypatch)
    assert code == 2
    assert message in stderr


@pytest.mark.parametrize("threads", [1, 2] if WITH_COMPOSER else [2])
def test_eight_bit_table_reports_every_algorithm_with_its_state_bytes(threads: int) -> None:
    """One thread in the Composer environment only: in the main one the quick run above
    prints this table on one thread, and checks it there."""
    command = [sys.executable, "examples/benchmark.py", "--eight-bit-only", "--quick"]
    output = run_worker([*command, "--threads", str(threads)], timeout=600).stdout
    assert_eight_bit_rows(output, threads)


def assert_eight_bit_rows(output: str, threads: int) -> None:
    """The 8-bit table: every algorithm's fused 8-bit step with its state bytes, and with
    more than one thread the two thread hand-offs."""
    suffix = "1 thread (" if threads == 1 else f"{threads} threads ("
    assert f"fp32 parameters, {suffix}" in output
    rows = {
        cells[0]: cells[1:]
        for line in output.splitlines()
        if line.startswith("| ") and not line.startswith(("| optimizer", "|---"))
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    for algorithm in ("AdamW", "Adam", "RAdam", "NAdam", "ADOPT"):
        milliseconds, ratio, state = rows[f"core {algorithm} 8-bit fused"]
        assert float(milliseconds) > 0 and float(ratio) > 0
        bytes_per_param = float(state.split()[0])
        # m and v at about 1.02 bytes each (ADOPT keeps v in fp32: 4 more), beside torch's 8
        assert bytes_per_param < (5.1 if algorithm == "ADOPT" else 2.1), state
        assert "(torch: 8.00)" in state
    handoff = ("torch's threads (parallel_for)", "the kernel's own threads")
    if threads == 1 or "(no runner on torch's threads here" in output:
        assert not any(name in rows for name in handoff)
        return
    for name in handoff:  # min / median ms, right after torch's step and after its own
        for cell in rows[name]:
            fastest, median = (float(value) for value in cell.split(" / "))
            assert 0 < fastest <= median


def test_kernel_only_table_times_the_kernel_beside_its_floor_and_torch() -> None:
    """--kernel-only builds examples/kernel_timing.c around the kernel users run and times
    it in L2 and from memory, beside the bytes it moves, torch's fused kernel and, where
    the kernel is built for AVX-512, the update over linear codes (any map's lower bound)."""
    command = [sys.executable, "examples/benchmark.py", "--kernel-only", "--quick"]
    output = run_worker(command, timeout=600).stdout
    # its header names the vector path, on which these ratios depend (it printed none)
    labels = {"avx512": "AVX-512", "avx2": "AVX2", "software": "software"}
    assert f"cores, kernels: {labels[cpu_kernel.vector_path()]}" in output.splitlines()[0]
    rows = {
        cells[0]: [float(cell) for cell in cells[1:]]
        for line in output.splitlines()
        if line.startswith("| ") and not line.startswith(("| what", "|---"))
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    expected = [
        f"{what}, {where}"
        for where in ("in L2 (20 x 2,048)", "from memory (20 x 1M)")
        for what in (
            "adamkit 8-bit AdamW step (C harness)",
            "its bytes moved with no arithmetic (C harness)",
            *(
                ["the same update over linear codes, the cheapest 8-bit format (C harness)"]
                if cpu_kernel.vector_path() == "avx512"
                else []
            ),
        )
    ] + [
        f"{name} from memory (20 x 1M), called from Python"
        for name in ("adamkit kernel", "torch kernel")
    ]
    assert sorted(rows) == sorted(expected), output
    assert all(0 < low <= median for low, median in rows.values()), rows


@pytest.mark.bad_input
@pytest.mark.skipif(importlib.util.find_spec("composer") is not None, reason="Composer is here")
def test_composer_only_without_composer_says_where_to_run_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It timed no table, printed only the memory bandwidth and exited 0."""
    code, _, stderr = exit_of_script("examples/benchmark.py", ["--composer-only"], monkeypatch)
    assert code == 2
    assert "argument --composer-only: Composer is not installed in this environment" in stderr
    assert ".venv-composer/bin/python examples/benchmark.py --composer-only" in stderr


def test_released_host_rows_close_each_training_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The released rows stepped every parameter again and again with no optimizer.step()
    between, which core warns about (two steps of one parameter in one training step);
    each repeat is now a whole training step. Four tensors instead of 300, for speed."""
    spec = importlib.util.spec_from_file_location(
        "example_benchmark", ROOT / "examples" / "benchmark.py"
    )
    benchmark = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "example_benchmark", benchmark)  # for its dataclasses
    spec.loader.exec_module(benchmark)  # type: ignore[union-attr]
    monkeypatch.setattr(benchmark, "EIGHT_BIT_HOST_SHAPE", (4, 4096))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = dict(benchmark.eight_bit_host_rows(repeats=1))
    released = [name for name in rows if name.endswith(", released")]
    assert len(released) == 4 and all(rows[name] > 0 for name in released)
