"""The step memo's host checks (core.backends.host_checks): the C++ module against the
Python fallback, case by case, including inputs no optimizer hands them (a check must
answer None or raise a Python error for anything unexpected, never crash)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from core.backends import cpu_kernel, host_checks
from core.backends.host_checks import PYTHON_CHECKS, HostChecks
from core.backends.kernel_arguments import SWITCHES
from tests.processes import worker_env


class _Subclass(Tensor):
    """A tensor subclass: its data_ptr need not be its data, so no memo vouches for it."""


@pytest.fixture(scope="module")
def compiled() -> HostChecks:
    """The C++ checks. Skipped only without a C++ compiler: where one is (CI, as the
    README's setup requires), a build that fails is a failure, not a silent skip."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checks = host_checks.compiled_checks()
    if checks is None:
        reason = "; ".join(str(warning.message) for warning in caught) or "no module"
        if host_checks.cxx_compiler() is None:
            pytest.skip(f"no C++ compiler here ({reason})")
        pytest.fail(f"a C++ compiler is here but the host checks did not build: {reason}")
    return checks


def _numbers(layout: Any, described: bool = True) -> list[int] | None:
    """A check's answer as plain integers (C++: int64 bytes, one description after another;
    Python: one list per property), so the two can be compared: per tensor its address,
    element count, dimensions and sizes, dtype and contiguity. The dtype (C++: c10's
    number, Python: the torch.dtype) is left out as -1: tests of a change of dtype compare
    an implementation's answers with its own."""
    if layout is None:
        return None
    if isinstance(layout, bytes):
        values = array("q", layout).tolist()
        if not described:  # gradient addresses
            return values
        numbers, at = [], 0
        while at < len(values):
            dimensions = values[at + 2]
            numbers += [*values[at : at + 3 + dimensions], -1, values[at + 4 + dimensions]]
            at += 5 + dimensions
        return numbers
    rows = list(zip(*layout, strict=True))
    if not described:
        return [value for row in rows for value in row]
    numbers = []
    for address, count, shape, _, in_order in rows:
        sizes = [0] if shape == 0 else [len(shape), *shape]  # 0: a state without the key
        numbers += [address, count, *sizes, -1, int(in_order)]
    return numbers


def _described(tensors: list[Tensor]) -> list[int]:
    """What each check answers per tensor, written out: address, element count, number of
    dimensions and each size, dtype (left out as _numbers leaves it), contiguity."""
    return [
        value
        for t in tensors
        for value in (t.data_ptr(), t.numel(), t.dim(), *t.shape, -1, int(t.is_contiguous()))
    ]


def _tensors() -> dict[str, Any]:
    base = torch.arange(12.0).reshape(3, 4)
    return {
        "plain": [torch.zeros(5), torch.ones(2, 3)],
        "parameters": [nn.Parameter(torch.zeros(4)), nn.Parameter(torch.ones(3))],
        "empty": [torch.zeros(0), torch.zeros(3)],
        "strided view": [base[:, 1], base],
        "sparse": [torch.zeros(4).to_sparse()],
        "subclass": [torch.zeros(3).as_subclass(_Subclass)],
        "not tensors": [1, None],
        "nothing": [],
    }


@pytest.mark.parametrize("case", list(_tensors()))
def test_parameter_layouts_agree(compiled: HostChecks, case: str) -> None:
    tensors = _tensors()[case]
    expected = _numbers(PYTHON_CHECKS.parameter_layout(tensors))
    assert _numbers(compiled.parameter_layout(tensors)) == expected
    if case in ("plain", "parameters", "empty", "strided view"):
        assert expected == _described(tensors)
    elif case != "nothing":
        assert expected is None


def _gradient_cases() -> dict[str, tuple[list[Any], list[Any]]]:
    params = [torch.zeros(2, 3), torch.zeros(4)]
    shared = torch.zeros(8)
    return {
        "plain": (params, [torch.ones(2, 3), torch.ones(4)]),
        "parameter gradients": (params, [nn.Parameter(torch.ones(2, 3)), torch.ones(4)]),
        "another dtype": (params, [torch.ones(2, 3), torch.ones(4, dtype=torch.bfloat16)]),
        "another size": (params, [torch.ones(2, 3), torch.ones(3)]),
        "not contiguous": (params, [torch.ones(3, 2).t(), torch.ones(4)]),
        "sparse": (params, [torch.ones(2, 3), torch.ones(4).to_sparse()]),
        "subclass": (params, [torch.ones(2, 3), torch.ones(4).as_subclass(_Subclass)]),
        "none": (params, [torch.ones(2, 3), None]),
        "lengths differ": (params, [torch.ones(2, 3)]),
        "parameters not tensors": ([1, 2], [torch.ones(1), torch.ones(1)]),
        "in its parameter": (params, [params[0].detach(), torch.ones(4)]),  # the step writes it
        "view of another parameter": (params, [torch.ones(2, 3), params[0].view(-1)[:4]]),
        "empty, both": ([torch.zeros(0)], [torch.zeros(0)]),
        "negated": (params, [torch.ones(2, 3), torch.ones(4)._neg_view()]),
        "conjugated": (
            [torch.zeros(4, dtype=torch.complex64)],
            [torch.ones(4, dtype=torch.complex64).conj()],
        ),
        "zero tensor": (params, [torch.ones(2, 3), torch._efficientzerotensor(4)]),
        "on another device": (params, [torch.ones(2, 3), torch.empty(4, device="meta")]),
        "another shape, as many elements": (params, [torch.ones(3, 2), torch.ones(4)]),
        "freed": (params, [torch.ones(2, 3), _freed(torch.ones(4))]),
        "sparse csr": (params, [torch.ones(2, 3).to_sparse_csr(), torch.ones(4)]),
        "nested": (params, [torch.ones(2, 3), torch.nested.nested_tensor([torch.ones(4)])]),
        "later in its parameter's storage": ([shared[:4]], [shared[4:]]),
    }


def _freed(tensor: Tensor) -> Tensor:
    """A tensor whose storage was given back (as FSDP frees unsharded parameters)."""
    tensor.untyped_storage().resize_(0)
    return tensor


def _short(tensor: Tensor, missing: int = 1) -> Tensor:
    """A tensor whose storage lacks its last `missing` elements."""
    tensor.untyped_storage().resize_((tensor.numel() - missing) * tensor.element_size())
    return tensor


@pytest.mark.parametrize("case", list(_gradient_cases()))
def test_gradient_addresses_agree(compiled: HostChecks, case: str) -> None:
    params, grads = _gradient_cases()[case]
    expected = _numbers(PYTHON_CHECKS.gradient_addresses(grads, params), described=False)
    assert _numbers(compiled.gradient_addresses(grads, params), described=False) == expected
    if case in (
        "plain",
        "parameter gradients",
        "view of another parameter",
        "empty, both",
        "later in its parameter's storage",
    ):
        assert expected == [g.data_ptr() for g in grads]
    else:
        assert expected is None


def _column_cases() -> dict[str, tuple[tuple[Any, ...], tuple[Any, ...]]]:
    moments = (torch.zeros(3), torch.zeros(2))
    states = ({"m": moments[0]}, {"m": moments[1]})
    sparse = torch.zeros(2).to_sparse()
    return {
        "the same tensors": (states, moments),
        "one replaced": (({"m": moments[0]}, {"m": moments[1].clone()}), moments),
        "one missing": (({"m": moments[0]}, {}), moments),
        "not a tensor": (({"m": 5},), (5,)),
        "a state not a dict": ((["m"],), (moments[0],)),
        "lengths differ": (states, moments[:1]),
        "sparse": (({"m": sparse},), (sparse,)),
        "absent where the column has None": (({"m": moments[0]}, {}), (moments[0], None)),
        "held where the column has None": (states, (moments[0], None)),
        "None where the column has None": (({"m": moments[0]}, {"m": None}), (moments[0], None)),
    }


@pytest.mark.parametrize("case", list(_column_cases()))
def test_column_addresses_agree(compiled: HostChecks, case: str) -> None:
    states, column = _column_cases()[case]
    expected = _numbers(PYTHON_CHECKS.column_addresses(states, "m", column))
    assert _numbers(compiled.column_addresses(states, "m", column)) == expected
    if case == "the same tensors":
        assert expected == _described(list(column))
    elif case in ("absent where the column has None", "None where the column has None"):
        # a moment stored in its other form
        assert expected == [*_described([column[0]]), 0, 0, 0, -1, 0]
    else:
        assert expected is None


def _unbacked_cases() -> dict[str, tuple[list[Any], int]]:
    """Tensor lists and the index of the first whose storage lacks some of its elements."""
    return {
        "all backed": ([torch.ones(3), torch.ones(2, 2)[:, 0], torch.zeros(0)], -1),
        "one element short": ([torch.ones(3), _short(torch.ones(8))], 1),
        "all but its first element missing": ([_short(torch.ones(8), missing=7)], 0),
        "freed": ([_freed(torch.ones(4))], 0),
        "meta, refused by device elsewhere": ([torch.empty(3, device="meta")], -1),
        "first of several": (
            [torch.ones(2), _short(torch.ones(8)), _freed(torch.ones(4)), torch.ones(1)],
            1,
        ),
        "nested, not asked": ([torch.nested.nested_tensor([torch.ones(2)]), torch.ones(2)], -1),
        "not tensors, not asked": ([1, None, "x"], -1),
    }


@pytest.mark.parametrize("case", list(_unbacked_cases()))
def test_first_unbacked_agrees(compiled: HostChecks, case: str) -> None:
    """The refusal of an unbacked tensor names the first one: both checks must find it."""
    tensors, expected = _unbacked_cases()[case]
    assert PYTHON_CHECKS.first_unbacked(tensors) == expected
    assert compiled.first_unbacked(tensors) == expected


def _changed_in_place() -> dict[str, Callable[[Tensor], None]]:
    """Changes that keep a tensor object and its address, each of which a backend reusing
    a memo's work must see (a kernel would read past the tensor or in the wrong order)."""

    def assign(tensor: Tensor, value: Tensor) -> None:
        tensor.data = value

    return {
        "narrowed": lambda t: assign(t, t.data[:2]),
        "reshaped": lambda t: assign(t, t.data.view(4, 16)),
        "transposed": lambda t: assign(t, t.data.t()),  # square: only the order changes
        "viewed as a narrower type": lambda t: assign(t, t.data.view(torch.bfloat16)),
        "viewed as a type of the same size": lambda t: assign(t, t.data.view(torch.int32)),
    }


@pytest.mark.parametrize("checks", ["compiled", "python"])
@pytest.mark.parametrize("change", list(_changed_in_place()))
def test_a_tensor_changed_in_place_answers_otherwise(
    compiled: HostChecks, checks: str, change: str
) -> None:
    implementation = compiled if checks == "compiled" else PYTHON_CHECKS
    param = torch.zeros(8, 8)
    state = {"m": torch.zeros(8, 8)}
    before = (
        implementation.parameter_layout([param]),
        implementation.column_addresses((state,), "m", (state["m"],)),
    )
    for tensor in (param, state["m"]):
        address = tensor.data_ptr()
        _changed_in_place()[change](tensor)
        assert tensor.data_ptr() == address
    after = (
        implementation.parameter_layout([param]),
        implementation.column_addresses((state,), "m", (state["m"],)),
    )
    assert None not in after
    assert after[0] != before[0] and after[1] != before[1]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "call",
    [
        lambda checks: checks.column_addresses([{}], "m", ()),
        lambda checks: checks.column_addresses((), 5, ()),
        lambda checks: checks.gradient_addresses(5, []),
        lambda checks: checks.parameter_layout(5),
    ],
    ids=["states-as-list", "key-not-a-string", "gradients-not-a-sequence", "not-a-sequence"],
)
def test_arguments_of_the_wrong_kind_raise_a_type_error(
    compiled: HostChecks, call: Callable[[Any], Any]
) -> None:
    with pytest.raises(TypeError):
        call(compiled)


def test_a_build_that_fails_in_any_way_leaves_the_python_checks_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for failure in (host_checks.KernelUnavailable("no C++ compiler"), RuntimeError("odd torch")):

        def failing(failure: Exception = failure) -> Any:
            raise failure

        monkeypatch.setattr(host_checks, "_build", failing)
        build = host_checks._Build()
        with pytest.warns(RuntimeWarning, match="could not be built"):
            assert build.module(wait=True) is None
        assert build.module(wait=False) is None  # tried once, not on every step


def test_a_process_forked_during_the_build_builds_its_own(
    monkeypatch: pytest.MonkeyPatch, compiled: HostChecks
) -> None:
    """A forked child has no copy of the running build thread: it starts its own."""
    import os
    import time

    module = host_checks._build()  # built already (the fixture): only the wait is simulated

    def slow_build() -> Any:
        time.sleep(1.0)
        return module

    monkeypatch.setattr(host_checks, "_build", slow_build)
    build = host_checks._Build()
    assert build.module(wait=False) is None  # the parent's build is running
    child = os.fork()
    if child == 0:  # the child: load through its own build, or exit non-zero
        try:
            os._exit(0 if build.module(wait=True) is not None else 2)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert build.module(wait=True) is not None


# -- builds (cpu_kernel.build_atomically, shared by the fused kernels and these checks) ----

WRITE_TARGET = [sys.executable, "-c", "import sys; open(sys.argv[-1], 'w').write('built')"]
"""A "compiler" that writes its -o file: the temporary build output."""


def test_a_build_removes_what_killed_builds_left_and_keeps_live_ones(tmp_path: Path) -> None:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    abandoned = tmp_path / f"{cpu_kernel.BUILDING_PREFIX}{finished.pid}-abc.so"
    own = tmp_path / f"{cpu_kernel.BUILDING_PREFIX}{os.getpid()}-def.so"  # a build in flight
    other = tmp_path / f"{cpu_kernel.BUILDING_PREFIX}unknown.so"
    for path in (abandoned, own, other):
        path.write_text("partial")
    target = tmp_path / "target.so"
    cpu_kernel.build_atomically([WRITE_TARGET], target, "a test target", ["python"])
    assert target.read_text() == "built"
    assert not abandoned.exists() and own.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["target.so", own.name, other.name])


@pytest.mark.parametrize("failure", [errno.EFAULT, errno.ENOENT], ids=["transient", "missing"])
def test_a_compiler_that_fails_once_to_start_is_started_again(
    failure: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EFAULT starting /usr/bin/c++ from the host checks' background thread (seen once in
    CI) cost the process its C++ checks; a missing compiler still fails, saying so."""
    popen, calls = subprocess.Popen, []

    def failing_once(*args: Any, **kwargs: Any) -> subprocess.Popen:
        calls.append(args)
        if len(calls) == 1:
            raise OSError(failure, os.strerror(failure), args[0][0])
        return popen(*args, **kwargs)

    monkeypatch.setattr(cpu_kernel.subprocess, "Popen", failing_once)
    target = tmp_path / "target.so"
    if failure == errno.ENOENT:
        with pytest.raises(cpu_kernel.KernelUnavailable, match="does not run"):
            cpu_kernel.build_atomically([WRITE_TARGET], target, "a test target", ["python"])
        assert len(calls) == 1 and not target.exists()
    else:
        cpu_kernel.build_atomically([WRITE_TARGET], target, "a test target", ["python"])
        assert len(calls) == 2 and target.read_text() == "built"


def _age(path: Path, days: float) -> None:
    """Set path's modification time to `days` ago."""
    when = time.time() - days * 86400
    os.utime(path, (when, when))


def test_a_build_deletes_adamkits_libraries_unused_for_30_days_and_nothing_else(
    tmp_path: Path,
) -> None:
    assert cpu_kernel.UNUSED_LIBRARY_DAYS == 30
    stale = ["adamkit_adam_0123.so", "adamkit_host_checks_4567.cpython-311-x86_64-linux-gnu.so"]
    kept = ["adamkit_adopt_89ab.so", "someone_elses.so", "adamkit_notes.txt"]
    for name in stale + kept:
        (tmp_path / name).write_text("library")
        _age(tmp_path / name, 31)
    _age(tmp_path / "adamkit_adopt_89ab.so", 29)
    target = tmp_path / "adamkit_adam_target.so"
    cpu_kernel.build_atomically([WRITE_TARGET], target, "a test target", ["python"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, target.name])


def _adam_kernel_cached_in(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> cpu_kernel.KernelConfig:
    """An fp32 Adam kernel configuration, with directory as the kernel cache of a process
    that has loaded no kernel yet."""
    monkeypatch.setenv("ADAMKIT_KERNEL_CACHE", str(directory))
    monkeypatch.setattr(cpu_kernel, "_loaded", {})
    switches = tuple((name, name in ("UPDATE", "ADAPTIVE")) for name in SWITCHES)
    return cpu_kernel.KernelConfig("adam", torch.float32, switches)


def test_loading_a_cached_kernel_marks_it_used_without_building_it_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What keeps a library in use from being deleted by another process's build."""
    config = _adam_kernel_cached_in(tmp_path, monkeypatch)
    cpu_kernel.library(config)
    (built,) = tmp_path.glob("adamkit_adam_*.so")
    _age(built, 40)
    inode = built.stat().st_ino
    monkeypatch.setattr(cpu_kernel, "_loaded", {})  # as a new process: load from the cache
    cpu_kernel.library(config)
    assert built.stat().st_ino == inode  # the same file, not a rebuild renamed into place
    assert time.time() - built.stat().st_mtime < 600
    assert cpu_kernel.mark_used(tmp_path / "adamkit_adam_missing.so") is False


def test_a_damaged_cached_kernel_is_built_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = _adam_kernel_cached_in(tmp_path, monkeypatch)
    built = cpu_kernel.library_path(config, cpu_kernel.arch_choices())
    built.write_bytes(b"\x7fELF" + bytes(96))  # what a copy cut short could leave
    values = torch.tensor([1.0, -2.5, 3.0e38])
    out = torch.empty(3, dtype=torch.float32)
    cpu_kernel.library(config).adamkit_round(3, values.data_ptr(), out.data_ptr())
    assert torch.equal(out, values)
    assert built.stat().st_size > 1000


def test_a_damaged_cached_host_checks_module_is_built_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, compiled: HostChecks
) -> None:
    """Not left on the Python checks (with a warning) in every process until deleted. The
    build is the real module's file copied into place (compiling it takes ~15 s; the
    rebuild itself is load_or_build's, which the damaged-kernel test compiles for real)."""
    built, _ = host_checks._cached_module()  # the fixture's module, built and loaded
    cached = tmp_path / built.name  # a path this process has not loaded
    cached.write_bytes(b"\x7fELF" + bytes(96))  # what a copy cut short could leave
    builds = []

    def build() -> None:
        builds.append(cached)
        shutil.copyfile(built, cached)

    monkeypatch.setattr(host_checks, "_cached_module", lambda: (cached, build))
    # loading this copy sets its runner for the kernels: the process's own comes back after
    monkeypatch.setattr(cpu_kernel, "_share_runner", cpu_kernel._share_runner)
    build_thread = host_checks._Build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = build_thread.module(wait=True)
    tensors = [torch.zeros(5), torch.ones(2, 3)]
    assert _numbers(module.parameter_layout(tensors)) == _described(tensors)
    assert builds == [cached]


@pytest.mark.parametrize("value", ["", "compiled", " Python ", "python"])
def test_host_checks_settings_select_their_checks(
    monkeypatch: pytest.MonkeyPatch, compiled: HostChecks, value: str
) -> None:
    monkeypatch.setenv("ADAMKIT_HOST_CHECKS", value)
    expected = PYTHON_CHECKS if "python" in value.lower() else compiled
    assert host_checks.host_checks() is expected


@pytest.mark.bad_input
@pytest.mark.parametrize("value", ["pyton", "c", "0", "cpp-please"])
def test_a_misspelt_host_checks_setting_is_refused_by_name_before_a_step(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    from core import AdamW

    monkeypatch.setenv("ADAMKIT_HOST_CHECKS", value)
    message = f"ADAMKIT_HOST_CHECKS={value!r} is not a setting; allowed: unset or 'compiled'"
    with pytest.raises(ValueError, match=re.escape(message)):
        AdamW([nn.Parameter(torch.ones(3))], lr=0.1)
    param = nn.Parameter(torch.ones(3))
    monkeypatch.delenv("ADAMKIT_HOST_CHECKS")
    optimizer = AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    monkeypatch.setenv("ADAMKIT_HOST_CHECKS", value)  # changed after construction
    with pytest.raises(ValueError, match=re.escape(message)):
        optimizer.step()
    assert torch.equal(param, torch.ones(3)) and not optimizer.state


def test_builders_needing_one_library_at_once_build_it_once(tmp_path: Path) -> None:
    """DDP ranks on one machine ask for the same kernel together: one builds it, the others
    wait and load it, and no lock file is left. Threads stand in for the processes: each
    opens the lock file itself, and flock serializes separate opens as it does processes."""
    target = tmp_path / "adamkit_adam_0123.so"
    builds, loaded = [], []

    def build() -> None:
        builds.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the others to ask for the same library
        target.write_text("library")

    def builder() -> None:
        loaded.append(cpu_kernel.load_or_build(target, build, lambda p: Path(p).read_text()))

    threads = [threading.Thread(target=builder) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert loaded == ["library"] * 3
    assert len(builds) == 1
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_failed_and_timed_out_build_commands_leave_no_file(tmp_path: Path) -> None:
    failing = [sys.executable, "-c", "import sys; open(sys.argv[-1], 'w'); sys.exit(3)"]
    sleeping = [sys.executable, "-c", "import sys, time; open(sys.argv[-1], 'w'); time.sleep(30)"]
    launcher = ["ccache", "gcc"]  # named as configured in the message, not as its first word
    message = "ccache gcc could not build a test:\nstill running after 1 s"
    with pytest.raises(cpu_kernel.KernelUnavailable, match=message):
        cpu_kernel.build_atomically([failing, sleeping], tmp_path / "t.so", "a test", launcher, 1)
    assert list(tmp_path.iterdir()) == []


def test_a_process_that_exits_during_a_background_build_stops_its_compiler(
    tmp_path: Path,
) -> None:
    """The C++ host checks build in a daemon thread (~15 s): a shorter process left the
    compiler and what it started (cc1plus, 0.9 GB) running on, writing a file no one
    installed. A stand-in compiler that starts a child of its own and sleeps is stopped
    with its child when the process exits, and its temporary file is removed."""
    sleeper = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
    sleeper += "'import time; time.sleep(120)']); time.sleep(120)"
    script = f"""
import sys, threading, time
from pathlib import Path
from core.backends import cpu_kernel
command = [sys.executable, "-c", {sleeper!r}]
target = Path({str(tmp_path)!r}) / "adamkit_stand_in.so"
threading.Thread(
    target=cpu_kernel.build_atomically, args=([command], target, "a stand-in", ["python"]),
    daemon=True,
).start()
deadline = time.monotonic() + 60
while not cpu_kernel._running_builds and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(0.5)  # its child started
(process,) = cpu_kernel._running_builds
print(process.pid)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    group = int(result.stdout)
    deadline = time.monotonic() + 30
    while _group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(group)
    assert list(tmp_path.iterdir()) == []


def _group_alive(group: int) -> bool:
    """Whether a process of the group still runs (zombies, which a container's init may
    never reap, do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False
