"""Preparing a model for an optimizer: weight-decay groups and pure low-precision casting.

`param_groups_weight_decay` and `to_low_precision` have optimi's names, signatures and
behaviour, so optimi code keeps working after its import changes. `skips_weight_decay` is
the project's one rule for which parameters get no weight decay; the Lightning and
Composer adapters call it too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from core.optimizer import finite_at_least, require

NO_DECAY_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Embedding,
    nn.EmbeddingBag,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
"""Modules whose parameters the adapters never decay (custom ones are found by name)."""
NO_DECAY_MODULE_NAMES = ("Norm", "Embedding")
"""Class-name parts that mark a custom normalisation or embedding module."""


def skips_weight_decay(
    name: str,
    param: Tensor,
    owner: nn.Module | None = None,
    additional_layers: Iterable[str] = (),
) -> bool:
    """Whether a parameter belongs in the group without weight decay.

    optimi's rule: biases (names ending in '.bias'), every parameter with ndim <= 1 (norm
    scales, biases, scalars: decaying them hurts and saves nothing) and names containing
    any of `additional_layers`. Given the module that holds the parameter (`owner`), also
    every parameter of a normalisation or embedding module, by type or by a class name
    containing 'Norm' or 'Embedding': the adapters' default, which spares embedding
    tables, though they are 2-D.

    A lazy module's parameter whose answer depends on its shape is refused: before the
    module's first forward it reports one dimension, so a 2-D weight silently lost its
    weight decay.
    """
    if name.endswith(".bias") or any(n in name for n in additional_layers):
        return True
    if owner is not None and (
        isinstance(owner, NO_DECAY_MODULE_TYPES)
        or any(n in type(owner).__name__ for n in NO_DECAY_MODULE_NAMES)
    ):
        return True
    if nn.parameter.is_lazy(param):
        raise ValueError(
            f"Invalid parameter {name!r}: uninitialized (a lazy module's), so its shape, "
            "which decides whether it gets weight decay, is not known yet. Allowed: "
            "initialized parameters: run one forward pass on an example batch before "
            "building the optimizer (for a LightningModule, in __init__ or setup()), or "
            "choose the no-decay parameters by name."
        )
    return param.ndim <= 1


_COMPILED_MODULE_ATTRIBUTE = "_orig_mod"
"""Where torch.compile's wrapper (OptimizedModule) holds the module it compiled."""


def user_facing_name(name: str) -> str:
    """A qualified parameter name as the user's modules spell it, without the component
    torch.compile's wrapper adds ('model._orig_mod.0.weight' -> 'model.0.weight'): the
    Lightning adapter's no-decay patterns match either, and its per-parameter metric keys
    read the same whether or not a submodule was compiled."""
    if _COMPILED_MODULE_ATTRIBUTE not in name:
        return name
    return ".".join(part for part in name.split(".") if part != _COMPILED_MODULE_ATTRIBUTE)


def owned_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, nn.Module]]:
    """(qualified name, parameter, module holding it) for every parameter of model, under
    every name it has: a tied parameter comes once per module that holds it, and a module
    registered under two names (self.enc2 = self.enc1) once per name."""
    for module_name, owner in model.named_modules(remove_duplicate=False):
        for param_name, param in owner.named_parameters(recurse=False, remove_duplicate=False):
            yield (f"{module_name}.{param_name}" if module_name else param_name), param, owner


def param_groups_weight_decay(
    model: nn.Module,
    weight_decay: float = 1e-2,
    additional_layers: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """optimi's helper: [no-decay group, decay group] of model's trainable parameters.

    The first group (weight_decay 0) holds what `skips_weight_decay` exempts without an
    owner (biases, parameters with ndim <= 1, names containing any of
    `additional_layers`); the second the rest, with `weight_decay`. Frozen parameters are
    left out. Pass the result as the optimizer's params.
    """
    require_module(model)
    require(
        finite_at_least(weight_decay, 0.0), "weight_decay", weight_decay, "a finite number >= 0"
    )
    require(
        additional_layers is None
        or (not isinstance(additional_layers, str) and isinstance(additional_layers, Iterable)),
        "additional_layers",
        additional_layers,
        "None or an iterable of name substrings, such as ['embed']",
    )
    layers = list(additional_layers or ())
    require(
        all(isinstance(layer, str) for layer in layers),
        "additional_layers",
        additional_layers,
        "None or an iterable of name substrings, such as ['embed']",
    )
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            exempt = skips_weight_decay(name, param, additional_layers=layers)
            (no_decay if exempt else decay).append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def require_module(model: object) -> None:
    """Refuse anything but a module: these helpers read names and owners from it (its
    parameters alone have none), and gradient release hooks its parameters."""
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"Invalid model: a {type(model).__name__}. Allowed: an nn.Module (the model "
            "itself, not model.parameters())."
        )


def _types_and_names(
    value: Any, argument: str, names_allowed: bool
) -> tuple[tuple[type[nn.Module], ...], tuple[str, ...]]:
    """Module types and lower-cased name parts from one selector or an iterable of them."""
    allowed = "None, an nn.Module subclass" + (", a name substring" if names_allowed else "")
    allowed += ", or an iterable of those"
    if value is None:
        return (), ()
    items = [value] if isinstance(value, (str, type)) else value
    require(isinstance(items, Iterable), argument, value, allowed)
    items = list(items)
    for item in items:
        is_module = isinstance(item, type) and issubclass(item, nn.Module)
        require(is_module or (names_allowed and isinstance(item, str)), argument, value, allowed)
    types = tuple(item for item in items if isinstance(item, type))
    return types, tuple(item.lower() for item in items if isinstance(item, str))


def to_low_precision(
    model: nn.Module,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    fp32_modules: type[nn.Module] | Iterable[type[nn.Module]] | None = nn.Embedding,
    fp32_buffers: str | type[nn.Module] | Iterable[str | type[nn.Module]] | None = (
        "rope",
        "rotary",
    ),
) -> nn.Module:
    """Cast model in place for pure low-precision training (optimi's helper); return it.

    Floating parameters and buffers become `dtype`, except those kept in float32:
    parameters and buffers of `fp32_modules` (embeddings by default: a bf16 table rounds
    rarely updated rows away), and the buffers of modules of a type in `fp32_buffers` or
    whose qualified name contains one of its strings, ignoring case (rotary position
    tables by default: their angles need float32). Everything moves to `device` when given.
    Train the result with Kahan summation (kahan_sum=None does it for bf16/fp16).
    """
    require_module(model)
    require(
        isinstance(dtype, torch.dtype) and dtype.is_floating_point,
        "dtype",
        dtype,
        "a floating torch.dtype, such as torch.bfloat16",
    )
    keep_module_types, _ = _types_and_names(fp32_modules, "fp32_modules", names_allowed=False)
    buffer_types, buffer_names = _types_and_names(fp32_buffers, "fp32_buffers", names_allowed=True)
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            require(False, "device", device, "None, a torch.device or a device string")
    for module_name, module in model.named_modules():
        keep_params = isinstance(module, keep_module_types)
        keep_buffers = (
            keep_params
            or isinstance(module, buffer_types)
            or any(part in module_name.lower() for part in buffer_names)
        )
        # Module._apply also hands over each parameter's gradient: it follows its parameter.
        kept = {}
        for param in module.parameters(recurse=False):
            kept[id(param)] = keep_params
            if param.grad is not None:
                kept[id(param.grad)] = keep_params
        kept.update((id(buffer), keep_buffers) for buffer in module.buffers(recurse=False))

        def cast(tensor: Tensor, kept: dict[int, bool] = kept) -> Tensor:
            if id(tensor) not in kept:
                return tensor
            if not tensor.is_floating_point():
                return tensor if device is None else tensor.to(device)
            return tensor.to(device=device, dtype=torch.float32 if kept[id(tensor)] else dtype)

        module._apply(cast, recurse=False)
    return model
