"""The fused CPU backend: one pass over memory per step.

Plain Adam/AdamW steps (L2 or decoupled decay, AMSGrad, fully decoupled decay as AdamW
with weight_decay / max_lr) go to torch's native fused kernels, which compute exactly
this step. Everything torch has no fused kernel for (RAdam, NAdam, ADOPT, Kahan-
compensated bf16/fp16, lr = 0) runs the generated kernels of cpu_kernel.c, one
compiled configuration per combination of switches. Tensors that are not densely laid
out (rare: a strided view handed in by hand) take the loop backend.

8-bit moments (state_precision='8bit') always take a generated kernel built with Q8,
which decodes, steps and encodes each block of 256 in one pass (torch has no such
kernel). Which moments are 8-bit is a switch of the kernel too, so ADOPT's 8-bit m beside
its full-precision v runs in the same pass; parameters are bucketed by that pattern. The
loop backend, their reference, keeps only what that kernel cannot address:
non-contiguous tensors, state cast to another dtype, and float64 parameters.

Stochastic rounding of bf16/fp16 parameters (StochasticRounding in place of the Kahan
buffer) is the generated kernels' STOCHASTIC switch, in both entry points: each bucket
holds one step's roundings, and their keys (StochasticRounding.key()) travel with the
call, one per tensor, so the kernel rounds θ as precision.stochastic_round does, bit for
bit. fp32 and float64 parameters have nothing to round stochastically and are rounded to
nearest, as the loop backend rounds them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from core.backends import cpu_kernel, loop
from core.backends.checked import checked_for
from core.backends.grouping import (
    buckets,
    moment_pattern,
    split_dense,
    split_moment_patterns,
    split_quantized,
    split_quantized_dense,
    take_all,
)
from core.backends.kernel_arguments import KernelArguments, adam_arguments, adopt_arguments
from core.backends.precision import LOW_PRECISION_DTYPES, StochasticRounding
from core.backends.views import QUANTIZED_ROWS
from core.coefficients import AdamStepCoefficients, AdoptStepCoefficients
from core.quantization import QuantizedMoment

TensorLists = list[list[Tensor] | None]
Rounding = list[StochasticRounding] | None
"""A bucket's stochastic roundings (its parameters are rounded stochastically), or None."""
NativeStep = Callable[[bool, Rounding], Callable[[TensorLists], bool] | None]
"""Whether torch's own fused kernel computes a full-precision bucket's step (KAHAN,
rounding): the call that runs it on the bucket's lists (False: nothing done), or None."""


_STEP_TENSORS: dict[float, Tensor] = {}
"""The last step count torch's native kernels were handed, as a host tensor (one entry)."""


def _step_tensor(step: float) -> Tensor:
    """torch's native kernels read the step count from a tensor per parameter (and never
    write it), so one host tensor serves every parameter and call of a step: made once a
    step, not once per call, which under gradient release (a call per parameter) cost
    about 6 µs a parameter."""
    tensor = _STEP_TENSORS.get(step)
    if tensor is None:
        tensor = torch.tensor(step, dtype=torch.float32, device="cpu")
        _STEP_TENSORS.clear()
        _STEP_TENSORS[step] = tensor
    return tensor


def _native_adam(lists: TensorLists, c: AdamStepCoefficients) -> bool:
    """torch._fused_adam(w)_: the step as torch.optim.Adam/AdamW(fused=True) takes it, for
    a step it computes (c.torch_terms, updating θ, no Kahan buffer or stochastic
    rounding). True: done (tests stand in a False, to send such steps to the generated
    kernels)."""
    terms = c.torch_terms
    assert terms is not None
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, _ = lists
    assert params is not None
    step = _step_tensor(terms.step)
    native = torch._fused_adamw_ if terms.decoupled else torch._fused_adam_
    native(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs if c.amsgrad else [],
        [step] * len(params),
        lr=terms.lr,
        beta1=c.beta1,
        beta2=c.beta2,
        weight_decay=terms.weight_decay,
        eps=c.eps,
        amsgrad=c.amsgrad,
        maximize=False,
    )
    return True


@dataclass(eq=False)
class _Bucket:
    """One uniform part of a step (see FusedCpu._buckets), by indices into its lists."""

    dense: list[int]
    """What a kernel takes (a generated one, or torch's native Adam)."""
    strided: list[int]
    """What the loop backend runs: other layouts, other dtypes, whatever no kernel takes."""
    dtype: torch.dtype
    kahan: bool
    stochastic: bool
    quantized: bool
    full_moments: frozenset[str] = frozenset()
    """Quantized buckets: the moments kept in full precision (cpu_kernel.KernelConfig)."""
    prepared: cpu_kernel.PreparedCall | None = None
    """The generated kernel's checked call over the dense tensors, kept for the later
    steps of a step memo (None until a step under one made it)."""


class FusedCpu:
    """The backend object; `strict` (fused=True) raises where the default would fall back."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict

    @staticmethod
    def _config(bucket: _Bucket, arguments: KernelArguments) -> cpu_kernel.KernelConfig:
        """The generated kernel a bucket's dense part runs."""
        return cpu_kernel.KernelConfig(
            arguments.algorithm,
            bucket.dtype,
            arguments.switches,
            bucket.quantized,
            bucket.full_moments,
            stochastic=bucket.stochastic,
        )

    def _build_before_any_bucket_runs(
        self,
        found: list[_Bucket],
        arguments: Callable[[bool], KernelArguments],
        native: NativeStep | None,
    ) -> None:
        """fused=True: build every generated kernel this step needs before the first
        bucket updates anything. A compiler that is there but fails (a broken toolchain, a
        full disk) otherwise failed at a later bucket, after earlier ones had updated their
        parameters and moments but not their counts, so retrying the step applied their
        gradients twice."""
        for bucket in found:
            rounding = [] if bucket.stochastic else None
            takes = not bucket.quantized and native is not None and native(bucket.kahan, rounding)
            if bucket.dense and not takes:
                try:
                    cpu_kernel.kernel(self._config(bucket, arguments(bucket.kahan)))
                except cpu_kernel.KernelUnavailable as error:
                    raise cpu_kernel.RefusedBeforeAnyUpdate(
                        f"fused=True: {error} (nothing was updated)"
                    ) from error

    def _generated(
        self,
        lists: TensorLists,
        bucket: _Bucket,
        arguments: KernelArguments,
        rounding: Rounding = None,
        memoized: bool = False,
    ) -> bool:
        """Run a generated kernel on a bucket's dense lists; False when it cannot be built
        and falling back is allowed. rounding: the bucket's StochasticRoundings, where θ
        is rounded stochastically. memoized: a step memo vouches for the bucket's tensors
        (core.backends.checked), so the call checked on its first such step is made
        again with the new gradients instead of checking every tensor again."""
        config = self._config(bucket, arguments)
        keys = None if rounding is None else [r.key() for r in rounding]
        state_keys = _state_keys(lists, arguments.state_draw) if bucket.quantized else None
        run = cpu_kernel.run_quantized if bucket.quantized else cpu_kernel.run
        try:
            if not memoized:
                run(config, *lists, arguments.scalars, keys, state_keys)  # type: ignore[arg-type]
                return True
            if bucket.prepared is None:
                bucket.prepared = cpu_kernel.prepare(config, *lists)  # type: ignore[arg-type]
            bucket.prepared.call(config, lists[1], arguments.scalars, keys, state_keys)  # type: ignore[arg-type]
        except cpu_kernel.KernelUnavailable as error:
            if self.strict:
                raise RuntimeError(f"fused=True: {error}") from error
            if cpu_kernel.compiler() is not None or cpu_kernel.compiler_misconfigured():
                # (no compiler at all, on a machine without one, is not news)
                _warn_fallback(error)
            return False
        return True

    def _each_bucket(
        self,
        lists: TensorLists,
        arguments: Callable[[bool], KernelArguments],
        fallback: Callable[[TensorLists], None],
        native: NativeStep | None = None,
    ) -> None:
        """Run each uniform dense bucket (see _buckets) on its kernel, `fallback` on the
        rest: `native` where it takes the bucket (torch's own fused Adam), else the
        generated kernel for `arguments(kahan)` (its 8-bit build where any moment is
        8-bit). A step a memo vouches for (core.backends.checked) reuses the buckets, and
        the checked kernel calls, of the memo's first such step."""
        checked = checked_for(lists[0])
        memoized = checked is not None and checked.plan_key is not None
        found = checked.cpu_buckets if memoized else None  # type: ignore[union-attr]
        if found is None:
            found = self._buckets(lists)
            if self.strict:
                self._build_before_any_bucket_runs(found, arguments, native)
            if memoized:
                checked.cpu_buckets = found  # type: ignore[union-attr]
        for bucket in found:
            if bucket.strided:
                part = take_all(lists, bucket.strided)
                if not bucket.kahan and not bucket.stochastic:
                    part[-1] = None
                fallback(_with_comps(part, len(bucket.strided)))
            if not bucket.dense:
                continue
            part = take_all(lists, bucket.dense)
            rounding = part[-1] if bucket.stochastic else None
            if not bucket.kahan:
                part[-1] = None
            run_native = (
                None if bucket.quantized or native is None else native(bucket.kahan, rounding)
            )
            done = (run_native is not None and run_native(part)) or self._generated(
                part,
                bucket,
                arguments(bucket.kahan),
                rounding,
                memoized,  # type: ignore[arg-type]
            )
            if not done:
                if bucket.stochastic:
                    part[-1] = rounding
                fallback(_with_comps(part, len(bucket.dense)))

    @staticmethod
    def _buckets(lists: TensorLists) -> list[_Bucket]:
        """The step's parameters in uniform buckets: by dtype and rounding (buckets()),
        8-bit ones apart from full-precision ones and by which moments are 8-bit
        (split_moment_patterns); each split into what a kernel takes and the rest."""
        kahan_comps = lists[-1]
        assert lists[0] is not None and kahan_comps is not None
        full, eight_bit = split_quantized(lists)
        parts = [(eight_bit, True)] if eight_bit else []
        parts.append((list(range(len(lists[0]))) if full is None else full, False))
        found = []
        for part, quantized in parts:
            if not part:
                continue
            part_lists = take_all(lists, part)
            groups = buckets(part_lists[0], part_lists[-1])  # type: ignore[arg-type]
            if quantized:
                groups = [
                    [indices[i] for i in pattern]
                    for indices in groups
                    for pattern in split_moment_patterns(take_all(part_lists, indices))
                ]
            for indices in groups:
                found.append(
                    _bucket(take_all(part_lists, indices), [part[i] for i in indices], quantized)
                )
        return found

    def adam_step(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        exp_avgs: Sequence[Tensor],
        exp_avg_sqs: Sequence[Tensor],
        max_exp_avg_sqs: Sequence[Tensor] | None,
        kahan_comps: Sequence[Tensor | None],
        c: AdamStepCoefficients,
    ) -> None:
        """Apply one Adam-family step (see AdamStepCoefficients) in one pass per bucket.

        Later micro-batches of an optimizer-accumulation window (continues_window) have no
        generated kernel; they run the loop backend, one tensor at a time as under release.
        """
        if c.continues_window:
            loop.adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, kahan_comps, c)
            return

        def arguments(kahan: bool) -> KernelArguments:
            return adam_arguments(c, kahan)

        def native(kahan: bool, rounding: Rounding) -> Callable[[TensorLists], bool] | None:
            computes = c.torch_terms is not None and c.update_params
            if computes and not kahan and rounding is None:
                return lambda lists: _native_adam(lists, c)
            return None

        self._each_bucket(
            [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, kahan_comps],  # type: ignore[list-item]
            arguments,
            lambda lists: loop.adam_step(*lists, c),  # type: ignore[arg-type]
            native,
        )

    def adopt_step(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        exp_avgs: Sequence[Tensor],
        exp_avg_sqs: Sequence[Tensor],
        kahan_comps: Sequence[Tensor | None],
        c: AdoptStepCoefficients,
    ) -> None:
        """Apply one ADOPT step (see AdoptStepCoefficients) in one pass per bucket."""

        def fallback(lists: TensorLists) -> None:
            params, grads, exp_avgs, exp_avg_sqs, _, comps = lists
            loop.adopt_step(params, grads, exp_avgs, exp_avg_sqs, comps, c)  # type: ignore[arg-type]

        self._each_bucket(
            [params, grads, exp_avgs, exp_avg_sqs, None, kahan_comps],  # type: ignore[list-item]
            lambda kahan: adopt_arguments(c, kahan),
            fallback,
        )


def _bucket(lists: TensorLists, indices: list[int], quantized: bool) -> _Bucket:
    """One bucket's split into what its kernel takes and the rest. lists: the bucket's
    (uniform in dtype, rounding and, if quantized, which moments are 8-bit); indices: its
    parameters' places in the step's lists."""
    params, comps = lists[0], lists[-1]
    assert params is not None and comps is not None
    dtype = params[0].dtype
    kahan, stochastic = _rounding_switches(comps[0], dtype)
    full_moments: frozenset[str] = frozenset()
    if quantized:
        full_moments = frozenset(
            row
            for row, values, eight_bit in zip(
                QUANTIZED_ROWS, lists[2:5], moment_pattern(lists), strict=True
            )
            if values is not None and not eight_bit
        )
    kernel_lists = lists if kahan else [*lists[:-1], None]
    if not quantized:
        dense, strided = split_dense(kernel_lists)
    elif dtype in cpu_kernel.QUANTIZED_DTYPES:
        dense, strided = split_quantized_dense(kernel_lists)
    else:
        dense, strided = [], list(range(len(params)))
    if stochastic:
        # An element's random bits follow its logical (row-major) index, which is its
        # offset in memory only where the parameter is contiguous.
        strided = sorted(strided + [i for i in dense if not params[i].is_contiguous()])
        dense = [i for i in dense if params[i].is_contiguous()]
    return _Bucket(
        [indices[i] for i in dense],
        [indices[i] for i in strided],
        dtype,
        kahan,
        stochastic,
        quantized,
        full_moments,
    )


def _state_keys(lists: TensorLists, draw: int) -> list[int] | None:
    """Each parameter's key of this step for its 8-bit m and v (QuantizedMoment.key: one
    hash per element serves both), so that they round stochastically as the loop backend
    rounds them; None where neither is 8-bit."""
    for moments in lists[2:4]:
        if moments and type(moments[0]) is QuantizedMoment:
            return [moment.key(draw) for moment in moments]  # type: ignore[attr-defined]
    return None


def _rounding_switches(comp: object, dtype: torch.dtype) -> tuple[bool, bool]:
    """(KAHAN, STOCHASTIC) of a bucket whose first parameter (of `dtype`) is rounded as
    `comp` says: a Kahan buffer, a StochasticRounding (16-bit parameters only: fp32 and
    float64 are rounded to nearest, as the loop backend does), or None."""
    if type(comp) is StochasticRounding:
        return False, dtype in LOW_PRECISION_DTYPES
    return comp is not None, False


def _with_comps(lists: TensorLists, count: int) -> TensorLists:
    """The loop backend takes a kahan_comps list with None entries, never None itself."""
    if lists[-1] is None:
        return [*lists[:-1], [None] * count]  # type: ignore[list-item]
    return lists


_warned = False


def _warn_fallback(error: Exception) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"adamkit: the fused CPU kernel is unavailable ({error}); using the loop backend. "
            "Pass fused=False to silence this, or fused=True to make it an error.",
            RuntimeWarning,
            stacklevel=4,
        )


STRICT = FusedCpu(strict=True)
DEFAULT = FusedCpu(strict=False)


def available() -> bool:
    """Whether generated kernels can be built here (torch's native ones always can)."""
    return cpu_kernel.compiler() is not None
