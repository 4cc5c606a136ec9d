"""Triton's interpreter, made cheaper for the test suite: one language patch per launch.

The interpreter (what TRITON_INTERPRET=1 runs) re-patches `triton.language` with
interpreted builtins on every call of a `@triton.jit` helper, not only once per launch:
it walks the language modules with `inspect.getmembers` each time (about 1 ms). The
kernels call helpers per block, so this was a third of a quantized test's time (profiled:
6.6 of 22 s for 6,314 helper calls in 14 launches) and about a minute per suite.

The patch is global: it rebinds attributes of the `triton.language` modules themselves,
so once a launch has patched them, a helper's call inside that launch would only write
the same attributes again. Here each launch patches `triton.language` and
`triton.language.core` once (the union of what any helper's call would patch: Triton's
own helpers in `triton.language.standard` see the language as `core`) and helper calls
inside it patch nothing. Kernels compute the same values either way; if the interpreter
changes so that a builtin is left unpatched, every interpreted test fails loudly (an
unpatched builtin refuses to run outside compilation), it cannot pass silently.

Installed only where the interpreter has the two hooks this relies on (Triton 3.3 and
3.9 here); otherwise the interpreter is left as it is.
"""

from __future__ import annotations

import functools
import types
from typing import Any


def patch_language_once_per_launch() -> bool:
    """Install the shim; True if this Triton's interpreter has the hooks it needs."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch_language = getattr(interpreter, "_patch_lang", None)
    launcher = getattr(interpreter, "GridExecutor", None)
    if patch_language is None or launcher is None or getattr(patch_language, "shim", False):
        return False
    both_languages = types.SimpleNamespace(__globals__={"tl": tl, "core": tl.core})
    launch = launcher.__call__
    state = {"patched": False}

    @functools.wraps(patch_language)
    def patch_unless_patched(fn: Any) -> Any:
        if state["patched"]:
            return None  # a helper's call inside a launch, which ignores the result
        state["patched"] = True
        return patch_language(both_languages)

    @functools.wraps(launch)
    def launch_patching_once(self: Any, *args: Any, **kwargs: Any) -> Any:
        state["patched"] = False  # the launch's own call patches, and restores at its end
        try:
            return launch(self, *args, **kwargs)
        finally:
            state["patched"] = False

    patch_unless_patched.shim = True  # type: ignore[attr-defined]
    interpreter._patch_lang = patch_unless_patched
    launcher.__call__ = launch_patching_once
    return True


@functools.cache
def interpreter_rounds_fma_once() -> bool:
    """Whether this Triton's interpreter computes tl.fma with one rounding, as a GPU does
    (Triton 3.9's: a true fma); Triton 3.3's multiplies and adds in numpy, two roundings.
    Probed on (1 + 2^-12)² − (1 + 2^-11) = 2^-24, which two roundings make 0."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def fma_of_loaded(x, y, z, out):  # type: ignore[no-untyped-def]
        tl.store(out, tl.fma(tl.load(x), tl.load(y), tl.load(z)))

    factor = torch.tensor([1 + 2.0**-12])
    out = torch.zeros(1)
    fma_of_loaded[(1,)](factor, factor, torch.tensor([-(1 + 2.0**-11)]), out)
    return float(out) == 2.0**-24
