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

import torch
from torch import Tensor

from core.backends import cpu_kernel, loop
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

TensorLists = list[list[Tensor] | None]
Rounding = list[StochasticRounding] | None
"""A bucket's stochastic roundings (its parameters are rounded stochastically), or None."""
FusedStep = Callable[[TensorLists, torch.dtype, bool, Rounding], bool]


def _native_adam(lists: TensorLists, c: AdamStepCoefficients) -> None:
    """torch._fused_adam(w)_: the step as torch.optim.Adam/AdamW(fused=True) takes it."""
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, _ = lists
    terms = c.torch_terms
    assert terms is not None and params is not None
    # torch reads the step count from a tensor per parameter; one shared host tensor will do.
    step = torch.tensor(terms.step, dtype=torch.float32)
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


class FusedCpu:
    """The backend object; `strict` (fused=True) raises where the default would fall back."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict

    def _generated(
        self,
        lists: TensorLists,
        dtype: torch.dtype,
        arguments: KernelArguments,
        quantized: bool = False,
        rounding: Rounding = None,
    ) -> bool:
        """Run a generated kernel; False when it cannot be built and falling back is allowed.
        A quantized bucket's moments are 8-bit or full precision as its first parameter's
        are (the buckets share one pattern; the kernel's checks refuse any other).
        rounding: the bucket's StochasticRoundings, where θ is rounded stochastically."""
        full_moments: frozenset[str] = frozenset()
        if quantized:
            pattern = moment_pattern(lists)
            full_moments = frozenset(
                row
                for row, values, eight_bit in zip(QUANTIZED_ROWS, lists[2:5], pattern, strict=True)
                if values is not None and not eight_bit
            )
        config = cpu_kernel.KernelConfig(
            arguments.algorithm,
            dtype,
            arguments.switches,
            quantized,
            full_moments,
            stochastic=rounding is not None,
        )
        keys = None if rounding is None else [r.key() for r in rounding]
        run = cpu_kernel.run_quantized if quantized else cpu_kernel.run
        try:
            run(config, *lists, arguments.scalars, keys)  # type: ignore[arg-type]
        except cpu_kernel.KernelUnavailable as error:
            if self.strict:
                raise RuntimeError(f"fused=True: {error}") from error
            if cpu_kernel.compiler() is not None:  # no compiler at all is not news
                _warn_fallback(error)
            return False
        return True

    def _each_bucket(
        self,
        lists: TensorLists,
        arguments: Callable[[bool], KernelArguments],
        fallback: Callable[[TensorLists], None],
        fused: FusedStep | None = None,
    ) -> None:
        """Split into uniform dense buckets (by dtype and rounding, see buckets()); run
        `fused` on each (by default the generated kernel for `arguments(kahan)`; always
        that kernel's 8-bit build where any moment is 8-bit), `fallback` on the rest."""

        def generated(quantized: bool) -> FusedStep:
            def step(
                lists: TensorLists, dtype: torch.dtype, kahan: bool, rounding: Rounding
            ) -> bool:
                return self._generated(
                    lists, dtype, arguments(kahan), quantized=quantized, rounding=rounding
                )

            return step

        quantized = generated(True)
        fused = fused or generated(False)
        full, eight_bit = split_quantized(lists)
        if eight_bit:
            self._each_bucket_of(take_all(lists, eight_bit), quantized, fallback, True)
            if not full:
                return
            lists = take_all(lists, full)
        self._each_bucket_of(lists, fused, fallback, False)

    @staticmethod
    def _each_bucket_of(
        lists: TensorLists,
        fused: FusedStep,
        fallback: Callable[[TensorLists], None],
        quantized: bool,
    ) -> None:
        """_each_bucket over parameters whose moments are all full precision, or some 8-bit
        (quantized: then bucketed further by which, see split_moment_patterns)."""
        kahan_comps = lists[-1]
        assert lists[0] is not None and kahan_comps is not None
        groups = buckets(lists[0], kahan_comps)
        if quantized:
            groups = [
                [indices[i] for i in pattern]
                for indices in groups
                for pattern in split_moment_patterns(take_all(lists, indices))
            ]
        for indices in groups:
            bucket = take_all(lists, indices)
            dtype = bucket[0][0].dtype  # type: ignore[index]
            kahan, stochastic = _rounding_switches(kahan_comps[indices[0]], dtype)
            comps = bucket[-1]
            if not kahan:
                bucket[-1] = None
            if not quantized:
                dense, strided = split_dense(bucket)
            elif dtype in cpu_kernel.QUANTIZED_DTYPES:
                dense, strided = split_quantized_dense(bucket)
            else:
                dense, strided = [], list(range(len(indices)))
            if stochastic:
                # An element's random bits follow its logical (row-major) index, which is
                # its offset in memory only where the parameter is contiguous.
                params = bucket[0]
                assert params is not None
                strided = sorted(strided + [i for i in dense if not params[i].is_contiguous()])
                dense = [i for i in dense if params[i].is_contiguous()]
            # The loop backend takes the stochastic roundings where the kernel does not.
            eager = [*bucket[:-1], comps] if stochastic else bucket
            if strided:
                fallback(_with_comps(take_all(eager, strided), len(strided)))
            if dense:
                rounding = [comps[i] for i in dense] if stochastic else None  # type: ignore[index]
                if not fused(take_all(bucket, dense), dtype, kahan, rounding):  # type: ignore[arg-type]
                    fallback(_with_comps(take_all(eager, dense), len(dense)))

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

        def fused(lists: TensorLists, dtype: torch.dtype, kahan: bool, rounding: Rounding) -> bool:
            if c.torch_terms is not None and c.update_params and not kahan and rounding is None:
                _native_adam(lists, c)
                return True
            return self._generated(lists, dtype, arguments(kahan), rounding=rounding)

        self._each_bucket(
            [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, kahan_comps],  # type: ignore[list-item]
            arguments,
            lambda lists: loop.adam_step(*lists, c),  # type: ignore[arg-type]
            fused,
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
