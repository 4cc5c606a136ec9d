"""Compile the Triton step kernel ahead of time for GPU targets, on a machine without a GPU.

Run as its own process (`python -m tests.core.triton_compile_worker < request.json`),
because the test process imports Triton with TRITON_INTERPRET=1, under which kernels
are interpreted and cannot be compiled. Reads {"archs": [80, ...], "specs": [{constexpr
name: value, "DTYPE": "float32" | "bfloat16" | "float16"}, ...], "jobs": N} and prints
one JSON object per spec and architecture: the compiler's error, or what the tests
assert on (registers, spills, global memory instructions, FMAs, flushes to zero). A spec
with "kernel": "quantized" compiles the 8-bit state kernel (_quantized_step_kernel).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from core.backends import triton as backend

GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)\s")
RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)")


KERNELS = {
    "step": (backend._step_kernel, backend.RUNTIME_ARGUMENT_TYPES),
    "quantized": (backend._quantized_step_kernel, backend.QUANTIZED_RUNTIME_ARGUMENT_TYPES),
}
"""The kernels by the name a request gives ("kernel", default "step"), with the types of
their runtime arguments (the others are fp32 scalars)."""


def _signature(name: str) -> dict[str, str]:
    kernel, types = KERNELS[name]
    return {
        param.name: "constexpr" if param.is_constexpr else types.get(param.name, "fp32")
        for param in kernel.params
    }


def _compile(constexprs: dict[str, Any], arch: int, name: str = "step") -> Any:
    kernel = KERNELS[name][0]
    signature = _signature(name)
    # torch allocates the metadata and code tables 16-byte aligned, and Triton's launcher
    # then specialises their pointers so
    pointers = [i for i, kind in enumerate(signature.values()) if kind.startswith("*")]
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs=constexprs,
        attrs={(i,): [["tt.divisibility", 16]] for i in pointers},
    )
    options = backend.compile_options("cuda")
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _resources(cubin: bytes) -> dict[str, int]:
    """Registers and spill memory from the cubin (the driver reports them only on load)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run(
            [tool, "--dump-resource-usage", file.name], capture_output=True, text=True, check=True
        ).stdout
    found = RESOURCES.search(report)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's report: {report}")
    registers, stack, local = map(int, found.groups())
    return {"registers": registers, "stack": stack, "local": local}


def _accesses(ptx: str) -> dict[str, int]:
    """Global loads and stores by kind: 'ld.v4.b32' for a 128-bit load, 'st.b16' for a
    16-bit store (cache hints dropped)."""
    counts: dict[str, int] = {}
    for op, suffixes in GLOBAL_ACCESS.findall(ptx):
        parts = [s for s in suffixes.split(".") if s and "::" not in s]
        name = ".".join([op, *parts])
        counts[name] = counts.get(name, 0) + 1
    return counts


def compile_one(job: tuple[dict[str, Any], int]) -> dict[str, Any]:
    request, arch = job
    name = request.get("kernel", "step")
    spec = {key: value for key, value in request.items() if key != "kernel"}
    constexprs = {**spec, "DTYPE": getattr(tl, spec["DTYPE"])}
    try:
        compiled = _compile(constexprs, arch, name)
    except Exception as error:  # the test reports what the compiler said
        return {"arch": arch, "spec": request, "error": f"{type(error).__name__}: {error}"}
    ptx = compiled.asm["ptx"]
    instructions = [line.split()[0] for line in ptx.splitlines() if line.strip()[:1].isalpha()]
    return {
        "arch": arch,
        "spec": request,
        **_resources(compiled.asm["cubin"]),
        "accesses": _accesses(ptx),
        # elementwise: sm_100's packed fma.rn.f32x2 does two
        "fma": sum(2 if op.endswith("x2") else 1 for op in instructions if op.startswith("fma.")),
        "fma_ops": sorted({op for op in instructions if op.startswith("fma.")}),
        "ftz": sum(".ftz" in op for op in instructions),
        "ftz_ops": sorted({op for op in instructions if ".ftz" in op}),
        "num_warps": compiled.metadata.num_warps,
    }


@triton.jit
def _probe(x):
    tl.store(x, 1.0)


def known(arch: int) -> str | None:
    """None if this Triton compiles for the architecture, else why not."""
    try:
        triton.compile(
            ASTSource(fn=_probe, signature={"x": "*fp32"}),
            target=GPUTarget("cuda", arch, 32),
            options=backend.compile_options("cuda"),
        )
    except Exception as error:
        return f"{type(error).__name__}: {str(error)[:300]}"
    return None


def main() -> None:
    request = json.load(sys.stdin)
    archs = [arch for arch in request["archs"]]
    unknown = {arch: known(arch) for arch in archs}
    specs = request["specs"] + request.get("quantized_specs", [])
    jobs = [(spec, arch) for arch in archs if unknown[arch] is None for spec in specs]
    workers = max(1, int(request.get("jobs", 1)))
    if workers == 1:
        results = list(map(compile_one, jobs))
    else:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(compile_one, jobs, chunksize=4))
    json.dump(
        {
            "triton": triton.__version__,
            "keeps_subnormals": "enable_reflect_ftz" in backend.compile_options("cuda"),
            "unknown": {str(arch): why for arch, why in unknown.items() if why},
            "results": results,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
