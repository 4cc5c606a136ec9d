"""The Triton kernels compiled for real GPU targets, on a machine without a GPU.

Every specialisation a launch can ask for is enumerated from the code that chooses it:
each case of the test table (every algorithm x decay mode x AMSGrad/clip), at its lr and
at lr = 0, is stepped past ADOPT's first call and RAdam's rectification; the coefficients
of each step go through kernel_arguments as the backend sends them, and launch_constexprs
adds dtype, Kahan, alignment and lerp form, and rounding_switches the stochastic rounding
each dtype gets. Each is compiled (in a worker process:
Triton's interpreter is on in this one) for sm_80, sm_90 and, where this Triton knows
it, sm_100, and its PTX and cubin checked: no register spills, no fused multiply-adds
but L2's (g + λθ rounded once, as torch rounds it), no flush to zero, and for
16-byte-aligned launches 128-bit loads and stores for every tensor the configuration
moves.

CI compiles one member of each family (dtype x alignment x algorithm kind), chosen so
every switch value occurs; ADAMKIT_ALL_SPECIALIZATIONS=1 (or `make compile-check`)
compiles them all.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

import core
from core.coefficients import AdamStepCoefficients
from tests.core.cases import trajectory_cases
from tests.processes import ROOT, worker_env

ARCHS = (80, 90, 100)
STEPS = 8
"""Past ADOPT's first call (INIT) and RAdam's first rectified step (t = 6)."""
LOW_PRECISION = (torch.bfloat16, torch.float16)
VECTOR_BYTES = 16
FULL_SWEEP = os.environ.get("ADAMKIT_ALL_SPECIALIZATIONS", "") not in ("", "0")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


def _switch_sets() -> set[tuple[str, tuple[tuple[str, bool], ...]]]:
    """(algorithm, switches) of every step the table's optimizers take, Kahan on and off."""
    from core.backends.kernel_arguments import adam_arguments, adopt_arguments

    found = set()
    for case in trajectory_cases():
        for lr_zero in (False, True):
            param = torch.nn.Parameter(torch.linspace(-1, 1, 3))
            optimizer = case.make([param], foreach=False)
            if lr_zero:  # as a schedule reaches it
                optimizer.param_groups[0]["lr"] = 0.0
            for step in range(STEPS):
                param.grad = torch.linspace(-0.5, 0.3, 3) * (step + 1)
                optimizer.step()
                c = optimizer.last_step_coefficients(param)
                for kahan in (False, True):
                    if isinstance(c, AdamStepCoefficients):
                        arguments = adam_arguments(c, kahan)
                    else:
                        arguments = adopt_arguments(c, kahan)  # type: ignore[arg-type]
                    found.add((arguments.algorithm, arguments.switches))
    return found


def _roundings(switches: dict[str, bool], dtype: torch.dtype) -> list[bool]:
    """STOCHASTIC values a launch with these switches gets for parameters of dtype, as the
    backend chooses them (rounding_switches) from what the optimizers hand it: a Kahan
    buffer, a StochasticRounding or None (never a Kahan buffer for fp32)."""
    from core.backends.precision import StochasticRounding
    from core.backends.triton import rounding_switches

    found = []
    for comp in (None, torch.zeros(1), StochasticRounding(0, 0)):
        kahan, stochastic = rounding_switches(comp, dtype)
        if kahan and dtype not in LOW_PRECISION:
            continue
        if kahan == switches["KAHAN"] and stochastic not in found:
            found.append(stochastic)
    return found


@functools.cache
def launchable_specializations() -> list[dict[str, Any]]:
    """Every constexpr combination the Triton backend can launch, DTYPE by name. Kahan
    compensation and stochastic rounding exist only for 16-bit parameters (the optimizers
    never give fp32 either)."""
    from core.backends.triton import TRITON_DTYPES, launch_constexprs

    specs = []
    for algorithm, switches in sorted(_switch_sets()):
        for dtype in TRITON_DTYPES:
            for stochastic in _roundings(dict(switches), dtype):
                for aligned in (True, False):
                    for small_weight in (True, False):
                        spec = launch_constexprs(
                            dtype, aligned, algorithm, small_weight, dict(switches), stochastic
                        )
                        specs.append({**spec, "DTYPE": str(dtype).removeprefix("torch.")})
    return specs


def _moment_sets() -> dict[tuple[str, bool], dict[str, bool]]:
    """Per (algorithm, AMSGrad), which moments state_precision="8bit" stores in 8 bits (the
    kernel's M_8BIT, V_8BIT, V_MAX_8BIT): moment_switches of the moments each case's
    optimizer hands its backend for a parameter large enough to be quantized."""
    from core.backends.triton import moment_switches
    from core.quantization import MIN_QUANTIZED_NUMEL, moment_view

    found: dict[tuple[str, bool], dict[str, bool]] = {}
    for case in trajectory_cases():
        param = torch.nn.Parameter(torch.linspace(-1, 1, MIN_QUANTIZED_NUMEL))
        optimizer = case.make([param], foreach=False, state_precision="8bit")
        param.grad = torch.ones_like(param)
        optimizer.step()
        state = optimizer.state[param]
        moments = [
            [moment_view(state, key)] if key in state or f"{key}_codes" in state else None
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        ]
        algorithm = "adopt" if isinstance(optimizer, core.ADOPT) else "adam"
        switches = moment_switches([None, None, *moments])
        key = (algorithm, moments[2] is not None)
        assert found.setdefault(key, switches) == switches, (case.id, switches)
    return found


@functools.cache
def launchable_quantized_specializations() -> list[dict[str, Any]]:
    """Every constexpr combination of the 8-bit state kernel (_quantized_step_kernel):
    the switch sets, dtypes and lerp forms of the full-precision kernel (it has no
    ALIGNED), with each algorithm's 8-bit moments (_moment_sets), "kernel" naming it for
    the worker."""
    from core.backends.triton import TRITON_DTYPES, quantized_launch_constexprs

    specs = []
    moment_sets = _moment_sets()
    for algorithm, switches in sorted(_switch_sets()):
        on = dict(switches)
        moments = moment_sets[algorithm, on["AMSGRAD"]]
        for dtype in TRITON_DTYPES:
            for stochastic in _roundings(on, dtype):
                for small_weight in (True, False):
                    spec = quantized_launch_constexprs(
                        dtype, algorithm, small_weight, on, moments, stochastic
                    )
                    specs.append(
                        {**spec, "DTYPE": str(dtype).removeprefix("torch."), "kernel": "quantized"}
                    )
    return specs


def ci_selection(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One member of each family (DTYPE, ALIGNED, ADOPT), picked greedily so that every
    value of every switch is compiled at least once, then more members while a value is
    still missing."""
    features = {(name, value) for spec in specs for name, value in spec.items()}
    chosen: list[dict[str, Any]] = []

    def gain(spec: dict[str, Any]) -> int:
        return len(set(spec.items()) & features)

    families: dict[tuple, list[dict[str, Any]]] = {}
    for spec in specs:
        family = (spec["DTYPE"], spec.get("ALIGNED"), spec["ADOPT"])
        families.setdefault(family, []).append(spec)
    for members in families.values():
        best = max(members, key=lambda s: (gain(s), sum(v is True for v in s.values())))
        chosen.append(best)
        features -= set(best.items())
    while features:
        best = max(specs, key=gain)
        chosen.append(best)
        features -= set(best.items())
    return chosen


def expected_traffic(spec: dict[str, Any]) -> tuple[int, int]:
    """(tensors read, tensors written) per element, from the README's bytes table: g, m, v
    read and m, v written; θ read for L2 or an update and written by an update; Kahan's k
    with θ; v_max both ways; ADOPT's first call reads g (θ for L2) and writes v only."""
    init = spec["INIT"]
    theta_read = spec["L2"] or (spec["UPDATE"] and not init)
    theta_written = spec["UPDATE"] and not init
    kahan = spec["KAHAN"]
    reads = 1 + (0 if init else 2) + theta_read * (1 + kahan) + spec["AMSGRAD"]
    writes = (1 if init else 2) + theta_written * (1 + kahan) + spec["AMSGRAD"]
    return reads, writes


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Compile CI's selection (or every specialisation) for every architecture, once."""
    specs = launchable_specializations()
    quantized = launchable_quantized_specializations()
    request = {
        "archs": list(ARCHS),
        "specs": specs if FULL_SWEEP else ci_selection(specs),
        "quantized_specs": quantized if FULL_SWEEP else ci_selection(quantized),
        "jobs": os.cpu_count() if FULL_SWEEP else 1,
    }
    # A fresh cache: every kernel is really compiled, not found from an earlier run.
    env = {**worker_env(), "TRITON_CACHE_DIR": str(tmp_path_factory.mktemp("triton-cache"))}
    result = subprocess.run(
        [sys.executable, "-m", "tests.core.triton_compile_worker"],
        input=json.dumps(request),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    output = json.loads(result.stdout)
    step = [r for r in output["results"] if r["spec"].get("kernel", "step") == "step"]
    quantized = [r for r in output["results"] if r["spec"].get("kernel") == "quantized"]
    return {**output, "results": step, "quantized_results": quantized, "requested": request}


def test_the_enumeration_covers_every_switch_of_the_kernel() -> None:
    """The table's optimizers reach every switch value (each switch on and off), so the
    enumeration misses no kernel code path."""
    from core.backends import triton as backend

    specs = launchable_specializations()
    annotations = backend._step_kernel.fn.__annotations__
    constexprs = {name for name, kind in annotations.items() if "constexpr" in str(kind)}
    assert set(specs[0]) == constexprs
    for name in constexprs - {"BLOCK"}:
        values = {spec[name] for spec in specs}
        assert len(values) >= 2, (name, values)


def test_the_quantized_enumeration_covers_every_switch_of_its_kernel() -> None:
    from core.backends import triton as backend

    specs = launchable_quantized_specializations()
    annotations = backend._quantized_step_kernel.fn.__annotations__
    constexprs = {name for name, kind in annotations.items() if "constexpr" in str(kind)}
    assert set(specs[0]) - {"kernel"} == constexprs
    for name in constexprs - {"QBLOCK", "QBLOCKS", "M_8BIT"}:
        values = {spec[name] for spec in specs}
        assert len(values) >= 2, (name, values)
    # Every algorithm keeps m in 8 bits (the kernel would also take a full-precision m).
    assert {spec["M_8BIT"] for spec in specs} == {True}


@pytest.mark.parametrize("kernel", ["step", "quantized"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_selected_specialization_compiles_without_spills(
    compiled: dict[str, Any], arch: int, kernel: str
) -> None:
    if str(arch) in compiled["unknown"]:
        if arch == 100:
            pytest.skip(f"Triton {compiled['triton']} does not compile for sm_100")
        pytest.fail(f"sm_{arch}: {compiled['unknown'][str(arch)]}")
    key = "results" if kernel == "step" else "quantized_results"
    results = [r for r in compiled[key] if r["arch"] == arch]
    requested = compiled["requested"]["specs" if kernel == "step" else "quantized_specs"]
    assert len(results) == len(requested)
    for result in results:
        assert "error" not in result, result
        assert result["stack"] == 0 and result["local"] == 0, result  # no spills
        # every multiply and add rounds as written, but L2's g + λθ, rounded once as
        # torch's add(alpha=) rounds it: one fma per element a thread steps, per place
        # the kernel applies the rule (the step kernel's full and partial block)
        assert result["fma"] == _l2_fmas(result["spec"], result["num_warps"], kernel), result
        if compiled["keeps_subnormals"]:
            assert result["ftz"] == 0, result
        else:  # Triton 3.3: libdevice's sqrt and division flush subnormals (README);
            # stochastic rounding's floor (cvt.rmi) does too, but its input, a value scaled
            # to its 16-bit spacing, is at least 2^-16 and never subnormal.
            allowed = {"sqrt.rn.ftz.f32", "div.rn.ftz.f32", "cvt.rmi.ftz.f32.f32"}
            assert set(result["ftz_ops"]) <= allowed, result


def _l2_fmas(spec: dict[str, Any], num_warps: int, kernel: str) -> int:
    """The fused multiply-adds a specialisation should hold: L2's, nothing else."""
    if not spec["L2"]:
        return 0
    elements = spec["BLOCK"] if kernel == "step" else spec["QBLOCK"] * spec["QBLOCKS"]
    places = 2 if kernel == "step" else 1
    return places * elements // (32 * num_warps)


@pytest.mark.parametrize("arch", ARCHS)
def test_aligned_launches_move_every_tensor_128_bits_at_a_time(
    compiled: dict[str, Any], arch: int
) -> None:
    """Full blocks of 16-byte-aligned tensors: exactly the tensors the configuration moves,
    each as 128-bit loads and stores (fp32, bf16 and fp16); unaligned launches never
    assume alignment."""
    results = [r for r in compiled["results"] if r["arch"] == arch and "error" not in r]
    if not results:
        pytest.skip(f"nothing compiled for sm_{arch} (see the compile test)")
    dtypes = set()
    for result in results:
        spec, accesses = result["spec"], result["accesses"]
        element = 4 if spec["DTYPE"] == "float32" else 2
        per_tensor = spec["BLOCK"] * element // (result["num_warps"] * 32 * VECTOR_BYTES)
        loads, stores = accesses.get("ld.v4.b32", 0), accesses.get("st.v4.b32", 0)
        if spec["ALIGNED"]:
            reads, writes = expected_traffic(spec)
            assert (loads, stores) == (reads * per_tensor, writes * per_tensor), result
            dtypes.add(spec["DTYPE"])
        else:
            assert loads == stores == 0, result
    assert dtypes == {"float32", "bfloat16", "float16"}
