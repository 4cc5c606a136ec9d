"""The per-tensor checks of a memoized step (core.optimizer.StepMemo), in C++ or Python.

A memoized step over 300 tensors spent ~150 µs of its host work reading one property
per tensor per pass from Python (about 45 ns each through torch's bindings). The same
three checks compiled against the running torch (host_checks.cpp, built once per torch
and compiler like the fused CPU kernels, with a C++ compiler and Python's headers) read
them at a few ns a tensor. Where it cannot be built, or with ADAMKIT_HOST_CHECKS=python,
`PythonChecks` does the same in Python; tests hold both to the same cases.

Each check answers a value (addresses, and sizes) that the memo compares with what it
recorded, or None where something is not what a memo can vouch for. The two answer in
their own form (bytes, lists), so when the build finishes mid-run a memo made with the
Python checks simply fails its next comparison and is made again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import operator
import os
import sys
import sysconfig
import threading
import warnings
from collections.abc import Callable, Sequence
from itertools import repeat
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from core.backends.cpu_kernel import (
    KernelUnavailable,
    build_atomically,
    cache_dir,
    compiler_version,
    find_compiler,
    load_or_build,
    missing_compiler,
    set_share_runner,
)
from core.backends.views import PLAIN_TENSOR_TYPES, storage_shortfall

SOURCE = Path(__file__).with_name("host_checks.cpp")
_MODULE_NAME = "adamkit_host_checks"


Layout = bytes | tuple[list[int], ...]
"""What a check answers: compared with ==, never read (bytes from C++, lists from Python)."""


class HostChecks(Protocol):
    """Each answer describes every tensor by DESCRIPTION (address, element count, shape,
    dtype, contiguity): what a backend relies on when it reuses what it worked out for a
    memo's tensors (core.backends.checked)."""

    def parameter_layout(self, params: Sequence[Tensor]) -> Layout | None:
        """The description of each plain strided tensor with storage, or None. One with
        any_lazy_values never matches a memo (a step refuses it)."""

    def column_addresses(
        self, states: tuple[dict[str, Any], ...], key: str, column: tuple[Any, ...]
    ) -> Layout | None:
        """Each column tensor's description, if every states[i][key] is column[i] (a
        strided tensor with storage), or None. A None in the column stands for a state
        without the key (or holding None), described as zeros: the rows of a group whose
        moments are stored in two forms (see core.optimizer.StepMemo). The Python checks
        do not ask state tensors for any_lazy_values (the C++ ones do, at no cost): only
        `.data =` on optimizer state could give it them without replacing it."""

    def gradient_addresses(
        self, grads: Sequence[Tensor], params: Sequence[Tensor]
    ) -> Layout | None:
        """Each gradient's address, if every one is a plain, strided, contiguous tensor
        with storage holding its values (not any_lazy_values), of its parameter's dtype,
        shape and device, and not starting where its parameter does, or None."""

    def first_unbacked(self, tensors: Sequence[Any]) -> int:
        """The index of the first plain tensor whose storage does not hold all of its
        elements (storage_shortfall), or -1; other objects (DTensors) are not asked."""


_NESTED = operator.attrgetter("is_nested")
_DTYPE = operator.attrgetter("dtype")
_LAYOUT = operator.attrgetter("layout")
_SHAPE = operator.attrgetter("shape")
_DEVICE = operator.attrgetter("device")

DESCRIPTION = (Tensor.data_ptr, Tensor.numel, _SHAPE, _DTYPE, Tensor.is_contiguous)
"""How host_checks.cpp's describe() reads a tensor, in its order (the dtype as a
torch.dtype rather than c10's number, contiguity as a bool; any_lazy_values, which
describe() folds into it, is asked of parameters and gradients apart)."""


def any_lazy_values(tensors: Sequence[Tensor]) -> bool:
    """Whether a tensor's memory does not hold its values as a kernel reads them: torch's
    negative or conjugate bit, or a ZeroTensor (core.backends.views.lazy_values); three passes
    at ~40 ns a tensor."""
    return (
        any(map(Tensor.is_neg, tensors))
        or any(map(Tensor.is_conj, tensors))
        or any(map(Tensor._is_zerotensor, tensors))
    )


def _describe(tensors: Sequence[Tensor]) -> tuple[list[Any], ...]:
    """One list per DESCRIPTION field, over the tensors (a pass each)."""
    return tuple(list(map(read, tensors)) for read in DESCRIPTION)


class PythonChecks:
    """HostChecks in Python: one pass per property (where the C++ module is not built)."""

    @staticmethod
    def parameter_layout(params: Sequence[Tensor]) -> Layout | None:
        if not PLAIN_TENSOR_TYPES.issuperset(map(type, params)):
            return None
        try:
            if any(t.layout != torch.strided for t in params) or any_lazy_values(params):
                return None
            return _describe(params)
        except RuntimeError:  # no storage
            return None

    @staticmethod
    def column_addresses(
        states: tuple[dict[str, Any], ...], key: str, column: tuple[Any, ...]
    ) -> Layout | None:
        try:
            if len(states) != len(column) or not all(
                map(operator.is_, map(_GET, states, repeat(key)), column)
            ):
                return None
            tensors = [t for t in column if t is not None]
            if any(t.layout != torch.strided for t in tensors):
                return None
            described = iter(zip(*_describe(tensors), strict=True))
            entries = [_ABSENT if t is None else next(described) for t in column]
            return tuple(map(list, zip(*entries, strict=True))) if entries else _describe(())
        except (AttributeError, RuntimeError, TypeError):  # not a dict or a tensor, no
            return None  # storage

    @staticmethod
    def gradient_addresses(grads: Sequence[Tensor], params: Sequence[Tensor]) -> Layout | None:
        if (
            len(grads) != len(params)
            or not PLAIN_TENSOR_TYPES.issuperset(map(type, grads))
            or not PLAIN_TENSOR_TYPES.issuperset(map(type, params))
            or any(map(_NESTED, grads))  # no shape to compare: torch raises
            or any(map(_NESTED, params))
            or any(layout is not torch.strided for layout in map(_LAYOUT, grads))
            or not all(map(operator.is_, map(_DTYPE, grads), map(_DTYPE, params)))
            or list(map(_SHAPE, grads)) != list(map(_SHAPE, params))
            or list(map(_DEVICE, grads)) != list(map(_DEVICE, params))
            or not all(map(Tensor.is_contiguous, grads))  # False for sparse
            or any_lazy_values(grads)
        ):
            return None
        try:
            addresses = list(map(Tensor.data_ptr, grads))
            starts = list(map(Tensor.data_ptr, params))
            if any(map(operator.eq, addresses, starts)) and any(
                a == b and a and g.numel() for a, b, g in zip(addresses, starts, grads, strict=True)
            ):
                return None  # one in its parameter's memory, which the step writes
        except RuntimeError:
            return None
        # address 0 with elements: storage freed (untyped_storage().resize_(0)); a shrunk
        # one moves to a new address, so no memo matches it
        if 0 in addresses and any(
            a == 0 and g.numel() for a, g in zip(addresses, grads, strict=True)
        ):
            return None
        return (addresses,)

    @staticmethod
    def first_unbacked(tensors: Sequence[Any]) -> int:
        return next(
            (
                i
                for i, t in enumerate(tensors)
                if not getattr(t, "is_nested", False) and storage_shortfall(t) is not None
            ),
            -1,
        )


_ABSENT = (0, 0, 0, None, False)
"""The description of a state without the key."""
_GET = dict.get
"""A state's entry or None (a state that is not a dict raises TypeError)."""


PYTHON_CHECKS = PythonChecks()


HOST_CHECKS_SETTINGS = {"": "compiled", "compiled": "compiled", "python": "python"}
"""ADAMKIT_HOST_CHECKS values (any case) and what each selects: the C++ checks once built
(unset, the default), or the Python checks only."""


def host_checks_setting() -> str:
    """ADAMKIT_HOST_CHECKS as a name of HOST_CHECKS_SETTINGS; any other value is refused
    (the optimizers read it when built, before any step), so that a misspelt 'python' does
    not silently keep the compiled checks a user meant to rule out."""
    raw = os.environ.get("ADAMKIT_HOST_CHECKS", "")
    setting = HOST_CHECKS_SETTINGS.get(raw.strip().lower())
    if setting is None:
        raise ValueError(
            f"ADAMKIT_HOST_CHECKS={raw!r} is not a setting; allowed: unset or 'compiled' (the "
            "C++ checks once built) or 'python' (the Python checks only)"
        )
    return setting


def host_checks() -> HostChecks:
    """The C++ checks once built, else PYTHON_CHECKS. The first call starts the build
    (~15 s, once per torch, Python and compiler; cached like the fused CPU kernels) in
    a background thread, so no step waits for it: steps check in Python meanwhile."""
    if host_checks_setting() == "python":
        return PYTHON_CHECKS
    compiled = _BUILD.module(wait=False)
    return PYTHON_CHECKS if compiled is None else compiled


def compiled_checks(wait: bool = True) -> HostChecks | None:
    """The C++ checks, waiting for their build if asked (tests, benchmarks); None where
    they cannot be built (a RuntimeWarning says why)."""
    return _BUILD.module(wait=wait)


class _Build:
    """The C++ module's build in a background thread, and the module once loaded. A
    forked child (whose copy of the thread does not run) starts its own build."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._owner = 0
        """The process that started the thread."""
        self._built: Any = None
        """The module the thread built and imported, before _load sets it up."""
        self._error: Exception | None = None
        self._module: Any = None
        self._failed = False

    def module(self, wait: bool) -> Any:
        if self._module is not None or self._failed:
            return self._module
        with self._lock:
            if self._thread is None or self._owner != os.getpid():
                self._built, self._error, self._owner = None, None, os.getpid()
                self._thread = threading.Thread(
                    target=self._build, name="adamkit-host-checks", daemon=True
                )
                self._thread.start()
            thread = self._thread
        if wait:
            thread.join()
        elif thread.is_alive():
            return None
        with self._lock:
            if self._module is None and not self._failed:
                self._load()
        return self._module

    def _build(self) -> None:
        try:
            self._built = _build()
        except Exception as error:  # reported by the thread that loads
            self._error = error

    def _load(self) -> None:
        try:
            if self._error is not None:
                raise self._error
            if self._built is None:
                raise KernelUnavailable("the build ended without a module")
            module = self._built
            module.set_plain_types(torch.Tensor, nn.Parameter)
            set_share_runner(torch_share_runner(module))
            self._module = module
        except Exception as error:  # any failure: the Python checks stay, and say why
            self._failed = True
            warnings.warn(
                f"adamkit: the C++ host checks could not be built ({str(error)[:300]}); "
                "memoized steps check their tensors in Python instead (the same checks, "
                "more host time per step), and multi-threaded fused CPU steps run on "
                "threads of their own rather than torch's (the same results).",
                RuntimeWarning,
                stacklevel=4,
            )


_BUILD = _Build()


CXX_COMPILERS = ("c++", "g++", "clang++")


def cxx_compiler() -> tuple[str, ...] | None:
    """The C++ compiler command the module is built with ($CXX, else the first of
    CXX_COMPILERS on PATH), or None where there is none."""
    return find_compiler("CXX", CXX_COMPILERS)


def torch_openmp_runtime() -> str | None:
    """The file of the OpenMP runtime torch's parallel operations run on (the libgomp
    loaded in this process: torch's wheels ship their own), or None where none is
    (another runtime, another platform)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if "libgomp" in line}
    except OSError:
        return None
    runtimes = sorted(p for p in paths if Path(p).name.startswith("libgomp") and Path(p).exists())
    return runtimes[0] if len(runtimes) == 1 else None


def _build() -> Any:
    """The module for this torch, Python and compiler, imported: built on first use, and
    again where the cached file is damaged."""
    return load_or_build(*_cached_module(), _load)


def _cached_module() -> tuple[Path, Callable[[], None]]:
    """Where the kernel cache keeps the module for this torch, Python and compiler, and
    how to build it there: with OpenMP, linked to torch's own runtime, where torch has one
    and the compiler can; else without (the checks alone)."""
    cxx = cxx_compiler()
    if cxx is None:
        raise KernelUnavailable(f"no C++ compiler: {missing_compiler('CXX', CXX_COMPILERS)}")
    root = Path(torch.__file__).parent  # what torch.utils.cpp_extension would use on CPU
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [root / "include", root / "include/torch/csrc/api/include"]
    includes.append(Path(sysconfig.get_paths()["include"]))
    libraries = [root / "lib"]
    openmp = torch_openmp_runtime()
    version = compiler_version(cxx)
    identity = [SOURCE.read_text(), torch.__version__, torch.__file__, sys.version, *cxx, version]
    identity.append(str(openmp))
    digest = hashlib.sha256("\n".join([*identity, str(abi)]).encode()).hexdigest()[:24]
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = cache_dir() / f"{_MODULE_NAME}_{digest}{suffix}"

    def build() -> None:
        command = [*cxx, "-O2", "-std=c++17", "-fPIC", "-shared", "-w"]
        command += [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{path}" for path in includes)]
        command += [str(SOURCE), *(f"-L{path}" for path in libraries)]
        command += ["-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
        command += [f"-Wl,-rpath,{path}" for path in libraries]
        # torch's runtime by its path (its own soname), so the -lgomp that -fopenmp adds
        # last is not needed and --as-needed leaves it out: one runtime, one pool.
        commands = [[*command, "-fopenmp", openmp, "-Wl,--as-needed"]] if openmp else []
        build_atomically([*commands, command], target, "the host checks", cxx)

    return target, build


def torch_share_runner(module: Any) -> int:
    """The module's runner (torch's parallel_for) if its parallel regions run on torch's
    own OpenMP runtime, else 0: the kernels then start threads of their own."""
    runner, runtime, torch_runtime = module.share_runner(), module.openmp_runtime(), None
    if runner and runtime:
        torch_runtime = torch_openmp_runtime()
    if torch_runtime and os.path.realpath(runtime) == os.path.realpath(torch_runtime):
        return runner
    return 0


def _load(path: str) -> Any:
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
