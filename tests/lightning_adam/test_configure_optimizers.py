"""lightning_adam.configure_optimizers: names, hyperparameters, groups, schedules, errors."""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import BatchSizeFinder, GradientAccumulationScheduler
from torch import nn

import core
from lightning_adam import LRSchedule, configure_optimizers, resolve_optimizer_class
from lightning_adam.optimizers import public_path
from lightning_adam.schedules import ScheduledLR
from tests.lightning_adam.models import Regression, loader, make_trainer, regression_data


class Tied(nn.Module):
    """Embedding tied to the output head, a norm, a biased projection and a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embedding.weight
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, set[str]]:
    names = {id(p): name for name, p in model.named_parameters()}
    return {g["name"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}


def test_default_rule_leaves_biases_norms_and_embeddings_undecayed() -> None:
    model = Tied()
    optimizer = configure_optimizers(model, "AdamW", lr=1e-3, weight_decay=0.1)["optimizer"]
    assert _group_names(model, optimizer) == {
        "decay": {"proj.weight"},
        "no_decay": {"embedding.weight", "norm.weight", "norm.bias", "proj.bias"},
    }
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


class Scaled(nn.Module):
    """A custom module with a learned 1-D scale, a custom norm and a 2-D parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))
        self.weight = nn.Parameter(torch.ones(8, 8))


class MyNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, 8))


def test_default_rule_is_cores_rule_with_the_owning_module() -> None:
    """One rule for the project (core.models.skips_weight_decay): 1-D parameters too."""
    model = nn.ModuleDict({"block": Scaled(), "norm": MyNorm(), "tied": Tied()})
    optimizer = configure_optimizers(model, "AdamW", lr=1e-3)["optimizer"]
    expected = {
        name
        for name, param, owner in core.models.owned_parameters(model)
        if param.requires_grad and core.models.skips_weight_decay(name, param, owner)
    }
    assert _group_names(model, optimizer)["no_decay"] == expected
    assert {"block.scale", "norm.gain", "tied.embedding.weight"} <= expected
    assert "block.weight" in _group_names(model, optimizer)["decay"]


@pytest.mark.parametrize(
    ("setting", "expected_no_decay"),
    [
        (["*.bias"], {"norm.bias", "proj.bias"}),
        (("norm.*", "embedding.weight"), {"norm.weight", "norm.bias", "embedding.weight"}),
        (lambda name, param, module: param.ndim == 1, {"norm.weight", "norm.bias", "proj.bias"}),
    ],
    ids=["patterns", "tuple", "callable"],
)
def test_no_weight_decay_is_configurable(setting: object, expected_no_decay: set[str]) -> None:
    model = Tied()
    optimizer = configure_optimizers(model, "AdamW", lr=1e-3, no_weight_decay=setting)["optimizer"]
    groups = _group_names(model, optimizer)
    assert groups["no_decay"] == expected_no_decay
    assert (
        groups["decay"]
        == {"embedding.weight", "norm.weight", "norm.bias", "proj.weight", "proj.bias"}
        - expected_no_decay
    )


class CompiledInside(nn.Module):
    """A submodule compiled where it is built, as users write it (`configure_model`):
    its parameters' names gain torch.compile's '_orig_mod' (no compilation happens until
    a forward, which these tests do not run)."""

    def __init__(self, compiled: bool) -> None:
        super().__init__()
        self.model = torch.compile(Tied()) if compiled else Tied()


@pytest.mark.parametrize(
    ("setting", "compiled_setting"),
    [
        (["model.norm.*", "*.bias"], None),
        (True, None),
        (["model.norm.*", "*.bias"], ["model._orig_mod.norm.*", "*.bias"]),  # the real names
    ],
    ids=["patterns", "default-rule", "patterns-with-orig-mod"],
)
def test_no_weight_decay_reads_a_compiled_submodule_by_the_names_it_was_written_with(
    setting: object, compiled_setting: object
) -> None:
    """A pattern for 'model.norm.*' matched nothing once the model was compiled (its
    names were 'model._orig_mod.norm.weight'): those parameters got weight decay. The
    names named_parameters() gives match too."""
    groups = []
    for compiled in (False, True):
        model = CompiledInside(compiled)
        chosen = compiled_setting if compiled and compiled_setting else setting
        built = configure_optimizers(model, "AdamW", lr=1e-3, no_weight_decay=chosen)
        names = {p: core.models.user_facing_name(n) for n, p in model.named_parameters()}
        groups.append(
            {g["name"]: {names[p] for p in g["params"]} for g in built["optimizer"].param_groups}
        )
    assert groups[1] == groups[0]
    assert {"model.norm.weight", "model.norm.bias"} <= groups[0]["no_decay"]


def test_no_weight_decay_patterns_match_a_module_under_any_of_its_names() -> None:
    """A module registered twice (self.enc2 = self.enc1) has state_dict keys under both
    names; a pattern over the second exempted nothing."""
    model = nn.ModuleDict({"enc1": nn.Linear(3, 3), "head": nn.Linear(3, 2)})
    model["enc2"] = model["enc1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        optimizer = configure_optimizers(model, "AdamW", lr=1e-3, no_weight_decay=["enc2.*"])
    assert _group_names(model, optimizer["optimizer"])["no_decay"] == {
        "enc1.weight",
        "enc1.bias",
    }


def test_a_no_weight_decay_pattern_matching_no_parameter_is_reported_by_name() -> None:
    model = Tied()
    with pytest.warns(
        UserWarning,
        match=r"no_weight_decay patterns \['norms\.\*'\] match no parameter name, so they "
        r"exempt nothing from weight decay; the names are like \['embedding\.weight', 'norm\.",
    ):
        optimizer = configure_optimizers(
            model, "AdamW", lr=1e-3, no_weight_decay=["*.bias", "norms.*"]
        )["optimizer"]
    assert _group_names(model, optimizer)["no_decay"] == {"norm.bias", "proj.bias"}


def test_no_weight_decay_false_makes_one_decayed_group() -> None:
    model = Tied()
    optimizer = configure_optimizers(model, "AdamW", lr=1e-3, no_weight_decay=False)["optimizer"]
    assert _group_names(model, optimizer) == {
        "decay": {"embedding.weight", "norm.weight", "norm.bias", "proj.weight", "proj.bias"}
    }


def test_no_decay_group_is_not_decayed_and_the_other_is() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    optimizer = configure_optimizers(model, "AdamW", lr=0.1, weight_decay=0.5)["optimizer"]
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    linear_weight, *undecayed = before
    torch.testing.assert_close(model[0].weight, linear_weight * (1 - 0.1 * 0.5))
    for param, old in zip([model[0].bias, model[1].weight, model[1].bias], undecayed, strict=True):
        assert torch.equal(param, old)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("adamw", core.AdamW),
        ("ADOPT", core.ADOPT),
        ("nadam", core.NAdam),
        ("core.RAdam", core.RAdam),
        ("torch.optim.AdamW", torch.optim.AdamW),
        (core.Adam, core.Adam),
        ({"class_path": "core.AdamW", "init_args": {"lr": 0.02}}, core.AdamW),
        (functools.partial(core.RAdam, lr=0.02), core.RAdam),
    ],
    ids=["lower", "short", "nadam", "path", "torch", "class", "cli-dict", "callable"],
)
def test_optimizer_by_name_path_class_dict_or_callable(spec: object, expected: type) -> None:
    extra = {} if isinstance(spec, (dict, functools.partial)) else {"lr": 0.02}
    optimizer = configure_optimizers(Tied(), spec, **extra)["optimizer"]
    assert type(optimizer) is expected
    assert [g["lr"] for g in optimizer.param_groups] == [0.02, 0.02]


def test_hyperparameters_reach_every_group_and_explicit_ones_win_over_init_args() -> None:
    spec = {"class_path": "core.AdamW", "init_args": {"lr": 0.5, "betas": [0.8, 0.9]}}
    optimizer = configure_optimizers(Tied(), spec, lr=0.02, kahan_sum=False)["optimizer"]
    for group in optimizer.param_groups:
        assert (group["lr"], group["betas"], group["kahan_sum"]) == (0.02, [0.8, 0.9], False)


def test_a_plain_dict_from_yaml_configures_optimizer_groups_and_schedule() -> None:
    config = yaml.safe_load(
        """
        optimizer: ADOPT
        lr: 2.0e-3
        weight_decay: 0.1
        decouple_wd: true
        scheduler: {kind: linear, warmup_steps: 1, total_steps: 3, name: lr}
        no_weight_decay: ['*.bias']
        """
    )
    model = Tied()
    result = configure_optimizers(model, config)
    optimizer, scheduler = result["optimizer"], result["lr_scheduler"]
    assert type(optimizer) is core.ADOPT
    assert _group_names(model, optimizer)["no_decay"] == {"norm.bias", "proj.bias"}
    assert {k: v for k, v in scheduler.items() if k != "scheduler"} == {
        "interval": "step",
        "frequency": 1,
        "name": "lr",
    }
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler["scheduler"].step()
    assert lrs == pytest.approx([1e-3, 2e-3, 1e-3, 0.0], abs=1e-15)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optimizer: RAdam\namsgrad: true", r"Invalid argument for core.RAdam: 'amsgrad'\."),
        ("optimizer: RAdamm", r"Invalid optimizer: 'RAdamm'\. Allowed: one of Adam, AdamW, RAdam,"),
        (
            "optimizer: NAdam\nschedular: cosine",
            r"Invalid argument for core.NAdam: 'schedular'\. Allowed: its parameters: lr, betas, "
            r".*momentum_decay, .*gradient_release; and the config keys optimizer, scheduler, "
            r"no_weight_decay\.$",
        ),
    ],
    ids=["unknown-argument", "unknown-name", "misspelt-key"],
)
def test_a_yaml_config_with_an_unknown_name_or_argument_lists_the_valid_ones(
    text: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        configure_optimizers(Tied(), yaml.safe_load(f"lr: 1.0e-3\n{text}"))


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("factory", "kwargs", "form"),
    [
        (lambda: None, {}, "optimizer(param_groups)"),
        (lambda groups: core.AdamW(groups), {"lr": 0.1}, "optimizer(param_groups, lr=...)"),
        (
            functools.partial(core.AdamW, lr=0.1),
            {"momentum": 0.9},
            "optimizer(param_groups, momentum=...)",
        ),
    ],
    ids=["takes-nothing", "no-keywords", "unknown-keyword"],
)
def test_a_callable_that_cannot_take_the_call_is_refused_by_name(
    factory: object, kwargs: dict[str, object], form: str
) -> None:
    """The call's own TypeError named neither the callable nor how it is called."""
    with pytest.raises(ValueError) as info:
        configure_optimizers(Tied(), factory, **kwargs)
    message = str(info.value)
    assert message.startswith(f"Invalid optimizer {factory!r}: it cannot be called as {form} (")
    assert message.endswith(
        "Allowed: a callable taking the param groups first and the hyperparameters as "
        "keywords, such as functools.partial(core.AdamW, betas=(0.9, 0.95))."
    )


def _expected_factor(kind: str, t: int, warmup: int, total: int, ratio: float) -> float:
    """The schedule written from its definition, to check the composed torch schedulers."""
    if t < warmup:
        return (t + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(t - warmup, total - warmup) / (total - warmup)
    if kind == "cosine":
        return ratio + (1 - ratio) * (1 + math.cos(math.pi * progress)) / 2
    return 1 - (1 - ratio) * progress


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedules_follow_their_definition_and_hold_after_the_end(kind: str, warmup: int) -> None:
    lr, total, ratio = 0.01, 12, 0.2
    schedule = LRSchedule(kind=kind, warmup_steps=warmup, total_steps=total, min_lr_ratio=ratio)
    result = configure_optimizers(Tied(), "AdamW", lr=lr, scheduler=schedule)
    optimizer, scheduler = result["optimizer"], result["lr_scheduler"]["scheduler"]
    for t in range(total + 5):
        expected = lr * _expected_factor(kind, t, warmup, total, ratio)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([expected] * 2, rel=1e-9)
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_each_group_follows_the_schedule_from_its_own_lr(kind: str) -> None:
    """A layer-wise lr (here the no-decay group at a tenth): the cosine stage decayed every
    group towards one floor taken from the largest lr, so the smaller one climbed."""
    lr, total, ratio, warmup = 0.01, 12, 0.5, 2

    def build(groups: list[dict]) -> core.AdamW:
        return core.AdamW(
            [{**g, "lr": lr if g["name"] == "decay" else lr / 10} for g in groups], lr=lr
        )

    schedule = LRSchedule(kind=kind, warmup_steps=warmup, total_steps=total, min_lr_ratio=ratio)
    result = configure_optimizers(Tied(), build, scheduler=schedule)
    optimizer, scheduler = result["optimizer"], result["lr_scheduler"]["scheduler"]
    for t in range(total + 3):
        factor = _expected_factor(kind, t, warmup, total, ratio)
        starts = [lr if g["name"] == "decay" else lr / 10 for g in optimizer.param_groups]
        got = [g["lr"] for g in optimizer.param_groups]
        assert got == pytest.approx([start * factor for start in starts], rel=1e-9)
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 3])
@pytest.mark.parametrize("joined", [2, 7, 14])
def test_a_group_added_mid_schedule_follows_it_from_where_it_joined(
    kind: str, warmup: int, joined: int
) -> None:
    """add_param_group mid-run (BackboneFinetuning): the closed-form stages had no starting
    lr for the new group and failed at their next step."""
    lr, total, ratio, joined_lr = 0.01, 12, 0.2, 0.004
    schedule = LRSchedule(kind=kind, warmup_steps=warmup, total_steps=total, min_lr_ratio=ratio)
    result = configure_optimizers(Tied(), "AdamW", lr=lr, scheduler=schedule)
    optimizer, scheduler = result["optimizer"], result["lr_scheduler"]["scheduler"]
    for t in range(total + 4):
        if t == joined:
            optimizer.add_param_group({"params": [nn.Parameter(torch.ones(2))], "lr": joined_lr})
        factor = _expected_factor(kind, t, warmup, total, ratio)
        expected = [lr * factor] * 2
        if t >= joined:
            at_joining = _expected_factor(kind, joined, warmup, total, ratio)
            expected.append(joined_lr * factor / at_joining)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(expected, rel=1e-9)
        optimizer.step()
        scheduler.step()


def test_a_cosine_schedule_saved_before_the_per_group_stage_resumes() -> None:
    """Checkpoints written while the cosine stage was torch's CosineAnnealingLR (between
    the same warmup and hold stages) load by position and continue on the definition."""
    from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, SequentialLR

    lr, total, ratio, warmup = 0.01, 12, 0.2, 3
    earlier = configure_optimizers(Tied(), "AdamW", lr=lr)["optimizer"]
    saved = SequentialLR(
        earlier,
        [
            LinearLR(earlier, 1 / (warmup + 1), 1.0, total_iters=warmup),
            CosineAnnealingLR(earlier, T_max=total - warmup, eta_min=ratio * lr),
            ConstantLR(earlier, ratio, total_iters=2**62),
        ],
        [warmup, total],
    )
    for _ in range(5):
        earlier.step()
        saved.step()
    schedule = LRSchedule(kind="cosine", warmup_steps=warmup, total_steps=total, min_lr_ratio=ratio)
    result = configure_optimizers(Tied(), "AdamW", lr=lr, scheduler=schedule)
    optimizer, scheduler = result["optimizer"], result["lr_scheduler"]["scheduler"]
    scheduler.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(earlier.state_dict())
    for t in range(5, total + 3):
        expected = lr * _expected_factor("cosine", t, warmup, total, ratio)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([expected] * 2, rel=1e-9)
        optimizer.step()
        scheduler.step()


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("copy_by", ["pickle", "deepcopy"])  # (torch warns for its own copies)
def test_a_schedule_still_to_be_counted_pickles_and_copies_counted(copy_by: str) -> None:
    """A schedule whose total_steps the trainer counts later holds a closure over the
    trainer and a hook on its optimizer until then: pickling failed on the closure
    (fails at the code before the fix). Copied, it is counted first, as its state_dict
    is; the copy follows the counted curve and the original is counted once."""
    import copy
    import pickle

    lr, total, warmup = 0.01, 9, 2
    counts: list[bool] = []

    def count(before_a_step: bool) -> int:
        counts.append(before_a_step)
        return total

    optimizer = configure_optimizers(Tied(), "AdamW", lr=lr)["optimizer"]
    pending = ScheduledLR(
        optimizer, LRSchedule(kind="linear", warmup_steps=warmup), total_from=count
    )
    assert pending.total_steps is None
    copied = pickle.loads(pickle.dumps(pending)) if copy_by == "pickle" else copy.deepcopy(pending)
    assert counts == [False] and pending.total_steps == copied.total_steps == total
    for original in (pending, copied):
        for t in range(total + 2):
            expected = lr * _expected_factor("linear", t, warmup, total, 0.0)
            assert original.get_last_lr() == pytest.approx([expected] * 2, rel=1e-9)
            original.optimizer.step()
            original.step()
    assert counts == [False]


def test_a_discarded_schedule_leaves_its_optimizer_alone() -> None:
    """The scheduler puts its lrs back after an optimizer state is loaded (a hook on the
    optimizer). Held strongly, the hook kept a discarded scheduler alive and went on
    writing its curve's lr over every loaded state, and over a scheduler that replaced
    it (fails at the code before the fix)."""
    import gc
    import weakref

    optimizer = configure_optimizers(Tied(), "AdamW", lr=0.01)["optimizer"]
    scheduler = ScheduledLR(optimizer, LRSchedule(kind="linear", warmup_steps=4, total_steps=9))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.002] * 2)
    gone = weakref.ref(scheduler)
    del scheduler
    gc.collect()
    assert gone() is None
    saved = optimizer.state_dict()
    for group in saved["param_groups"]:
        group["lr"] = 0.5
    optimizer.load_state_dict(saved)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.5]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "saved", [{}, {"last_epoch": 3}, {"last_epoch": "3", "base_lrs": [0.01]}, {"base_lrs": [1]}]
)
def test_a_scheduler_state_without_its_place_on_the_curve_is_refused(saved: dict) -> None:
    """What loading takes from a checkpoint: last_epoch and base_lrs (its own or its first
    stage's); without them it is no schedule's state, refused before anything is set."""
    schedule = LRSchedule(kind="linear", total_steps=8)
    result = configure_optimizers(Tied(), "AdamW", lr=0.01, scheduler=schedule)
    optimizer, scheduler = result["optimizer"], result["lr_scheduler"]["scheduler"]
    with pytest.raises(ValueError, match=r"Invalid scheduler state_dict: .*Allowed: the state of"):
        scheduler.load_state_dict(saved)
    assert scheduler.last_epoch == 0 and [g["lr"] for g in optimizer.param_groups] == [0.01] * 2


def test_total_steps_default_to_the_trainers_optimizer_steps() -> None:
    """8 batches, accumulate 2, 3 epochs: 12 optimizer steps, so linear decay ends at lr 0."""
    model = Regression(scheduler={"kind": "linear"}, lr=1e-2)
    trainer = make_trainer(max_epochs=3, accumulate_grad_batches=2)
    trainer.fit(model, loader(regression_data(128), batch_size=16))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert trainer.global_step == 12 and scheduler.last_epoch == 12
    assert scheduler.get_last_lr() == [0.0, 0.0]


class BatchSized(Regression):
    """A Regression whose loader takes its batch size from the module (for BatchSizeFinder)."""

    def __init__(self, batch_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batch_size = batch_size

    def train_dataloader(self) -> Any:
        return loader(regression_data(128), batch_size=self.batch_size)


def test_total_steps_follow_the_batch_size_a_batch_size_finder_picks_inside_the_fit(
    tmp_path: Path,
) -> None:
    """BatchSizeFinder as a callback changes the batch size in on_fit_start, after
    configure_optimizers counted the steps: the schedule was built for batch size 2 (128
    steps) and the fit ran 32 at the size found, ending at 76% of the peak lr instead of
    0 (fails at the code before the fix). Lightning restores the scheduler after the
    finder's trials, and the count is taken again there."""
    finder = BatchSizeFinder(mode="power", steps_per_trial=1, init_val=2, max_trials=3)
    model = BatchSized(2, scheduler={"kind": "linear", "warmup_steps": 1}, lr=1e-2)
    trainer = make_trainer(max_epochs=2, callbacks=[finder], default_root_dir=tmp_path)
    trainer.fit(model)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert model.batch_size == 8 and trainer.global_step == scheduler.total_steps == 32
    assert scheduler.last_epoch == 32 and scheduler.get_last_lr() == [0.0, 0.0]


@pytest.mark.parametrize(("frequency", "accumulate"), [(2, 2), (3, 1), (2, 3), (4, 2)])
def test_a_schedule_stepped_every_few_batches_ends_at_the_last_scheduler_step(
    frequency: int, accumulate: int
) -> None:
    """Lightning steps a 'step' scheduler of frequency f after batches whose index in the
    epoch is a multiple of f and ends a window, not every f optimizer steps: total_steps
    was optimizer steps // f, so (f 2, accumulation 2) the lr reached its floor halfway."""
    model = Regression(scheduler={"kind": "linear", "frequency": frequency}, lr=1e-2)
    trainer = make_trainer(max_epochs=2, accumulate_grad_batches=accumulate)
    trainer.fit(model, loader(regression_data(128), batch_size=16))  # 8 batches an epoch
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    expected = sum(
        1
        for batch in range(1, 9)
        if (batch % accumulate == 0 or batch == 8) and batch % frequency == 0
    )
    assert scheduler.total_steps == scheduler.last_epoch == 2 * expected
    assert scheduler.get_last_lr() == [0.0, 0.0]


class _Endless(torch.utils.data.IterableDataset):
    """One epoch that never ends: max_steps alone bounds the run."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        data = regression_data(64)
        while True:
            yield from data


@pytest.mark.parametrize(("frequency", "accumulate"), [(2, 2), (3, 1), (2, 3), (4, 2)])
def test_a_schedule_stepped_every_few_batches_of_an_endless_epoch_ends_at_max_steps(
    frequency: int, accumulate: int
) -> None:
    """The same count on an epoch without end (an endless IterableDataset, max_steps):
    only batches that end a window and are a multiple of f step the scheduler."""
    model = Regression(scheduler={"kind": "linear", "frequency": frequency}, lr=1e-2)
    trainer = make_trainer(max_steps=12, accumulate_grad_batches=accumulate)
    trainer.fit(model, torch.utils.data.DataLoader(_Endless(), batch_size=16))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    batches = range(1, 12 * accumulate + 1)
    expected = sum(1 for b in batches if b % accumulate == 0 and b % frequency == 0)
    assert trainer.global_step == 12
    assert scheduler.total_steps == scheduler.last_epoch == expected
    assert scheduler.get_last_lr() == [0.0, 0.0]


def test_epoch_interval_counts_epochs() -> None:
    model = Regression(
        scheduler={"kind": "linear", "interval": "epoch", "min_lr_ratio": 0.5}, lr=1e-3
    )
    trainer = make_trainer(max_epochs=4)
    trainer.fit(model, loader(regression_data(64)))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert trainer.lr_scheduler_configs[0].interval == "epoch"
    assert scheduler.last_epoch == 4 and scheduler.get_last_lr() == pytest.approx([5e-4] * 2)


@pytest.mark.parametrize(
    ("scheduling", "steps"), [({0: 1, 1: 2}, 8 + 4 + 4), ({0: 2, 1: 1}, 4 + 8 + 8)]
)
@pytest.mark.parametrize("frequency", [1, 2])
def test_total_steps_follow_a_gradient_accumulation_scheduler(
    scheduling: dict, steps: int, frequency: int
) -> None:
    """It sets the trainer's accumulation at each epoch start, after the schedule is built:
    the length was taken with the first epoch's for all ({0: 1, 1: 2}: built for 24
    steps, 16 ran, the decay stopped at a third of the lr)."""
    model = Regression(scheduler={"kind": "linear", "frequency": frequency}, lr=1e-2)
    trainer = make_trainer(
        max_epochs=3, callbacks=[GradientAccumulationScheduler(scheduling=scheduling)]
    )
    trainer.fit(model, loader(regression_data(128), batch_size=16))  # 8 batches an epoch
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert trainer.global_step == steps
    assert scheduler.total_steps == scheduler.last_epoch
    assert scheduler.get_last_lr() == [0.0, 0.0]


@pytest.mark.parametrize("max_epochs", [10, -1])
def test_an_epoch_schedule_ends_where_max_steps_ends_training(max_epochs: int) -> None:
    """8 batches an epoch and max_steps: training ends in its second or third epoch. The
    schedule was built for max_epochs (10: the decay 20% done at the end) or refused
    without it. Now it spans the epochs max_steps leaves; one cut short trains at the
    curve's last value before the floor, as a max_epochs run's last epoch does (Lightning
    steps no 'epoch' scheduler after it)."""
    for max_steps, epochs, lr in ((16, 2, 0.0), (20, 3, 1e-2 / 3)):
        model = Regression(scheduler={"kind": "linear", "interval": "epoch"}, lr=1e-2)
        trainer = make_trainer(max_epochs=max_epochs, max_steps=max_steps)
        trainer.fit(model, loader(regression_data(128), batch_size=16))
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        assert trainer.global_step == max_steps and scheduler.total_steps == epochs
        assert scheduler.last_epoch == max_steps // 8
        assert scheduler.get_last_lr() == pytest.approx([lr, lr])


@pytest.mark.bad_input
def test_a_trainer_shorter_than_the_warmup_is_refused_naming_where_total_steps_came_from() -> None:
    """Five steps with a 30-step warmup: the message named only total_steps=5, which the
    user never set."""
    model = Regression(scheduler={"kind": "cosine", "warmup_steps": 30}, lr=1e-2)
    trainer = make_trainer(max_steps=5)
    with pytest.raises(
        ValueError,
        match=r"Invalid total_steps: None\. Allowed: more than warmup_steps \(30\) for a cosine "
        r"schedule; taken from trainer\.estimated_stepping_batches \(5\) it is 5",
    ):
        trainer.fit(model, loader(regression_data(64)))


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_fast_dev_run_builds_a_schedule_longer_than_its_run(interval: str) -> None:
    """fast_dev_run smoke-tests the real run's config: a warmup longer than its few steps
    was refused, so the config could not be tried. The run stays in its warmup."""
    schedule = {"kind": "cosine", "warmup_steps": 30, "interval": interval}
    model = Regression(scheduler=schedule, lr=1e-2)
    trainer = make_trainer(fast_dev_run=2)
    trainer.fit(model, loader(regression_data(64)))
    (config,) = trainer.lr_scheduler_configs
    steps = trainer.global_step if interval == "step" else 1
    start = 1.0 / 31  # LinearLR's start factor, rising to 1 over the 30 warmup steps
    expected = 1e-2 * (start + (1.0 - start) * steps / 30)
    assert trainer.global_step == 2
    assert config.scheduler.get_last_lr() == pytest.approx([expected] * 2)


@pytest.mark.bad_input
def test_unbounded_trainer_needs_total_steps() -> None:
    model = Regression(scheduler="cosine", lr=1e-2)
    trainer = make_trainer(max_steps=-1, max_epochs=-1)
    with pytest.raises(ValueError, match=r"Invalid total_steps: None\. .*estimated_stepping"):
        trainer.fit(model, loader(regression_data(64)))


@pytest.mark.parametrize("settings", [{"max_steps": 0}, {"limit_train_batches": 0}])
def test_a_trainer_that_runs_no_step_builds_its_schedule(settings: dict) -> None:
    """Nothing to schedule: the fit ran with torch.optim and no schedule, but the helper's
    schedule refused it, saying the trainer did not bound training."""
    model = Regression(scheduler="cosine", lr=1e-2)
    trainer = make_trainer(**settings)
    trainer.fit(model, loader(regression_data(64)))
    assert trainer.global_step == 0


class _Stream(torch.utils.data.IterableDataset):
    """Batches of unknown number: an IterableDataset without __len__."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        yield from regression_data(64)


@pytest.mark.bad_input
def test_a_dataloader_without_length_is_named_as_what_leaves_total_steps_unknown() -> None:
    """The message blamed an unbounded trainer and asked for max_epochs, which was set."""
    model = Regression(scheduler="cosine", lr=1e-2)
    trainer = make_trainer(max_epochs=1)
    with pytest.raises(
        ValueError,
        match=r"Invalid total_steps: None\. Allowed: an int when the trainer cannot count its "
        r"steps: the training dataloader has no length \(an IterableDataset without "
        r"__len__\) and max_steps is not set",
    ):
        trainer.fit(model, torch.utils.data.DataLoader(_Stream(), batch_size=16))
    model = Regression(scheduler="cosine", lr=1e-2)
    trainer = make_trainer(max_steps=3)
    trainer.fit(model, torch.utils.data.DataLoader(_Stream(), batch_size=16))
    assert trainer.global_step == 3


@pytest.mark.bad_input
def test_an_unbounded_epoch_schedule_is_told_to_set_max_epochs() -> None:
    """The advice was 'max_steps / max_epochs' (max_steps alone now bounds the epochs:
    test_an_epoch_schedule_ends_where_max_steps_ends_training)."""
    model = Regression(scheduler={"kind": "cosine", "interval": "epoch"}, lr=1e-2)
    trainer = make_trainer(max_steps=-1, max_epochs=-1)
    with pytest.raises(
        ValueError,
        match=r"\(trainer\.max_epochs is -1\); set total_steps, or max_epochs on the Trainer\.$",
    ):
        trainer.fit(model, loader(regression_data(64)))


@pytest.mark.bad_input
def test_a_schedule_for_a_submodule_outside_a_trainer_names_the_module() -> None:
    """A GAN's configure_optimizers(self.generator, ...) with a schedule: the message said
    'call it from inside configure_optimizers', where it was called, and then only 'pass
    the LightningModule itself', which would put every parameter in both optimizers."""
    with pytest.raises(
        ValueError,
        match=r"not a LightningModule attached to a Trainer \(here a Sequential\): set the "
        r"schedule's total_steps \(one optimizer of several",
    ):
        configure_optimizers(nn.Sequential(nn.Linear(2, 2)), "AdamW", scheduler="cosine", lr=1e-2)


class _TakesPositionalRest(torch.optim.SGD):
    """A class whose *args reads like a keyword named 'args' to a careless signature reader."""

    def __init__(self, params: Any, *args: Any, lr: float = 0.1, weight_decay: float = 0.0):
        super().__init__(params, lr=lr, weight_decay=weight_decay)


class _RequiresMomentum(torch.optim.SGD):
    """A keyword-only argument without a default."""

    def __init__(self, params: Any, *, lr: float, momentum: float, weight_decay: float = 0.0):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


class _TakesKeywords(torch.optim.AdamW):
    """A class that takes weight_decay through **kwargs (wrappers often do)."""

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)


def test_a_class_taking_keywords_gets_the_no_decay_group() -> None:
    """weight_decay reaches a **kwargs class, so its biases, norms and embeddings get the
    no_decay group as with a class that names the argument."""
    model = Tied()
    optimizer = configure_optimizers(model, _TakesKeywords, lr=1e-3, weight_decay=0.1)["optimizer"]
    groups = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert groups == {"decay": 0.1, "no_decay": 0.0}
    assert _group_names(model, optimizer)["no_decay"] == {
        "embedding.weight",
        "norm.weight",
        "norm.bias",
        "proj.bias",
    }


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "AdamX"}, r"Invalid optimizer: 'AdamX'\. Allowed: one of Adam, AdamW,"),
        ({"optimizer": "torch.optim.Nope"}, r"Invalid optimizer: 'torch.optim.Nope'\."),
        ({"optimizer": "lightning_adam.LRSchedule"}, r"Invalid optimizer: 'lightning_adam"),
        ({"lrr": 1e-3}, r"Invalid argument for core.AdamW: 'lrr'\. Allowed: .*: lr, betas,"),
        ({"lr": -1.0}, r"Invalid lr: -1.0\. Allowed: a finite number >= 0"),
        (
            {"lr": None},
            r"Invalid arguments for core.AdamW: \{\}\. Allowed: arguments that include lr, "
            r"which core.AdamW requires \(no default\)\.",
        ),
        ({"scheduler": "cosin"}, r"Invalid scheduler kind: 'cosin'\. Allowed: one of cosine,"),
        ({"scheduler": {"warmup": 3}}, r"Invalid scheduler key: \['warmup'\]\. .*warmup_steps"),
        (
            {"scheduler": {"warmup_steps": 5, "total_steps": 5}},
            r"Invalid total_steps: 5\. Allowed: .*more than warmup_steps \(5\)",
        ),
        ({"scheduler": {"interval": "batch"}}, r"Invalid interval: 'batch'\. Allowed: 'step'"),
        ({"scheduler": 3}, r"Invalid scheduler: 3\. Allowed: None, one of cosine"),
        ({"no_weight_decay": 3}, r"Invalid no_weight_decay: 3\. Allowed: True, False, a list"),
        (  # Python's own TypeError named neither the setting nor how it is called
            {"no_weight_decay": lambda name: name.endswith("bias")},
            r"Invalid no_weight_decay: <function .*cannot be called as "
            r"no_weight_decay\(name, parameter, module\)",
        ),
        (  # a rule that forgot its return decayed every parameter without a word
            {"no_weight_decay": lambda name, parameter, module: None},
            r"Invalid no_weight_decay: <function .* returned None for parameter '.*'\. "
            r"Allowed: True \(no weight decay\) or False\.",
        ),
        (
            {"optimizer": {"class_path": "core.AdamW", "args": {}}},
            r"Invalid optimizer dict keys: \['args'\]\. Allowed: class_path and init_args",
        ),
        (
            {"optimizer": {"optimizer": "AdamW"}, "lr": 1.0},
            r"Invalid arguments beside a config dict: \['lr'\]",
        ),
        (  # silently ignored, were it not refused: the dict holds the whole setting
            {"optimizer": {"optimizer": "AdamW", "lr": 1e-3}, "lr": None, "no_weight_decay": False},
            r"Invalid arguments beside a config dict: \['no_weight_decay'\]",
        ),
        (  # a rule answering 1/0 or a tensor is no answer: True or False only
            {"no_weight_decay": lambda name, parameter, module: int(parameter.ndim == 1)},
            r"Invalid no_weight_decay: <function .* returned [01] for parameter '.*'\. "
            r"Allowed: True \(no weight decay\) or False\.",
        ),
        (
            {"no_weight_decay": lambda name, parameter, module: torch.tensor(True)},
            r"Invalid no_weight_decay: <function .* returned tensor\(True\) for parameter",
        ),
        (  # *args is no keyword the class takes
            {"optimizer": _TakesPositionalRest, "args": 1},
            r"Invalid argument for .*_TakesPositionalRest: 'args'\. Allowed: its parameters: "
            r"lr, weight_decay\.",
        ),
        (  # named up front, not the constructor's TypeError
            {"optimizer": _RequiresMomentum},
            r"Invalid arguments for .*_RequiresMomentum: \{'lr': 0\.001\}\. Allowed: "
            r"arguments that include momentum, which .*_RequiresMomentum requires \(no default\)",
        ),
    ],
    ids=lambda value: str(value)[:40],
)
def test_bad_input_is_refused_with_argument_value_and_what_is_allowed(
    kwargs: dict, message: str
) -> None:
    kwargs = {"optimizer": "AdamW", "lr": 1e-3, **kwargs}
    kwargs = {key: value for key, value in kwargs.items() if value is not None}  # None: left out
    with pytest.raises((ValueError, TypeError), match=message):
        configure_optimizers(Tied(), kwargs.pop("optimizer"), **kwargs)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("given", "kind"),
    [
        (lambda model: model.parameters(), "generator"),
        (lambda model: list(model.parameters()), "list"),
        (lambda model: None, "NoneType"),
    ],
    ids=["parameters", "list", "None"],
)
def test_parameters_instead_of_the_module_are_refused_naming_the_model(
    given: object, kind: str
) -> None:
    """configure_optimizers(self.parameters(), ...) failed on 'named_modules' in a helper."""
    with pytest.raises(ValueError, match=rf"Invalid model: a {kind}\. Allowed: an nn\.Module"):
        configure_optimizers(given(Tied()), "AdamW", lr=1e-3)  # type: ignore[operator]


@pytest.mark.bad_input
@pytest.mark.parametrize("name", [".AdamW", "..AdamW", ".core.AdamW"])
def test_a_class_path_with_an_empty_part_is_an_invalid_optimizer(name: str) -> None:
    """A leading dot made importlib try a relative import: 'Empty module name' or 'the
    package argument is required', naming no optimizer."""
    message = rf"Invalid optimizer: '{name}'\. Allowed: one of Adam, AdamW"
    with pytest.raises(ValueError, match=message):
        resolve_optimizer_class(name)
    with pytest.raises(ValueError, match=message):
        configure_optimizers(Tied(), name, lr=1e-3)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: configure_optimizers(
                Tied(), {"class_path": "core.AdamW", "init_args": {"lr": 1e-3, 1: 2}}
            ),
            r"Invalid init_args keys: \['lr', 1\]\. Allowed: strings: the optimizer's argument",
        ),
        (
            lambda: configure_optimizers(Tied(), {"class_path": "core.AdamW", "init_args": {1: 2}}),
            r"Invalid init_args keys: \[1\]\.",
        ),
        (
            lambda: configure_optimizers(Tied(), {"class_path": "core.AdamW", 1: 2, "x": 3}),
            r"Invalid optimizer dict keys: \[1, 'x'\]\. Allowed: class_path and init_args",
        ),
        (
            lambda: LRSchedule.coerce({5: 1, "warm": 2}),
            r"Invalid scheduler key: \[5, 'warm'\]\. Allowed: keys among kind, warmup_steps",
        ),
        (
            lambda: configure_optimizers(Tied(), "AdamW", lr=1e-3, scheduler={"warm": 2, 5: 1}),
            r"Invalid scheduler key: \[5, 'warm'\]\.",
        ),
    ],
    ids=["init_args-mixed", "init_args-int", "optimizer-dict-mixed", "coerce", "scheduler"],
)
def test_keys_that_are_not_strings_are_refused_by_name(call: object, message: str) -> None:
    """Keys of mixed types failed in sorted() ('<' not supported) or in str.join."""
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]


@pytest.mark.bad_input
def test_a_config_dict_with_a_module_key_is_refused_as_an_unknown_key() -> None:
    """The key collided with configure_optimizers' own first argument: a TypeError about
    'multiple values for argument module'."""
    model = Tied()
    with pytest.raises(
        ValueError,
        match=r"Invalid config key: 'module'\. Allowed: optimizer, scheduler, no_weight_decay "
        r"and the optimizer's hyperparameters; pass the module as configure_optimizers' first",
    ):
        configure_optimizers(model, {"module": model, "optimizer": "AdamW", "lr": 1e-3})


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            nn.Linear(2, 2).requires_grad_(False),
            r"a Linear in which no parameter requires grad \(2 frozen\)\. Allowed: an nn\.Module "
            r"with at least one trainable parameter",
        ),
        (nn.Identity(), r"an Identity in which no parameter requires grad \(it has no param"),
    ],
    ids=["frozen", "no-parameters"],
)
def test_a_module_with_nothing_to_train_is_refused_saying_so(
    model: nn.Module, message: str
) -> None:
    """torch's 'optimizer got an empty parameter list' did not say the parameters are
    frozen, nor which module was given."""
    with pytest.raises(ValueError, match=r"Invalid module: " + message):
        configure_optimizers(model, "AdamW", lr=1e-3)


class _ElsewhereSGD(torch.optim.SGD):
    """An optimizer whose recorded module cannot be imported (a class made under python -c,
    or whose module was removed)."""


_ElsewhereSGD.__module__ = "no_such_package.optimizers"


def test_a_class_whose_module_cannot_be_imported_keeps_its_recorded_path() -> None:
    """public_path raised ModuleNotFoundError, so configure_optimizers failed for it."""
    assert public_path(_ElsewhereSGD) == "no_such_package.optimizers._ElsewhereSGD"
    assert public_path(core.AdamW) == "core.AdamW"
    optimizer = configure_optimizers(Tied(), _ElsewhereSGD, lr=0.1)["optimizer"]
    assert type(optimizer) is _ElsewhereSGD


NEVER_STEPPED = {
    # frequency 3 in 2 epochs: the message said the trainer does not bound training
    # (max_epochs is 2), which it does; the scheduler would never step.
    "epoch-frequency-above-max-epochs": (
        {"interval": "epoch", "frequency": 3},
        {"max_epochs": 2},
        64,
        r"Invalid frequency: 3\. Allowed: at most trainer\.max_epochs \(2\) for an 'epoch' "
        r"schedule: .* so in 2 epochs it would never step; lower frequency or raise max_epochs\.$",
    ),
    # max_steps=16 ends training in the second epoch: the schedule was built for
    # max_epochs (10) and never stepped, silently.
    "epoch-frequency-above-the-epochs-max-steps-leaves": (
        {"interval": "epoch", "frequency": 3},
        {"max_epochs": 10, "max_steps": 16},
        128,
        r"Invalid frequency: 3\. Allowed: at most the epochs trainer\.max_steps leaves \(2\) "
        r"for an 'epoch' schedule: .* lower frequency or raise max_epochs and max_steps\.$",
    ),
    # max_steps=10 over epochs of 7 batches cuts the second short, after which Lightning
    # steps no 'epoch' scheduler: the message allowed "at most ... (2)" epochs for
    # frequency 2, which was the frequency refused.
    "epoch-frequency-above-the-whole-epochs-max-steps-leaves": (
        {"interval": "epoch", "frequency": 2},
        {"max_epochs": 10, "max_steps": 10},
        112,
        r"Invalid frequency: 2\. Allowed: at most the whole epochs trainer\.max_steps leaves "
        r"\(it cuts the last short\) \(1\) for an 'epoch' schedule: .* so in 1 epoch it would "
        r"never step; lower frequency or raise max_epochs and max_steps\.$",
    ),
    # Accumulation 3 over 5 batches ends windows at batches 3 and 5, neither a multiple of
    # frequency 2: the message said 'it is 0: train longer', which never helps.
    "no-batch-ends-a-window-at-the-frequency": (
        {"kind": "linear", "frequency": 2},
        {"max_epochs": 2, "accumulate_grad_batches": 3},
        80,  # 5 batches an epoch
        r"Invalid frequency: 2\. Allowed: .*a multiple of frequency and that ends a "
        r"gradient-accumulation window .*no batch is both, so it would never step however long "
        r"training runs; set frequency to a divisor of accumulate_grad_batches \(3\) or of the "
        r"batches an epoch \(5\)",
    ),
    # Two optimizer steps, frequency 3: the message said the trainer does not bound
    # training (estimated_stepping_batches is 2).
    "first-step-after-the-run": (
        {"kind": "linear", "frequency": 3},
        {"max_steps": 2},
        64,
        r"Invalid frequency: 3\. Allowed: a frequency the run reaches: Lightning first "
        r"steps this scheduler after 3 optimizer steps .* and the trainer runs 2 "
        r"\(trainer\.estimated_stepping_batches\), so it would never step; lower frequency",
    ),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(NEVER_STEPPED))
def test_a_schedule_lightning_would_never_step_names_frequency_and_why(case: str) -> None:
    scheduler, trainer_settings, samples, message = NEVER_STEPPED[case]
    model = Regression(scheduler=scheduler, lr=1e-2)
    trainer = make_trainer(**trainer_settings)
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, loader(regression_data(samples), batch_size=16))


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_a_schedule_under_max_epochs_0_is_built(interval: str) -> None:
    """No epoch runs, as with max_steps=0: an epoch schedule was refused as not bounding
    training, and a step schedule (the default interval) whose warmup is longer than one
    epoch as too short ("train longer"): Lightning's estimate counts one epoch there."""
    schedule = {"kind": "cosine", "interval": interval, "warmup_steps": 30}
    model = Regression(scheduler=schedule, lr=1e-2)
    trainer = make_trainer(max_epochs=0)
    trainer.fit(model, loader(regression_data(64)))
    assert trainer.global_step == 0


def test_fast_dev_run_builds_an_epoch_schedule_stepped_less_often_than_its_run() -> None:
    """fast_dev_run's one epoch under frequency 2 counts 0 scheduler steps: it was refused
    (as an unbounded trainer), so the smoke test of such a config failed."""
    model = Regression(scheduler={"interval": "epoch", "frequency": 2}, lr=1e-2)
    trainer = make_trainer(fast_dev_run=2)
    trainer.fit(model, loader(regression_data(64)))
    assert trainer.global_step == 2


class LazyHead(Regression):
    """A lazy layer, as Lightning users build one: configure_optimizers runs before any
    forward, so it sees the layer unbuilt unless the module runs one first."""

    def __init__(self, build_first: bool, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.net = nn.Sequential(nn.LazyLinear(8), nn.Tanh(), nn.Linear(8, 3))
        if build_first:
            self.net(torch.zeros(1, 6))


@pytest.mark.bad_input
def test_a_lazy_layer_is_refused_until_built_then_decays_its_weight() -> None:
    """Unbuilt, its weight reports one dimension: it went to the no-decay group silently."""
    with pytest.raises(ValueError, match=r"Invalid parameter 'net\.0\.weight': uninitialized"):
        make_trainer(max_steps=1).fit(LazyHead(False, lr=1e-2), loader(regression_data(64)))
    model = LazyHead(True, lr=1e-2)
    trainer = make_trainer(max_steps=2)
    trainer.fit(model, loader(regression_data(64)))
    decay, no_decay = trainer.optimizers[0].param_groups
    assert decay["name"] == "decay" and no_decay["weight_decay"] == 0.0
    assert [tuple(p.shape) for p in decay["params"]] == [(8, 6), (3, 8)]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "spec",
    [torch.optim.Optimizer, "torch.optim.Optimizer", core.AdamFamilyOptimizer],
    ids=["torch-base", "torch-base-path", "core-base"],
)
def test_a_base_class_that_builds_no_optimizer_is_an_invalid_optimizer(spec: object) -> None:
    """They were accepted, then refused for their own signatures ('its parameters:
    defaults')."""
    with pytest.raises(ValueError, match=r"Invalid optimizer: .*Allowed: one of Adam, AdamW"):
        resolve_optimizer_class(spec)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Invalid optimizer: .*Allowed: one of Adam, AdamW"):
        configure_optimizers(Tied(), spec, lr=1e-3)  # type: ignore[arg-type]
