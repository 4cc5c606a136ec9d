"""Optimizer step time of every core optimizer and backend beside torch.optim, in one run.

Timing on a shared machine is noisy, so: one thread, timed by the CPU time of that
thread (time.thread_time, which other processes taking the core turns do not inflate),
warm-up steps, the minimum of several repeats, and every contender timed in alternation
with the baseline, torch.optim.AdamW(fused=True), so that its ratio compares the two
under the same memory traffic from the rest of the machine.
M params/s is also set against the roofline: the machine's measured memory-copy
bandwidth divided by the bytes a configuration must move per parameter. Compile time
of the generated CPU kernels (a fresh kernel cache, so a cold build) is reported
separately. optimi rows appear when torch-optimi is installed.

In the Composer environment (`.venv-composer`) a further table times
composer_adam.DecoupledAdamW against composer.optim.DecoupledAdamW, which is then the
baseline of that table.

On a GPU (`--device cuda`) every algorithm's Triton step (fp32, and bf16 with Kahan) is
timed with CUDA events at 20 x 1M, 200 x 100k and 1 x 100M parameters, in alternation
with torch.optim.AdamW(fused=True), beside torch's foreach AdamW and optimi's Triton
kernels (when torch-optimi is installed), as ms/step, ratio and % of the GPU's measured
copy bandwidth.

The host-time table (both devices) is the Python work of a Triton-backend step with the
kernel launch replaced by a no-op: for 30 and 300 tensors, and per parameter under
gradient release (one step per parameter).

With --threads N (N > 1) torch and adamkit's kernels use N threads and steps are timed
by wall time instead, as the thread's CPU time would count only its own share; the 8-bit
tables then include one of where the kernel's shares run (torch's threads or its own)
right after torch's multi-threaded step and right after its own.

Run: python examples/benchmark.py [--quick] [--composer-only] [--runs N] [--device cuda]
     [--host-time-only] [--eight-bit-only] [--kernel-only] [--threads N]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import platform
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import core
from core.backends import cpu_kernel
from core.backends.checked import checking, current_checked_step
from core.backends.host_checks import PYTHON_CHECKS, compiled_checks, host_checks
from core.optimizer import step_released_param

Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]

BYTES_PER_PARAM = {
    "fp32": 28,
    "fp32 amsgrad": 36,
    "bf16": 14,
    "bf16 kahan": 18,
    "fp32 8bit": 16,
    "fp32 8bit m": 22,
}
"""Each tensor read once and written once: θ, m, v (and v_max, Kahan k) both ways, g read
(8-bit m and v: one byte each way, scales aside; ADOPT's 8-bit m beside its fp32 v)."""


@dataclass(frozen=True)
class Contender:
    name: str
    make: Factory
    dtype: torch.dtype
    traffic: str


def _torch_adamw(**flags: bool) -> Factory:
    return lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, **flags)


CORE_ALGORITHMS: list[tuple[str, Callable[..., torch.optim.Optimizer], str]] = [
    ("core AdamW", lambda p, **kw: core.AdamW(p, lr=1e-3, **kw), "fp32"),
    (
        "core AdamW amsgrad",
        lambda p, **kw: core.AdamW(p, lr=1e-3, amsgrad=True, **kw),
        "fp32 amsgrad",
    ),
    ("core RAdam", lambda p, **kw: core.RAdam(p, lr=1e-3, **kw), "fp32"),
    ("core NAdam", lambda p, **kw: core.NAdam(p, lr=1e-3, **kw), "fp32"),
    ("core ADOPT", lambda p, **kw: core.ADOPT(p, lr=1e-3, **kw), "fp32"),
]
BACKEND_FLAGS = {
    "fused": {"fused": True},
    "default": {},
    "foreach": {"foreach": True},
    "loop": {"foreach": False},
}


def _optimi_rows(dtype: torch.dtype, traffic: str) -> list[Contender]:
    """optimi's AdamW, RAdam and Adam (its foreach path, Kahan on for bf16), if installed."""
    try:
        import optimi
    except ImportError:
        return []
    rows = []
    for name in ("AdamW", "RAdam"):
        cls = getattr(optimi, name, None)
        if cls is not None:
            rows.append(Contender(f"optimi {name}", lambda p, c=cls: c(p, lr=1e-3), dtype, traffic))
    return rows


def fp32_contenders() -> list[Contender]:
    """torch.optim.AdamW on its three paths, every core optimizer on every backend, optimi."""
    fp32 = torch.float32
    rows = [
        Contender("torch AdamW fused", _torch_adamw(fused=True), fp32, "fp32"),
        Contender("torch AdamW foreach", _torch_adamw(foreach=True), fp32, "fp32"),
        Contender("torch AdamW for-loop", _torch_adamw(foreach=False), fp32, "fp32"),
        Contender(
            "torch AdamW amsgrad fused",
            _torch_adamw(fused=True, amsgrad=True),
            fp32,
            "fp32 amsgrad",
        ),
    ]
    for name, make, traffic in CORE_ALGORITHMS:
        for backend, flags in BACKEND_FLAGS.items():
            rows.append(
                Contender(f"{name} {backend}", lambda p, m=make, f=flags: m(p, **f), fp32, traffic)
            )
    return rows + _optimi_rows(fp32, "fp32")


def bf16_contenders() -> list[Contender]:
    """bf16 parameters and state (and one fp16 row): torch has no Kahan; core compensates
    by default."""
    bf16 = torch.bfloat16
    rows = [Contender("torch AdamW fused (no Kahan)", _torch_adamw(fused=True), bf16, "bf16")]
    for name, make, _ in CORE_ALGORITHMS:
        if "amsgrad" in name:
            continue
        for backend in ("fused", "default"):
            flags = BACKEND_FLAGS[backend]
            rows.append(
                Contender(
                    f"{name} Kahan {backend}",
                    lambda p, m=make, f=flags: m(p, **f),
                    bf16,
                    "bf16 kahan",
                )
            )
    rows.append(
        Contender(
            "core AdamW Kahan fused, fp16 params",
            lambda p: core.AdamW(p, lr=1e-3, fused=True),
            torch.float16,
            "bf16 kahan",  # the same bytes: every tensor is 16-bit either way
        )
    )
    rows.append(
        Contender(
            "core AdamW foreach (Kahan)",
            lambda p: core.AdamW(p, lr=1e-3, foreach=True),
            bf16,
            "bf16 kahan",
        )
    )
    return rows + _optimi_rows(bf16, "bf16 kahan")


EIGHT_BIT = [
    ("core AdamW", lambda p: core.AdamW(p, lr=1e-3, state_precision="8bit", fused=True)),
    ("core Adam", lambda p: core.Adam(p, lr=1e-3, state_precision="8bit", fused=True)),
    ("core RAdam", lambda p: core.RAdam(p, lr=1e-3, state_precision="8bit", fused=True)),
    ("core NAdam", lambda p: core.NAdam(p, lr=1e-3, state_precision="8bit", fused=True)),
    ("core ADOPT", lambda p: core.ADOPT(p, lr=1e-3, state_precision="8bit", fused=True)),
]
"""Fused CPU steps with 8-bit moments (core.quantization), fp32 parameters; ADOPT keeps v
full precision (core.adopt), so only its m is 8-bit: the same one-pass kernel, built with
v in fp32."""


EIGHT_BIT_NUMEL, EIGHT_BIT_QUICK = 1 << 20, 1 << 17
"""Tensor sizes of the 8-bit table: multiples of the 256-element block, which torchao
needs to quantize a tensor at all (it keeps any other size in fp32)."""


def _anchor_rows() -> list[tuple[str, Factory]]:
    """bitsandbytes' and torchao's 8-bit AdamW where installed (`pip install
    .[anchors]`): the tools users reach for today, measured on the same tensors."""
    return _bitsandbytes_rows() + _torchao_rows()


def _bitsandbytes_rows() -> list[tuple[str, Factory]]:
    try:
        import bitsandbytes
    except ImportError:
        return []
    return [("bitsandbytes AdamW8bit", lambda p: bitsandbytes.optim.AdamW8bit(p, lr=1e-3))]


def _torchao_rows() -> list[tuple[str, Factory]]:
    try:
        import torchao.optim
    except ImportError:
        return []
    return [
        ("torchao AdamW8bit", lambda p: torchao.optim.AdamW8bit(p, lr=1e-3)),
        ("torchao AdamW4bit", lambda p: torchao.optim.AdamW4bit(p, lr=1e-3)),
    ]


def eight_bit_contenders() -> list[Contender]:
    """The 8-bit rows, named with the state bytes per parameter they keep, then the
    anchors that are installed."""
    rows = [
        Contender(
            f"{name} 8-bit fused",
            make,
            torch.float32,
            "fp32 8bit m" if name == "core ADOPT" else "fp32 8bit",
        )
        for name, make in EIGHT_BIT
    ]
    return rows + [
        Contender(name, make, torch.float32, "fp32 8bit") for name, make in _anchor_rows()
    ]


def stored_bytes(value: torch.Tensor) -> int:
    """The bytes a state tensor holds: a wrapper subclass (torchao's 8-bit and 4-bit
    state) reports its logical fp32 size, so its inner tensors are counted instead."""
    flatten = getattr(type(value), "__tensor_flatten__", None)
    if flatten is None:
        return value.nbytes
    names, _ = value.__tensor_flatten__()  # type: ignore[attr-defined]
    return sum(stored_bytes(getattr(value, name)) for name in names)


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of every state tensor (codes, scales, full moments, host scalars) per parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total = sum(
        stored_bytes(value)
        for p in params
        for value in optimizer.state[p].values()
        if isinstance(value, torch.Tensor)
    )
    return total / sum(p.numel() for p in params)


def eight_bit_table(count: int, numel: int, steps: int, repeats: int) -> list[str]:
    """ms/step of each 8-bit row beside torch.optim.AdamW(fused=True) on fp32 state, timed
    in alternation, with the ratio and the state bytes per parameter of both."""
    threads = torch.get_num_threads()
    lines = [
        f"\n8-bit state, fused CPU: {count} tensors x {numel:,} fp32 parameters, "
        f"{threads} thread{'s' if threads > 1 else ''} (target: at most 0.75x torch fused "
        "AdamW)\n",
        "| optimizer | ms/step | vs torch fused AdamW | state bytes/param |",
        "|---|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    compiled_checks(wait=True)  # with threads, shares run on torch's once it is loaded
    baseline = _torch_adamw(fused=True)(make_params(count, numel, torch.float32))
    baseline.step()
    base_bytes = state_bytes_per_param(baseline)
    for contender in eight_bit_contenders():
        optimizer = contender.make(make_params(count, numel, torch.float32))
        seconds, baseline_seconds = time_against(optimizer, baseline, steps, repeats)
        cells = [
            contender.name,
            f"{seconds * 1e3:.2f}",
            f"{seconds / baseline_seconds:.2f}",
            f"{state_bytes_per_param(optimizer):.2f} (torch: {base_bytes:.2f})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
        del optimizer
    return lines


def thread_handoff_table(count: int, numel: int, repeats: int) -> list[str]:
    """With several threads: core.AdamW's 8-bit fused step right after torch's own
    multi-threaded step (as after backward's operations in training) and right after its
    own, its shares run on torch's threads (what users get once the C++ helper module
    is built) and on threads the kernel starts (before that, or without a C++ compiler).
    torch's idle OpenMP threads spin for a while after each operation, on the cores the
    kernel's own threads then need; torch's threads are those threads. ms per step as
    minimum / median of `repeats`, each timed alone by wall time."""
    threads = torch.get_num_threads()
    lines = [
        f"\nShares of a {threads}-thread 8-bit step (core AdamW, fused, {count} x {numel:,} "
        "fp32), ms min / median\n",
        "| shares run on | right after torch's AdamW step | right after its own step |",
        "|---|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    compiled_checks(wait=True)  # loads the module, which sets the runner
    torch_threads = cpu_kernel.share_runner()
    if torch_threads is None:
        lines.append(
            "| (no runner on torch's threads here: the C++ host module did not build, or "
            "torch's OpenMP runtime is not the libgomp it links) | | |"
        )
        print(lines[-1], flush=True)
        return lines
    baseline = _torch_adamw(fused=True)(make_params(count, numel, torch.float32))
    ours = core.AdamW(make_params(count, numel, torch.float32), lr=1e-3, state_precision="8bit")
    samples: dict[tuple[str, str], list[float]] = {}
    runners = {"torch's threads (parallel_for)": torch_threads, "the kernel's own threads": 0}
    try:
        for _ in range(2):
            baseline.step()
            ours.step()
        for _ in range(repeats):
            for name, runner in runners.items():
                cpu_kernel.set_share_runner(runner)
                for after, before in (("torch", baseline.step), ("own", ours.step)):
                    before()
                    start = time.perf_counter()
                    ours.step()
                    samples.setdefault((name, after), []).append(time.perf_counter() - start)
    finally:
        cpu_kernel.set_share_runner(torch_threads)
    for name in runners:
        cells = [
            f"{min(times) * 1e3:.2f} / {statistics.median(times) * 1e3:.2f}"
            for times in (samples[(name, "torch")], samples[(name, "own")])
        ]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
        print(lines[-1], flush=True)
    return lines


EIGHT_BIT_HOST_SHAPE = (300, 4096)
"""Many small tensors (the smallest that are quantized), where a step's host work, not
its kernel, takes most of the time."""


def eight_bit_host_rows(repeats: int) -> list[tuple[str, float]]:
    """(row, µs per tensor) of AdamW steps over EIGHT_BIT_HOST_SHAPE, kernels included:
    torch fused, adamkit with full and with 8-bit state on fp32 parameters and on bf16 ones
    rounded stochastically, whole steps and released ones (each parameter stepped alone,
    as gradient release does inside backward, then the optimizer.step() that closes the
    training step and steps nothing released)."""
    count, numel = EIGHT_BIT_HOST_SHAPE
    rows = []
    baseline = _torch_adamw(fused=True)(make_params(count, numel, torch.float32))
    rows.append(("torch AdamW(fused=True), step", _best_seconds(baseline.step, 5, repeats)))
    stochastic = {"stochastic_rounding": True}
    variants = [("", torch.float32, {}), (", bf16 + SR", torch.bfloat16, stochastic)]
    for (suffix, dtype, options), precision in itertools.product(variants, ("full", "8bit")):
        params = make_params(count, numel, dtype)
        optimizer = core.AdamW(params, lr=1e-3, state_precision=precision, **options)
        name = f"core AdamW, state_precision={precision!r}{suffix}"
        rows.append((f"{name}, step", _best_seconds(optimizer.step, 5, repeats)))

        def released_steps(params: list[torch.Tensor] = params, optimizer: Any = optimizer) -> None:
            for p in params:
                step_released_param(optimizer, p)  # what the release hook calls in backward
            # The training step's optimizer.step(): it steps nothing released and closes the
            # step, so the next call is a new training step (without it core warns that a
            # parameter was stepped twice in one). Its share is part of release's cost.
            optimizer.step()

        rows.append((f"{name}, released", _best_seconds(released_steps, 5, repeats)))
    return [(name, seconds / count) for name, seconds in rows]


def eight_bit_host_table(repeats: int) -> list[str]:
    count, numel = EIGHT_BIT_HOST_SHAPE
    compiled_checks(wait=True)  # a step memo's checks, in C++ once built
    lines = [
        f"\nHost work of 8-bit steps: {count} tensors x {numel:,} parameters (fp32; bf16 + SR: "
        f"bf16, rounded stochastically), kernels included (step-memo checks in "
        f"{_checks_language()})\n",
        "| optimizer, how stepped | µs per tensor |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {seconds * 1e6:.1f} |" for name, seconds in eight_bit_host_rows(repeats)]
    print("\n".join(lines), flush=True)
    return lines


KERNEL_TIMING = Path(__file__).with_name("kernel_timing.c")


def _captured_kernel_calls(
    count: int, numel: int
) -> tuple[cpu_kernel.KernelConfig, list[tuple[str, Callable[[], None]]]]:
    """The kernel configuration core.AdamW(state_precision="8bit", fused=True) steps fp32
    parameters with, and its C call and torch's fused AdamW kernel, each over its own
    state of count x numel, as their optimizers make them on a step, to be called again
    alone."""
    recorded: dict[str, tuple[Any, ...]] = {}
    prepared_call, torch_kernel = cpu_kernel.PreparedCall.call, torch._fused_adamw_

    def record_prepared(self: cpu_kernel.PreparedCall, *args: Any) -> None:
        recorded["adamkit kernel"] = (self, *args)
        prepared_call(self, *args)

    def record_torch(*args: Any, **kwargs: Any) -> None:
        recorded["torch kernel"] = (args, kwargs)
        torch_kernel(*args, **kwargs)

    ours = core.AdamW(
        make_params(count, numel, torch.float32), lr=1e-3, state_precision="8bit", fused=True
    )
    theirs = _torch_adamw(fused=True)(make_params(count, numel, torch.float32))
    cpu_kernel.PreparedCall.call, torch._fused_adamw_ = record_prepared, record_torch  # type: ignore[method-assign, assignment]
    try:
        ours.step()
        theirs.step()
    finally:
        cpu_kernel.PreparedCall.call, torch._fused_adamw_ = prepared_call, torch_kernel  # type: ignore[method-assign]
    ours_call, (args, kwargs) = recorded["adamkit kernel"], recorded["torch kernel"]

    # A PreparedCall holds raw addresses, so each call keeps its optimizer (and tensors) alive.
    def adamkit_kernel(optimizer: Any = ours) -> None:
        prepared_call(*ours_call)

    def torch_fused_kernel(optimizer: Any = theirs) -> None:
        torch_kernel(*args, **kwargs)

    calls = [("adamkit kernel", adamkit_kernel), ("torch kernel", torch_fused_kernel)]
    return ours_call[1], calls


def _build_kernel_timing(directory: Path, config: cpu_kernel.KernelConfig) -> Path:
    """examples/kernel_timing.c built as the kernel of config is (flags, -march choices,
    switches)."""
    executable = directory / "kernel_timing"
    flags = [flag for flag in cpu_kernel.BASE_FLAGS if flag != "-shared"]
    sources = [f'-DKERNEL_SOURCE="{cpu_kernel.SOURCE}"', str(KERNEL_TIMING), "-lm"]
    defines, cc = config.defines(), cpu_kernel.compiler() or ()
    commands = [
        [*cc, *flags, *cpu_kernel.EXACT_FLAGS, *arch, *defines, *sources]
        for arch in cpu_kernel.arch_choices()
    ]
    cpu_kernel.build_atomically(commands, executable, "examples/kernel_timing.c", cc)
    return executable


def kernel_only_table(rounds: int) -> list[str]:
    """ns per element of the fused 8-bit AdamW kernel alone: from the C harness (in L2 and
    from memory, beside the floor of the bytes it moves and, on AVX-512 builds, the same
    update over linear codes: the least any code map can cost) and called from Python beside
    torch's fused AdamW kernel, each over 20 x 1M fp32 parameters; `rounds` alternating
    runs, min and median."""
    count, numel = 20, EIGHT_BIT_NUMEL
    samples: dict[str, list[float]] = {}
    config, calls = _captured_kernel_calls(count, numel)
    with tempfile.TemporaryDirectory(prefix="adamkit-kernel-timing-") as name:
        directory = Path(name)
        executable = _build_kernel_timing(directory, config)
        words = directory / "map_words.bin"
        words.write_bytes(cpu_kernel.map_words().numpy().astype("<u4").tobytes())
        shapes = {"in L2 (20 x 2,048)": (2048, 300), "from memory (20 x 1M)": (numel, 1)}
        for _ in range(rounds):
            for where, (size, inner) in shapes.items():
                command = [str(executable), str(words), str(count), str(size), "10", str(inner)]
                output = subprocess.run(command, capture_output=True, text=True, check=True)
                for line in output.stdout.splitlines():
                    kind, value = line.split()
                    if kind == "idle" and value != "0":
                        raise RuntimeError(f"kernel_timing: {value} blocks skipped encoding")
                    if kind != "idle":
                        samples.setdefault(f"{kind} {where}", []).append(float(value))
    for _ in range(rounds):
        for name, call in calls:
            start = _step_clock()
            call()
            seconds = _step_clock() - start
            samples.setdefault(f"{name} from memory (20 x 1M), called from Python", []).append(
                seconds * 1e9 / (count * numel)
            )
    labels = {
        "step": "adamkit 8-bit AdamW step (C harness)",
        "floor": "its bytes moved with no arithmetic (C harness)",
        "linear": "the same update over linear codes, the cheapest 8-bit format (C harness)",
    }
    lines = [
        f"\nThe fused 8-bit AdamW kernel alone, fp32, one thread, {rounds} alternating runs "
        "(examples/kernel_timing.c; Python's calls time the kernels without the rest of a "
        "step)\n",
        "| what | ns/element, min | median |",
        "|---|---:|---:|",
    ]
    for key, values in samples.items():
        kind, _, where = key.partition(" ")
        label = f"{labels[kind]}, {where}" if kind in labels else key
        lines.append(f"| {label} | {min(values):.3f} | {statistics.median(values):.3f} |")
    print("\n".join(lines), flush=True)
    return lines


def composer_contenders() -> list[Contender]:
    """Composer's DecoupledAdamW (the table's baseline), then adamkit's drop-in; empty
    without Composer installed."""
    try:
        from composer.optim import DecoupledAdamW
    except ImportError:
        return []
    import composer_adam

    rows = []
    for amsgrad, traffic in ((False, "fp32"), (True, "fp32 amsgrad")):
        suffix = " amsgrad" if amsgrad else ""
        rows.append(
            Contender(
                f"composer DecoupledAdamW{suffix}",
                lambda p, a=amsgrad: DecoupledAdamW(p, lr=1e-3, amsgrad=a),
                torch.float32,
                traffic,
            )
        )
        rows.append(
            Contender(
                f"composer_adam DecoupledAdamW{suffix}",
                lambda p, a=amsgrad: composer_adam.DecoupledAdamW(p, lr=1e-3, amsgrad=a),
                torch.float32,
                traffic,
            )
        )
    return rows


def make_params(
    count: int, numel: int, dtype: torch.dtype, device: str = "cpu"
) -> list[torch.Tensor]:
    generator = torch.Generator(device).manual_seed(0)
    params = []
    for _ in range(count):
        p = torch.randn(numel, generator=generator, device=device).to(dtype).requires_grad_()
        p.grad = (torch.randn(numel, generator=generator, device=device) * 1e-2).to(dtype)
        params.append(p)
    return params


def memory_bandwidth(numel: int, repeats: int) -> tuple[float, float]:
    """(copy, in-place update) bandwidth in bytes per second, on the benchmark's threads.

    A copy counts 8 bytes per fp32 element (read + write) but also pays for reading the
    target's cache lines before writing them; an in-place a += b (12 bytes: two reads,
    one write to lines just read) is the access pattern of an optimizer step, so it is
    the roofline the table uses.
    """
    source, target = torch.randn(numel), torch.randn(numel)

    def best_seconds(operation: Callable[[], object]) -> float:
        operation()
        best = float("inf")
        for _ in range(repeats):
            start = _step_clock()
            operation()
            best = min(best, _step_clock() - start)
        return best

    copy = 8 * numel / best_seconds(lambda: target.copy_(source))
    in_place = 12 * numel / best_seconds(lambda: target.add_(source))
    return copy, in_place


_step_clock: Callable[[], float] = time.thread_time
"""What steps are timed by: this thread's CPU time, or wall time with several threads."""


def use_threads(threads: int) -> None:
    """Run torch and adamkit's kernels on this many threads, timed accordingly."""
    global _step_clock
    torch.set_num_threads(threads)
    _step_clock = time.thread_time if threads == 1 else time.perf_counter


def _timed_steps(optimizer: torch.optim.Optimizer, steps: int) -> float:
    """Seconds per step: CPU seconds of this thread with one thread (all the work runs on
    it), wall seconds with more."""
    start = _step_clock()
    for _ in range(steps):
        optimizer.step()
    return (_step_clock() - start) / steps


def time_against(
    contender: torch.optim.Optimizer, baseline: torch.optim.Optimizer, steps: int, repeats: int
) -> tuple[float, float]:
    """(seconds per step of the contender, of the baseline): minima over repeats, the two
    timed in alternation so both see the same machine load."""
    for _ in range(2):
        contender.step()
        baseline.step()
    best, best_baseline = float("inf"), float("inf")
    for _ in range(repeats):
        best = min(best, _timed_steps(contender, steps))
        best_baseline = min(best_baseline, _timed_steps(baseline, steps))
    return best, best_baseline


@dataclass(frozen=True)
class Table:
    """One table of the report: contenders against a baseline on one shape."""

    title: str
    contenders: list[Contender]
    count: int
    numel: int
    baseline: Contender


@dataclass(frozen=True)
class Measurement:
    """One contender in one run: seconds per step, the ratio to the baseline timed beside
    it (kept per run, so a median ratio compares like with like), cold compile time."""

    seconds: float
    ratio: float
    compile_seconds: float


def measure_table(table: Table, bandwidth: float, steps: int, repeats: int) -> list[Measurement]:
    """Time each contender in alternation with the table's baseline; print rows as they come."""
    print("\n".join(header(table)), flush=True)
    baseline_optimizer = table.baseline.make(
        make_params(table.count, table.numel, table.baseline.dtype)
    )
    measurements = []
    for contender in table.contenders:
        compiled_before = dict(cpu_kernel.compile_seconds)
        optimizer = contender.make(make_params(table.count, table.numel, contender.dtype))
        seconds, baseline_seconds = time_against(optimizer, baseline_optimizer, steps, repeats)
        new_builds = cpu_kernel.compile_seconds.keys() - compiled_before.keys()
        measurement = Measurement(
            seconds,
            seconds / baseline_seconds,
            sum(cpu_kernel.compile_seconds[config] for config in new_builds),
        )
        measurements.append(measurement)
        print(row(table, contender, measurement, bandwidth), flush=True)
        del optimizer
    return measurements


def header(table: Table, runs: int = 1) -> list[str]:
    total = table.count * table.numel
    which = f", median of {runs} runs" if runs > 1 else ""
    return [
        f"\n{table.title}: {table.count} tensors x {table.numel:,} parameters "
        f"({total / 1e6:.0f}M){which}\n",
        f"| optimizer | ms/step | M params/s | % of roofline | vs {table.baseline.name} "
        "| compile s |",
        "|---|---:|---:|---:|---:|---:|",
    ]


def row(table: Table, contender: Contender, measurement: Measurement, bandwidth: float) -> str:
    rate = table.count * table.numel / measurement.seconds
    roofline = bandwidth / BYTES_PER_PARAM[contender.traffic]
    cells = [
        contender.name,
        f"{measurement.seconds * 1e3:.2f}",
        f"{rate / 1e6:.0f}",
        f"{100 * rate / roofline:.0f}",
        f"{measurement.ratio:.2f}",
        f"{measurement.compile_seconds:.2f}" if measurement.compile_seconds else "-",
    ]
    return "| " + " | ".join(cells) + " |"


def median_table(table: Table, runs: list[list[Measurement]], bandwidth: float) -> list[str]:
    """The table with each cell the median over runs (compile time: the first, cold run)."""
    lines = header(table, len(runs))
    for i, contender in enumerate(table.contenders):
        measurement = Measurement(
            statistics.median(run[i].seconds for run in runs),
            statistics.median(run[i].ratio for run in runs),
            runs[0][i].compile_seconds,
        )
        lines.append(row(table, contender, measurement, bandwidth))
    return lines


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {vector_paths()}"


def vector_paths() -> str:
    """Which of the fused CPU kernel's vector paths this CPU takes: the ratios to torch
    differ by several times between them (README, "On CPUs without AVX-512")."""
    path = cpu_kernel.vector_path()
    if path == "avx512":
        bf16 = "with" if "avx512_bf16" in cpu_kernel._cpu_flags() else "without"
        return f"kernels: AVX-512 ({bf16} AVX512-BF16)"
    if path == "avx2":
        return "kernels: AVX2 (no AVX-512: 8-bit coding and bf16 rounding eight lanes wide)"
    if path == "software":
        return "kernels: software (8-bit coding and 16-bit rounding one value at a time)"
    return "kernels: unavailable (this ADAMKIT_PORTABLE_KERNELS is refused)"


# -- host time of a Triton-backend step ------------------------------------------------------

HOST_TARGETS = {"300 tensors": 200e-6, "gradient release, per parameter": 20e-6}
"""Targets for the host work of a step (issue #14)."""


class _NoLaunch:
    """Stands in for the Triton kernel: a launch that does nothing, so only the host
    work of a step (checks, plans, arguments) is timed."""

    def __getitem__(self, grid: object) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def _best_seconds(operation: Callable[[], object], inner: int, repeats: int) -> float:
    """Minimum over repeats of the mean wall time of `inner` calls (host work only)."""
    for _ in range(3):
        operation()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            operation()
        best = min(best, (time.perf_counter() - start) / inner)
    return best


def host_time_rows(device: str, repeats: int, wait: bool) -> list[tuple[str, float, float]]:
    """(row, seconds of optimizer.step(), seconds in the Triton backend) with the kernel
    launches stubbed out, for AdamW on fp32 tensors of 4096 elements (the smallest that
    are quantized), with full-precision and 8-bit state."""
    import core.backends
    from core.backends import triton as triton_backend

    # A step memo's checks run in C++ once built (in the background, ~15 s on first use):
    # a full run waits for them, --quick times whichever are ready (the header says which).
    compiled_checks(wait=wait)
    saved = (
        triton_backend._step_kernel,
        triton_backend._quantized_step_kernel,
        core.backends.TRITON_DEVICE_TYPES,
    )
    triton_backend._step_kernel = _NoLaunch()  # type: ignore[assignment]
    triton_backend._quantized_step_kernel = _NoLaunch()  # type: ignore[assignment]
    core.backends.TRITON_DEVICE_TYPES = saved[2] | {device}
    try:
        rows = []
        for precision, prefix in (("full", ""), ("8bit", "8-bit state, ")):
            counts = (30, 300) if precision == "full" else (300,)
            for count in counts:
                params = make_params(count, 4096, torch.float32, device)
                optimizer = core.AdamW(params, lr=1e-3, fused=True, state_precision=precision)
                optimizer.step()
                step = _best_seconds(optimizer.step, 20, repeats)
                backend = _best_seconds(_backend_call(optimizer, triton_backend), 20, repeats)
                rows.append((f"{prefix}{count} tensors", step, backend))
            params = make_params(300, 4096, torch.float32, device)
            optimizer = core.AdamW(
                params, lr=1e-3, fused=True, gradient_release=True, state_precision=precision
            )

            def released_steps(
                params: list[torch.Tensor] = params, optimizer: Any = optimizer
            ) -> None:
                for p in params:
                    step_released_param(optimizer, p)  # what the release hook calls in backward
                # The training step's optimizer.step(): it steps nothing released and closes
                # the step (without it core warned that hooks stepped with no step after).
                optimizer.step()
                optimizer.zero_grad(set_to_none=False)  # a new training step: hooks step again

            with warnings.catch_warnings():
                # Its one-time note that no release hooks are registered: this harness calls
                # what they call, without a backward to run them.
                warnings.filterwarnings("ignore", "AdamW: param group", RuntimeWarning)
                released_steps()
            per_param = _best_seconds(released_steps, 2, repeats) / len(params)
            call = _backend_call(optimizer, triton_backend, params[0])
            backend = _best_seconds(call, 200, repeats)
            rows.append((f"{prefix}gradient release, per parameter", per_param, backend))
        return rows
    finally:
        (
            triton_backend._step_kernel,  # type: ignore[assignment]
            triton_backend._quantized_step_kernel,  # type: ignore[assignment]
            core.backends.TRITON_DEVICE_TYPES,
        ) = saved


def _backend_call(
    optimizer: torch.optim.Optimizer, triton_backend: object, param: torch.Tensor | None = None
) -> Callable[[], None]:
    """The Triton backend's call from one step of optimizer, to repeat on its own."""
    calls: list[tuple] = []
    original = triton_backend.adam_step  # type: ignore[attr-defined]

    def record(*args: object) -> None:
        checked = current_checked_step()  # what the optimizer vouched for, and its key
        calls.append((args, checked, None if checked is None else checked.plan_key))
        original(*args)

    triton_backend.adam_step = record  # type: ignore[attr-defined]
    try:
        optimizer.step(param=param) if param is not None else optimizer.step()  # type: ignore[call-arg]
    finally:
        triton_backend.adam_step = original  # type: ignore[attr-defined]
    args, checked, plan_key = calls[-1]

    def call() -> None:
        if checked is not None:
            checked.plan_key = plan_key
        with checking(checked):
            original(*args)

    return call


def _checks_language() -> str:
    return "Python" if host_checks() is PYTHON_CHECKS else "C++"


def host_time_table(device: str, repeats: int, wait: bool = True) -> list[str]:
    rows = host_time_rows(device, repeats, wait)  # first: it may wait for the C++ checks
    lines = [
        f"\nHost time of a Triton-backend step, kernel launch stubbed out ({device} tensors, "
        f"AdamW, fp32, 4096 elements each; step-memo checks in {_checks_language()})\n",
        "| step | µs per step | of which Triton backend µs | target µs |",
        "|---|---:|---:|---:|",
    ]
    for name, step, backend in rows:
        target = HOST_TARGETS.get(name)
        cells = [name, f"{step * 1e6:.0f}", f"{backend * 1e6:.0f}"]
        cells.append(f"{target * 1e6:.0f}" if target else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# -- GPU ----------------------------------------------------------------------------------------

GPU_SHAPES = [(20, 1_000_000), (200, 100_000), (1, 100_000_000)]
GPU_ALGORITHMS = [(name, make, traffic) for name, make, traffic in CORE_ALGORITHMS]


def gpu_contenders(dtype: torch.dtype) -> list[Contender]:
    """torch's foreach AdamW, every core algorithm on the Triton backend, optimi's Triton
    AdamW where installed; bf16 runs use Kahan compensation (core's default)."""
    bf16 = dtype == torch.bfloat16
    rows = [
        Contender(
            "torch AdamW foreach",
            _torch_adamw(foreach=True),
            dtype,
            "bf16" if bf16 else "fp32",
        )
    ]
    for name, make, traffic in GPU_ALGORITHMS:
        if bf16 and "amsgrad" in name:
            continue
        label = f"{name} Triton" + (" (Kahan)" if bf16 else "")
        rows.append(
            Contender(
                label,
                lambda p, m=make: m(p, fused=True),
                dtype,
                "bf16 kahan" if bf16 else traffic,
            )
        )
    try:
        import optimi
    except ImportError:
        return rows
    rows.append(
        Contender(
            "optimi AdamW triton" + (" (Kahan)" if bf16 else ""),
            lambda p: optimi.AdamW(p, lr=1e-3, triton=True),
            dtype,
            "bf16 kahan" if bf16 else "fp32",
        )
    )
    return rows


def cuda_copy_bandwidth(numel: int, repeats: int) -> float:
    """Bytes per second of a device-to-device copy (read + write), best of repeats."""
    source = torch.empty(numel, device="cuda")
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 8 * numel / best


def _cuda_seconds(optimizer: torch.optim.Optimizer, steps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        optimizer.step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / steps


def cuda_time_against(
    contender: torch.optim.Optimizer, baseline: torch.optim.Optimizer, steps: int, repeats: int
) -> tuple[float, float]:
    """(seconds per step of the contender, of the baseline) by CUDA events, minima over
    repeats, timed in alternation (warm-up steps compile the Triton kernels first)."""
    for _ in range(2):
        contender.step()
        baseline.step()
    torch.cuda.synchronize()
    best, best_baseline = float("inf"), float("inf")
    for _ in range(repeats):
        best = min(best, _cuda_seconds(contender, steps))
        best_baseline = min(best_baseline, _cuda_seconds(baseline, steps))
    return best, best_baseline


def gpu_header(label: str, count: int, numel: int) -> list[str]:
    return [
        f"\nGPU {label}: {count} tensors x {numel:,} parameters",
        "| optimizer | ms/step | vs torch fused | % of copy bandwidth |",
        "|---|---:|---:|---:|",
    ]


def gpu_row(
    name: str, seconds: float, baseline_seconds: float, bytes_per_step: float, copy: float
) -> str:
    """One row: the step's bytes over its time, as a share of the copy bandwidth."""
    cells = [
        name,
        f"{seconds * 1e3:.3f}",
        f"{seconds / baseline_seconds:.2f}",
        f"{100 * bytes_per_step / seconds / copy:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def gpu_tables(quick: bool) -> list[str]:
    """ms/step, ratio to torch's fused CUDA AdamW and % of copy bandwidth, every shape;
    each line printed as it is measured, and returned."""
    shapes = [(count, numel // 100) for count, numel in GPU_SHAPES] if quick else GPU_SHAPES
    steps, repeats = (3, 2) if quick else (10, 5)
    copy = cuda_copy_bandwidth(256 * 2**20, repeats=5)
    lines = [
        f"\n{torch.cuda.get_device_name()}: copy bandwidth {copy / 1e9:.0f} GB/s "
        "(device-to-device, read + write)"
    ]
    print(lines[0], flush=True)
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        baseline = Contender("torch AdamW fused (CUDA)", _torch_adamw(fused=True), dtype, label)
        for count, numel in shapes:
            lines += gpu_header(label, count, numel)
            print("\n".join(lines[-3:]), flush=True)
            base = baseline.make(make_params(count, numel, dtype, "cuda"))
            for contender in [baseline, *gpu_contenders(dtype)]:
                optimizer = contender.make(make_params(count, numel, dtype, "cuda"))
                seconds, baseline_seconds = cuda_time_against(optimizer, base, steps, repeats)
                bytes_per_step = count * numel * BYTES_PER_PARAM[contender.traffic]
                lines.append(
                    gpu_row(contender.name, seconds, baseline_seconds, bytes_per_step, copy)
                )
                print(lines[-1], flush=True)
                del optimizer
                torch.cuda.empty_cache()
            del base
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller tensors")
    # The "only" tables exclude each other (argparse names the pair when two are given):
    # each used to win over the others silently, --kernel-only over all.
    only = parser.add_mutually_exclusive_group()
    only.add_argument(
        "--composer-only",
        action="store_true",
        help="only the Composer tables (20 x 1M; each printed as measured, then in the summary)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="repeat every table this many times and report the median of each cell "
        "(single runs on a shared machine can be disturbed for seconds at a time)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (default) or cuda: the GPU tables instead of the CPU ones",
    )
    only.add_argument("--host-time-only", action="store_true", help="only the host-time table")
    only.add_argument(
        "--eight-bit-only", action="store_true", help="only the 8-bit state table (20 x 1M)"
    )
    only.add_argument(
        "--kernel-only",
        action="store_true",
        help="only the fused 8-bit AdamW kernel alone (C harness and direct calls), one thread",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch and adamkit (default 1; more are timed by wall time)",
    )
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"argument --runs: invalid value {args.runs}; allowed: an integer >= 1")
    if args.threads < 1:
        parser.error(f"argument --threads: invalid value {args.threads}; allowed: an integer >= 1")
    if args.device not in ("cpu", "cuda"):
        parser.error(f"argument --device: invalid value {args.device!r}; allowed: 'cpu', 'cuda'")
    if args.composer_only and importlib.util.find_spec("composer") is None:
        # Without Composer its tables are empty: the run would time nothing and exit 0.
        parser.error(
            "argument --composer-only: Composer is not installed in this environment; run it "
            "in the Composer one: .venv-composer/bin/python examples/benchmark.py --composer-only"
        )
    single_tables = {
        "--kernel-only": args.kernel_only,
        "--eight-bit-only": args.eight_bit_only,
        "--host-time-only": args.host_time_only,
    }
    single_table = next((flag for flag, given in single_tables.items() if given), None)
    if single_table and args.runs != 1:  # these tables take their own repeats
        parser.error(f"argument --runs: invalid value {args.runs} with {single_table}; allowed: 1")
    if args.device == "cuda" and single_table in ("--kernel-only", "--eight-bit-only"):
        # CPU kernels: the CPU tables ran, whatever --device said
        parser.error(f"argument --device: invalid value 'cuda' with {single_table}; allowed: 'cpu'")
    # What this machine has comes after what the flags mean together: the clearer error first.
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "argument --device: invalid value 'cuda': torch finds no CUDA device here "
            "(torch.cuda.is_available() is False); allowed: 'cpu'"
        )
    if args.kernel_only and args.threads != 1:
        parser.error(
            f"argument --threads: invalid value {args.threads} with --kernel-only; allowed: 1"
        )
    use_threads(args.threads)
    threads = "1 thread" if args.threads == 1 else f"{args.threads} threads (wall time)"
    if single_table or args.device != "cuda":  # ratios depend on the vector path (host
        # time on the CPU's): the header comes first, before the host-time table too
        print(f"torch {torch.__version__}, {machine()}, {threads}", flush=True)
    if args.kernel_only:
        kernel_only_table(rounds=3 if args.quick else 15)
        return
    if args.eight_bit_only:
        shape = (20, EIGHT_BIT_QUICK) if args.quick else (20, EIGHT_BIT_NUMEL)
        eight_bit_table(*shape, steps=3, repeats=2 if args.quick else 5)
        if args.threads > 1:
            thread_handoff_table(*shape, repeats=3 if args.quick else 15)
        eight_bit_host_table(repeats=2 if args.quick else 10)
        return
    host_lines = []
    if not args.composer_only:
        host_lines = host_time_table(
            args.device, repeats=3 if args.quick else 10, wait=not args.quick
        )
        print("\n".join(host_lines), flush=True)
    if args.host_time_only:
        return
    if args.device == "cuda":
        print(f"torch {torch.__version__}", flush=True)
        gpu_tables(args.quick)  # prints each line as it is measured
        return
    # A cold kernel cache, so compile time is what a first run on a new machine pays;
    # deleted when this function returns (it held a library per configuration timed).
    cold_cache = tempfile.TemporaryDirectory(prefix="adamkit-kernels-")
    os.environ["ADAMKIT_KERNEL_CACHE"] = cold_cache.name
    if args.quick:
        shapes, steps, repeats = [(20, 100_000), (200, 10_000)], 3, 2
    else:
        shapes, steps, repeats = [(20, 1_000_000), (200, 100_000)], 3, 12
    torch_fused = Contender("torch fused", _torch_adamw(fused=True), torch.float32, "")
    tables = []
    if not args.composer_only:
        for title, contenders in (("fp32", fp32_contenders), ("bf16", bf16_contenders)):
            tables += [Table(title, contenders(), *shape, torch_fused) for shape in shapes]
    composer_rows = composer_contenders()
    for baseline, ours in zip(composer_rows[::2], composer_rows[1::2], strict=True):
        tables.append(Table("Composer", [baseline, ours], *shapes[0], baseline))
    eight_bit_shape = (20, EIGHT_BIT_QUICK if args.quick else EIGHT_BIT_NUMEL)
    eight_bit_lines = []
    if not args.composer_only:
        eight_bit_lines = eight_bit_table(*eight_bit_shape, steps, repeats)
        if args.threads > 1:
            eight_bit_lines += thread_handoff_table(*eight_bit_shape, repeats)
        eight_bit_lines += eight_bit_host_table(repeats)
    bandwidths: list[float] = []
    results: list[list[list[Measurement]]] = [[] for _ in tables]
    for run in range(args.runs):
        if args.runs > 1:
            print(f"\nrun {run + 1} of {args.runs}")
        copy, bandwidth = memory_bandwidth(shapes[0][0] * shapes[0][1], repeats=10)
        bandwidths.append(bandwidth)
        print(
            f"memory bandwidth: copy {copy / 1e9:.1f} GB/s, in-place a += b "
            f"{bandwidth / 1e9:.1f} GB/s (the roofline); roofline "
            + ", ".join(
                f"{name} {bandwidth / size / 1e6:.0f} M params/s ({size} B)"
                for name, size in BYTES_PER_PARAM.items()
            )
        )
        for table, table_results in zip(tables, results, strict=True):
            table_results.append(measure_table(table, bandwidth, steps, repeats))
    bandwidth = statistics.median(bandwidths)
    report = [f"\nmedian in-place bandwidth {bandwidth / 1e9:.1f} GB/s"] if args.runs > 1 else []
    for table, table_results in zip(tables, results, strict=True):
        report += median_table(table, table_results, bandwidth)
    print("\n".join(eight_bit_lines + report + host_lines))


if __name__ == "__main__":
    main()
