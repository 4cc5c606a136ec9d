"""Build, cache and call the generated CPU kernels of cpu_kernel.c.

A kernel is compiled once per configuration (algorithm, dtype and the switches of one
step) by the system C compiler in well under a second, cached on disk for every later
process and in memory for this one, and called through ctypes with whole lists of
tensors, so a step over hundreds of tensors is one call. Why not torch.compile: on this
project's machines Inductor needs about 50 s per configuration and adds a Python-side
call per tensor; a plain C compile is ~0.3 s and measures as fast as torch's own fused
AdamW.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import ctypes
import errno
import functools
import hashlib
import operator
import os
import platform
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from core.backends.checked import checked_scalars
from core.backends.kernel_arguments import SWITCHES
from core.backends.views import (
    PLAIN_TENSOR_TYPES,
    QUANTIZED_ROWS,
    check_addressable,
    check_quantized_addressable,
    device_of,
    dtype_of,
    memory_problem,
)
from core.quantization import CodeMap, QuantizedMoment, absmax_shape, code_map, map_values

SOURCE = Path(__file__).with_name("cpu_kernel.c")
DTYPE_CODES = {torch.float32: 1, torch.float64: 2, torch.bfloat16: 3, torch.float16: 4}
ALGORITHM_CODES = {"adam": 1, "adopt": 2}
BASE_FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-pthread")
EXACT_FLAGS = ("-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math")
"""No fused multiply-add contraction: results do not depend on the machine's FMA units.
(L2's g + λθ is an explicit fmaf, correctly rounded everywhere: the instruction where the
target has one, the C library's function in portable builds.)"""
LIBRARIES = ("-lm",)
"""Portable builds call the C library's fmaf (L2's sum); native ones inline the instruction."""
COEFFICIENT_COUNT = 10
MOMENT_SWITCHES = ("M_8BIT", "V_8BIT", "V_MAX_8BIT")
"""cpu_kernel.c's switches saying which moments (QUANTIZED_ROWS order) are 8-bit."""


@dataclass(frozen=True)
class KernelConfig:
    """Everything that selects one compiled kernel: the -D switches of cpu_kernel.c."""

    algorithm: str
    dtype: torch.dtype
    switches: tuple[tuple[str, bool], ...]
    quantized: bool = False
    """8-bit moments (cpu_kernel.c's Q8): a C switch only, as the Triton kernels have no
    such argument (see kernel_arguments.SWITCHES)."""
    full_moments: frozenset[str] = frozenset()
    """With quantized, the moments (of QUANTIZED_ROWS) kept in the parameter's dtype, as
    ADOPT keeps exp_avg_sq; every other moment is 8-bit (cpu_kernel.c's M_8BIT, V_8BIT,
    V_MAX_8BIT, Triton's switches of the same names)."""
    stochastic: bool = False
    """θ is rounded stochastically (cpu_kernel.c's STOCHASTIC, with a key per tensor):
    bfloat16 and float16 without Kahan only."""

    def eight_bit(self) -> tuple[bool, bool, bool]:
        """Whether m, v and v_max (QUANTIZED_ROWS order) are 8-bit in this kernel."""
        return tuple(self.quantized and row not in self.full_moments for row in QUANTIZED_ROWS)  # type: ignore[return-value]

    def defines(self) -> list[str]:
        flags = [
            f"-DALGORITHM={ALGORITHM_CODES[self.algorithm]}",
            f"-DDTYPE={DTYPE_CODES[self.dtype]}",
            f"-DQ8={int(self.quantized)}",
            f"-DSTOCHASTIC={int(self.stochastic)}",
        ]
        flags += [
            f"-D{name}={int(value)}"
            for name, value in zip(MOMENT_SWITCHES, self.eight_bit(), strict=True)
        ]
        return flags + [f"-D{name}={int(value)}" for name, value in self.switches]


class KernelUnavailable(RuntimeError):
    """No C compiler, or it could not build this configuration."""


class RefusedBeforeAnyUpdate(RuntimeError):
    """fused=True refused a step after its states were made but before any bucket updated
    anything (a kernel that could not be built): the optimizer takes back the states this
    step made, so the refused step leaves the optimizer as it found it."""


C_COMPILERS = ("cc", "gcc", "clang")


@functools.cache
def compiler() -> tuple[str, ...] | None:
    """The C compiler's command: $CC, else the first of C_COMPILERS on PATH."""
    return find_compiler("CC", C_COMPILERS)


def find_compiler(variable: str, names: Sequence[str]) -> tuple[str, ...] | None:
    """$variable as a shell splits it (a launcher such as `ccache gcc`, or flags, are kept),
    its first word found on PATH; else the first of names on PATH. None if none is."""
    setting = os.environ.get(variable, "").strip()
    if not setting:
        return next(((path,) for name in names if (path := shutil.which(name))), None)
    try:
        words = shlex.split(setting)
    except ValueError:  # unbalanced quotes
        return None
    path = shutil.which(words[0])
    return (path, *words[1:]) if path else None


def missing_compiler(variable: str, names: Sequence[str]) -> str:
    """Why find_compiler(variable, names) found none, for messages."""
    if os.environ.get(variable, "").strip():
        return f"{variable}={os.environ[variable]!r} is not a command on PATH"
    return f"no {', '.join(names)} on PATH (set {variable} to a compiler)"


def compiler_misconfigured() -> bool:
    """$CC is set but names no compiler: news, unlike a machine without any compiler."""
    return compiler() is None and bool(os.environ.get("CC", "").strip())


def compiler_version(command: Sequence[str]) -> str:
    """What `command --version` prints (part of a cached library's name); for a command on
    PATH that does not run, why, and its build then fails saying so."""
    try:
        return subprocess.run([*command, "--version"], capture_output=True, text=True).stdout
    except OSError as error:
        return f"does not run: {error}"


@functools.cache
def _toolchain_identity() -> str:
    """What the compiled code depends on besides the source: compiler version and CPU."""
    cc = compiler() or ()
    version = compiler_version(cc)
    cpu = platform.processor() + platform.machine() + " ".join(sorted(_cpu_flags()))
    return f"{cc}\n{version}\n{cpu}"


def cache_dir() -> Path:
    """$ADAMKIT_KERNEL_CACHE, else $XDG_CACHE_HOME/adamkit/kernels (~/.cache by default).
    KernelUnavailable where none is set and there is no home (HOME unset, and a user id
    without a passwd entry, as in containers run with an arbitrary --user)."""
    if os.environ.get("ADAMKIT_KERNEL_CACHE"):
        return Path(os.environ["ADAMKIT_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except (RuntimeError, KeyError) as error:
            raise KernelUnavailable(
                f"the kernel cache has no place: no home directory ({error}) and neither "
                "ADAMKIT_KERNEL_CACHE nor XDG_CACHE_HOME is set (set ADAMKIT_KERNEL_CACHE "
                "to a writable directory)"
            ) from error
    return Path(base) / "adamkit" / "kernels"


AVX2_FLAGS = ("-mavx2", "-mfma", "-mf16c")
"""ADAMKIT_PORTABLE_KERNELS=avx2: code for every x86-64 CPU with AVX2, FMA and F16C."""
AVX2_CPU_FLAGS = frozenset({"avx2", "fma", "f16c"})
"""What /proc/cpuinfo must list for code built with AVX2_FLAGS to run."""


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The instruction-set flags /proc/cpuinfo lists for this CPU (none where it cannot be
    read); read once, as every kernel lookup may ask."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            line = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


NATIVE_SETTINGS = frozenset({"", "0", "false", "no", "off"})
PORTABLE_SETTINGS = frozenset({"1", "true", "yes", "on"})
"""ADAMKIT_PORTABLE_KERNELS values (any case) besides 'avx2'; anything else is refused, so
that a misspelt target is not silently built as the slowest code."""


def arch_choices() -> tuple[tuple[str, ...], ...]:
    """The -march flags to try in order: native first, for AVX-512's 16-bit rounding
    instructions and the widest vectors this CPU has, then portable code. Setting
    ADAMKIT_PORTABLE_KERNELS=1 builds only the portable code (for a cache shared by
    machines with different CPUs, and to test the software rounding on any machine);
    =avx2 builds code for any CPU with AVX2 (the eight-lane paths, also on a CPU with
    AVX-512), refused where this CPU lacks it. There is deliberately no setting for any
    other target: code for a CPU this one is not would stop the process with an illegal
    instruction."""
    raw = os.environ.get("ADAMKIT_PORTABLE_KERNELS", "")
    setting = raw.strip().lower()
    if setting not in NATIVE_SETTINGS | PORTABLE_SETTINGS | {"avx2"}:
        raise KernelUnavailable(
            f"ADAMKIT_PORTABLE_KERNELS={raw!r} is not a setting; allowed: unset or '0' "
            "(native), '1' (portable) or 'avx2'"
        )
    if setting == "avx2":
        missing = AVX2_CPU_FLAGS - _cpu_flags()
        if missing:
            raise KernelUnavailable(
                "ADAMKIT_PORTABLE_KERNELS='avx2': this CPU lacks "
                f"{', '.join(sorted(missing))}, and its code would stop the process; "
                "allowed here: unset, '0' (native) or '1' (portable)"
            )
        return (AVX2_FLAGS, ())
    if setting in PORTABLE_SETTINGS:
        return ((),)
    return (("-march=native",), ())


def settings_problem() -> str | None:
    """Why the kernel settings rule out every kernel here (a refused
    ADAMKIT_PORTABLE_KERNELS, a kernel cache below a file), or None: fused=True asks at
    construction and before a step, so that it is refused before any state is made
    rather than by the build inside the step. A cache that exists but cannot be written
    is no problem: its kernels are still read."""
    try:
        cache = cache_dir()
    except KernelUnavailable as error:
        return str(error)
    return _settings_problem(
        os.environ.get("ADAMKIT_PORTABLE_KERNELS", ""), str(cache), _cpu_flags()
    )


@functools.lru_cache(maxsize=8)
def _settings_problem(setting: str, cache: str, cpu_flags: frozenset[str]) -> str | None:
    try:
        arch_choices()
    except KernelUnavailable as error:
        return str(error)
    path = Path(cache)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                return (
                    f"the kernel cache {path} cannot be a directory ({candidate} is a file; "
                    "set ADAMKIT_KERNEL_CACHE to a directory)"
                )
            break
    return None


def vector_path() -> str:
    """The widest vector code the kernels built now take (arch_choices' first choice on
    this CPU): "avx512", "avx2", "software", or "unavailable" where the setting is
    refused. Ratios to torch differ several times between them."""
    try:
        first = arch_choices()[0]
    except KernelUnavailable:
        return "unavailable"
    flags = _cpu_flags() if first else frozenset()
    if first != AVX2_FLAGS and "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "software"


def _compile(config: KernelConfig, target: Path, choices: tuple[tuple[str, ...], ...]) -> None:
    cc = compiler() or ()
    commands = [
        [*cc, *BASE_FLAGS, *EXACT_FLAGS, *arch, *config.defines(), str(SOURCE), *LIBRARIES]
        for arch in choices
    ]
    build_atomically(commands, target, f"the fused kernel {config}", cc)


BUILDING_PREFIX = ".building-"
"""Temporary build outputs are named .building-<pid>-<random>.so in the kernel cache."""


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


UNUSED_LIBRARY_DAYS = 30
"""Libraries in the kernel cache that no process has loaded for this many days are deleted
by the next build there: every adamkit version, compiler or configuration change adds
libraries (about 30 kB each), and nothing else would ever remove the old ones."""


def mark_used(path: Path) -> bool:
    """Record that a cached library is about to be loaded (its modification time, which
    remove_unused_libraries reads); False if it is not there, to be built."""
    try:
        os.utime(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:  # a cache this user cannot write (shared, read-only) is still read
        return True
    return True


def remove_unused_libraries(directory: Path, keep: Path) -> None:
    """Delete adamkit's libraries in directory not loaded for UNUSED_LIBRARY_DAYS (but keep).
    A process about to load one marks it first, so only libraries idle that long can
    vanish under a loader, which then builds its own again."""
    oldest = time.time() - UNUSED_LIBRARY_DAYS * 86400
    for path in directory.glob("adamkit_*.so"):
        with contextlib.suppress(OSError):  # gone already, or not ours to delete
            if path != keep and path.stat().st_mtime < oldest:
                path.unlink()


def remove_abandoned_builds(directory: Path) -> None:
    """Delete the temporary outputs of builds whose process is gone (killed, or exited
    while a background build ran): nothing else would, and each is a whole library."""
    for path in directory.glob(f"{BUILDING_PREFIX}*.so"):
        pid = path.name[len(BUILDING_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_exists(int(pid)):
            path.unlink(missing_ok=True)


def build_atomically(
    commands: Sequence[list[str]],
    target: Path,
    what: str,
    compiler: Sequence[str],
    timeout: float = 300,
) -> None:
    """Build target with the first of commands that succeeds (each given `-o <file>`),
    atomically: a temporary file renamed into place, so processes building the same
    target at once (DDP ranks) never load a partial one. A command that fails, or runs
    past timeout seconds, leaves no file behind; KernelUnavailable says why, naming the
    compiler as configured (a launcher such as `ccache gcc` with what it runs)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_builds(target.parent)
    errors = ""
    for command in commands:
        handle, temporary = tempfile.mkstemp(
            prefix=f"{BUILDING_PREFIX}{os.getpid()}-", suffix=".so", dir=target.parent
        )
        os.close(handle)
        try:
            returncode, errors = _run_compiler([*command, "-o", temporary], temporary, timeout)
            if returncode == 0:
                # mkstemp's 0600 would keep a cache warmed by one user (a container image
                # built as root) from every other: libraries are read by all, as cc makes them.
                os.chmod(temporary, 0o755)
                os.replace(temporary, target)
                remove_unused_libraries(target.parent, keep=target)
                return
        except subprocess.TimeoutExpired:
            errors = f"still running after {timeout} s (stopped)"
        except OSError as error:  # on PATH, but not runnable (a dangling interpreter line)
            errors = f"{command[0]} does not run: {error}"
            break
        finally:
            Path(temporary).unlink(missing_ok=True)
    raise KernelUnavailable(f"{shlex.join(compiler)} could not build {what}:\n{errors}")


_running_builds: dict[subprocess.Popen, str] = {}
"""Compilers running now, with the temporary file each writes (the C++ host checks build
in a background thread, which a process may outlive)."""


_TRANSIENT_SPAWN_ERRORS = frozenset({errno.EAGAIN, errno.EFAULT, errno.EINTR, errno.ENOMEM})
"""Why starting a compiler may fail once and not again: seen in CI, EFAULT ("Bad
address") starting /usr/bin/c++ from the host checks' background thread while the main
thread was busy, which cost the process its C++ checks (every memoized step then checked
in Python). A compiler that is missing or not executable fails with other errors."""


def _spawn_compiler(command: list[str]) -> subprocess.Popen:
    """Start a build command, once more after a transient failure to start it."""

    def start() -> subprocess.Popen:
        # A session of its own, so stopping it stops what the driver started (cc1plus, ld).
        return subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    try:
        return start()
    except OSError as error:
        if error.errno not in _TRANSIENT_SPAWN_ERRORS:
            raise
    time.sleep(0.1)
    return start()


def _run_compiler(command: list[str], temporary: str, timeout: float) -> tuple[int, str]:
    """Run one build command: its exit code and the end of what it printed to stderr."""
    with _spawn_compiler(command) as process:
        _running_builds[process] = temporary
        try:
            _, stderr = process.communicate(timeout=timeout)
        except BaseException:
            _stop(process)
            process.communicate()
            raise
        finally:
            _running_builds.pop(process, None)
    return process.returncode, stderr[-2000:]


def _stop(process: subprocess.Popen) -> None:
    """Kill a build command and every process it started."""
    with contextlib.suppress(OSError):
        os.killpg(process.pid, signal.SIGKILL)


@atexit.register
def _stop_running_builds(owner: int = os.getpid()) -> None:
    """Stop this process's compilers when it exits: a background build would otherwise run
    on (up to 0.9 GB for the host checks) and write a file no one installs."""
    if os.getpid() != owner:  # a forked child's copies are its parent's builds
        return
    for process, temporary in list(_running_builds.items()):
        _stop(process)
        Path(temporary).unlink(missing_ok=True)


_ARGTYPES = [ctypes.c_int64] + [ctypes.c_void_p] * 9 + [ctypes.c_int, ctypes.c_void_p]
_QUANTIZED_ARGTYPES = [ctypes.c_int64] + [ctypes.c_void_p] * 15 + [ctypes.c_int, ctypes.c_void_p]
_loaded: dict[tuple[KernelConfig, tuple[tuple[str, ...], ...]], ctypes.CDLL] = {}
compile_seconds: dict[KernelConfig, float] = {}
"""Wall time spent building (or loading from the disk cache) each configuration."""


def library_path(config: KernelConfig, choices: tuple[tuple[str, ...], ...]) -> Path:
    """Where the kernel cache keeps config's library: named by everything it is built from."""
    key = [SOURCE.read_text(), *BASE_FLAGS, *EXACT_FLAGS, *LIBRARIES, *config.defines()]
    key.append(str(choices))
    digest = hashlib.sha256("\n".join([*key, _toolchain_identity()]).encode()).hexdigest()[:24]
    return cache_dir() / f"adamkit_{config.algorithm}_{digest}.so"


@contextlib.contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """Held while target is built: processes that need the same library at once (DDP
    ranks on one machine, test suites side by side) wait for one build instead of each
    compiling it. An advisory lock on target + '.lock', released by the kernel if the
    builder dies, and removed after the build; where no lock can be taken (no fcntl, a
    cache this user cannot write) builds are not serialized, which is only slower, as
    each still renames a whole file into place."""
    lock_path = target.with_name(target.name + ".lock")
    try:
        import fcntl

        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+b")  # noqa: SIM115 (closed by the with below)
    except (ImportError, OSError):
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield
        finally:
            with contextlib.suppress(OSError):
                lock_path.unlink()  # a process that waited on it finds the library built


Loaded = TypeVar("Loaded")
"""What load_or_build's loader returns: a ctypes library, or an imported module."""


def load_or_build(path: Path, build: Callable[[], None], load: Callable[[str], Loaded]) -> Loaded:
    """The library at path (opened with load), built first where the cache lacks it, and
    built anew where a cached file does not load (damaged). What goes wrong is
    KernelUnavailable, saying why, so that a bad cache or compiler costs the compiled
    code, never the step. The fused kernels and the C++ host checks both load this way."""
    try:
        cached = mark_used(path)
        if not cached:
            with build_lock(path):
                if not mark_used(path):  # else another process built it while this waited
                    build()
    except OSError as error:
        raise KernelUnavailable(
            f"the kernel cache {path.parent} cannot be written (set ADAMKIT_KERNEL_CACHE "
            f"to a writable directory): {error}"
        ) from error
    try:
        return load(str(path))
    except (OSError, ImportError) as error:  # ctypes raises the one, importlib the other
        if not cached:
            raise KernelUnavailable(f"{path} was just built but does not load: {error}") from error
    try:
        with build_lock(path):
            build()
        return load(str(path))
    except (OSError, ImportError) as error:
        raise KernelUnavailable(f"{path} does not load, even built anew: {error}") from error


def library(config: KernelConfig) -> ctypes.CDLL:
    """The compiled library for a configuration, building it on first use."""
    choices = arch_choices()
    loaded = _loaded.get((config, choices))
    if loaded is not None:
        return loaded
    if compiler() is None:
        raise KernelUnavailable(f"no C compiler: {missing_compiler('CC', C_COMPILERS)}")
    start = time.perf_counter()
    path = library_path(config, choices)
    built = load_or_build(path, lambda: _compile(config, path, choices), ctypes.CDLL)
    step = built.adamkit_step_q8 if config.quantized else built.adamkit_step
    step.argtypes = _QUANTIZED_ARGTYPES if config.quantized else _ARGTYPES
    step.restype = ctypes.c_int
    if config.quantized:
        built.adamkit_quantize.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 4 + [ctypes.c_int]
        built.adamkit_quantize.restype = None
        built.adamkit_quantize_stochastic.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 4
        built.adamkit_quantize_stochastic.argtypes += [ctypes.c_int, ctypes.c_uint32]
        built.adamkit_quantize_stochastic.restype = None
        built.adamkit_dequantize.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 4
        built.adamkit_dequantize.argtypes += [ctypes.c_int]
        built.adamkit_dequantize.restype = None
    built.adamkit_round.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    built.adamkit_round.restype = None
    if config.stochastic:
        built.adamkit_round_stochastic.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 2
        built.adamkit_round_stochastic.argtypes += [ctypes.c_uint32]
        built.adamkit_round_stochastic.restype = None
    built.adamkit_read_scalars.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    built.adamkit_read_scalars.restype = None
    built.adamkit_write_scalars.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    built.adamkit_write_scalars.restype = None
    for name in ("adamkit_add_to_scalars", "adamkit_multiply_scalars"):
        getattr(built, name).argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_float]
        getattr(built, name).restype = None
    _loaded[(config, choices)] = built
    compile_seconds[config] = time.perf_counter() - start
    return built


def kernel(config: KernelConfig) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    """The compiled step for a configuration."""
    built = library(config)
    return built.adamkit_step_q8 if config.quantized else built.adamkit_step


def _check_rounding_dtype(dtype: object) -> None:
    """The rounding hooks round to a 16-bit dtype the kernels store (any other was built
    into a kernel, or failed with a KeyError naming nothing)."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"Invalid dtype: {dtype!r}. Allowed: torch.bfloat16 or torch.float16.")


def _check_signed(signed: object) -> None:
    """The coding hooks' map: m's (signed) or v's; int() of anything else chose one."""
    if not isinstance(signed, bool):
        raise ValueError(f"Invalid signed: {signed!r}. Allowed: True (m's map) or False (v's).")


def round_as_kernels_do(values: Tensor, dtype: torch.dtype) -> Tensor:
    """float32 values rounded to dtype by the kernels' own rounding (hardware where the
    CPU has it): tests hold it to torch's conversion."""
    _check_hook_tensor("values", values, torch.float32, _shape_of(values))
    _check_rounding_dtype(dtype)
    config = KernelConfig("adam", dtype, tuple((name, False) for name in SWITCHES))
    out = torch.empty(values.shape, dtype=dtype, device="cpu")
    library(config).adamkit_round(values.numel(), values.data_ptr(), out.data_ptr())
    return out


def round_stochastically_as_kernels_do(values: Tensor, dtype: torch.dtype, key: int) -> Tensor:
    """float32 values rounded to dtype by the kernels' stochastic rounding (STOCHASTIC's
    parameter store), value i as element i of a tensor whose step key is `key`: tests hold
    it to precision.stochastic_round."""
    _check_hook_tensor("values", values, torch.float32, _shape_of(values))
    _check_rounding_dtype(dtype)
    switches = tuple((name, False) for name in SWITCHES)
    config = KernelConfig("adam", dtype, switches, stochastic=True)
    _key_array(config, [key], 1)
    out = torch.empty(values.shape, dtype=dtype, device="cpu")
    library(config).adamkit_round_stochastic(values.numel(), values.data_ptr(), out.data_ptr(), key)
    return out


_SCALARS_CONFIG = KernelConfig("adam", torch.float32, tuple((name, False) for name in SWITCHES))
MIN_SCALARS = 16
"""Below this many scalars torch's per-tensor operations cost less than building the call."""
_CPU = torch.device("cpu")
_scalars_unavailable = False


def _scalar_call(scalars: Sequence[Tensor]) -> tuple[ctypes.CDLL, ctypes.Array] | None:
    """The compiled helpers and the scalars' addresses; None where torch must do the work:
    few scalars (unless a memoized step's, whose addresses it keeps), no usable compiler
    (tried once per process), or any scalar that is not a one-element float32 CPU tensor."""
    if _scalars_unavailable:
        return None
    checked = checked_scalars(scalars)
    if checked is not None:  # the optimizer checked these tensors and addresses this step
        call = checked.scalar_arrays.get(id(scalars))
        if call is not None:
            return call
    elif len(scalars) < MIN_SCALARS:
        return None
    else:
        addresses = _cached_addresses(scalars)
        if addresses is not None:
            return library(_SCALARS_CONFIG), addresses
    helpers = _scalar_helpers(scalars)
    if helpers is None:
        return None
    if checked is not None:
        call = checked.scalar_arrays[id(scalars)] = (helpers, _addresses(scalars))
        return call
    return helpers, _remember_addresses(scalars)


_NESTED = operator.attrgetter("is_nested")


def _scalar_helpers(scalars: Sequence[Tensor]) -> ctypes.CDLL | None:
    """The compiled scalar helpers, if every scalar is a plain one-element float32 CPU
    tensor holding its own value in its storage (no negative bit, no ZeroTensor, storage
    neither freed nor shrunk: the helpers read and write raw memory) and they build (a
    failed build is not tried again in this process). Asked only where no checked or
    cached list of the same tensors at the same addresses answers."""
    from core.backends.host_checks import host_checks  # imports us

    global _scalars_unavailable
    if (
        _scalars_unavailable
        or not PLAIN_TENSOR_TYPES.issuperset(map(type, scalars))
        or any(map(_NESTED, scalars))  # a nested tensor's memory is no plain scalar's
        or set(map(dtype_of, scalars)) != {torch.float32}
        or set(map(device_of, scalars)) != {_CPU}
        or set(map(Tensor.numel, scalars)) != {1}
        or any(map(Tensor.is_neg, scalars))  # memory holding -value (no conj: float32)
        or host_checks().first_unbacked(scalars) >= 0  # also a ZeroTensor: no memory
    ):
        return None
    try:
        return library(_SCALARS_CONFIG)
    except KernelUnavailable:
        _scalars_unavailable = True
        return None


@dataclass(frozen=True, slots=True)
class HostScalarAccess:
    """One C call to read, and one to write, a fixed list of host scalars: what a replayed
    released step (core.optimizer.StepMemo) pays for its step counts, 0.4-0.6 µs each
    (measured with timeit), where reading or writing a 0-dim tensor through torch costs
    1-3 µs per scalar."""

    helpers: ctypes.CDLL
    addresses: ctypes.Array
    buffer: ctypes.Array
    """The values last read (C doubles)."""

    def read(self) -> list[float]:
        self.helpers.adamkit_read_scalars(len(self.buffer), self.addresses, self.buffer)
        return self.buffer[:]

    def write(self, values: ctypes.Array) -> None:
        """Set the scalars to values (C floats, one per scalar)."""
        self.helpers.adamkit_write_scalars(len(self.buffer), self.addresses, values)


def host_scalar_access(scalars: Sequence[Tensor]) -> HostScalarAccess | None:
    """Access to scalars for as long as the caller keeps them at their addresses (it
    holds them and checks that); None where torch must read and write them."""
    helpers = _scalar_helpers(scalars)
    if helpers is None or not scalars:
        return None
    return HostScalarAccess(helpers, _addresses(scalars), (ctypes.c_double * len(scalars))())


def float32_array(values: Sequence[float]) -> ctypes.Array:
    """values as a C float array (HostScalarAccess.write)."""
    return (ctypes.c_float * len(values))(*values)


@dataclass(frozen=True)
class _ScalarAddresses:
    """A checked list of host scalars and the C array of their addresses."""

    tensors: tuple[Tensor, ...]
    """Held, so no other tensor can take their ids (or memory) while the entry lives."""
    pointers: list[int]
    array: ctypes.Array


_address_cache: dict[tuple[int, int], _ScalarAddresses] = {}
"""(id of the first scalar, count) -> the list checked last: an optimizer reads and counts
the same step tensors every step, and checking and gathering 300 addresses costs ~100 µs
(the check alone: type, dtype, device and size of each) where this lookup costs ~15 µs."""
_ADDRESS_CACHE_SIZE = 64


def _cached_addresses(scalars: Sequence[Tensor]) -> ctypes.Array | None:
    """The address array of a list checked before: the same tensor objects (so the same
    types), still at the same addresses (a tensor moved by `.data =` or set_ is checked
    again, as is one replaced in the optimizer's state)."""
    entry = _address_cache.get((id(scalars[0]), len(scalars)))
    if (
        entry is None
        or not all(map(operator.is_, scalars, entry.tensors))
        or list(map(Tensor.data_ptr, scalars)) != entry.pointers
    ):
        return None
    return entry.array


def _remember_addresses(scalars: Sequence[Tensor]) -> ctypes.Array:
    """Gather the addresses of checked scalars, and keep them for the next step."""
    pointers = list(map(Tensor.data_ptr, scalars))
    array = (ctypes.c_void_p * len(pointers))(*pointers)
    if len(_address_cache) >= _ADDRESS_CACHE_SIZE:
        _address_cache.clear()
    _address_cache[(id(scalars[0]), len(scalars))] = _ScalarAddresses(
        tuple(scalars), pointers, array
    )
    return array


def read_scalars(scalars: Sequence[Tensor]) -> list[float] | None:
    """The values of 0-dim float32 CPU tensors in one call, or None (see _scalar_call)."""
    call = _scalar_call(scalars)
    if call is None:
        return None
    helpers, addresses = call
    values = array.array("d", bytes(8 * len(scalars)))  # tolist() is ~10x list(ctypes array)
    helpers.adamkit_read_scalars(len(scalars), addresses, values.buffer_info()[0])
    return values.tolist()


def add_to_scalars(scalars: Sequence[Tensor], amount: float) -> bool:
    """scalar += amount for each, in float32 as torch._foreach_add_ computes it; False
    where torch must do it. Raw writes do not bump the tensors' autograd version counters,
    which nothing tracks for these counters."""
    call = _scalar_call(scalars)
    if call is not None:
        call[0].adamkit_add_to_scalars(len(scalars), call[1], amount)
    return call is not None


def multiply_scalars(scalars: Sequence[Tensor], factor: float) -> bool:
    """scalar *= factor for each, as torch._foreach_mul_; False where torch must do it."""
    call = _scalar_call(scalars)
    if call is not None:
        call[0].adamkit_multiply_scalars(len(scalars), call[1], factor)
    return call is not None


def _addresses(tensors: Sequence[Tensor]) -> ctypes.Array:
    """The tensors' data pointers as a C array."""
    return (ctypes.c_void_p * len(tensors))(*map(Tensor.data_ptr, tensors))


def _pointers(tensors: Sequence[Tensor] | None) -> ctypes.Array | None:
    return None if tensors is None else _addresses(tensors)


@dataclass(frozen=True, slots=True, eq=False)
class PreparedCall:
    """A kernel call over fixed tensors, checked, with every address gathered but the
    gradients': what `run` and `run_quantized` call once, and what the fused CPU backend
    calls again on later steps of a step memo (core.backends.checked), whose checks vouch
    that none of these tensors changed address, size, block rows, dtype or contiguity and
    that the gradients are dense, of their parameters' dtype and element counts."""

    config: KernelConfig
    """The configuration it was checked for: a call may change only the switches that
    select no list (not KAHAN or AMSGRAD)."""
    count: int
    sizes: ctypes.Array
    row_lengths: ctypes.Array | None
    """Quantized calls: each parameter's row length (blocks run along rows)."""
    params: ctypes.Array
    moments: tuple[ctypes.Array | None, ...]
    """adamkit_step's exp_avgs, exp_avg_sqs, max_exp_avg_sqs; adamkit_step_q8's codes
    (or full-precision elements) and scales of each."""
    comps: ctypes.Array | None
    functions: dict[KernelConfig, ctypes._CFuncPtr] = field(default_factory=dict)  # type: ignore[name-defined]
    """The compiled step of each configuration called so far, found once: kernel(config)
    reads the environment's build choices and took ~1.7 µs a call here, this lookup ~0.3
    (a released step makes one call per parameter)."""

    def _check_config(self, config: KernelConfig) -> None:
        """Refuse a configuration that reads other lists than the prepared one."""
        prepared, switches = self.config, dict(config.switches)
        listed = [dict(prepared.switches).get(name) for name in LIST_SWITCHES]
        if (
            (config.algorithm, config.dtype, config.quantized, config.full_moments)
            != (prepared.algorithm, prepared.dtype, prepared.quantized, prepared.full_moments)
            or config.stochastic != prepared.stochastic
            or [switches.get(name) for name in LIST_SWITCHES] != listed
        ):
            raise ValueError(
                f"Invalid config {config} for a call prepared with {prepared}. Allowed: one "
                f"that differs only in switches other than {LIST_SWITCHES}."
            )

    def call(
        self,
        config: KernelConfig,
        grads: Sequence[Tensor],
        coefficients: Sequence[float],
        keys: Sequence[int] | None = None,
        state_keys: Sequence[int] | None = None,
    ) -> None:
        """One step with these gradients and scalars (keys, state_keys: as run takes them). The
        gradients are not checked here beyond their count: the caller has checked them
        (prepare, in run) or a step memo vouches for them (dense, contiguous, of their
        parameters' dtype and element counts: host_checks.gradient_addresses)."""
        if len(grads) != self.count:
            raise ValueError(
                f"Invalid grads: {len(grads)} tensors for a call over {self.count} parameters."
            )
        if len(coefficients) != COEFFICIENT_COUNT:
            raise ValueError(f"Invalid coefficients: {len(coefficients)} values. Allowed: 10.")
        key_array = _key_array(config, keys, self.count)
        state_key_array = _state_key_array(config, state_keys, self.count)
        function = self.functions.get(config)
        if function is None:  # a configuration not called before: checked once
            self._check_config(config)
            function = self.functions[config] = kernel(config)
        # array.array builds these C arrays in about half the time of ctypes arrays (a
        # released step makes one call per parameter); each is held until the call returns
        scalars = array.array("d", coefficients)
        grad_addresses = array.array("Q", map(Tensor.data_ptr, grads))
        threads = torch.get_num_threads()
        runner = share_runner() if threads > 1 else None
        if config.quantized:
            function(
                self.count,
                self.sizes,
                self.row_lengths,
                self.params,
                grad_addresses.buffer_info()[0],
                self.comps,
                key_array,
                state_key_array,
                *self.moments,
                scalars.buffer_info()[0],
                map_words().data_ptr(),
                threads,
                runner,
            )
        else:
            function(
                self.count,
                self.sizes,
                self.params,
                grad_addresses.buffer_info()[0],
                *self.moments,
                self.comps,
                key_array,
                scalars.buffer_info()[0],
                threads,
                runner,
            )


_share_runner: int | None = None
"""What host_checks.cpp hands the kernels once that module is loaded: the address of its
run_shares_on_torch, or 0 where it has none that runs on torch's threads."""


def set_share_runner(address: int) -> None:
    """What multi-threaded kernel calls run their shares with (cpu_kernel.c's
    share_runner_t), set by core.backends.host_checks when its module loads: torch's
    parallel_for, or 0 for threads of the kernels' own."""
    global _share_runner
    _share_runner = address


def share_runner() -> int | None:
    """torch's parallel_for for a multi-threaded call, once host_checks has built it (a
    step memo's first steps, or this, start the build); until then, where it cannot be
    built, and under ADAMKIT_HOST_CHECKS=python, None: the kernels start threads of
    their own (the same results, slower right after torch's own multi-threaded
    operations, whose idle threads keep spinning)."""
    if _share_runner is None:
        from core.backends.host_checks import compiled_checks, host_checks_setting  # imports us

        if host_checks_setting() == "python":  # no C++ module wanted
            return None
        compiled_checks(wait=False)  # loads the module (and sets the runner) once built
    return _share_runner or None


LIST_SWITCHES = ("KAHAN", "AMSGRAD")
"""Switches that say which lists a kernel reads (the Kahan buffers, v_max)."""


def prepare(
    config: KernelConfig,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[QuantizedMoment | Tensor],
    exp_avg_sqs: Sequence[QuantizedMoment | Tensor],
    max_exp_avg_sqs: Sequence[QuantizedMoment | Tensor] | None,
    kahan_comps: Sequence[Tensor] | None,
) -> PreparedCall:
    """Check every tensor a call over these lists reads, gradients included, before any
    address is taken (run's and run_quantized's checks), and gather the addresses."""
    _check_config(config)
    _check_lists(config, max_exp_avg_sqs, kahan_comps)
    count = len(params)
    moments = [exp_avgs, exp_avg_sqs, max_exp_avg_sqs]
    sizes = (ctypes.c_int64 * count)(*map(Tensor.numel, params))
    if not config.quantized:
        check_addressable([params, grads, *moments, kahan_comps], config.dtype, _CPU)  # type: ignore[list-item]
        arrays = tuple(map(_pointers, moments))  # type: ignore[arg-type]
        return PreparedCall(
            config, count, sizes, None, _addresses(params), arrays, _pointers(kahan_comps)
        )
    eight_bit = config.eight_bit()
    full = [None if q else values for q, values in zip(eight_bit, moments, strict=True)]
    check_addressable([params, grads, *full, kahan_comps], config.dtype, _CPU)  # type: ignore[list-item]
    row_lengths = check_quantized_addressable(
        params,
        [values if q else None for q, values in zip(eight_bit, moments, strict=True)],  # type: ignore[misc]
        _CPU,
    )
    arrays = []
    for q, moment in zip(eight_bit, moments, strict=True):
        if moment is None:
            arrays += [None, None]
        elif q:
            arrays += [
                _addresses([m.codes for m in moment]),
                _addresses([m.absmax for m in moment]),
            ]  # type: ignore[union-attr]
        else:
            arrays += [_addresses(moment), None]  # type: ignore[arg-type]
    return PreparedCall(
        config,
        count,
        sizes,
        (ctypes.c_int64 * count)(*row_lengths),
        _addresses(params),
        tuple(arrays),
        _pointers(kahan_comps),
    )


def _run(
    config: KernelConfig,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Any],
    exp_avg_sqs: Sequence[Any],
    max_exp_avg_sqs: Sequence[Any] | None,
    kahan_comps: Sequence[Tensor] | None,
    coefficients: Sequence[float],
    keys: Sequence[int] | None = None,
    state_keys: Sequence[int] | None = None,
    *,
    quantized: bool,
) -> None:
    """One step over tensors of config.dtype, everything checked before any address is
    read: run for dense tensors and full-precision moments (adamkit_step), run_quantized
    for contiguous ones whose moments are 8-bit (core.quantization), decoded and encoded
    in the same pass, except those the config keeps in full precision
    (config.full_moments: tensors of config.dtype, as run takes them) (adamkit_step_q8).
    θ, g, k and full-precision moments are checked by check_addressable, 8-bit ones by
    check_quantized_addressable. keys: under config.stochastic, each tensor's
    StochasticRounding.key() of this step. state_keys: with 8-bit m or v, each tensor's
    key of this step for them (QuantizedMoment.key: core.random_bits.step_key of its
    stream and the state_draw, offset for a shard): they then round stochastically, with
    the high and low halves of each element's bits (quantization.moment_bits) (None: to
    nearest).
    The configuration, keys and kernel come first (refused or built even for no
    tensors), then every check, then the call."""
    _check_config(config, quantized)
    _key_array(config, keys, len(params))
    _state_key_array(config, state_keys, len(params))
    kernel(config)
    if not params:
        return
    prepared = prepare(config, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, kahan_comps)
    prepared.call(config, grads, coefficients, keys, state_keys)


STOCHASTIC_DTYPES = (torch.bfloat16, torch.float16)
"""Parameter dtypes the kernels round stochastically (fp32 and float64 have nothing to
round: their StochasticRoundings are rounded to nearest, as the loop backend does)."""


def _key_array(config: KernelConfig, keys: Sequence[int] | None, count: int) -> ctypes.Array | None:
    """The keys as a C array of uint32, one per tensor, under config.stochastic (else
    None); refused (ValueError) unless the configuration and the list agree."""
    if config.stochastic and (
        config.dtype not in STOCHASTIC_DTYPES or dict(config.switches).get("KAHAN", False)
    ):
        raise ValueError(
            f"Invalid config: stochastic=True with dtype {config.dtype} and KAHAN="
            f"{int(dict(config.switches).get('KAHAN', False))}. Allowed: a dtype of "
            f"{STOCHASTIC_DTYPES} without KAHAN."
        )
    if config.stochastic != (keys is not None):
        raise ValueError(
            f"Invalid keys for a kernel built with STOCHASTIC={int(config.stochastic)}: "
            f"{'None' if keys is None else 'a list'}."
        )
    if keys is None:
        return None
    return _uint32_array("keys", keys, count)


def _uint32_array(name: str, keys: Sequence[int], count: int) -> ctypes.Array:
    """One key per tensor as a C array of uint32, refused by name unless there are
    `count` of them, each an int (not a bool) that fits: ctypes would wrap 2^32 to 0."""
    if len(keys) != count:
        raise ValueError(
            f"Invalid {name}: {len(keys)} values for {count} tensors (one per tensor)."
        )
    for index, key in enumerate(keys):
        if type(key) is not int or not 0 <= key < 1 << 32:
            raise ValueError(
                f"Invalid {name}: {key!r} for tensor {index}. Allowed: each an int in [0, 2^32)."
            )
    return (ctypes.c_uint32 * count)(*keys)


def _state_key_array(
    config: KernelConfig, state_keys: Sequence[int] | None, count: int
) -> ctypes.Array | None:
    """state_keys as a C array of uint32, one per tensor (None stays None); refused
    (ValueError) where the configuration has neither 8-bit m nor 8-bit v, or the list is
    malformed."""
    if state_keys is None:
        return None
    if not any(config.eight_bit()[:2]):
        raise ValueError(
            f"Invalid state_keys for a kernel without 8-bit m or v (quantized="
            f"{config.quantized}, full_moments {sorted(config.full_moments)}). Allowed: None."
        )
    return _uint32_array("state_keys", state_keys, count)


def _check_lists(
    config: KernelConfig,
    max_exp_avg_sqs: Sequence[object] | None,
    kahan_comps: Sequence[Tensor] | None,
) -> None:
    """Refuse optional lists the configuration does not expect."""
    switches = dict(config.switches)
    optional = (
        ("max_exp_avg_sqs", "AMSGRAD", max_exp_avg_sqs),
        ("kahan_comps", "KAHAN", kahan_comps),
    )
    for name, switch, values in optional:
        wanted = switches.get(switch, False)
        if wanted != (values is not None):
            raise ValueError(
                f"Invalid {name} for a kernel built with {switch}={int(wanted)}: "
                f"{'None' if values is None else 'a list'}."
            )


QUANTIZED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Parameter dtypes the 8-bit kernels step (the reference computes in fp32 for these)."""


MAP_WORDS = 7
"""cpu_kernel.c's MAP_WORDS: the numbers one map's encoding and decoding need."""


def _map_words(spec: CodeMap) -> list[int]:
    """cpu_kernel.c's code_map_t of one map, from CodeMap's rule. With g = group_bits a
    code's value has bits (bits(fp32(c + 1)) << g) + decode_offset (mod 2^32), and a
    normalized magnitude a (bits A, at least lowest_bits) lies at fp32 bits
    (A >> g) + encode_offset on the scale where each code c sits at c + 1."""
    g = spec.group_bits
    lowest = spec.lowest_exponent
    zero_below = (lowest - 1) << 23 if spec.signed else 1
    return [
        g,
        ((spec.exponent_base - (127 << g)) << 23) % 2**32,
        ((127 << g) - spec.exponent_base) << (23 - g),
        spec.smallest_code,
        spec.largest_code,
        lowest << 23,
        zero_below,
    ]


@functools.cache
def map_words() -> Tensor:
    """What the 8-bit kernels decode and encode with (cpu_kernel.c's code_map_t): the
    signed map's _map_words, then the unsigned map's."""
    words = _map_words(code_map(True)) + _map_words(code_map(False))
    for signed in (True, False):  # the vector encoder clamps nothing above (cpu_kernel.c)
        largest = map_values(signed, _CPU)[code_map(signed).largest_code]
        if float(largest) != 1.0:
            raise AssertionError(f"the {'signed' if signed else 'unsigned'} map tops at {largest}")
    if len(words) != 2 * MAP_WORDS:
        raise AssertionError(f"{len(words)} map words, where cpu_kernel.c reads {2 * MAP_WORDS}")
    return torch.tensor(words, dtype=torch.int64, device="cpu").to(torch.int32)


def _check_config(config: KernelConfig, quantized: bool | None = None) -> None:
    """Refuse a quantized configuration the 8-bit kernels do not build, and one that is
    not `quantized` where the caller says which it must be."""
    if quantized is False and config.quantized:
        raise ValueError("Invalid config: quantized=True. Allowed: False (see run_quantized).")
    if (quantized and not config.quantized) or (
        config.quantized
        and (config.dtype not in QUANTIZED_DTYPES or not config.full_moments <= set(QUANTIZED_ROWS))
    ):
        raise ValueError(
            f"Invalid config for 8-bit moments: quantized={config.quantized}, dtype "
            f"{config.dtype}, full_moments {sorted(config.full_moments)}. Allowed: "
            f"quantized=True, a dtype of {QUANTIZED_DTYPES} and full_moments of "
            f"{QUANTIZED_ROWS}."
        )


run = functools.partial(_run, quantized=False)
"""_run on dense tensors with full-precision moments (adamkit_step)."""
run_quantized = functools.partial(_run, quantized=True)
"""_run on contiguous tensors with 8-bit moments (adamkit_step_q8)."""


def _encoding_library() -> ctypes.CDLL:
    """A quantized kernel build, for its encoding and decoding hooks."""
    switches = tuple((name, False) for name in SWITCHES)
    return library(KernelConfig("adam", torch.float32, switches, quantized=True))


def _shape_of(tensor: object) -> tuple[int, ...] | None:
    """A rounding hook takes values of any shape: theirs (None for what is no tensor)."""
    if not isinstance(tensor, Tensor) or tensor.is_nested:
        return None
    return tuple(tensor.shape)


def _check_hook_tensor(
    name: str, tensor: object, dtype: torch.dtype, shape: tuple[int, ...] | None = None
) -> None:
    """Refuse, by name and before C reads its address, a tensor a coding or rounding hook
    is handed that is not a contiguous plain CPU tensor of dtype and shape (1-D where
    None) whose memory holds its values (a meta or GPU tensor's address, or a freed
    storage's, read as host memory crashed the process; a negated view was read
    unnegated)."""
    nested = isinstance(tensor, Tensor) and tensor.is_nested  # has no shape to read
    if (
        type(tensor) in PLAIN_TENSOR_TYPES
        and not nested
        and tensor.layout == torch.strided  # type: ignore[attr-defined]
        and dtype_of(tensor) == dtype  # type: ignore[arg-type]
        and device_of(tensor) == _CPU  # type: ignore[arg-type]
        and tensor.is_contiguous()  # type: ignore[attr-defined]
        and (tensor.ndim == 1 if shape is None else tuple(tensor.shape) == shape)  # type: ignore[attr-defined]
        and memory_problem(tensor) is None  # type: ignore[arg-type]
    ):
        return
    if nested:
        found = f"a nested {tensor.dtype} tensor on {tensor.device}"  # type: ignore[attr-defined]
    elif isinstance(tensor, Tensor):
        found = f"a {tensor.dtype} tensor on {tensor.device} of shape {tuple(tensor.shape)}"
    else:
        found = f"a {type(tensor).__name__}"
    if type(tensor) in PLAIN_TENSOR_TYPES and not nested and tensor.layout == torch.strided:  # type: ignore[attr-defined]
        problem = memory_problem(tensor)  # type: ignore[arg-type]
        found += "" if problem is None else f" {problem[0]}"
    wanted = "one dimension" if shape is None else f"shape {shape}"
    raise ValueError(
        f"Invalid {name}: {found}. Allowed: a contiguous plain CPU {dtype} tensor of {wanted} "
        "whose memory holds its values."
    )


def quantize_as_kernels_do(
    values: Tensor, signed: bool, key: int | None = None
) -> tuple[Tensor, Tensor]:
    """(codes, absmax) of a 1-D float32 tensor by the 8-bit kernels' own encoding (one row
    of blocks), to nearest or, with key, stochastically as a step stores m and v (element
    i of the row draws core.random_bits.rounding_bits' i-th bits under key, of which the
    moment takes its half, quantization.moment_bits): tests hold it to
    core.quantization.quantize on chosen values."""
    _check_hook_tensor("values", values, torch.float32)
    _check_signed(signed)
    if key is not None and (type(key) is not int or not 0 <= key < 1 << 32):
        raise ValueError(f"Invalid key: {key!r}. Allowed: None or an int in [0, 2^32).")
    codes = torch.empty(values.shape, dtype=torch.uint8, device="cpu")
    absmax = torch.empty(absmax_shape(values.shape), dtype=torch.float32, device="cpu")
    library = _encoding_library()
    addresses = (values.data_ptr(), codes.data_ptr(), absmax.data_ptr(), map_words().data_ptr())
    if key is None:
        library.adamkit_quantize(values.numel(), *addresses, int(signed))
    else:
        library.adamkit_quantize_stochastic(values.numel(), *addresses, int(signed), key)
    return codes, absmax


def dequantize_as_kernels_do(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """The fp32 values of a 1-D uint8 tensor of codes (one row of blocks, scaled by the
    float32 absmax of shape absmax_shape) by the 8-bit kernels' own decoding: tests hold
    it to core.quantization.dequantize on every code."""
    _check_hook_tensor("codes", codes, torch.uint8)
    _check_hook_tensor("absmax", absmax, torch.float32, absmax_shape(codes.shape))
    _check_signed(signed)
    values = torch.empty(codes.shape, dtype=torch.float32, device="cpu")
    _encoding_library().adamkit_dequantize(
        codes.numel(),
        codes.data_ptr(),
        absmax.data_ptr(),
        values.data_ptr(),
        map_words().data_ptr(),
        int(signed),
    )
    return values
