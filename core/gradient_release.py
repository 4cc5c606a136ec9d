"""Gradient release: step each parameter inside backward and free its gradient at once.

A post-accumulate-grad hook runs `optimizer.step(param=p)` as soon as p's gradient is
complete and then drops it, so the model never holds a full set of gradients (about a
quarter of Adam's non-activation memory). With `optimizer.optimizer_accumulation = True`
micro-batch gradients are folded into the moments instead (see core.optimizer.window_terms).

What cannot work is refused rather than computed wrongly: a GradScaler (its unscale and
inf/NaN skip come after backward, when parameters are already updated) and sparse
gradients raise; gradient clipping needs the whole gradient and cannot be applied to
released gradients (the Lightning and Composer callbacks refuse it; in plain PyTorch,
clip_grad_norm_ after backward sees no gradients). Hooks fire on local gradients, so a
distributed model must step from its communication hook instead (the adapters do).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from core.optimizer import AdamFamilyOptimizer


@dataclass
class _Registration:
    """The hooks one prepare_for_gradient_release call installed."""

    optimizer: AdamFamilyOptimizer
    params: list[Tensor]
    handles: list[RemovableHandle] = field(default_factory=list)

    def release(self, params: list[Tensor]) -> None:
        """Hook params (also called by add_param_group for a new released group)."""
        hook = _release_hook(weakref.ref(self.optimizer))
        self.handles.extend(p.register_post_accumulate_grad_hook(hook) for p in params)
        self.params.extend(params)
        self.optimizer.released_params.update(params)


_registrations: weakref.WeakKeyDictionary[nn.Module, _Registration] = weakref.WeakKeyDictionary()


def _has_other_hooks(param: Tensor) -> bool:
    return bool(getattr(param, "_post_accumulate_grad_hooks", None))


def _release_hook(optimizer_ref: weakref.ref[AdamFamilyOptimizer]) -> Callable[[Tensor], None]:
    def step_and_free(param: Tensor) -> None:
        optimizer = optimizer_ref()
        if optimizer is not None:
            optimizer.step(param=param)
            optimizer.zero_grad(param=param)

    return step_and_free


def prepare_for_gradient_release(
    model: nn.Module,
    optimizer: AdamFamilyOptimizer,
    ignore_existing_hooks: bool = False,
) -> None:
    """Register release hooks on the model's parameters in groups with gradient_release=True.

    Calling it again replaces the earlier registration (safe to call at every fit start).

    Args:
        model: The module whose parameters the optimizer trains.
        optimizer: A core optimizer created with gradient_release=True.
        ignore_existing_hooks: Register even on parameters that already carry
            post-accumulate-grad hooks (they would otherwise be refused, because such a
            hook may expect the gradient release frees).
    """
    if not isinstance(optimizer, AdamFamilyOptimizer):
        raise TypeError(
            f"Invalid optimizer: {type(optimizer).__name__}. Allowed: an adamkit core optimizer "
            "(core.Adam, AdamW, RAdam, NAdam, ADOPT) created with gradient_release=True."
        )
    if isinstance(model, nn.parallel.DistributedDataParallel) or (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        raise RuntimeError(
            "Gradient release hooks fire on each rank's local gradient, before DDP averages "
            "it, so replicas would drift apart. Use the Lightning or Composer GradientRelease "
            "callback, which steps after the all-reduce, or train without release."
        )
    model_params = {p for p in model.parameters() if p.requires_grad}
    released = [
        p
        for group in optimizer.param_groups
        if group["gradient_release"]
        for p in group["params"]
        if p in model_params
    ]
    if not released:
        raise ValueError(
            "Invalid optimizer for gradient release: no param group with gradient_release=True "
            "holds a parameter of this model. Create the optimizer with gradient_release=True."
        )
    remove_gradient_release(model)
    if not ignore_existing_hooks:
        hooked = [tuple(p.shape) for p in released if _has_other_hooks(p)]
        if hooked:
            raise ValueError(
                f"Invalid model for gradient release: {len(hooked)} parameter(s) (shapes "
                f"{hooked[:3]}) already carry post-accumulate-grad hooks. Allowed: parameters "
                "without such hooks, or pass ignore_existing_hooks=True."
            )
    registration = _Registration(optimizer, [])
    registration.release(released)
    optimizer.gradient_release_registrations.append(registration)
    # GradScaler passes itself to step() when this is set, so step() can refuse it clearly.
    optimizer._step_supports_amp_scaling = True
    _registrations[model] = registration


def remove_gradient_release(model: nn.Module) -> None:
    """Remove the hooks prepare_for_gradient_release registered; the optimizer steps normally."""
    registration = _registrations.pop(model, None)
    if registration is None:
        return
    for handle in registration.handles:
        handle.remove()
    optimizer = registration.optimizer
    optimizer.released_params.difference_update(registration.params)
    optimizer.gradient_release_registrations.remove(registration)
    if not optimizer.released_params:
        optimizer._step_supports_amp_scaling = False


def is_gradient_release_prepared(model: nn.Module) -> bool:
    """Whether the model currently has release hooks from prepare_for_gradient_release."""
    return model in _registrations
