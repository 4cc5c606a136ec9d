"""Recipes: build_optimizer/build_scheduler from dicts and YAML, llm-foundry entry points,
and the Composer training example."""

from __future__ import annotations

import importlib.util
import os
import re
import types
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import composer_adam
from composer_adam import recipes
from core.models import owned_parameters, skips_weight_decay
from tests.composer_adam.harness import (
    LR,
    STEPS,
    GradientsAfterBackward,
    assert_same_parameters,
    train,
)
from tests.core.configuration_cases import BACKENDS

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs" / "composer").glob("*.yaml"))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 11, bias=False)


def _groups(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[tuple[list[str], dict]]:
    names = {p: n for n, p in model.named_parameters()}
    return [
        (sorted(names[p] for p in g["params"]), {k: g[k] for k in ("lr", "weight_decay")})
        for g in optimizer.param_groups
    ]


def test_no_decay_is_the_rule_lightning_and_core_use() -> None:
    """core.models.skips_weight_decay with the owning module, as configure_optimizers uses
    it: a custom module's 1-D scale skips decay too (ndim <= 1)."""
    model = nn.Sequential(Block(), nn.Module())
    model[1].scale = nn.Parameter(torch.ones(8))
    exempt = recipes.no_decay_parameters(model)
    names = {p: n for n, p in model.named_parameters()}
    assert sorted(names[p] for p in exempt) == [
        "0.embedding.weight",
        "0.norm.bias",
        "0.norm.weight",
        "0.proj.bias",
        "1.scale",
    ]
    assert exempt == {
        p for n, p, owner in owned_parameters(model) if skips_weight_decay(n, p, owner)
    }


def test_default_recipe_exempts_biases_norms_and_embeddings_from_decay() -> None:
    model = Block()
    optimizer = composer_adam.build_optimizer({"name": "adamkit_decoupled_adamw", "lr": 0.1}, model)
    assert type(optimizer) is composer_adam.DecoupledAdamW
    assert _groups(optimizer, model) == [
        (["head.weight", "proj.weight"], {"lr": 0.1, "weight_decay": 1e-5}),
        (
            ["embedding.weight", "norm.bias", "norm.weight", "proj.bias"],
            {"lr": 0.1, "weight_decay": 0.0},
        ),
    ]


def test_param_groups_match_in_order_and_disable_grad_freezes() -> None:
    model = Block()
    config = {
        "name": "decoupled_radam",  # the adamkit_ prefix is optional
        "lr": 0.1,
        "weight_decay": 1e-4,
        "disable_grad": "^embedding",
        "param_groups": [
            {"param_str_match": "head", "lr": 0.01},
            {"param_str_match": "proj|head", "weight_decay": 0.0},
        ],
        "no_decay": False,
    }
    optimizer = composer_adam.build_optimizer(config, model)
    assert type(optimizer) is composer_adam.DecoupledRAdam
    assert _groups(optimizer, model) == [
        (["norm.bias", "norm.weight"], {"lr": 0.1, "weight_decay": 1e-4}),
        (["head.weight"], {"lr": 0.01, "weight_decay": 1e-4}),
        (["proj.bias", "proj.weight"], {"lr": 0.1, "weight_decay": 0.0}),
    ]
    assert not model.embedding.weight.requires_grad
    assert [g["initial_lr"] for g in optimizer.param_groups] == [0.1, 0.01, 0.1]


def test_no_decay_spares_groups_that_set_weight_decay_and_frozen_parameters_join_none() -> None:
    """no_decay exempts biases, norms and embeddings only in groups that leave weight_decay
    to the recipe: a group that sets it keeps it for its bias too. Parameters frozen
    before the recipe (requires_grad False) join no group, and a group matching only
    them is refused as matching no trainable parameter."""
    model = Block()
    model.norm.requires_grad_(False)
    config = {
        "name": "decoupled_adamw",
        "lr": 0.1,
        "weight_decay": 1e-4,
        "param_groups": [{"param_str_match": "proj", "weight_decay": 0.05}],
    }
    optimizer = composer_adam.build_optimizer(config, model)
    assert _groups(optimizer, model) == [
        (["head.weight"], {"lr": 0.1, "weight_decay": 1e-4}),
        (["embedding.weight"], {"lr": 0.1, "weight_decay": 0.0}),
        (["proj.bias", "proj.weight"], {"lr": 0.1, "weight_decay": 0.05}),
    ]
    config["param_groups"] = [{"param_str_match": "^norm", "lr": 0.01}]
    with pytest.raises(ValueError, match=r"'\^norm' matches no trainable parameter"):
        composer_adam.build_optimizer(config, model)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"name": "adamw"},
            "Invalid optimizer name: 'adamw'. Allowed: adamkit_decoupled_adamw, "
            "adamkit_decoupled_radam, adamkit_decoupled_nadam, adamkit_decoupled_adopt.",
        ),
        ({}, "Invalid optimizer name: None. Allowed: adamkit_decoupled_adamw"),
        (
            {"name": "decoupled_adamw", "momentum": 0.9},
            "unknown key(s) ['momentum']. Allowed: name,",
        ),
        (
            {"name": "decoupled_nadam", "lr": -1.0},
            "Invalid lr: -1.0. Allowed: a finite number >= 0.",
        ),
        (
            {"name": "decoupled_adamw", "param_groups": [{"param_str_match": "lm_head"}]},
            "'lm_head' matches no trainable parameter. Parameter names: embedding.weight",
        ),
        (
            # first match wins: it said "matches no trainable parameter" of a visible match
            {
                "name": "decoupled_adamw",
                "param_groups": [{"param_str_match": "proj"}, {"param_str_match": "proj.w"}],
            },
            "Invalid param_groups[1].param_str_match: 'proj.w' matches only parameters an "
            "earlier group already took (proj.weight): each parameter goes to the first group",
        ),
        ({"name": "decoupled_adamw", "param_groups": [{"lr": 0.1}]}, "with a param_str_match"),
        (
            # llm-foundry hands param_str_match to re.search: one regex, no list.
            {"name": "decoupled_adamw", "param_groups": [{"param_str_match": ["proj", "head"]}]},
            "Invalid param_groups[0].param_str_match: ['proj', 'head']. Allowed: one regex (a "
            "string searched in parameter names, as in llm-foundry); join alternatives with |,",
        ),
        (
            {"name": "decoupled_adamw", "param_groups": [{"param_str_match": []}]},
            "Invalid param_groups[0].param_str_match: []. Allowed: one regex",
        ),
        (
            {
                "name": "decoupled_adamw",
                "disable_grad": "norm",
                "param_groups": [{"param_str_match": "(", "lr": 1}],
            },
            "is not a regex",
        ),
        ({"name": "decoupled_adopt", "no_decay": "yes"}, "Invalid no_decay: 'yes'"),
        (
            {"name": "decoupled_adamw", "param_groups": [{"param_str_match": "head", "lrate": 1}]},
            "Invalid param_groups[0]: unknown key(s) ['lrate']. Allowed: param_str_match, lr,",
        ),
        (  # keys of mixed types (YAML's `1: 0.1`): sorting them raised a bare TypeError
            {"name": "decoupled_adamw", 1: 0.1, "lr2": 1e-3},
            "unknown key(s) [1, 'lr2']. Allowed: name,",
        ),
        (
            {
                "name": "decoupled_radam",
                "disable_grad": "embedding",
                "param_groups": [
                    {"param_str_match": "head", "lr": 0.1},
                    {"param_str_match": "proj", "betas": [0.9, 1.5]},
                ],
            },
            # The recipe's place, not the optimizer group (2 here, after the no-decay split).
            "Invalid betas in param_groups[1]: [0.9, 1.5]. Allowed: two numbers",
        ),
    ],
)
def test_bad_recipes_name_the_key_and_what_is_allowed_before_any_change(
    config: dict, message: str
) -> None:
    model = Block()
    with pytest.raises(ValueError, match=re.escape(message)):
        composer_adam.build_optimizer(config, model)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.bad_input
def test_yaml_recipe_reads_exponents_as_numbers_and_refuses_unknown_arguments(
    tmp_path: Path,
) -> None:
    """6e-4 is a string to PyYAML's YAML 1.1 but a number to OmegaConf, so to llm-foundry."""
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "optimizer:\n  name: adamkit_decoupled_nadam\n  lr: 6e-4\n  weight_decay: 1E-5\n"
        "  momentum_decay: 4.0e-3\n  param_groups:\n    - param_str_match: head\n"
        "      lr: .5e+2\n"
    )
    optimizer = composer_adam.build_optimizer(path, Block())
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [
        (6e-4, 1e-5),
        (6e-4, 0.0),
        (50.0, 1e-5),
    ]
    assert optimizer.defaults["momentum_decay"] == 4e-3
    path.write_text("optimizer:\n  name: adamkit_decoupled_nadam\n  lr: 6e-4\n  momentum: 0.9\n")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Invalid DecoupledNAdam recipe: unknown key(s) ['momentum']. Allowed: name, "
            "param_groups, disable_grad, no_decay, lr, betas, eps, weight_decay, momentum_decay,"
        ),
    ):
        composer_adam.build_optimizer(path, Block())


@pytest.mark.bad_input
def test_a_key_given_twice_in_a_yaml_recipe_is_refused(tmp_path: Path) -> None:
    """PyYAML alone keeps the last of two `lr:` lines; OmegaConf (llm-foundry) refuses."""
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "optimizer:\n  name: adamkit_decoupled_adamw\n  lr: 6e-4\n  lr: 1e-3\n"
        "scheduler:\n  name: constant\n"
    )
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"Invalid recipe file {str(path)!r}: key(s) ['lr'] given more than once in the "
            "mapping at line 2. Allowed: each key once."
        ),
    ):
        composer_adam.build_optimizer(path, Block())


@pytest.mark.bad_input
@pytest.mark.parametrize("recipe", [1, None, [("name", "decoupled_adamw")], b"recipe.yaml"])
def test_a_recipe_neither_mapping_nor_path_is_refused_before_anything_is_opened(
    recipe: object,
) -> None:
    """open() takes an int as a file descriptor and closes it after reading: a recipe of 1
    closed stdout. The descriptor here is a pipe's, which must stay open."""
    read_end, write_end = os.pipe()
    if recipe == 1:
        recipe = write_end
    message = re.escape(
        f"Invalid recipe: {recipe!r} (type {type(recipe).__name__}). Allowed: a mapping, or "
        "the path of a YAML file as a str or os.PathLike."
    )
    try:
        with pytest.raises(ValueError, match=message):
            composer_adam.load_recipe(recipe)
        with pytest.raises(ValueError, match=message):
            composer_adam.build_optimizer(recipe, Block())
        with pytest.raises(ValueError, match=message):
            composer_adam.build_scheduler(recipe)
        assert os.write(write_end, b"x") == 1  # still open
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.bad_input
@pytest.mark.parametrize("model", [None, "params", "generator"])
def test_a_model_that_is_no_module_is_refused_by_type(model: object) -> None:
    """Groups and no_decay read names and owning modules, which parameters alone lack."""
    block = Block()
    model = {"params": list(block.parameters()), "generator": block.parameters()}.get(model)
    recipe = {"name": "decoupled_adamw", "disable_grad": "norm"}
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"Invalid model: a {type(model).__name__}. Allowed: an nn.Module (the model "
            "itself, not model.parameters())."
        ),
    ):
        composer_adam.build_optimizer(recipe, model)
    assert all(p.requires_grad for p in block.parameters())


def test_yaml_merge_keys_are_read_as_pyyaml_reads_them(tmp_path: Path) -> None:
    """`<<: *base` is no repeated key: the mapping's own keys override the merged ones,
    as yaml.safe_load reads them. `tuned`, built after `later` merged it (PyYAML merges
    in place), is no repeated key either."""
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "base: &base {lr: 1.0e-3, betas: [0.9, 0.95]}\n"
        "nested:\n  tuned: &tuned\n    <<: *base\n    lr: 3.0e-3\n"
        "later:\n  <<: *tuned\n"
        "more: &more {eps: 1.0e-6}\n"
        "optimizer:\n  <<: [*base, *more]\n  name: adamkit_decoupled_adamw\n"
        "  lr: 2.0e-3\n  weight_decay: 0.0\n"
        "scheduler:\n  <<: {t_warmup: 2ba, alpha_f: 0.5}\n  name: cosine_with_warmup\n"
        "  alpha_f: 0.1\n"
    )
    recipe = composer_adam.load_recipe(path)
    assert recipe == yaml.safe_load(path.read_text())
    assert recipe["optimizer"] == {
        "lr": 2e-3,
        "betas": [0.9, 0.95],
        "eps": 1e-6,
        "name": "adamkit_decoupled_adamw",
        "weight_decay": 0.0,
    }
    optimizer = composer_adam.build_optimizer(path, Block())
    assert {(g["lr"], g["eps"]) for g in optimizer.param_groups} == {(2e-3, 1e-6)}
    scheduler = composer_adam.build_scheduler(path)
    assert (scheduler.t_warmup, scheduler.alpha_f) == ("2ba", 0.1)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("text", "repeated", "line"),
    [
        ("base: &b {lr: 1.0}\noptimizer:\n  <<: *b\n  eps: 1.0\n  eps: 2.0\n", "eps", 3),
        ("a: &a {lr: 1.0}\nb: &b {eps: 1.0}\noptimizer:\n  <<: *a\n  <<: *b\n", "<<", 4),
    ],
    ids=["beside-a-merge", "two-merge-keys"],
)
def test_a_key_given_twice_beside_merge_keys_is_still_refused(
    tmp_path: Path, text: str, repeated: str, line: int
) -> None:
    """Two `<<:` lines are two of one key too (PyYAML lets the second win); a list of
    aliases, `<<: [*a, *b]`, merges both."""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"Invalid recipe file {str(path)!r}: key(s) [{repeated!r}] given more than once "
            f"in the mapping at line {line}. Allowed: each key once."
        ),
    ):
        composer_adam.load_recipe(path)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("optimizer:\n  name: decoupled_adamw\n  lr: [1e-3\n", "line 4, column 1"),
        ("optimizer:\n\tname: decoupled_adamw\n", "line 2, column 1"),
        ("\x00optimizer: 1\n", "position 0"),
        ("optimizer:\n  <<: 5\n  name: decoupled_adamw\n", "line 2, column 7"),
    ],
    ids=["parser", "scanner", "reader", "constructor"],
)
def test_malformed_yaml_is_an_invalid_recipe_file_with_pyyamls_message(
    tmp_path: Path, text: str, where: str
) -> None:
    """PyYAML's own message (file, line and column) is kept, and the error chained."""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"Invalid recipe file {str(path)!r}: ")) as info:
        composer_adam.load_recipe(path)
    assert f'in "{path}", {where}' in str(info.value)
    assert isinstance(info.value.__cause__, yaml.YAMLError)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "text",
    ["- name: cosine\n", "- [name, cosine]\n- [t_max, 1dur]\n", "cosine\n"],
    ids=["list", "list-of-pairs", "scalar"],
)
def test_a_recipe_file_that_is_no_mapping_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(
        ValueError, match=re.escape(f"Invalid recipe file {str(path)!r}: expected a YAML mapping.")
    ):
        composer_adam.load_recipe(path)


def test_a_loaded_mapping_is_a_copy_of_the_callers() -> None:
    """load_recipe copies a mapping it is given, so editing the recipe leaves the caller's."""
    given = {"scheduler": {"name": "cosine_with_warmup", "t_warmup": "10ba"}}
    recipe = composer_adam.load_recipe(given)
    recipe["scheduler"] = {"name": "constant"}
    assert given == {"scheduler": {"name": "cosine_with_warmup", "t_warmup": "10ba"}}
    assert type(composer_adam.load_recipe(types.MappingProxyType({"a": 1}))) is dict


TIME_RANGE = (
    "a time >= 0 in ep, ba, sp, tok or iter such as '100ba' or '1ep', "
    "or a 'dur' fraction in [0, 1] (wall-clock 'sec' is no scheduler time)"
)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("name", "key", "value", "allowed"),
    [
        ("cosine_with_warmup", "t_warmup", "-5ba", TIME_RANGE),
        ("cosine_with_warmup", "t_warmup", "5dur", TIME_RANGE),
        ("linear_decay_with_warmup", "t_max", "1.5dur", TIME_RANGE),
        ("cosine_with_warmup", "t_warmup", "5sec", TIME_RANGE),
        ("cosine", "t_max", "60sec", TIME_RANGE),
        ("constant", "t_max", "-1ep", TIME_RANGE),
        ("cosine_with_warmup", "alpha_f", float("nan"), "a finite number >= 0"),
        ("cosine_with_warmup", "alpha_f", float("inf"), "a finite number >= 0"),
        ("cosine_with_warmup", "alpha_f", -3, "a finite number >= 0"),
        ("linear_decay_with_warmup", "alpha_i", -0.5, "a finite number >= 0"),
        ("constant_with_warmup", "alpha", float("-inf"), "a finite number >= 0"),
    ],
)
def test_scheduler_values_out_of_range_are_refused_when_built(
    name: str, key: str, value: object, allowed: str
) -> None:
    """Composer builds them and trains on a negative or NaN learning rate, or a warmup
    longer than the run ('dur' is a fraction of the run), or refuses them at the first batch
    (wall-clock 'sec'). The bounds themselves build."""
    recipe = {"name": name, key: value}
    if name.endswith("_with_warmup") and key != "t_warmup":
        recipe["t_warmup"] = "1ba"
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"Invalid {recipes.SCHEDULERS[name]} recipe: {key}={value!r}. Allowed: {allowed}."
        ),
    ):
        composer_adam.build_scheduler(recipe)
    divides = (name, key) == ("cosine", "t_max")  # 0 refused: see the next test
    bounds = ("1ba", "1dur") if divides else ("0ba", "0dur", "1dur")
    for bound in bounds if allowed == TIME_RANGE else (0, 0.0):
        composer_adam.build_scheduler({**recipe, key: bound})


@pytest.mark.bad_input
@pytest.mark.parametrize("t_max", ["0ba", "0ep", "0dur", "0tok"])
def test_a_cosine_t_max_of_zero_is_refused_when_built(t_max: str) -> None:
    """Composer divides by it: the recipe built and fit failed at the first batch with
    ZeroDivisionError."""
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"Invalid CosineAnnealingScheduler recipe: t_max={t_max!r}. Allowed: a time > 0 "
            "(CosineAnnealingScheduler divides by its t_max)."
        ),
    ):
        composer_adam.build_scheduler({"name": "cosine", "t_max": t_max})


TIME_STRING = (
    "a Composer time string such as '100ba', '1ep' or '0.1dur' (whole numbers but for dur)"
)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("t_warmup", 10, TIME_STRING),
        ("t_warmup", "10", TIME_STRING),
        ("t_warmup", "0.5ep", TIME_STRING),  # escaped as Composer's TypeError
        ("t_warmup", "2.5sp", TIME_STRING),
        ("t_warmup", "infba", TIME_STRING),  # int(inf) overflows
        ("t_warmup", "1e999ep", TIME_STRING),
        ("alpha_f", "0.1", "a number"),
        ("scale_warmup", "yes", "true or false"),
    ],
    ids=[
        "int-time",
        "unitless-time",
        "half-epoch",
        "half-sample",
        "infinite-time",
        "overflowing-time",
        "text-number",
        "text-flag",
    ],
)
def test_scheduler_values_of_the_wrong_kind_are_refused_when_built(
    key: str, value: object, allowed: str
) -> None:
    """Composer takes them as given and fails at the first batch (an int t_warmup raised
    AttributeError: 'int' object has no attribute 'unit' there)."""
    recipe = {"name": "cosine_with_warmup", "t_warmup": "5ba", key: value}
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"Invalid CosineAnnealingWithWarmupScheduler recipe: {key}={value!r}. "
            f"Allowed: {allowed}."
        ),
    ):
        composer_adam.build_scheduler(recipe)
    good = {"t_warmup": "0.1dur", "alpha_f": 0, "scale_warmup": True}
    composer_adam.build_scheduler({**recipe, key: good[key]})


@pytest.mark.bad_input
def test_scheduler_recipe_and_its_errors() -> None:
    from composer.optim import CosineAnnealingWithWarmupScheduler

    scheduler = composer_adam.build_scheduler(
        {"scheduler": {"name": "cosine_with_warmup", "t_warmup": "5ba"}}
    )
    assert isinstance(scheduler, CosineAnnealingWithWarmupScheduler)
    with pytest.raises(
        ValueError,
        match=re.escape("Invalid scheduler name: 'cosine_warmup'. Allowed: cosine_with_warmup,"),
    ):
        composer_adam.build_scheduler({"name": "cosine_warmup"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['warmup'\]"):
        composer_adam.build_scheduler({"name": "cosine_with_warmup", "warmup": "5ba"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \[3, 'x'\]"):  # was a TypeError
        composer_adam.build_scheduler(
            {"name": "cosine_with_warmup", "t_warmup": "5ba", 3: 1, "x": 2}
        )
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Invalid CosineAnnealingWithWarmupScheduler recipe: missing key(s) ['t_warmup']. "
            "Required: t_warmup."
        ),
    ):
        composer_adam.build_scheduler({"name": "cosine_with_warmup", "alpha_f": 0.1})


def test_llmfoundry_entry_points_register_the_classes() -> None:
    found = {e.name: e.load() for e in entry_points(group="llmfoundry_optimizers")}
    assert found == recipes.OPTIMIZERS
    # llm-foundry calls the class with params= and the YAML's keyword arguments.
    optimizer = found["adamkit_decoupled_adamw"](params=Block().parameters(), lr=6e-4)
    assert optimizer.param_groups[0]["initial_lr"] == 6e-4


def test_llmfoundry_builds_release_from_its_yaml_sections_alone() -> None:
    """What llm-foundry does with `optimizer: {name: adamkit_decoupled_adamw,
    gradient_release: true, ...}` and `callbacks: {adamkit_gradient_release: {}}`: each
    name's entry point called with the section's keywords. Gradients are released in the
    last microbatch's backward, and training equals the same sections without release."""
    optimizers = {e.name: e.load() for e in entry_points(group="llmfoundry_optimizers")}
    callbacks = {e.name: e.load() for e in entry_points(group="llmfoundry_callbacks")}
    assert callbacks == {"adamkit_gradient_release": composer_adam.GradientRelease}
    section = {"lr": LR, "betas": [0.9, 0.95], "weight_decay": 1e-4}
    adamw = optimizers["adamkit_decoupled_adamw"]
    ordinary, _ = train(lambda params: adamw(params=params, **section))
    probe = GradientsAfterBackward()
    released, _ = train(
        lambda params: adamw(params=params, gradient_release=True, **section),
        callbacks=[callbacks["adamkit_gradient_release"](), probe],
    )
    assert probe.kept == [True, True, True, False] * STEPS
    assert_same_parameters(released.state.model, ordinary.state.model, atol=0)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_builds(path: Path) -> None:
    optimizer = composer_adam.build_optimizer(path, _example().CharLanguageModel(64, 16, 2, 1))
    assert isinstance(optimizer, tuple(recipes.OPTIMIZERS.values()))
    composer_adam.build_scheduler(path)


def _example():
    spec = importlib.util.spec_from_file_location(
        "composer_train", ROOT / "examples" / "composer_train.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_example_trains_from_the_recipe(backend: str, tmp_path: Path) -> None:
    """The shipped recipe as it is (default flags), and choosing each backend by its
    fused/foreach keys."""
    path, example = RECIPES[0], _example()
    if BACKENDS[backend]:
        recipe = composer_adam.load_recipe(path)
        recipe["optimizer"].update(BACKENDS[backend])
        path = tmp_path / path.name
        path.write_text(yaml.safe_dump(recipe))
        built = composer_adam.build_optimizer(path, example.CharLanguageModel(64, 16, 2, 1))
        for group in built.param_groups:
            assert {key: group[key] for key in BACKENDS[backend]} == BACKENDS[backend]
    result = example.train(str(path), max_duration="12ba")
    assert result["batches"] == 12
    assert result["last_loss"] < result["first_loss"] - 0.5


def test_state_precision_comes_from_the_recipe() -> None:
    path = ROOT / "configs" / "composer" / "char_lm_decoupled_adamw_8bit.yaml"
    model = _example().CharLanguageModel(64, 16, 2, 1)
    optimizer = composer_adam.build_optimizer(path, model)
    assert {g["state_precision"] for g in optimizer.param_groups} == {"8bit"}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    quantized = [p for p in model.parameters() if "exp_avg_codes" in optimizer.state[p]]
    assert quantized and all(p.numel() >= 4096 for p in quantized)
    with pytest.raises(ValueError, match=r"Invalid state_precision: '4bit'"):
        composer_adam.build_optimizer(
            {"name": "adamkit_decoupled_adamw", "state_precision": "4bit"}, model
        )
