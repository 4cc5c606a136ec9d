"""Gradient release: step each parameter inside backward and free its gradient at once.

A post-accumulate-grad hook runs `step_released_param(optimizer, p)` (the update of
`optimizer.step(param=p)`) as soon as p's gradient is complete and then drops it, so the
model never holds a full set of gradients (about a quarter of Adam's non-activation
memory). With `optimizer.optimizer_accumulation = True` micro-batch gradients are folded
into the moments instead (see core.optimizer.window_terms).

What cannot work is refused rather than computed wrongly: a GradScaler (its unscale and
inf/NaN skip come after backward, when parameters are already updated) and sparse
gradients raise; gradient clipping needs the whole gradient and cannot be applied to
released gradients, so while a model is released torch.nn.utils.clip_grad_norm_ and
clip_grad_value_ raise when given its parameters (the framework callbacks refuse clipping
settings up front). Under FSDP2 the hooks fire after the reduce-scatter, on the
sharded parameters, so release works there as on one process; under DDP they would fire
on local gradients, so a DDP model must step from its communication hook instead (the
Lightning adapter does) and is refused here.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from core.backends.views import dtensor_type
from core.models import require_module
from core.optimizer import (
    AdamFamilyOptimizer,
    in_a_run_of_several_ranks,
    require,
    require_core_optimizer,
    step_released_param,
    unwrapped,
)


@dataclass(eq=False)  # one registration is one set of hooks: compared by identity
class _Registration:
    """The hooks one prepare_for_gradient_release call installed. It lives in its
    optimizer's gradient_release_registrations and holds the optimizer and the module it
    was made on weakly: release ends with its optimizer (its hooks are removed when the
    optimizer is collected), and a temporary container given to prepare may go."""

    optimizer_ref: weakref.ref[AdamFamilyOptimizer]
    module_ref: weakref.ref[nn.Module]
    params: list[Tensor] = field(default_factory=list)
    handles: list[RemovableHandle] = field(default_factory=list)

    def release(self, params: list[Tensor]) -> None:
        """Hook params that require grad (also called by add_param_group for a new released
        group, whose frozen params are left as prepare leaves them); a parameter another
        optimizer already releases is refused before any hook, and a failed hook undoes
        those made before it."""
        optimizer = self.optimizer_ref()
        assert optimizer is not None, "called by prepare or the optimizer's add_param_group"
        params = [p for p in params if p.requires_grad]
        _refuse_released_elsewhere(optimizer, params, exempt=[])
        hook = _release_hook(self.optimizer_ref)
        handles: list[RemovableHandle] = []
        try:
            for p in params:
                handles.append(p.register_post_accumulate_grad_hook(hook))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        self.handles.extend(handles)
        self.params.extend(params)
        optimizer.released_params.update(params)
        optimizer._release_seen = True  # plain steps after removal are deliberate


_releasing_optimizers: weakref.WeakSet[AdamFamilyOptimizer] = weakref.WeakSet()
"""Optimizers that were prepared for release: their gradient_release_registrations are
what is released anywhere (one per optimizer and module prepared; a head and a body
trained by two optimizers are prepared on the same model, each on its own parameters)."""


def _live_registrations() -> list[_Registration]:
    """Every live optimizer's registrations. A collection may run between this call and
    the use of its result (any allocation can trigger one), so users of the list read
    each registration's optimizer_ref() again and skip one that has since gone (its
    finalizer removed its hooks)."""
    return [r for o in list(_releasing_optimizers) for r in o.gradient_release_registrations]


def _remove_hooks(registration: _Registration) -> None:
    for handle in registration.handles:
        handle.remove()


def _guard_while_released() -> None:
    """torch's guards stay while anything is released anywhere, no longer."""
    _guard_torch(active=bool(_live_registrations()))


def _forget_registrations(registrations: list[_Registration]) -> None:
    """A released optimizer collected without remove_gradient_release: its hooks stayed on
    the parameters (doing nothing, yet counted as foreign hooks by a later prepare), and
    while the model lived the optimizer did too, so its hooks went on stepping and freeing
    gradients a new optimizer then never saw. Also takes torch's guards off once nothing
    is released anywhere (they stayed for the rest of the process)."""
    for registration in registrations:
        _remove_hooks(registration)
    registrations.clear()
    _guard_while_released()


_CLIPPING_FUNCTIONS = ("clip_grad_norm_", "clip_grad_value_")
_guarded_originals: dict[str, Callable[..., object]] = {}


def _released_anywhere(optimizer: AdamFamilyOptimizer | None = None) -> set[Tensor]:
    """Parameters release hooks step (those of optimizer, when given)."""
    return {
        p
        for r in _live_registrations()
        if (owner := r.optimizer_ref()) is not None and (optimizer is None or owner is optimizer)
        for p in r.params
    }


def _refusing_clipping(name: str, original: Callable[..., object]) -> Callable[..., object]:
    def clip(parameters: object, *args: object, **kwargs: object) -> object:
        candidates = [parameters] if isinstance(parameters, Tensor) else list(parameters)  # type: ignore[call-overload]
        released = _released_anywhere()
        if any(p in released for p in candidates):
            raise RuntimeError(
                f"torch.nn.utils.{name} was called on parameters under gradient release: their "
                "gradients were applied and freed inside backward, so there is nothing left to "
                "clip. Turn gradient release off to clip gradients."
            )
        return original(candidates, *args, **kwargs)

    clip.__doc__ = original.__doc__
    return clip


def _guard_torch(active: bool) -> None:
    """While any model is released, make torch's clipping functions refuse released params
    (they would otherwise see no gradients and silently clip nothing), and GradScaler refuse
    to scale a loss whose backward would step them."""
    modules = (torch.nn.utils, torch.nn.utils.clip_grad)
    for name in _CLIPPING_FUNCTIONS:
        if active and name not in _guarded_originals:
            _guarded_originals[name] = getattr(torch.nn.utils, name)
            for module in modules:
                setattr(module, name, _refusing_clipping(name, _guarded_originals[name]))
        elif not active and name in _guarded_originals:
            original = _guarded_originals.pop(name)
            for module in modules:
                setattr(module, name, original)
    scaler = torch.amp.GradScaler
    if active and _SCALE not in _guarded_originals:
        _guarded_originals[_SCALE] = scaler.scale
        scaler.scale = _refusing_scale(_guarded_originals[_SCALE])  # type: ignore[method-assign]
    elif not active and _SCALE in _guarded_originals:
        scaler.scale = _guarded_originals.pop(_SCALE)  # type: ignore[method-assign]


_SCALE = "GradScaler.scale"


def _refusing_scale(original: Callable[..., Any]) -> Callable[..., Any]:
    """GradScaler.scale that refuses a loss reaching released parameters: their hooks would
    step them from the scaled gradient inside backward, before the scaler can unscale it
    or skip an inf/NaN step (step() refused it only then, after every parameter had moved).
    Scaling anything else, or with the scaler disabled, is unchanged."""

    def scale(self: torch.amp.GradScaler, outputs: Any) -> Any:
        if self.is_enabled() and _reaches_released(outputs):
            raise RuntimeError(
                "Invalid setup for gradient release: GradScaler.scale was given a loss whose "
                "backward steps released parameters, inside backward, from the scaled "
                "gradient, before the scaler can unscale it or skip an inf/NaN step. Nothing "
                "was changed. Allowed: bf16 autocast (no scaler needed), or train without "
                "release (remove_gradient_release)."
            )
        return original(self, outputs)

    scale.__doc__ = original.__doc__
    return scale


def _reaches_released(outputs: Any) -> bool:
    """Whether the autograd graph behind outputs (a tensor or nested iterables of them)
    accumulates into a released parameter: one walk of the graph per scaled loss, made
    only while some model is released."""
    released = _released_anywhere()
    pending, nodes, seen = [outputs], [], set()
    while pending:
        item = pending.pop()
        if isinstance(item, Tensor):
            nodes.append(item.grad_fn)
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node's parameter
        if variable is not None and variable in released:
            return True
        nodes.extend(following for following, _ in node.next_functions)
    return False


def _inner_module(model: nn.Module) -> nn.Module:
    """The module transparent wrappers hold (Fabric's setup() returns one whose `module`
    is the user's model, torch.compile one whose `_orig_mod` is, each with the same
    parameters), so that preparing through one and removing or preparing again through
    another find the same registration."""
    inner = _wrapped(model)
    while (
        isinstance(inner, nn.Module)
        and not isinstance(model, nn.parallel.DistributedDataParallel)
        and _same_parameters(model, inner)
    ):
        model, inner = inner, _wrapped(inner)
    return model


def _wrapped(model: nn.Module) -> object:
    """What a wrapper holds: Fabric's (and DDP's) `module`, torch.compile's `_orig_mod`."""
    inner = getattr(model, "module", None)
    return inner if inner is not None else getattr(model, "_orig_mod", None)


def _same_parameters(outer: nn.Module, inner: nn.Module) -> bool:
    return {id(p) for p in outer.parameters()} == {id(p) for p in inner.parameters()}


def _has_other_hooks(param: Tensor, own: set[int]) -> bool:
    """Whether param carries post-accumulate-grad hooks besides those whose ids are own."""
    hooks = getattr(param, "_post_accumulate_grad_hooks", None) or {}
    return any(key not in own for key in hooks)


def _release_hook(optimizer_ref: weakref.ref[AdamFamilyOptimizer]) -> Callable[[Tensor], None]:
    def step_and_free(param: Tensor) -> None:
        optimizer = optimizer_ref()
        if optimizer is None or optimizer.release_paused:
            return
        if _ranks_since_prepared(param):
            raise RuntimeError(
                "Invalid setup for gradient release: prepare_for_gradient_release ran before "
                f"a process group of {torch.distributed.get_world_size()} ranks was started "
                "(fabric.launch(), init_process_group), and this parameter of shape "
                f"{tuple(param.shape)} is a plain tensor, whose hook sees the rank's local "
                "gradient before any all-reduce (replicas would drift apart). Nothing was "
                "stepped. Allowed: prepare after the process group exists, on a model "
                "sharded with FSDP2 (fully_shard), or train without release under DDP."
            )
        if step_released_param(optimizer, param, frees_gradient=True):
            optimizer.zero_grad(param=param)

    return step_and_free


def _ranks_since_prepared(param: Tensor) -> bool:
    """Whether a plain parameter's hook runs on several ranks: prepare_for_gradient_release
    refuses that, but a process group started after it (fabric.launch() after preparing)
    slipped past its check. One cheap call while no process group exists."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    dtensor = dtensor_type()
    sharded = dtensor is not None and isinstance(param, dtensor)
    return not sharded and torch.distributed.get_world_size() > 1


def _check_distributed_setup(model: nn.Module) -> None:
    """Refuse setups where a parameter's hook would see a gradient before it is global.

    FSDP2 (fully_shard) reduce-scatters before it sets a sharded parameter's gradient and
    runs its post-accumulate-grad hooks, and DTensor autograd hands every DTensor
    parameter its global gradient, so a model whose parameters are all DTensors is
    released correctly on any number of ranks. Plain parameters on more than one rank
    (DDP, or a model replicated by hand) get their hook call on the local gradient, before
    DDP averages it: those are refused.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise RuntimeError(
            "Invalid model for gradient release: a DistributedDataParallel module. Its "
            "hooks would fire on each rank's local gradient, before DDP averages it, so "
            "replicas would drift apart. Shard the model with FSDP2 (fully_shard; "
            "Lightning's ModelParallelStrategy, Composer's FSDP2Config), use the Lightning "
            "GradientRelease callback under automatic optimization (it steps from DDP's "
            "communication hook, after the all-reduce), or train without release."
        )
    if not in_a_run_of_several_ranks():
        return
    dtensor = dtensor_type()
    plain = [
        tuple(p.shape)
        for p in model.parameters()
        if p.requires_grad and (dtensor is None or not isinstance(p, dtensor))
    ]
    if plain:
        raise RuntimeError(
            f"Invalid model for gradient release on {torch.distributed.get_world_size()} "
            f"ranks: {len(plain)} parameter(s) (shapes {plain[:3]}) are plain tensors, whose "
            "hooks fire on each rank's local gradient before any all-reduce. Allowed: a "
            "model sharded with FSDP2 (fully_shard, every parameter a DTensor; Lightning's "
            "ModelParallelStrategy, Composer's FSDP2Config), or under DDP the Lightning "
            "GradientRelease callback with automatic optimization (it steps after the "
            "all-reduce); with manual optimization under DDP, train without release."
        )


def prepare_for_gradient_release(
    model: nn.Module,
    optimizer: AdamFamilyOptimizer,
    ignore_existing_hooks: bool = False,
) -> None:
    """Register release hooks on the model's parameters in groups with gradient_release=True.

    Calling it again with the same optimizer replaces that optimizer's earlier
    registration (safe to call at every fit start). Several optimizers can be prepared on
    one model, each releasing its own parameters; a parameter another optimizer already
    releases is refused (it would be stepped by both).

    Args:
        model: The module whose parameters the optimizer trains.
        optimizer: A core optimizer created with gradient_release=True.
        ignore_existing_hooks: Register even on parameters that already carry
            post-accumulate-grad hooks (they would otherwise be refused, because such a
            hook may expect the gradient release frees).
    """
    require_module(model)
    require_core_optimizer(optimizer, ") created with gradient_release=True")
    scaler = _grad_scaler_of(model, optimizer)
    if scaler is not None:
        raise RuntimeError(
            f"Invalid setup for gradient release: the loss is scaled by a "
            f"{type(scaler).__name__} (16-mixed precision), whose unscaling and inf/NaN step "
            "skipping come after backward, when released parameters are already updated. "
            "Nothing was changed. Allowed: bf16-mixed, bf16-true or 32-true precision, or "
            "train without release."
        )
    require(
        isinstance(ignore_existing_hooks, bool),
        "ignore_existing_hooks",
        ignore_existing_hooks,
        "True or False",
    )
    # Hooks step the optimizer Lightning steps, not a LightningOptimizer wrapper of it.
    optimizer = unwrapped(optimizer)
    _check_distributed_setup(model)
    model = _inner_module(model)
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
    # Checked before anything is removed, so a refusal leaves the earlier release working.
    # Replaced: this optimizer's earlier registration on the model, and another optimizer's
    # on the model that covers any of the same parameters (a new optimizer for a model a
    # fit that raised left prepared); kept: other optimizers' on other parameters (a head
    # and a body). This optimizer's registrations made through other modules (a part of
    # the model, a container) give up the parameters taken here.
    taking = set(released)
    live = _live_registrations()
    earlier = [
        r
        for r in live
        if r.module_ref() is model
        and (r.optimizer_ref() is optimizer or any(p in taking for p in r.params))
    ]
    overlapping = [
        r
        for r in live
        if r.optimizer_ref() is optimizer
        and r not in earlier
        and any(p in taking for p in r.params)
    ]
    _refuse_released_elsewhere(optimizer, released, exempt=earlier)
    if not ignore_existing_hooks:
        own = {handle.id for r in (*earlier, *overlapping) for handle in r.handles}
        hooked = [tuple(p.shape) for p in released if _has_other_hooks(p, own)]
        if hooked:
            raise ValueError(
                f"Invalid model for gradient release: {len(hooked)} parameter(s) (shapes "
                f"{hooked[:3]}) already carry post-accumulate-grad hooks. Allowed: parameters "
                "without such hooks, or pass ignore_existing_hooks=True."
            )
    for registration in earlier:
        _remove(registration)
    for registration in overlapping:
        _unhook(registration, taking)
    registration = _Registration(weakref.ref(optimizer), weakref.ref(model))
    registration.release(released)
    optimizer.gradient_release_registrations.append(registration)
    # GradScaler passes itself to step() when this is set, so step() can refuse it clearly.
    optimizer._step_supports_amp_scaling = True
    if optimizer not in _releasing_optimizers:
        _releasing_optimizers.add(optimizer)
        weakref.finalize(optimizer, _forget_registrations, optimizer.gradient_release_registrations)
    _guard_torch(active=True)


def _refuse_released_elsewhere(
    optimizer: AdamFamilyOptimizer, params: list[Tensor], exempt: list[_Registration]
) -> None:
    """Refuse params another optimizer releases (through a registration not in exempt):
    each backward would step them with both; with release only the first hook does (the
    second finds the gradient freed), where ordinary training steps both."""
    taken = {
        p: other
        for r in _live_registrations()
        if (other := r.optimizer_ref()) is not None
        and other is not optimizer
        and all(r is not e for e in exempt)
        for p in r.params
    }
    shared = [(tuple(p.shape), taken[p]) for p in params if p in taken]
    if shared:
        raise ValueError(
            f"Invalid optimizer for gradient release: {len(shared)} parameter(s) (shapes "
            f"{[shape for shape, _ in shared[:3]]}) are already released by another "
            f"optimizer ({type(shared[0][1]).__name__}), so each backward would step them "
            "twice. Nothing was changed. Allowed: optimizers on disjoint parameters, or "
            "remove_gradient_release on the model released with the other first."
        )


def _grad_scaler_of(*wrapped: object) -> object | None:
    """The GradScaler a framework's wrappers will scale the loss with, if they say: Fabric's
    module and optimizer wrappers hold their strategy, whose precision plugin holds it.
    Given the bare module and optimizer nothing says, and step() refuses the scaler when it
    reaches the optimizer, after backward."""
    for wrapper in wrapped:
        precision = getattr(getattr(wrapper, "_strategy", None), "precision", None)
        scaler = getattr(precision, "scaler", None)
        if scaler is not None:
            return scaler
    return None


def remove_gradient_release(model: nn.Module) -> None:
    """Remove the hooks prepare_for_gradient_release registered; the optimizer steps normally.

    Also unhooks the model's parameters released through another module (a container
    built for the call and since collected, or the whole model when given a part of it):
    they were left stepping inside backward, silently.
    """
    require_module(model)
    model = _inner_module(model)
    own = set(model.parameters())
    for registration in _live_registrations():
        if registration.module_ref() is model:
            _remove(registration)
        elif any(p in own for p in registration.params):
            _unhook(registration, own)


def _unhook(registration: _Registration, params: set[Tensor]) -> None:
    """Undo a registration's hooks on params only; one left with none is removed."""
    optimizer = registration.optimizer_ref()
    if optimizer is None:  # collected meanwhile: its finalizer removed every hook
        return
    pairs = list(zip(registration.params, registration.handles, strict=True))
    kept = [(p, handle) for p, handle in pairs if p not in params]
    if not kept:
        _remove(registration)
        return
    for p, handle in pairs:
        if p in params:
            handle.remove()
            optimizer.released_params.discard(p)
    registration.params[:] = [p for p, _ in kept]
    registration.handles[:] = [handle for _, handle in kept]


def _remove(registration: _Registration) -> None:
    """Undo one registration: its hooks, and the optimizer's record of them."""
    _remove_hooks(registration)
    optimizer = registration.optimizer_ref()
    if optimizer is None:  # collected meanwhile: its finalizer forgot it
        return
    optimizer.released_params.difference_update(registration.params)
    optimizer.gradient_release_registrations.remove(registration)
    if not optimizer.released_params:
        optimizer._step_supports_amp_scaling = False
    _guard_while_released()


def is_gradient_release_prepared(
    model: nn.Module, optimizer: AdamFamilyOptimizer | None = None
) -> bool:
    """Whether release hooks step any of the model's parameters (those of the optimizer,
    when given), whichever module they were prepared through."""
    require_module(model)
    if optimizer is not None:
        require_core_optimizer(optimizer, ")")
        optimizer = unwrapped(optimizer)
    released = _released_anywhere(optimizer)
    return any(p in released for p in _inner_module(model).parameters())
