"""`configure_optimizers` in one call: an optimizer, no-weight-decay groups and an LR schedule.

Everything is checked (names, hyperparameters, schedule fields) before the optimizer is
built, and every error names the argument, the value and what is allowed.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

from torch import nn
from torch.optim import Optimizer

import core
from core.models import owned_parameters, require_module, skips_weight_decay, user_facing_name
from core.optimizer import require
from lightning_adam.schedules import LRSchedule

CORE_OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.__name__: cls for cls in (core.Adam, core.AdamW, core.RAdam, core.NAdam, core.ADOPT)
}
"""The names `configure_optimizers` resolves without a module path (case-insensitive)."""

OptimizerSpec: TypeAlias = str | type[Optimizer] | Mapping[str, Any] | Callable[..., Optimizer]
ScheduleSpec: TypeAlias = LRSchedule | str | Mapping[str, Any] | None
NoWeightDecay: TypeAlias = bool | Sequence[str] | Callable[[str, nn.Parameter, nn.Module], bool]

_ALLOWED_OPTIMIZERS = (
    f"one of {', '.join(CORE_OPTIMIZERS)} (adamkit's core classes, any case), a dotted class "
    "path such as 'core.AdamW' or 'torch.optim.SGD', an Optimizer subclass, a "
    "{'class_path': ..., 'init_args': {...}} dict, or a callable that builds the optimizer "
    "from param groups"
)
_CONFIG_KEYS = "optimizer, scheduler, no_weight_decay and the optimizer's hyperparameters"


def configure_optimizers(
    module: nn.Module,
    optimizer: OptimizerSpec = "AdamW",
    *,
    scheduler: ScheduleSpec = None,
    no_weight_decay: NoWeightDecay = True,
    **hyperparameters: Any,
) -> dict[str, Any]:
    """Build what `LightningModule.configure_optimizers` returns, in one call.

    Args:
        module: The LightningModule (any nn.Module; the trainer is needed only when the
            schedule's total_steps is left to it).
        optimizer: The optimizer: a core name ('AdamW', 'ADOPT', ...), a dotted class path,
            a class, a {'class_path', 'init_args'} dict as LightningCLI links it, or a
            callable taking param groups. Or a whole config as a plain dict (e.g. loaded
            from YAML) whose keys are this function's keyword arguments; then pass
            nothing else.
        scheduler: None for a fixed lr, or an LRSchedule, a kind ('cosine', 'linear',
            'constant'), or a dict of LRSchedule fields.
        no_weight_decay: Which parameters go in a group with weight_decay 0. True: biases,
            normalisation weights and embeddings (`core.models.skips_weight_decay` with
            the owning module: parameters with ndim <= 1 or named '*.bias', and those of
            normalisation and embedding modules). False: none.
            A list of fnmatch patterns over qualified parameter names replaces that rule;
            a callable (name, parameter, owning module) -> bool decides per parameter.
        **hyperparameters: The optimizer's keyword arguments (lr, weight_decay, ...);
            unknown names are refused with the list of valid ones.

    Returns:
        {'optimizer': ...} and, with a schedule, 'lr_scheduler': {'scheduler', 'interval',
        'frequency', 'name'}, as Lightning accepts it.
    """
    require_module(module)  # model.parameters() has no names for the no-decay rule
    _require_trainable(module)
    if isinstance(optimizer, Mapping) and "class_path" not in optimizer:
        return _from_config(module, optimizer, scheduler, no_weight_decay, hyperparameters)
    factory, label, kwargs = _resolve_optimizer(optimizer, hyperparameters)
    schedule = None if scheduler is None else LRSchedule.coerce(scheduler)
    count_later = None  # total_steps counted by the trainer once it is safe (resumed fits)
    if schedule is not None and schedule.total_steps is None:
        schedule, count_later = schedule.counted_by(_trainer_of(module))
    decide = _no_weight_decay_rule(no_weight_decay)
    groups = _param_groups(module, decide if _has_weight_decay(factory) else None)
    built = factory(groups, **kwargs)
    if not isinstance(built, Optimizer):
        raise TypeError(f"Invalid optimizer {label}: it built {built!r}, not a torch Optimizer.")
    config: dict[str, Any] = {"optimizer": built}
    if schedule is not None:
        config["lr_scheduler"] = {
            "scheduler": schedule.build(built, count_later),
            "interval": schedule.interval,
            "frequency": schedule.frequency,
            "name": schedule.name or f"lr-{type(built).__name__}",
        }
    return config


def resolve_optimizer_class(name: str | type) -> type[Optimizer]:
    """The Optimizer class for a core name (any case), a dotted class path, or a class.

    Base classes that build no optimizer (torch.optim.Optimizer, core.AdamFamilyOptimizer)
    are refused here: they failed later with messages about their own signatures."""
    if isinstance(name, type):
        require(_buildable_optimizer(name), "optimizer", name, _ALLOWED_OPTIMIZERS)
        return name
    require(isinstance(name, str), "optimizer", name, _ALLOWED_OPTIMIZERS)
    if "." not in name:
        by_lower = {key.lower(): cls for key, cls in CORE_OPTIMIZERS.items()}
        require(name.lower() in by_lower, "optimizer", name, _ALLOWED_OPTIMIZERS)
        return by_lower[name.lower()]
    # '.AdamW' or 'core..AdamW' would be a relative import, which importlib refuses with
    # errors that name no optimizer.
    require(all(name.split(".")), "optimizer", name, _ALLOWED_OPTIMIZERS)
    module_path, _, attribute = name.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_path), attribute)
    except (ImportError, AttributeError, ValueError, TypeError):
        found = None
    require(_buildable_optimizer(found), "optimizer", name, _ALLOWED_OPTIMIZERS)
    return found  # type: ignore[return-value]


def _buildable_optimizer(found: object) -> bool:
    """An Optimizer subclass that builds one: not the base class, nor an abstract one."""
    return (
        isinstance(found, type)
        and issubclass(found, Optimizer)
        and found is not Optimizer
        and not inspect.isabstract(found)
    )


def public_path(cls: type) -> str:
    """The shortest import path that exports the class: 'core.AdamW', not 'core.adam.AdamW'.

    A class whose module cannot be imported (made in a script's __main__ run with -c, with
    a made-up __module__, or from a module since removed) gets its recorded path: it only
    names the class in messages and logs.
    """
    parts = cls.__module__.split(".")
    for end in range(1, len(parts) + 1):
        module_path = ".".join(parts[:end])
        try:
            module = importlib.import_module(module_path)
        except (ImportError, ValueError, TypeError):
            break  # a longer path imports this prefix first, so it fails too
        if getattr(module, cls.__name__, None) is cls:
            return f"{module_path}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _from_config(
    module: nn.Module,
    config: Mapping[str, Any],
    scheduler: ScheduleSpec,
    no_weight_decay: NoWeightDecay,
    hyperparameters: dict[str, Any],
) -> dict[str, Any]:
    """configure_optimizers(module, {...}): the dict's keys are the keyword arguments."""
    extra = sorted(hyperparameters) + [
        name
        for name, value, default in (
            ("scheduler", scheduler, None),
            ("no_weight_decay", no_weight_decay, True),
        )
        if value is not default
    ]
    require(
        not extra,
        "arguments beside a config dict",
        extra,
        "none: put them in the dict, or pass the optimizer itself instead of a dict",
    )
    require(
        all(isinstance(key, str) for key in config),
        "config keys",
        list(config),
        f"strings: {_CONFIG_KEYS}",
    )
    # The module is configure_optimizers' own first argument: as a key it would collide
    # with it (a TypeError about multiple values) instead of being refused.
    require(
        "module" not in config,
        "config key",
        "module",
        f"{_CONFIG_KEYS}; pass the module as configure_optimizers' first argument",
    )
    try:
        return configure_optimizers(module, **config)
    except ValueError as error:
        if not str(error).startswith("Invalid argument for "):
            raise
        # An unknown key of the dict: the optimizer's arguments are not all it may hold.
        raise ValueError(
            f"{str(error).removesuffix('.')}; and the config keys optimizer, scheduler, "
            "no_weight_decay."
        ) from None


def _resolve_optimizer(
    spec: OptimizerSpec, hyperparameters: dict[str, Any]
) -> tuple[Callable[..., Optimizer], str, dict[str, Any]]:
    """(what builds the optimizer from param groups, its name for errors, checked kwargs)."""
    if isinstance(spec, Mapping):
        # Sorted by str: keys of mixed types (1, 'x') do not compare.
        unknown = sorted(set(spec) - {"class_path", "init_args"}, key=str)
        require(not unknown, "optimizer dict keys", unknown, "class_path and init_args")
        init_args = spec.get("init_args") or {}
        require(isinstance(init_args, Mapping), "init_args", init_args, "a dict of arguments")
        require(
            all(isinstance(key, str) for key in init_args),
            "init_args keys",
            list(init_args),
            "strings: the optimizer's argument names",
        )
        spec, hyperparameters = spec["class_path"], {**init_args, **hyperparameters}
    if callable(spec) and not isinstance(spec, type):
        _require_callable_takes(spec, hyperparameters)
        return spec, repr(spec), hyperparameters
    cls = resolve_optimizer_class(spec)  # type: ignore[arg-type]
    label = public_path(cls)
    accepted = _keyword_arguments(cls)
    if accepted is not None:
        unknown = sorted(set(hyperparameters) - set(accepted))
        require(
            not unknown,
            f"argument for {label}",
            ", ".join(unknown),
            f"its parameters: {', '.join(accepted)}",
        )
    missing = [name for name in _required_arguments(cls) if name not in hyperparameters]
    require(
        not missing,
        f"arguments for {label}",
        hyperparameters,
        f"arguments that include {', '.join(missing)}, which {label} requires (no default)",
    )
    return cls, label, hyperparameters


def _require_callable_takes(factory: Callable[..., Optimizer], kwargs: dict[str, Any]) -> None:
    """A factory that cannot be called as factory(groups, **kwargs) is refused by its
    signature before anything is built; the call's own TypeError named neither the factory
    nor the form it is called in."""
    problem = _call_problem(factory, [], **kwargs)
    if problem is not None:
        raise ValueError(
            f"Invalid optimizer {factory!r}: it cannot be called as "
            f"optimizer(param_groups{''.join(f', {k}=...' for k in kwargs)}) ({problem}). "
            "Allowed: a callable taking the param groups first and the hyperparameters as "
            "keywords, such as functools.partial(core.AdamW, betas=(0.9, 0.95))."
        )


def _call_problem(function: Callable[..., object], *args: object, **kwargs: object) -> str | None:
    """Why function's signature cannot take these arguments, or None (also where it has no
    signature to read, as some builtins: the call decides)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        return str(error)
    return None


def _required_arguments(cls: type) -> list[str]:
    """Constructor arguments after params that have no default (core's lr)."""
    parameters = list(inspect.signature(cls).parameters.values())[1:]
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in keyword_kinds and p.default is p.empty]


def _keyword_arguments(cls: type) -> list[str] | None:
    """The constructor's arguments after params; None when it takes **kwargs."""
    parameters = list(inspect.signature(cls).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL]


def _has_weight_decay(factory: Callable[..., Optimizer]) -> bool:
    """Whether a no-decay group means anything to this optimizer."""
    if not isinstance(factory, type):
        return True  # a callable: torch's optimizers all take weight_decay in groups
    accepted = _keyword_arguments(factory)
    return accepted is None or "weight_decay" in accepted


def _no_weight_decay_rule(
    setting: NoWeightDecay,
) -> Callable[[str, nn.Parameter, nn.Module], bool] | None:
    if setting is True:
        return skips_weight_decay
    if setting is False:
        return None
    if isinstance(setting, Sequence) and not isinstance(setting, str):
        patterns = list(setting)
        require(
            all(isinstance(p, str) for p in patterns),
            "no_weight_decay",
            setting,
            "True, False, a list of fnmatch patterns, or a callable",
        )
        return _NamePatterns(patterns)
    require(
        callable(setting),
        "no_weight_decay",
        setting,
        "True, False, a list of fnmatch patterns, or a callable",
    )
    problem = _call_problem(setting, "name", None, None)  # type: ignore[arg-type]
    if problem is not None:
        raise ValueError(
            f"Invalid no_weight_decay: {setting!r} cannot be called as "
            f"no_weight_decay(name, parameter, module) ({problem}). Allowed: a callable taking "
            "those three and returning True for the parameters that skip weight decay."
        )
    return _checked_answers(setting)  # type: ignore[arg-type]


def _checked_answers(
    decide: Callable[[str, nn.Parameter, nn.Module], object],
) -> Callable[[str, nn.Parameter, nn.Module], bool]:
    """decide, refusing answers other than True or False: a rule that forgot its return
    (None) decayed every parameter without a word, and a tensor's truth is ambiguous."""

    def checked(name: str, param: nn.Parameter, module: nn.Module) -> bool:
        answer = decide(name, param, module)
        if not isinstance(answer, bool):
            raise ValueError(
                f"Invalid no_weight_decay: {decide!r} returned {answer!r} for parameter "
                f"{name!r}. Allowed: True (no weight decay) or False."
            )
        return answer

    return checked


class _NamePatterns:
    """no_weight_decay's fnmatch patterns over qualified parameter names, as named_parameters
    gives them or without torch.compile's '_orig_mod' (a compiled submodule's parameters
    are 'model._orig_mod.0.weight': 'model.0.*' matched nothing before). Remembers which
    matched: a pattern that matches nothing (a typo, a name the module does not have)
    left those parameters decayed without a word."""

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = patterns
        self.matched: set[str] = set()

    def __call__(self, name: str, _param: nn.Parameter, _owner: nn.Module) -> bool:
        plain = user_facing_name(name)
        hits = [
            p
            for p in self.patterns
            if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(plain, p)
        ]
        self.matched.update(hits)
        return bool(hits)

    def warn_unmatched(self, names: list[str]) -> None:
        unmatched = [p for p in self.patterns if p not in self.matched]
        if unmatched:
            warnings.warn(
                f"no_weight_decay patterns {unmatched} match no parameter name, so they "
                f"exempt nothing from weight decay; the names are like {names[:3]} "
                "(fnmatch patterns over the whole qualified name: 'encoder.*' or '*.bias').",
                UserWarning,
                stacklevel=4,  # configure_optimizers' caller
            )


def _require_trainable(module: nn.Module) -> None:
    """torch's 'optimizer got an empty parameter list' does not say the parameters are frozen."""
    params = list(module.parameters())
    if any(p.requires_grad for p in params):
        return
    found = f"{len(params)} frozen" if params else "it has no parameters"
    name = type(module).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    raise ValueError(
        f"Invalid module: {article} {name} in which no parameter requires grad "
        f"({found}). Allowed: an nn.Module with at least one trainable parameter; unfreeze "
        "the ones to train (requires_grad_(True)) before configure_optimizers builds the "
        "optimizer, or pass the submodule that trains."
    )


def _param_groups(
    module: nn.Module, exclude: Callable[[str, nn.Parameter, nn.Module], bool] | None
) -> list[dict[str, Any]]:
    """The trainable parameters as a 'decay' and a 'no_decay' group (empty groups left out).

    A parameter shared by several modules (tied weights) skips decay if any owner says so.
    Frozen parameters are left out, so a finetuning callback can add them later.
    """
    skip: set[int] = set()
    if exclude is not None:
        owned = list(owned_parameters(module))
        for name, param, owner in owned:
            if exclude(name, param, owner):
                skip.add(id(param))
        if isinstance(exclude, _NamePatterns):
            exclude.warn_unmatched(
                [user_facing_name(name) for name, param, _ in owned if param.requires_grad]
            )
    trainable = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in trainable if id(p) not in skip]
    no_decay = [p for p in trainable if id(p) in skip]
    groups = []
    if decay:
        groups.append({"params": decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def _trainer_of(module: nn.Module) -> Any:
    try:
        trainer = module.trainer  # a LightningModule raises RuntimeError when detached
    except (AttributeError, RuntimeError):
        trainer = None
    require(
        trainer is not None,
        "scheduler total_steps",
        None,
        f"an int when the module is not a LightningModule attached to a Trainer (here a "
        f"{type(module).__name__}): set the schedule's total_steps (one optimizer of "
        "several, as in a GAN, is stepped as often as training_step says), or pass the "
        "LightningModule itself (self) from inside LightningModule.configure_optimizers",
    )
    require(
        module.automatic_optimization,
        "scheduler total_steps",
        None,
        "an int under manual optimization (automatic_optimization=False): training_step "
        "steps the optimizer and calls the scheduler's step() itself, as often as it "
        "chooses, so the trainer cannot count the schedule's steps; set total_steps to the "
        "number of scheduler.step() calls the run will make",
    )
    return trainer
