"""What Composer does to an optimizer: checkpoints and autoresume, torch's lr = 0 state
creation, FSDP-style rebuilding of param groups; and the rest of the family in a Trainer."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
from composer import Trainer
from composer.algorithms import LayerFreezing
from composer.distributed.fsdp2_utils import update_optimizer_modules
from composer.loggers import InMemoryLogger
from composer.optim import DecoupledAdamW as ComposerAdamW
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

import composer_adam
from tests.composer_adam.harness import (
    LR,
    STEPS,
    assert_same_parameters,
    make_loader,
    make_model,
    train,
    with_backends,
)
from tests.core.configuration_cases import BACKENDS

FAMILY = [
    composer_adam.DecoupledAdamW,
    composer_adam.DecoupledRAdam,
    composer_adam.DecoupledNAdam,
    composer_adam.DecoupledADOPT,
]
KWARGS = {"lr": LR, "weight_decay": 1e-4, "amsgrad": True}


DIRECTIONS = {
    "composer_to_ours": (ComposerAdamW, composer_adam.DecoupledAdamW),
    "ours_to_composer": (composer_adam.DecoupledAdamW, ComposerAdamW),
}


@pytest.mark.parametrize(("direction", "backend"), with_backends(list(DIRECTIONS)))
def test_autoresume_across_classes_continues_identically(
    direction: str, backend: str, tmp_path: Path
) -> None:
    """Both classes save under "DecoupledAdamW"; Composer's autoresume picks the other up
    (ours on the backend, Composer's as it is)."""
    writer, reader = DIRECTIONS[direction]

    def build(cls: type, params: object) -> torch.optim.Optimizer:
        flags = BACKENDS[backend] if cls is composer_adam.DecoupledAdamW else {}
        return cls(params, **KWARGS, **flags)

    uninterrupted, _ = train(lambda p: build(writer, p))
    common = {"run_name": "resume", "save_folder": str(tmp_path), "save_interval": "15ba"}
    train(lambda p: build(writer, p), max_duration=f"{STEPS // 2}ba", **common)
    resumed, _ = train(
        lambda p: build(reader, p), model=make_model(seed=5), autoresume=True, **common
    )
    assert int(resumed.state.timestamp.batch) == STEPS
    assert type(resumed.state.optimizers[0]) is reader
    assert_same_parameters(resumed.state.model, uninterrupted.state.model)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("cls", FAMILY, ids=lambda c: c.__name__)
def test_torch_state_creation_step_with_lr_zero_leaves_parameters(cls: type, backend: str) -> None:
    """torch.distributed.checkpoint steps once with lr = 0 and zero grads to create state."""
    model = make_model()
    before = copy.deepcopy(list(model.parameters()))
    optimizer = cls(model.parameters(), lr=LR, weight_decay=1e-2, **BACKENDS[backend])
    state_dict = get_optimizer_state_dict(model, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert len(state_dict["state"]) == len(before)
    assert [g["lr"] for g in optimizer.param_groups] == [LR]


@pytest.mark.parametrize(("cls", "backend"), with_backends(FAMILY))
def test_fsdp2_rebuilding_param_groups_keeps_every_hyperparameter(cls: type, backend: str) -> None:
    """Composer's own FSDP2 helper rebuilds the groups from their keys onto new parameters
    (the backend flags among them); training then goes exactly as with an optimizer built
    on those parameters directly."""
    model = make_model()
    head, body = list(model.parameters())[2:], list(model.parameters())[:2]
    groups = [{"params": body}, {"params": head, "lr": LR / 2, "weight_decay": 0.0}]
    optimizer = cls(groups, lr=LR, weight_decay=1e-3, **BACKENDS[backend])
    names = {p: n for n, p in model.named_parameters()}
    sharded = copy.deepcopy(model)  # stands in for the sharded model: same names, new tensors
    expected_groups = copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    )
    update_optimizer_modules(optimizer, sharded, names)
    rebuilt = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    assert rebuilt == expected_groups

    direct_model = copy.deepcopy(sharded)
    direct = cls(
        [
            {"params": list(direct_model.parameters())[:2]},
            {"params": list(direct_model.parameters())[2:], "lr": LR / 2, "weight_decay": 0.0},
        ],
        lr=LR,
        weight_decay=1e-3,
        **BACKENDS[backend],
    )
    rebuilt_run, _ = train(lambda p: optimizer, model=sharded)
    direct_run, _ = train(lambda p: direct, model=direct_model)
    assert_same_parameters(rebuilt_run.state.model, direct_run.state.model, atol=0)


# Fully decoupled decay λ is torch's decoupled decay λ / initial_lr; RAdam's eps placement
# differs from torch's, so it is compared with a tiny eps.
REFERENCES = {
    "RAdam": (composer_adam.DecoupledRAdam, torch.optim.RAdam, 1e-10),
    "NAdam": (composer_adam.DecoupledNAdam, torch.optim.NAdam, 1e-8),
}


@functools.cache
def torch_run(name: str) -> tuple[Trainer, InMemoryLogger]:
    """torch.optim's class for name, as users build it: the one reference for every
    backend of ours, so trained once."""
    _, torch_class, eps = REFERENCES[name]
    return train(
        lambda p: torch_class(
            p,
            lr=LR,
            betas=(0.9, 0.95),
            eps=eps,
            weight_decay=1e-4 / LR,
            decoupled_weight_decay=True,
        )
    )


@pytest.mark.parametrize(("name", "backend"), with_backends(list(REFERENCES)))
def test_family_in_a_trainer_follows_torch(name: str, backend: str) -> None:
    ours, _, eps = REFERENCES[name]
    our_run, our_log = train(
        lambda p: ours(p, lr=LR, weight_decay=1e-4, eps=eps, **BACKENDS[backend])
    )
    reference_run, _ = torch_run(name)
    assert_same_parameters(our_run.state.model, reference_run.state.model)
    assert len([k for k in our_log.data if k.startswith("l2_norm/update/")]) == 4


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_adopt_in_a_trainer_is_core_adopt_with_scheduled_decay(backend: str) -> None:
    """Exactly core.ADOPT on the same backend (the backends agree to rounding only)."""
    import core

    flags = BACKENDS[backend]
    our_run, _ = train(lambda p: composer_adam.DecoupledADOPT(p, lr=LR, weight_decay=1e-4, **flags))
    reference_run, _ = train(
        lambda p: core.ADOPT(
            p, lr=LR, betas=(0.9, 0.9999), eps=1e-6, weight_decay=1e-4, decouple_lr=True, **flags
        )
    )
    assert_same_parameters(our_run.state.model, reference_run.state.model, atol=0)


def _train_with_layer_freezing(cls: type, flags: dict, save_folder: Path) -> Trainer:
    """4 epochs of 5 batches; LayerFreezing takes the first Linear out of the optimizer
    at the end of epoch 2 (and its state stays in optimizer.state); a checkpoint per epoch."""
    model = make_model()
    trainer = Trainer(
        model=model,
        train_dataloader=make_loader(steps=5),
        optimizers=cls(model.parameters(), lr=LR, weight_decay=1e-4, **flags),
        max_duration="4ep",
        algorithms=[LayerFreezing(freeze_start=0.0, freeze_level=1.0)],
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        save_folder=str(save_folder),
        save_interval="1ep",
        seed=17,
    )
    trainer.fit()
    return trainer


@pytest.mark.parametrize(("cls", "backend"), with_backends(FAMILY))
def test_layer_freezing_runs_checkpoint_after_the_freeze(
    cls: type, backend: str, tmp_path: Path
) -> None:
    """Composer's LayerFreezing takes frozen layers out of the param groups and leaves
    their state; torch's state_dict then raised a KeyError at the next checkpoint, which
    ended the run (it still does with Composer's own DecoupledAdamW). The run completes,
    and each checkpoint holds the state of the parameters still trained, as the
    optimizer holds it."""
    trainer = _train_with_layer_freezing(cls, BACKENDS[backend], tmp_path)
    optimizer = trainer.state.optimizers[0]
    module = trainer.state.model.module
    held = [module[2].weight, module[2].bias]
    assert [p for g in optimizer.param_groups for p in g["params"]] == held
    assert module[0].weight in optimizer.state  # the frozen layer's state, kept as torch does
    saved = torch.load(tmp_path / "ep4-ba20-rank0.pt", weights_only=False)
    (saved_optimizer,) = saved["state"]["optimizers"].values()
    assert sorted(saved_optimizer["state"]) == ["module.2.bias", "module.2.weight"]
    for name, param in zip(("module.2.weight", "module.2.bias"), held, strict=True):
        for key, value in saved_optimizer["state"][name].items():
            assert torch.equal(value, optimizer.state[param][key])


def test_layer_freezing_checkpoints_fail_with_composers_own_optimizer(tmp_path: Path) -> None:
    """What the test above guards against, shown on Composer's DecoupledAdamW."""
    with pytest.raises(KeyError):
        _train_with_layer_freezing(ComposerAdamW, {}, tmp_path)
