"""Build optimizers and schedulers from YAML or dict recipes, as llm-foundry configs do.

An optimizer recipe is llm-foundry's `optimizer:` section: `name` plus the class's
keyword arguments, optionally `param_groups` (each with a `param_str_match` regex,
searched in parameter names; a parameter joins the first group that matches, the rest
form the default group) and `disable_grad` (regexes of parameters to freeze). One key is
added: `no_decay` (default true) gives biases, parameters with ndim <= 1, normalization and
embedding parameters weight_decay 0 in every group that does not set weight_decay itself.

    optimizer:
      name: adamkit_decoupled_adamw
      lr: 6.0e-4
      betas: [0.9, 0.95]
      weight_decay: 1.0e-5
      param_groups:
        - param_str_match: "lm_head"
          lr: 3.0e-4
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import re
import reprlib
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from composer_adam.optimizers import (
    DecoupledAdamW,
    DecoupledADOPT,
    DecoupledNAdam,
    DecoupledRAdam,
)
from core.models import owned_parameters, require_module, skips_weight_decay
from core.optimizer import AdamFamilyOptimizer

OPTIMIZERS: dict[str, type[AdamFamilyOptimizer]] = {
    "adamkit_decoupled_adamw": DecoupledAdamW,
    "adamkit_decoupled_radam": DecoupledRAdam,
    "adamkit_decoupled_nadam": DecoupledNAdam,
    "adamkit_decoupled_adopt": DecoupledADOPT,
}
"""Registry names, the same as the `llmfoundry_optimizers` entry points; the `adamkit_`
prefix may be left out (so llm-foundry's `decoupled_adamw` selects ours)."""

SCHEDULERS: dict[str, str] = {
    "cosine_with_warmup": "CosineAnnealingWithWarmupScheduler",
    "linear_decay_with_warmup": "LinearWithWarmupScheduler",
    "constant_with_warmup": "ConstantWithWarmupScheduler",
    "cosine": "CosineAnnealingScheduler",
    "constant": "ConstantScheduler",
}
"""llm-foundry's scheduler names for composer.optim's schedulers."""

RECIPE_KEYS = ("name", "param_groups", "disable_grad", "no_decay")

MERGE_TAG = "tag:yaml.org,2002:merge"
MERGE_KEY = "<<"


@functools.cache
def _yaml_loader() -> type:
    """PyYAML's SafeLoader, reading 6e-4 and 1.0e5 as floats (YAML 1.2, as OmegaConf and so
    llm-foundry do) where YAML 1.1 makes strings of them: without a dot or an exponent
    sign they would reach the optimizer as '6e-4'."""
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        def __init__(self, stream: Any) -> None:
            super().__init__(stream)
            self._checked: set[int] = set()  # ids of the mapping nodes checked

        def flatten_mapping(self, node: Any) -> None:
            """Refuse a key given twice in one mapping (PyYAML keeps the last silently;
            OmegaConf, and so llm-foundry, refuse it): one of the two was a mistake.

            Only the mapping's own keys count, so they are read here, before PyYAML merges
            `<<: *base` into the node (in place, and maybe from another mapping before
            this one is built): a key set beside a merge over a merged one is what merge
            keys are for. `<<` itself is a key like the others, so two of them are refused
            (PyYAML would let the second win); `<<: [*a, *b]` merges several."""
            if id(node) not in self._checked:
                self._checked.add(id(node))
                keys = [
                    MERGE_KEY if key.tag == MERGE_TAG else self.construct_object(key, deep=True)
                    for key, _ in node.value
                ]
                repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
                if repeated:
                    raise ValueError(
                        f"key(s) {repeated} given more than once in the mapping at line "
                        f"{node.start_mark.line + 1}. Allowed: each key once."
                    )
            super().flatten_mapping(node)

    RecipeLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )
    return RecipeLoader


def load_recipe(source: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """A recipe as a plain dict: a mapping is copied, a path is read as YAML.

    Anything else is refused before open() sees it: open() takes an int as a file
    descriptor and closes it when done (`load_recipe(1)` closed stdout).
    """
    if isinstance(source, Mapping):
        return dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"Invalid recipe: {reprlib.repr(source)} (type {type(source).__name__}). "
            "Allowed: a mapping, or the path of a YAML file as a str or os.PathLike."
        )
    import yaml

    with open(source, encoding="utf-8") as file:
        try:
            loaded = yaml.load(file, Loader=_yaml_loader())  # a SafeLoader
        except ValueError as error:
            raise ValueError(f"Invalid recipe file {os.fspath(source)!r}: {error}") from None
        except yaml.YAMLError as error:  # malformed YAML; PyYAML's message has the line
            raise ValueError(f"Invalid recipe file {os.fspath(source)!r}: {error}") from error
    if not isinstance(loaded, Mapping):
        raise ValueError(f"Invalid recipe file {os.fspath(source)!r}: expected a YAML mapping.")
    return dict(loaded)


def _section(config: Mapping[str, Any] | str | os.PathLike[str], key: str) -> dict[str, Any]:
    """The `key:` section of a whole recipe, or the recipe itself when it is the section."""
    recipe = load_recipe(config)
    section = recipe.get(key, recipe)
    if not isinstance(section, Mapping):
        raise ValueError(f"Invalid {key} recipe: {section!r}. Allowed: a mapping with a name.")
    return dict(section)


def _lookup(kind: str, name: object, registry: Mapping[str, Any], prefix: str = "") -> Any:
    if isinstance(name, str):
        for candidate in (name, prefix + name):
            if candidate in registry:
                return registry[candidate]
    raise ValueError(f"Invalid {kind} name: {name!r}. Allowed: {', '.join(registry)}.")


def optimizer_class(name: str) -> type[AdamFamilyOptimizer]:
    """The class registered under name (with or without the adamkit_ prefix)."""
    return _lookup("optimizer", name, OPTIMIZERS, prefix="adamkit_")


def _argument_names(cls: type) -> list[str]:
    return [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "params")]


def _check_keys(keys: Any, allowed: list[str], where: str) -> None:
    unknown = sorted(set(keys) - set(allowed), key=str)  # keys of mixed types: 1, "lr2"
    if unknown:
        raise ValueError(
            f"Invalid {where}: unknown key(s) {unknown}. Allowed: {', '.join(allowed)}."
        )


def _patterns(value: Any, where: str) -> list[re.Pattern[str]]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"Invalid {where}: {value!r}. Allowed: a regex or a list of regexes.")
    try:
        return [re.compile(v) for v in values]
    except re.error as error:
        raise ValueError(f"Invalid {where}: {value!r} is not a regex ({error}).") from None


def _group_pattern(value: Any, where: str) -> re.Pattern[str]:
    """A param group's one regex. llm-foundry passes param_str_match to re.search as it
    is, so a list is no recipe there: refused here too rather than given a meaning."""
    if not isinstance(value, str):
        raise ValueError(
            f"Invalid {where}: {value!r}. Allowed: one regex (a string searched in parameter "
            "names, as in llm-foundry); join alternatives with |, such as 'fc|lm_head'."
        )
    (pattern,) = _patterns(value, where)
    return pattern


def no_decay_parameters(model: nn.Module) -> set[Tensor]:
    """Biases, parameters with ndim <= 1 and those of normalization and embedding modules:
    `core.models.skips_weight_decay` with the owning module, as Lightning's default."""
    return {
        param
        for name, param, owner in owned_parameters(model)
        if skips_weight_decay(name, param, owner)
    }


def build_optimizer(
    config: Mapping[str, Any] | str | os.PathLike[str], model: nn.Module
) -> AdamFamilyOptimizer:
    """Build the recipe's optimizer for model's parameters.

    Args:
        config: An optimizer recipe (see the module docstring), a whole recipe with an
            `optimizer:` section, or the path of a YAML file holding either.
        model: The model to optimize, an nn.Module (groups and no_decay read its parameter
            names and modules); frozen parameters (requires_grad False) are left out.

    Every key is checked before anything changes: an unknown name or argument raises a
    ValueError listing the allowed ones, and a param_str_match that matches no parameter
    is refused (it is usually a typo).
    """
    recipe = _section(config, "optimizer")
    require_module(model)
    cls = optimizer_class(recipe.get("name"))  # type: ignore[arg-type]
    arguments = _argument_names(cls)
    _check_keys(recipe, [*RECIPE_KEYS, *arguments], f"{cls.__name__} recipe")
    kwargs = {k: v for k, v in recipe.items() if k not in RECIPE_KEYS}
    no_decay = recipe.get("no_decay", True)
    if not isinstance(no_decay, bool):
        raise ValueError(f"Invalid no_decay: {no_decay!r}. Allowed: true or false.")
    frozen = _patterns(recipe.get("disable_grad", []), "disable_grad")

    named = [
        (name, p)
        for name, p in model.named_parameters()
        if p.requires_grad and not any(f.search(name) for f in frozen)
    ]
    group_configs = recipe.get("param_groups") or []
    if not isinstance(group_configs, list):
        raise ValueError(f"Invalid param_groups: {group_configs!r}. Allowed: a list of mappings.")
    groups: list[tuple[dict[str, Any], list[Tensor]]] = []
    remaining = dict(named)
    for index, group_config in enumerate(group_configs):
        where = f"param_groups[{index}]"
        if not isinstance(group_config, Mapping) or "param_str_match" not in group_config:
            raise ValueError(
                f"Invalid {where}: {group_config!r}. Allowed: a mapping with a "
                "param_str_match regex and optimizer arguments."
            )
        _check_keys(group_config, ["param_str_match", *arguments], where)
        pattern = _group_pattern(group_config["param_str_match"], f"{where}.param_str_match")
        matched = [name for name in remaining if pattern.search(name)]
        if not matched:
            taken = [name for name, _ in named if name not in remaining and pattern.search(name)]
            if taken:  # first match wins: an earlier group holds all it matches
                raise ValueError(
                    f"Invalid {where}.param_str_match: {pattern.pattern!r} matches only "
                    f"parameters an earlier group already took ({', '.join(taken[:6])}"
                    + (", ..." if len(taken) > 6 else "")
                    + "): each parameter goes to the first group that matches it. Allowed: "
                    "a regex matching a parameter no earlier group matches, or this group "
                    "moved before the one that takes them."
                )
            raise ValueError(
                f"Invalid {where}.param_str_match: {pattern.pattern!r} matches no trainable "
                f"parameter. Parameter names: {', '.join(list(dict(named))[:12])}"
                + (", ..." if len(named) > 12 else "")
            )
        options = {k: v for k, v in group_config.items() if k != "param_str_match"}
        groups.append((where, options, [remaining.pop(name) for name in matched]))
    groups.insert(0, ("the recipe's default group", {}, list(remaining.values())))

    exempt = no_decay_parameters(model) if no_decay else set()
    param_groups, origins = [], []
    for where, options, params in groups:
        if "weight_decay" in options:
            split = [(options, params)]
        else:
            split = [
                (options, [p for p in params if p not in exempt]),
                ({**options, "weight_decay": 0.0}, [p for p in params if p in exempt]),
            ]
        built = [{"params": ps, **opts} for opts, ps in split if ps]
        param_groups += built
        origins += [where] * len(built)
    if not param_groups:
        raise ValueError("Invalid model: it has no trainable parameter for the optimizer.")
    optimizer = _construct(cls, param_groups, kwargs, origins)
    for name, p in model.named_parameters():
        if any(f.search(name) for f in frozen):
            p.requires_grad_(False)
    return optimizer


def _construct(
    cls: type[AdamFamilyOptimizer],
    param_groups: list[dict[str, Any]],
    kwargs: dict[str, Any],
    origins: list[str],
) -> AdamFamilyOptimizer:
    """cls(param_groups, **kwargs), with an invalid value in a group named by where the
    recipe sets it (param_groups[i]), not by the optimizer group it lands in (the no-decay
    split and the default group move the numbers)."""
    try:
        return cls(param_groups, **kwargs)
    except ValueError as error:
        found = re.search(r" in param group (\d+)", str(error))
        if found is None:
            raise
        located = str(error).replace(found.group(0), f" in {origins[int(found.group(1))]}", 1)
        raise ValueError(located) from None


def build_scheduler(config: Mapping[str, Any] | str | os.PathLike[str]) -> Any:
    """A composer.optim scheduler from a recipe's `scheduler:` section (llm-foundry's names)."""
    import composer.optim

    recipe = _section(config, "scheduler")
    cls = getattr(composer.optim, _lookup("scheduler", recipe.pop("name", None), SCHEDULERS))
    _check_keys(recipe, _argument_names(cls), f"{cls.__name__} recipe")
    required = [
        name
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if name != "self"
        and parameter.default is inspect.Parameter.empty
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ]
    missing = [name for name in required if name not in recipe]
    if missing:
        raise ValueError(
            f"Invalid {cls.__name__} recipe: missing key(s) {missing}. "
            f"Required: {', '.join(required)}."
        )
    _check_scheduler_values(cls, recipe)
    return cls(**recipe)


def _check_scheduler_values(cls: type, recipe: Mapping[str, Any]) -> None:
    """Refuse values of the wrong kind or out of range by key, at build time: Composer
    takes them as given and fails at the first batch (`t_warmup: 10`, an int, raised
    AttributeError there) or trains on a nonsense schedule (a negative warmup, '5dur' of a
    run, an alpha_f of NaN or -3: a negative or NaN learning rate).
    The kinds are read from the scheduler's own annotations: times, numbers, flags. The
    numbers of the registered schedulers are all learning-rate multipliers (alpha,
    alpha_i, alpha_f), so each must be finite and >= 0."""
    from composer.core import Time

    parameters = inspect.signature(cls.__init__).parameters
    for name, value in recipe.items():
        annotation = str(parameters[name].annotation)
        if "Time" in annotation:
            time = value if isinstance(value, Time) else _as_time(value)
            valid = time is not None and _time_in_range(time)
            allowed = (
                "a Composer time string such as '100ba', '1ep' or '0.1dur' (whole numbers "
                "but for dur)"
                if time is None
                else "a time >= 0 in ep, ba, sp, tok or iter such as '100ba' or '1ep', "
                "or a 'dur' fraction in [0, 1] (wall-clock 'sec' is no scheduler time)"
            )
            if valid and name in _DIVIDED_BY.get(cls.__name__, ()) and time.value == 0:
                valid = False
                allowed = f"a time > 0 ({cls.__name__} divides by its {name})"
        elif annotation in ("float", "<class 'float'>"):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            valid = number and math.isfinite(value) and value >= 0
            allowed = "a finite number >= 0" if number else "a number"
        elif annotation in ("bool", "<class 'bool'>"):
            allowed = "true or false"
            valid = isinstance(value, bool)
        else:
            continue
        if not valid:
            raise ValueError(
                f"Invalid {cls.__name__} recipe: {name}={value!r}. Allowed: {allowed}."
            )


_DIVIDED_BY: dict[str, tuple[str, ...]] = {"CosineAnnealingScheduler": ("t_max",)}
"""Scheduler times Composer divides by without a guard: 0 failed at the first batch with
ZeroDivisionError (the warmup schedulers guard their t_max - t_warmup)."""


def _as_time(value: object) -> Any:
    """value read as a Composer Time, or None where it is no time string."""
    from composer.core import Time

    if not isinstance(value, str):
        return None
    try:
        return Time.from_timestring(value)
    # 'infba': an int of infinity; '0.5ep': a fraction of a unit Composer counts whole
    except (ValueError, OverflowError, TypeError):
        return None


def _time_in_range(time: Any) -> bool:
    """Composer's TimeUnit.DURATION is a fraction of the whole run; its schedulers refuse
    wall-clock seconds, but only at the first batch."""
    from composer.core import TimeUnit

    value = time.value
    in_range = math.isfinite(value) and value >= 0 and time.unit != TimeUnit.SECOND
    return in_range and (time.unit != TimeUnit.DURATION or value <= 1)
