"""Per-parameter optimizer metrics, shared by the Composer and Lightning adapters.

Per parameter: the l2 norms of the first moment, the parameter, the update and the
gradient, under Composer's names (`l2_norm/moment/<name>`, `l2_norm/param/<name>`,
`l2_norm/update/<name>`, `l2_norm/grad/<name>`), so dashboards built for Composer's
OptimizerMonitor keep working. The update is the change the optimizer's own rule makes
to θ from its current state, at the group's current hyperparameters (for Composer's
Trainer that is the lr after the scheduler's step, as Composer's own metric takes it) or
at the lr the step was taken with where the caller passes it (Lightning's
OptimizerMonitor): decay and step included, with the signs they are applied with. An
update that reads the gradient itself (NAdam's) is left out once the gradient is gone
(zeroed, or freed by gradient release) rather than logged without its gradient term.

It is never re-derived here. The algorithm supplies the coefficients of its last step
(`AdamFamilyOptimizer.last_step_coefficients`), and the reference backend applies them,
in float64, to copies whose moments are held fixed (beta1 = beta2 = 1); the update is
the difference. So every algorithm, decay mode and AMSGrad is covered by the code that
trains.

Distributed runs (parameters or state sharded across ranks, as FSDP does): square the
norms with `pre_reduce_metrics`, then `dist_reduce_metrics` sums them over ranks and
takes the root. Plain torch.distributed; nothing here imports a framework.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import MutableMapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from core.backends import loop
from core.backends.views import dtensor_type
from core.coefficients import AdamStepCoefficients, AdoptStepCoefficients
from core.optimizer import AdamFamilyOptimizer, require_core_optimizer
from core.quantization import stored_moment

MOMENT = "l2_norm/moment"
PARAM = "l2_norm/param"
UPDATE = "l2_norm/update"
GRAD = "l2_norm/grad"
METRICS = (MOMENT, PARAM, UPDATE, GRAD)
"""Metric names; a parameter's key is f"{metric}/{parameter name}"."""

Metrics = MutableMapping[str, Any]

_UPDATE_FROM_COEFFICIENTS = (
    " or the adapters' classes), whose step coefficients give the update; for another "
    "optimizer take l2_norm of the parameter and its gradient"
)
"""Why the update metric needs an adamkit optimizer (any other failed with an
AttributeError about last_step_coefficients)."""


def global_value(norm: Any) -> Any:
    """A norm of a DTensor as a plain tensor holding the global norm (the norm of a
    sharded DTensor is a pending reduction over ranks, whose local value is this rank's
    part: every rank must call this, in the same order); anything else unchanged."""
    return global_values([norm])[0]


def global_values(values: Sequence[Any]) -> list[Any]:
    """`global_value` of each value, with one collective per kind of DTensor norm (its
    mesh, placements, dtype, shape and whether it requires grad) instead of one per norm:
    a model's metrics under FSDP2 cost a few all-reduces a step, not four per parameter.
    The kinds' norms are stacked and reduced together: on 2 ranks the values are those
    `global_value` gives one by one, bit for bit; on more, the reduction may add the
    ranks' parts in another order for some positions of the stack (measured: 1 ulp, in
    5-10 of 247 values on 3-4 gloo ranks), as any other reduction order would. Every rank
    must call it with the same kinds in the same order."""
    dtensor = dtensor_type()
    result = list(values)
    if dtensor is None:
        return result
    kinds: dict[tuple[Any, ...], list[int]] = {}
    for index, value in enumerate(result):
        if isinstance(value, dtensor):
            # requires_grad too: a norm without a graph is given none from another's
            kind = (
                value.device_mesh,
                value.placements,
                value.dtype,
                value.shape,
                value.requires_grad,
            )
            kinds.setdefault(kind, []).append(index)
    for indices in kinds.values():
        if len(indices) == 1:
            result[indices[0]] = result[indices[0]].full_tensor()
            continue
        whole = torch.stack([result[index] for index in indices]).full_tensor()
        for index, value in zip(indices, whole.unbind(), strict=True):
            result[index] = value
    return result


def l2_norm(tensor: Tensor) -> Tensor:
    """The l2 norm, in float32 at least (a bf16 norm would keep three digits); what every
    adamkit metric and callback takes, so released and kept gradients log alike. A sparse
    gradient (nn.Embedding(sparse=True)) is measured by its stored values."""
    if tensor.is_sparse:
        tensor = tensor.coalesce().values()
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    return torch.linalg.vector_norm(tensor)


def _exact_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def parameter_update(
    optimizer: AdamFamilyOptimizer, param: Tensor, lr: float | None = None
) -> Tensor | None:
    """The update θ_new − θ_old the optimizer's state implies for param (at its group's
    lr, or at `lr`), or None before its first step, or where the rule reads the gradient
    itself (NAdam's Nesterov term) and p.grad is gone. Computed in float64 on copies;
    the optimizer is not changed.

    The step is applied to the current θ, the old one being gone: decoupled decay
    (θ ← f·θ − s) then gives f times the update, which is divided out, so the update is
    θ_new − θ_old exactly (it was (1 − f) off: 5% at weight_decay 0.05). Where the rule
    reads the gradient with an L2 term (NAdam's), that λθ is the new θ's.
    """
    require_core_optimizer(optimizer, _UPDATE_FROM_COEFFICIENTS)
    if _gradient_gone(optimizer, param):
        return None
    coefficients = optimizer.last_step_coefficients(param, lr)
    return None if coefficients is None else _update(optimizer, param, coefficients)


def _gradient_gone(optimizer: AdamFamilyOptimizer, param: Tensor) -> bool:
    """Whether the update reads the gradient itself (NAdam's) and p.grad no longer exists."""
    return param.grad is None and optimizer.update_reads_gradient


def _update(
    optimizer: AdamFamilyOptimizer,
    param: Tensor,
    coefficients: AdamStepCoefficients | AdoptStepCoefficients,
) -> Tensor:
    """parameter_update for the coefficients of param's last step."""
    state = optimizer.state[param]
    dtype = _exact_dtype(param.device)

    def copy(tensor: Tensor | None) -> Tensor:
        source = torch.zeros_like(param) if tensor is None else tensor
        return source.detach().to(dtype=dtype, copy=True)

    theta = copy(param)
    if "kahan_comp" in state:
        theta.add_(state["kahan_comp"].to(dtype))
    before = theta.clone()
    held = dataclasses.replace(coefficients, beta1=1.0, beta2=1.0)
    tensors = [
        [theta],
        [copy(param.grad)],
        [copy(stored_moment(state, "exp_avg", param))],
        [copy(stored_moment(state, "exp_avg_sq", param))],
    ]
    maxima = None
    if isinstance(held, AdoptStepCoefficients):
        loop.adopt_step(*tensors, [None], held)
    else:
        if held.amsgrad:
            maxima = [copy(stored_moment(state, "max_exp_avg_sq", param))]
        loop.adam_step(*tensors, maxima, [None], held)
    update = theta.sub_(before)
    if coefficients.param_decay not in (0.0, 1.0):  # 0: decay erased θ_old, nothing to undo
        update.div_(coefficients.param_decay)
    if _gradient_term_reads_theta(held):
        # NAdam's gradient term took g + λθ at θ_old; recomputed at θ_new = θ_old + Δ it
        # comes out as Δ·(1 + c), c = −grad_step·λ/d elementwise (d the step's
        # denominator, from the stored v): divided out, it is the change itself. It was
        # off by cΔ, large where g + λθ nearly cancels (d small): +10% at a first step.
        second_moment = tensors[3][0] if maxima is None else maxima[0]  # as the step read it
        denominator = second_moment.sqrt().div_(held.bias_correction2_sqrt).add_(held.eps)
        scale = -held.grad_step * held.l2_weight_decay
        update.div_(denominator.reciprocal_().mul_(scale).add_(1.0))
    return update


def _gradient_term_reads_theta(
    coefficients: AdamStepCoefficients | AdoptStepCoefficients,
) -> bool:
    """Whether the update itself reads θ (not only through the stored moments): NAdam's
    gradient term with L2 decay, in a step that updated the parameter."""
    return (
        isinstance(coefficients, AdamStepCoefficients)
        and coefficients.update_params
        and coefficients.adaptive
        and coefficients.grad_step != 0
        and coefficients.l2_weight_decay != 0
    )


def parameter_metrics(
    optimizer: AdamFamilyOptimizer,
    param: Tensor,
    name: str,
    metrics: Metrics | None = None,
    lr: float | None = None,
    gradient: bool = True,
    update: bool = True,
) -> Metrics:
    """Add param's four norms to metrics (a new dict when None) and return it; `lr`: the
    lr its step was taken with, where the group's has moved since (see the module);
    gradient=False leaves the gradient's norm out, for callers that took it at the step
    (a sharded parameter's norm is a collective: not worth taking twice); update=False
    leaves the update's out, for a parameter the step just taken did not update (its
    last update was an earlier step's).

    A parameter without optimizer state yet contributes nothing, as in Composer; the
    gradient norm is added only while param.grad exists, and so is the update norm of an
    update that reads the gradient (NAdam's). A parameter with state taken out of the
    param groups (a freezing callback that drops its group) reports its moment, parameter
    and gradient norms but no update norm: the hyperparameters to compute it are gone
    (the metrics raised there, ending a Composer run inside OptimizerMonitor).
    """
    require_core_optimizer(optimizer, _UPDATE_FROM_COEFFICIENTS)
    metrics = {} if metrics is None else metrics
    coefficients = optimizer.last_step_coefficients(param, lr)
    if coefficients is None:
        state = optimizer.state.get(param)
        if not state or float(state.get("step", 0)) == 0:
            return metrics
    change = (
        None
        if not update or coefficients is None or _gradient_gone(optimizer, param)
        else _update(optimizer, param, coefficients)
    )
    metrics[f"{MOMENT}/{name}"] = l2_norm(stored_moment(optimizer.state[param], "exp_avg", param))
    metrics[f"{PARAM}/{name}"] = l2_norm(param.detach())
    if change is not None:
        metrics[f"{UPDATE}/{name}"] = torch.linalg.vector_norm(change).to(
            torch.promote_types(param.dtype, torch.float32)
        )
    if gradient and param.grad is not None:
        metrics[f"{GRAD}/{name}"] = l2_norm(param.grad)
    return metrics


def pre_reduce_metrics(metrics: Metrics) -> Metrics:
    """Square the l2 norms in place (and return metrics), so a sum over ranks of the
    squares gives the square of the global norm."""
    for key, value in metrics.items():
        if key.startswith("l2_norm/"):
            metrics[key] = value**2
    return metrics


def _zero_on_reduce_device(metrics: Metrics) -> Tensor:
    """A zero for a metric this rank lacks, on the device the process group reduces on."""
    for value in metrics.values():
        if isinstance(value, Tensor):
            return torch.zeros((), dtype=value.dtype, device=value.device)
    if dist.get_backend() == "nccl":
        return torch.zeros((), device=torch.device("cuda", torch.cuda.current_device()))
    return torch.zeros((), device="cpu")


def dist_reduce_metrics(metrics: Metrics, group: Any = None) -> Metrics:
    """Combine pre-reduced metrics over the ranks of `group` in place (and return them).

    l2 norms: the root of the summed squares, as a Python float; other metrics: the mean
    over ranks; both as Composer's DecoupledAdamW returns them, so code written for its
    output (OptimizerMonitor, a logger) sees the same types. Every
    rank must call it; a metric that some rank lacks (a parameter with no state there)
    counts as zero on that rank. Without an initialized process group it only takes the
    roots, so single-process code can call the same pair of functions.
    """
    for key, value in metrics.items():  # before any change or collective
        if key.startswith("l2_norm/") and float(value) < 0:
            raise ValueError(
                f"Invalid metric {key}: {float(value)!r}. Allowed: a value >= 0, the squared "
                "norm pre_reduce_metrics makes (call it first)."
            )
    distributed = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size(group) if distributed else 1
    keys = set(metrics)
    if world_size > 1:
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, sorted(keys), group=group)
        keys = set().union(*gathered)
    for key in sorted(keys):
        value = metrics.get(key)
        value = _zero_on_reduce_device(metrics) if value is None else value
        if world_size > 1:
            value = value.clone() if isinstance(value, Tensor) else torch.tensor(float(value))
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
        metrics[key] = math.sqrt(value) if key.startswith("l2_norm/") else value / world_size
    return metrics
