"""Backends run the elementwise part of a step; algorithms hand them host scalars.

Every backend (a module, or an object for the fused CPU backend) exposes the same two
functions, `adam_step` (Adam, AMSGrad, RAdam, NAdam) and `adopt_step`, and must reproduce
`loop` to floating-point tolerance. `select_backend` is the one place that chooses.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Protocol

from torch import Tensor
from torch.nn.parameter import is_lazy

from core.backends import foreach, loop
from core.backends.checked import checked_for
from core.backends.views import (
    PLAIN_TENSOR_TYPES,
    device_of,
    dtensor_type,
    is_plain,
    local_lists,
    real_view_lists,
)
from core.coefficients import AdamStepCoefficients, AdoptStepCoefficients


class Backend(Protocol):
    """What an algorithm needs from a backend."""

    def adam_step(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        exp_avgs: Sequence[Tensor],
        exp_avg_sqs: Sequence[Tensor],
        max_exp_avg_sqs: Sequence[Tensor] | None,
        kahan_comps: Sequence[Tensor | None],
        c: AdamStepCoefficients,
    ) -> None: ...

    def adopt_step(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        exp_avgs: Sequence[Tensor],
        exp_avg_sqs: Sequence[Tensor],
        kahan_comps: Sequence[Tensor | None],
        c: AdoptStepCoefficients,
    ) -> None: ...


TRITON_DEVICE_TYPES = {"cuda", "xpu"}
"""Device types whose fused backend is Triton. Tests add "cpu" to run the Triton kernels
through Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors."""


@functools.cache
def _triton_backend() -> Backend | str:
    """The Triton backend, or why it cannot be loaded (imported on first use only, so
    that core imports without triton and TRITON_INTERPRET is read when it matters)."""
    try:
        from core.backends import triton as triton_backend
    except ImportError as error:
        return f"the Triton backend needs triton ({error})"
    return triton_backend  # type: ignore[return-value]


def _unaddressable_subclasses(tensors: Sequence[Tensor | None]) -> list[str]:
    """Names of the tensor subclasses among tensors that no fused kernel can address."""
    if is_plain(tensors):
        return []
    dtensor = dtensor_type()
    return sorted(
        {
            type(t).__name__
            for t in tensors
            if t is not None
            and type(t) not in PLAIN_TENSOR_TYPES
            and not (dtensor is not None and isinstance(t, dtensor))
            # a lazy module's parameter becomes a plain one, in place, at its first forward
            and not is_lazy(t)
        }
    )


def fused_unavailable_reason(params: Sequence[Tensor], *, forced: bool = True) -> str | None:
    """Why no fused backend can run a step over these parameters, or None if one can.

    Unless forced (fused=True), a CPU without a C compiler is no reason: the fused CPU
    backend then runs torch's native kernels where exact and the loop elsewhere.
    """
    subclasses = _unaddressable_subclasses(params)
    if subclasses:
        return (
            f"a fused kernel reads raw memory, which tensor subclasses ({subclasses}) do not "
            "describe (DTensor is the exception: its local shard is stepped)"
        )
    devices = set(map(device_of, params))
    if len(devices) > 1:
        names = sorted(str(d) for d in devices)
        return f"the parameters of one group must share one device for a fused step, got {names}"
    if not devices:
        return None
    device_type = next(iter(devices)).type
    if device_type in TRITON_DEVICE_TYPES:
        backend = _triton_backend()
        return backend if isinstance(backend, str) else None
    if device_type == "cpu":
        from core.backends import cpu, cpu_kernel

        if forced and not cpu.available():
            reason = cpu_kernel.missing_compiler("CC", cpu_kernel.C_COMPILERS)
            return f"the fused CPU backend compiles a C kernel and has no C compiler: {reason}"
        if forced:
            problem = cpu_kernel.settings_problem()
            if problem is not None:
                return f"the fused CPU backend can build no kernel: {problem}"
        return None
    if device_type == "meta":  # deferred initialization
        return (
            "no fused backend exists for 'meta' tensors, which hold no values yet: build "
            "the optimizer once the model is materialized (to_empty), or leave fused=None, "
            "which takes the fused backend once the parameters are on CPU or a GPU"
        )
    return f"no fused backend exists for {device_type!r} tensors (only CPU and, with Triton, GPU)"


def select_backend(
    params: Sequence[Tensor], *, foreach: bool | None, fused: bool | None
) -> Backend:
    """Pick the backend for one step, as torch.optim does: explicit flags win; with both
    None the fused backend where one runs, else foreach on accelerators and loop on CPU."""
    if fused and foreach:
        raise ValueError(
            "Invalid fused: True. Allowed: None or False when foreach=True (pick one backend)."
        )
    if fused or (fused is None and foreach is None):
        reason = fused_unavailable_reason(params, forced=bool(fused))
        if reason is None:
            if not params:
                return _LOOP  # nothing to step
            return _fused_backend(params[0].device.type, strict=bool(fused))
        if fused:
            raise ValueError(f"Invalid fused: True. Allowed: None or False here: {reason}.")
    if foreach is None:
        foreach = any(p.device.type != "cpu" for p in params)
    return _FOREACH if foreach else _LOOP


STEP_LIST_NAMES = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "kahan_comps")
ADOPT_LIST_NAMES = ("params", "grads", "exp_avgs", "exp_avg_sqs", "kahan_comps")


def backend_and_lists(
    lists: Sequence[Sequence[Tensor | None] | None],
    names: Sequence[str],
    *,
    foreach: bool | None,
    fused: bool | None,
) -> tuple[Backend, list]:
    """The backend for one step and the tensor lists (params first) as it addresses them.

    DTensors (FSDP2, tensor parallelism) become the local shards they own and complex
    tensors real pairs (see core.backends.views), so every backend, the default included,
    runs on plain memory. Any other tensor subclass goes to the loop backend (or foreach
    when asked), whose torch operations dispatch through the subclass; fused=True is
    refused for it by name.
    """
    checked = checked_for(lists[0])
    if checked is not None and checked.backend is not None:
        return checked.backend, list(lists)  # resolved when these tensors were checked
    if all(values is None or is_plain(values) for values in lists):  # the usual case
        local = real_view_lists(lists)
        backend = select_backend(local[0], foreach=foreach, fused=fused)
        if checked is not None and all(map(operator.is_, local, lists)):
            checked.backend = backend  # plain and real: later steps take the lists as they are
        return backend, local
    local = real_view_lists(local_lists(lists, names))
    if all(values is None or is_plain(values) for values in local):
        return select_backend(local[0], foreach=foreach, fused=fused), local
    if fused:
        every = [t for values in local if values is not None for t in values]
        reason = f"tensor subclasses ({_unaddressable_subclasses(every)})"
        raise ValueError(f"Invalid fused: True. Allowed: None or False for {reason}.")
    return (_FOREACH if foreach else _LOOP), local


def _fused_backend(device_type: str, strict: bool) -> Backend:
    if device_type in TRITON_DEVICE_TYPES:
        return _triton_backend()  # type: ignore[return-value]
    from core.backends import cpu

    return cpu.STRICT if strict else cpu.DEFAULT


_LOOP: Backend = loop  # type: ignore[assignment]
_FOREACH: Backend = foreach  # type: ignore[assignment]
