"""Composer's decoupled optimizers on adamkit's core: DecoupledAdamW and its siblings.

Composer's `DecoupledAdamW` decays weights by `weight_decay * lr / initial_lr` per step,
so the schedule that moves lr moves the decay too. That is core's fully decoupled decay
(`decouple_lr=True`) with `max_lr` read from the group's `initial_lr`, so each class
here only sets Composer's defaults and names; every step runs core's code on its
fastest backend. The classes need no Composer import: Composer finds the metric hooks
(`report_per_parameter_metrics`, `pre_reduce_metrics`, `dist_reduce_metrics`) by name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

import core
from core import metrics
from core.backends.views import dtensor_type
from core.optimizer import (
    HIGH_FULLY_DECOUPLED_WEIGHT_DECAY,
    ParamsT,
    finite_at_least,
    hyperparameters,
    require,
)
from core.quantization import StatePrecision

log = logging.getLogger(__name__)


def _value_now(lr: Any) -> Any:
    """lr as it is now: a tensor lr is copied, as torch's schedulers copy it for their
    own initial_lr, because they write a tensor lr in place (the same object as initial_lr
    would follow the schedule, and a warmup from 0 would hold the decay's reference, and
    the scheduler's base lr, at 0 for good)."""
    return lr.clone() if isinstance(lr, Tensor) else lr


class ComposerConventions:
    """Composer's decoupled-optimizer conventions, mixed in before a core optimizer class.

    `initial_lr` (Composer's and torch's scheduler key) is what the decay is relative to;
    it is recorded per group at creation and kept in the group, so frameworks that
    rebuild param groups or load checkpoints carry it along. A group without one (added
    with add_param_group, or by a checkpoint of an optimizer that never had it) takes its
    lr at its first step, as Composer does.
    """

    param_groups: list[dict[str, Any]]
    warns_on_ambiguous_decay: ClassVar[bool] = False
    """A group without decouple_lr is Composer's: fully decoupled, as these classes are."""

    def __init__(self, params: ParamsT, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)  # type: ignore[call-arg]
        for group in self.param_groups:
            group["initial_lr"] = _value_now(group["lr"])

    def _step(
        self, closure: Callable[[], Any] | None, param: Tensor | None, grad_scaler: object
    ) -> Any:
        """core's step; a full step first records initial_lr in every group without one,
        with gradients or not, as Composer's step does (a group added with lr warming up
        and no gradient at its first step would take a later lr). Here, not in step():
        torch wraps each class's own step with its hooks, so an override ran them twice."""
        if param is None:
            for group in self.param_groups:
                if "initial_lr" not in group:
                    group["initial_lr"] = _value_now(group["lr"])
        return super()._step(closure, param, grad_scaler)  # type: ignore[misc]

    def _report_high_weight_decay(self, weight_decay: float) -> None:
        """Composer logs the warning (core's check decides when), in Composer's terms."""
        log.warning(
            "%s: weight_decay=%s is high. The decay is not scaled by lr, so at the "
            "initial lr every step multiplies the weights by %s; Composer's decoupled "
            "optimizers are meant for values below %s.",
            type(self).__name__,
            weight_decay,
            1.0 - weight_decay,
            HIGH_FULLY_DECOUPLED_WEIGHT_DECAY,
        )

    def _validate_algorithm(self, group: dict[str, Any], where: str) -> None:
        super()._validate_algorithm(group, where)  # type: ignore[misc]
        initial_lr = group.get("initial_lr", 0.0)
        require(
            finite_at_least(initial_lr, 0.0),
            "initial_lr",
            initial_lr,
            "a finite number >= 0 (the lr the weight decay is relative to)",
            where,
        )

    def _common_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        """Core's keyword arguments with the decay relative to initial_lr; an initial_lr of
        0 means lr itself (full weight_decay per step), as in Composer, except at lr 0,
        where core changes nothing (Composer still decays: see the README)."""
        initial_lr = group.setdefault("initial_lr", _value_now(group["lr"]))
        kwargs = super()._common_kwargs(group)  # type: ignore[misc]
        kwargs["max_lr"] = float(initial_lr) if initial_lr else None
        return kwargs

    # -- Composer's OptimizerMonitor hooks --------------------------------------------------

    def report_per_parameter_metrics(
        self, param: Tensor, name: str, optimizer_metrics: dict[str, Any]
    ) -> dict[str, Any]:
        """l2 norms of moment, param, update and grad under Composer's names (core.metrics).

        Under FSDP2 the norms of DTensor parameters are DTensors, which Composer's
        all-reduce cannot take; each becomes this rank's share (see `rank_share`).
        Composer has DTensor parameters only with FSDP on (its TP requires FSDP), which
        is when its OptimizerMonitor reduces the shares back to the global norm.
        """
        before = set(optimizer_metrics)
        metrics.parameter_metrics(self, param, name, optimizer_metrics)  # type: ignore[arg-type]
        # In insertion order: every rank must reach the collectives in the same order.
        added = [key for key in optimizer_metrics if key not in before]
        shares = rank_shares([optimizer_metrics[key] for key in added])
        optimizer_metrics.update(zip(added, shares, strict=True))
        return optimizer_metrics

    def pre_reduce_metrics(self, optimizer_metrics: dict[str, Any]) -> dict[str, Any]:
        """Square the l2 norms so ranks can sum them (called under FSDP)."""
        return metrics.pre_reduce_metrics(optimizer_metrics)  # type: ignore[return-value]

    def dist_reduce_metrics(self, optimizer_metrics: dict[str, Any]) -> dict[str, Any]:
        """Sum the squares over ranks and take the root (called under FSDP)."""
        return metrics.dist_reduce_metrics(optimizer_metrics)  # type: ignore[return-value]


def rank_share(norm: Any) -> Any:
    """A DTensor l2 norm as the plain tensor whose square, summed over ranks by
    `dist_reduce_metrics`, is the square of the global norm (norm / sqrt(world size));
    anything else unchanged.

    Composer reduces metrics when FSDP is on: it squares each rank's value and sums over
    ranks, built for FSDP1's flat local shards. A DTensor norm is already global (and
    cannot enter a plain all-reduce), so every rank contributes an equal share of it;
    this holds for any placement, Shard or Replicate.
    """
    return rank_shares([norm])[0]


def rank_shares(norms: list[Any]) -> list[Any]:
    """`rank_share` of each norm, the DTensors among them made global together
    (`core.metrics.global_values`: one collective per kind, not one per norm)."""
    dtensor = dtensor_type()
    if dtensor is None or not any(isinstance(norm, dtensor) for norm in norms):
        return list(norms)
    world = torch.distributed.get_world_size() ** 0.5
    whole = metrics.global_values(norms)
    return [
        value / world if isinstance(norm, dtensor) else norm
        for norm, value in zip(norms, whole, strict=True)
    ]


class DecoupledAdamW(ComposerConventions, core.Adam):
    """Drop-in for `composer.optim.DecoupledAdamW`: the same defaults, decay, state and
    metric names, with every step on adamkit's core (and Kahan summation for bf16).

    Each step multiplies θ by 1 − weight_decay·lr/initial_lr, then takes Adam's step; use
    a much smaller weight_decay than with torch's AdamW (Composer's default is 1e-5).
    A checkpoint of either class loads into the other; both are saved under the name
    "DecoupledAdamW", so Composer's autoresume switches between them.

    Args:
        params: Iterable of parameters or dicts defining parameter groups.
        lr: Learning rate.
        betas: Coefficients of the running averages of the gradient and its square.
        eps: Added to the bias-corrected root of the second moment.
        weight_decay: Fraction of θ removed per step at the initial lr (scheduled with lr).
        amsgrad: Use the running maximum of the second moment (AMSGrad).
        kahan_sum: Kahan-compensated updates for bf16/fp16 parameters; None turns it on
            for low-precision parameters only.
        state_precision: 'full' keeps m and v in the parameter's dtype; '8bit' stores
            them block-wise in 8 bits (about 2 bytes per parameter for both; parameters
            under 4096 elements stay full). See core.quantization.
        stochastic_rounding: Round bf16/fp16 parameters stochastically (unbiased, no
            buffer) instead of keeping a Kahan buffer; reproducible from rounding_seed.
        rounding_seed: Seed of stochastic rounding's random bits, of the parameters and
            of 8-bit m and v (with the parameter's position, the step and the element index).
        foreach: Use the multi-tensor foreach backend; None picks the fastest.
        fused: Use a fused backend; None picks it where available and exact.
        triton: optimi's name for fused (see core.Adam).
        gradient_release: Step each parameter inside backward (see GradientRelease).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 1e-5,
        amsgrad: bool = False,
        *,
        kahan_sum: bool | None = None,
        state_precision: StatePrecision = "full",
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
        foreach: bool | None = None,
        fused: bool | None = None,
        triton: bool | None = None,
        gradient_release: bool = False,
    ) -> None:
        super().__init__(params, decouple_lr=True, **hyperparameters(locals()))
        self.amsgrad = amsgrad

    @staticmethod
    def adamw(
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        exp_avgs: Sequence[Tensor],
        exp_avg_sqs: Sequence[Tensor],
        max_exp_avg_sqs: Sequence[Tensor],
        state_steps: Sequence[Tensor],
        *,
        amsgrad: bool,
        beta1: float,
        beta2: float,
        lr: float,
        initial_lr: float,
        weight_decay: float,
        eps: float,
    ) -> None:
        """Composer's functional form, on core's math.

        As in Composer, `state_steps` already count this step (the caller increments
        them first) and are not changed here.
        """
        if not params:
            return
        for index, step in enumerate(state_steps):
            # Checked as given: core would name the step before this one (0 shown as -1),
            # and a plain number failed on .detach().
            require(
                finite_at_least(step, 1.0),
                f"state_steps[{index}]",
                step,
                "a finite step count >= 1 (a number or a 1-element tensor): Composer's "
                "functional form takes the steps already counting this step",
                " for DecoupledAdamW.adamw",
            )
        core.adam(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs if amsgrad else None,
            [torch.tensor(float(step) - 1, device="cpu") for step in state_steps],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            decouple_lr=True,
            max_lr=initial_lr if initial_lr else None,
            amsgrad=amsgrad,
        )


class DecoupledRAdam(ComposerConventions, core.RAdam):
    """RAdam with Composer's decoupled, lr-scheduled weight decay and conventions.

    Args as `DecoupledAdamW`, without amsgrad. eps is added to the bias-corrected root.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 1e-5,
        *,
        kahan_sum: bool | None = None,
        state_precision: StatePrecision = "full",
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
        foreach: bool | None = None,
        fused: bool | None = None,
        triton: bool | None = None,
        gradient_release: bool = False,
    ) -> None:
        super().__init__(params, decouple_lr=True, **hyperparameters(locals()))


class DecoupledNAdam(ComposerConventions, core.NAdam):
    """NAdam (torch's momentum schedule) with Composer's decoupled, lr-scheduled decay.

    Args as `DecoupledRAdam`, plus momentum_decay (ψ of μt = β1·(1 − 0.5·0.96^(t·ψ))).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 1e-5,
        *,
        momentum_decay: float = 4e-3,
        kahan_sum: bool | None = None,
        state_precision: StatePrecision = "full",
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
        foreach: bool | None = None,
        fused: bool | None = None,
        triton: bool | None = None,
        gradient_release: bool = False,
    ) -> None:
        super().__init__(params, decouple_lr=True, **hyperparameters(locals()))


class DecoupledADOPT(ComposerConventions, core.ADOPT):
    """ADOPT with Composer's decoupled, lr-scheduled weight decay and conventions.

    betas and eps keep ADOPT's reference defaults ((0.9, 0.9999), 1e-6): ADOPT is
    built for beta2 close to 1, and eps bounds the root it divides by. clip bounds the
    normalised gradient by step^0.25 (False: the paper's unclipped ADOPT).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        weight_decay: float = 1e-5,
        *,
        clip: bool = True,
        kahan_sum: bool | None = None,
        state_precision: StatePrecision = "full",
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
        foreach: bool | None = None,
        fused: bool | None = None,
        triton: bool | None = None,
        gradient_release: bool = False,
    ) -> None:
        super().__init__(params, decouple_lr=True, **hyperparameters(locals()))
