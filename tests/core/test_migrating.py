"""Switching from torch.optim or optimi changes one line: checked against the real libraries.

optimi is installed in the main environment only (the dev extra); its tests are skipped in
the Composer environment.
"""

from __future__ import annotations

import copy
import inspect
import types
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import core
from core.backends import cpu_kernel
from tests.core.cases import TRAINING_BACKENDS, make_batches

CORE_CLASSES = [core.Adam, core.AdamW, core.RAdam, core.NAdam, core.ADOPT]
POSITIONAL = ["params", "lr", "betas", "weight_decay", "eps"]


@pytest.fixture
def optimi() -> types.ModuleType:
    return pytest.importorskip("optimi", reason="torch-optimi is in the main environment only")


def _parameters() -> list[nn.Parameter]:
    return list(nn.Linear(3, 2).parameters())


# -- positional arguments -------------------------------------------------------------------


@pytest.mark.parametrize("cls", CORE_CLASSES, ids=lambda c: c.__name__)
def test_only_params_lr_betas_weight_decay_eps_are_positional(cls: type) -> None:
    parameters = inspect.signature(cls).parameters.values()
    positional = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == POSITIONAL
    assert all(p.kind is p.KEYWORD_ONLY for p in parameters if p.name not in POSITIONAL)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RAdam"])
def test_optimis_positional_order_agrees_up_to_eps_and_is_a_type_error_after(
    optimi: types.ModuleType, name: str
) -> None:
    """optimi's AdamW takes decouple_lr sixth; adamkit's sixth would have been decouple_wd."""
    theirs = list(inspect.signature(getattr(optimi, name)).parameters)
    assert theirs[: len(POSITIONAL)] == POSITIONAL
    arguments = (1e-3, (0.9, 0.99), 1e-2, 1e-6, True)
    getattr(optimi, name)(_parameters(), *arguments, triton=False)  # optimi accepts it
    with pytest.raises(TypeError, match="positional argument"):
        getattr(core, name)(_parameters(), *arguments)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RAdam", "NAdam"])
def test_torch_takes_eps_before_weight_decay_so_pass_them_by_keyword(name: str) -> None:
    """torch.optim's order is (params, lr, betas, eps, weight_decay, ...), adamkit's optimi's."""
    theirs = list(inspect.signature(getattr(torch.optim, name)).parameters)
    assert theirs[:5] == ["params", "lr", "betas", "eps", "weight_decay"]
    ours = list(inspect.signature(getattr(core, name)).parameters)
    assert ours[:5] == POSITIONAL


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RAdam"])
def test_every_optimi_argument_is_accepted_with_optimis_default(
    optimi: types.ModuleType, name: str
) -> None:
    ours = inspect.signature(getattr(core, name)).parameters
    for argument, parameter in inspect.signature(getattr(optimi, name)).parameters.items():
        assert argument in ours, argument
        assert ours[argument].default == parameter.default, argument


TORCH_SHARED = {
    "Adam": ["amsgrad", "fused"],
    "AdamW": ["amsgrad", "fused"],
    "RAdam": [],
    "NAdam": ["momentum_decay"],
}
"""torch.optim arguments adamkit takes under the same name, beyond the common ones."""


@pytest.mark.parametrize("name", list(TORCH_SHARED))
def test_torchs_argument_names_that_carry_over_and_those_that_do_not(name: str) -> None:
    ours = inspect.signature(getattr(core, name)).parameters
    theirs = inspect.signature(getattr(torch.optim, name)).parameters
    shared = ["params", "lr", "betas", "eps", "weight_decay", "foreach"]
    assert all(n in ours and n in theirs for n in [*shared, *TORCH_SHARED[name]])
    for missing in ("maximize", "capturable", "differentiable", "decoupled_weight_decay"):
        assert missing not in ours
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{missing}'"):
            getattr(core, name)(_parameters(), lr=1e-3, **{missing: False})


@pytest.mark.parametrize("backend", ["default", "loop", "foreach", "fused"])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_bf16_steps_with_torchs_values_are_torchs_fused_steps_bit_for_bit(
    name: str, backend: str
) -> None:
    """README "Migrating": bf16 parameters without Kahan step as torch.optim's fused CPU
    kernel rounds them (its foreach and for-loop steps round some elements one ulp away
    from it, so that is the step to match), on every CPU backend and the default. Triton's
    kernels compute the moments by their own fp32 arithmetic (through the interpreter, 2
    of 4096 bf16 moments near zero differ here, 1e-9 against 0), held to the loop backend
    to an ulp by tests/core/test_fused.py."""
    hyperparameters = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05}
    runs = []
    for make in (
        lambda p: getattr(torch.optim, name)(p, fused=True, **hyperparameters),
        lambda p: getattr(core, name)(
            p, kahan_sum=False, **hyperparameters, **TRAINING_BACKENDS[backend]
        ),
    ):
        generator = torch.Generator().manual_seed(0)
        params = [
            torch.randn(n, generator=generator).bfloat16().requires_grad_() for n in (4096, 300)
        ]
        optimizer = make(params)
        for _ in range(10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).bfloat16()
            optimizer.step()
        runs.append([(p.detach(), *optimizer.state[p].values()) for p in params])
    for theirs, ours in zip(*runs, strict=True):
        assert len(theirs) == len(ours)
        assert all(torch.equal(a, b) for a, b in zip(theirs, ours, strict=True))


def _final_parameters(make_optimizer: Any) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Linear(6, 3).double()
    optimizer = make_optimizer(model.parameters())
    for x, y in make_batches(torch.float64, 20):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_radam_adds_eps_to_the_bias_corrected_root_as_optimi_not_the_raw_root_as_torch(
    optimi: types.ModuleType,
) -> None:
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.99)}
    ours = _final_parameters(lambda p: core.RAdam(p, eps=1e-3, **kwargs))
    optimis = _final_parameters(lambda p: optimi.RAdam(p, eps=1e-3, triton=False, **kwargs))
    torchs = _final_parameters(lambda p: torch.optim.RAdam(p, eps=1e-3, **kwargs))
    torch.testing.assert_close(ours, optimis, atol=1e-12, rtol=0)
    assert float((ours - torchs).abs().max()) > 1e-5
    small = [
        _final_parameters(lambda p, c=c: c(p, eps=1e-10, **kwargs))
        for c in (core.RAdam, torch.optim.RAdam)
    ]
    torch.testing.assert_close(small[0], small[1], atol=1e-9, rtol=0)


def test_optimis_other_optimizers_have_no_counterpart(optimi: types.ModuleType) -> None:
    for name in ("Adan", "Lion", "SGD", "Ranger", "StableAdamW"):
        assert hasattr(optimi, name) and not hasattr(core, name)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RAdam", "NAdam"])
def test_defaults_differ_from_torchs(name: str) -> None:
    """betas (0.9, 0.99) and eps 1e-6, as optimi: pass torch's to reproduce a torch run."""
    theirs = inspect.signature(getattr(torch.optim, name)).parameters
    ours = inspect.signature(getattr(core, name)).parameters
    assert (ours["betas"].default, ours["eps"].default) == ((0.9, 0.99), 1e-6)
    assert (theirs["betas"].default, theirs["eps"].default) == ((0.9, 0.999), 1e-8)


@pytest.mark.parametrize("helper", ["prepare_for_gradient_release", "remove_gradient_release"])
def test_gradient_release_helpers_have_optimis_signatures(
    optimi: types.ModuleType, helper: str
) -> None:
    ours = inspect.signature(getattr(core, helper)).parameters
    theirs = inspect.signature(getattr(optimi, helper)).parameters
    assert [(p.name, p.default) for p in ours.values()] == [
        (p.name, p.default) for p in theirs.values()
    ]


@pytest.mark.bad_input
def test_optimi_checkpoint_is_refused_before_any_change(optimi: types.ModuleType) -> None:
    """optimi keeps step in the param group, not per parameter as torch.optim and adamkit."""
    model = nn.Linear(3, 2)
    source = optimi.AdamW(model.parameters(), lr=1e-3, triton=False)
    model(torch.ones(1, 3)).sum().backward()
    source.step()
    optimizer = core.AdamW(model.parameters(), lr=1e-3)
    optimizer.step()
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=r"Invalid state_dict for AdamW: .* lacks \['step'\]"):
        optimizer.load_state_dict(source.state_dict())
    assert optimizer.state_dict()["param_groups"] == before["param_groups"]


@pytest.mark.bad_input
def test_torch_maximize_checkpoint_is_refused_before_any_change() -> None:
    model = nn.Linear(3, 2)
    source = torch.optim.Adam(model.parameters(), lr=1e-3, maximize=True)
    model(torch.ones(1, 3)).sum().backward()
    source.step()
    optimizer = core.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=r"Invalid maximize in param group 0 .*: True. Allowed"):
        optimizer.load_state_dict(source.state_dict())
    assert not optimizer.state and "maximize" not in optimizer.param_groups[0]


# -- triton ---------------------------------------------------------------------------------


def _train(optimizer_factory: Any, steps: int = 10) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = optimizer_factory(model)
    for x, y in make_batches(torch.float32, steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("triton", [None, False, True])
@pytest.mark.parametrize("cls", CORE_CLASSES, ids=lambda c: c.__name__)
def test_triton_is_fused_and_only_fused_is_stored(cls: type, triton: bool | None) -> None:
    optimizer = cls(_parameters(), lr=1e-3, triton=triton)
    for group in [optimizer.defaults, *optimizer.param_groups]:
        assert group["fused"] is triton and "triton" not in group
    reference = cls(_parameters(), lr=1e-3, fused=triton)
    assert optimizer.state_dict()["param_groups"] == reference.state_dict()["param_groups"]
    ours = _train(lambda m: cls(m.parameters(), lr=1e-2, triton=triton))
    theirs = _train(lambda m: cls(m.parameters(), lr=1e-2, fused=triton))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_triton_in_a_param_group_is_folded_into_fused() -> None:
    first, second = nn.Linear(3, 2), nn.Linear(3, 2)
    optimizer = core.AdamW(first.parameters(), lr=1e-3)
    optimizer.add_param_group({"params": list(second.parameters()), "triton": False})
    assert optimizer.param_groups[1]["fused"] is False and "triton" not in optimizer.param_groups[1]


@pytest.mark.parametrize("fused", [True, False])
def test_triton_written_into_a_live_group_switches_the_backend(fused: bool) -> None:
    """optimi keeps `triton` in its groups, so its users switch the kernel there: the key
    was ignored (the backend ran on, the group holding fused and triton disagreeing)."""
    runs = []
    for switch in ("triton", "fused"):
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        optimizer = core.AdamW(model.parameters(), lr=1e-2, fused=fused)
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        optimizer.param_groups[0][switch] = not fused
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        group = optimizer.param_groups[0]
        assert group["fused"] is (not fused) and "triton" not in group
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("flags", "value", "allowed"),
    [
        ({}, "yes", "None, True or False"),
        ({"foreach": True}, True, "None or False when foreach=True"),
    ],
)
def test_a_bad_triton_written_into_a_live_group_is_refused_before_any_change(
    flags: dict, value: object, allowed: str
) -> None:
    model = nn.Linear(3, 2)
    optimizer = core.AdamW(model.parameters(), lr=1e-2, **flags)
    optimizer.param_groups[0]["triton"] = value
    model(torch.ones(1, 3)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(
        ValueError, match=rf"Invalid triton in param group 0: {value!r}. Allowed: {allowed}"
    ):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_a_triton_written_and_saved_before_a_step_is_not_loaded() -> None:
    """An execution choice, as fused is: the receiving optimizer keeps its own (the key
    was carried into the loaded group, to override it at the next step)."""
    optimizer = core.AdamW([nn.Parameter(torch.ones(3))], lr=1e-2)
    optimizer.param_groups[0]["triton"] = False
    receiving = core.AdamW([nn.Parameter(torch.ones(3))], lr=1e-2, fused=None)
    receiving.load_state_dict(optimizer.state_dict())
    assert "triton" not in receiving.param_groups[0]
    assert receiving.param_groups[0]["fused"] is None


def test_a_triton_of_none_written_into_a_live_group_lets_adamkit_choose() -> None:
    optimizer = core.AdamW([nn.Parameter(torch.ones(3))], lr=1e-2, fused=False)
    optimizer.param_groups[0]["triton"] = None
    optimizer.param_groups[0]["params"][0].grad = torch.ones(3)
    optimizer.step()
    assert optimizer.param_groups[0]["fused"] is None


@pytest.mark.bad_input
def test_a_triton_written_beside_a_bad_value_waits_for_a_step_that_passes() -> None:
    """The step refused for the lr leaves the group as it was, triton included."""
    optimizer = core.AdamW([nn.Parameter(torch.ones(3))], lr=1e-2, fused=False)
    group = optimizer.param_groups[0]
    group.update(triton=True, lr=-1.0)
    with pytest.raises(ValueError, match=r"Invalid lr in param group 0: -1.0"):
        optimizer.step()
    assert group["triton"] is True and group["fused"] is False


@pytest.mark.parametrize("triton", [None, False])
def test_optimi_code_with_triton_runs_unchanged_on_adamkit(
    optimi: types.ModuleType, triton: bool | None
) -> None:
    """optimi's own usage, helpers included, with only the module swapped: same trajectory."""

    def script(lib: Any) -> list[torch.Tensor]:
        return _train(
            lambda model: lib.AdamW(
                lib.param_groups_weight_decay(model, weight_decay=1e-2),
                lr=1e-2,
                triton=triton,
            )
        )

    for a, b in zip(script(core), script(optimi), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.bad_input
@pytest.mark.parametrize("value", ["yes", 1, 0.0])
def test_non_bool_triton_is_refused_by_name(value: object) -> None:
    with pytest.raises(ValueError, match=rf"Invalid triton: {value!r}. Allowed: None, True or"):
        core.AdamW(_parameters(), lr=1e-3, triton=value)


@pytest.mark.bad_input
@pytest.mark.parametrize(("triton", "fused"), [(True, False), (False, True)])
def test_triton_and_fused_disagreeing_is_refused_naming_both(triton: bool, fused: bool) -> None:
    with pytest.raises(ValueError, match=rf"Invalid triton={triton} with fused={fused}"):
        core.RAdam(_parameters(), lr=1e-3, triton=triton, fused=fused)


@pytest.mark.bad_input
def test_triton_with_foreach_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"Invalid triton: True. Allowed: None or False when"):
        core.Adam(_parameters(), lr=1e-3, triton=True, foreach=True)


@pytest.mark.bad_input
def test_triton_true_without_gpu_or_compiler_is_refused_by_name_before_any_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On CPU triton=True means the fused CPU backend; without a compiler it cannot run."""
    model = nn.Linear(3, 2)
    optimizer = core.NAdam(model.parameters(), lr=1e-3, triton=True)
    model(torch.ones(1, 3)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setattr(cpu_kernel, "_scalars_unavailable", False)  # restored after the test
    monkeypatch.setattr(cpu_kernel, "compiler", lambda: None)  # as on a machine without one
    pattern = r"Invalid triton in param group 0: True. Allowed: None or False here: .*C compiler"
    with pytest.raises(ValueError, match=pattern):
        core.NAdam(model.parameters(), lr=1e-3, triton=True)
    with pytest.raises(ValueError, match=pattern):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert not optimizer.state


# -- fully decoupled weight decay warning ---------------------------------------------------


def _warnings_of(factory: Any) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        factory()
    return [str(w.message) for w in caught if w.category is UserWarning]


@pytest.mark.parametrize("weight_decay", [1e-3, 5e-2, 9e-4])
def test_high_fully_decoupled_weight_decay_warns_once_as_optimi_does(
    optimi: types.ModuleType, weight_decay: float
) -> None:
    groups = [{"params": _parameters()}, {"params": _parameters(), "weight_decay": 1e-5}]
    kwargs = {"lr": 1e-3, "weight_decay": weight_decay, "decouple_lr": True}
    theirs = _warnings_of(lambda: optimi.AdamW(groups, triton=False, **kwargs))
    ours = _warnings_of(lambda: core.AdamW(groups, **kwargs))
    assert len(ours) == len(theirs) == (1 if weight_decay >= 1e-3 else 0)
    if ours:
        assert f"weight_decay={weight_decay} is high for fully decoupled decay" in ours[0]
        assert "usual values are 1e-5 to 1e-4" in ours[0]


@pytest.mark.parametrize("cls", CORE_CLASSES, ids=lambda c: c.__name__)
def test_every_class_warns_only_for_fully_decoupled_decay(cls: type) -> None:
    assert len(_warnings_of(lambda: cls(_parameters(), lr=1e-3, weight_decay=1e-2))) == 0
    high = _warnings_of(lambda: cls(_parameters(), lr=1e-3, weight_decay=1e-2, decouple_lr=True))
    assert len(high) == 1 and high[0].startswith(f"{cls.__name__}: weight_decay=0.01")


# -- param_groups_weight_decay --------------------------------------------------------------


class _Rotary(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.linspace(0.1, 1.0, 4))
        self.register_buffer("positions", torch.arange(4))


class _Model(nn.Module):
    """Embedding, attention with rotary buffers, norms, biases, a scalar, a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.rotary = _Rotary()
        self.attn = nn.MultiheadAttention(8, 2)
        self.norm = nn.LayerNorm(8)
        self.batch_norm = nn.BatchNorm1d(8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.temperature = nn.Parameter(torch.ones(()))
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


@pytest.mark.parametrize("additional_layers", [None, ["embed"], ("head", "proj.weight")])
def test_param_groups_weight_decay_builds_optimis_groups(
    optimi: types.ModuleType, additional_layers: Any
) -> None:
    model = _Model()
    ours = core.param_groups_weight_decay(model, 0.05, additional_layers)
    theirs = optimi.param_groups_weight_decay(model, 0.05, additional_layers)
    assert [{k: v for k, v in g.items() if k != "params"} for g in ours] == [
        {k: v for k, v in g.items() if k != "params"} for g in theirs
    ]
    for mine, reference in zip(ours, theirs, strict=True):
        assert [id(p) for p in mine["params"]] == [id(p) for p in reference["params"]]
    assert inspect.signature(core.param_groups_weight_decay).parameters.keys() == (
        inspect.signature(optimi.param_groups_weight_decay).parameters.keys()
    )


def test_param_groups_weight_decay_leaves_out_frozen_and_exempts_biases_and_1d() -> None:
    model = _Model()
    no_decay, decay = core.param_groups_weight_decay(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 1e-2 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == {
        "embed.weight",
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "proj.weight",
        "head.weight",
    }
    assert not any(n.startswith("frozen") for p in no_decay["params"] for n in [names[id(p)]])


@pytest.mark.bad_input
def test_a_lazy_layers_weight_is_refused_until_its_shape_is_known() -> None:
    """Before its first forward a lazy weight reports one dimension: it went to the no-decay
    group, silently. Named ones are decided by their names."""
    model = nn.Sequential(nn.LazyLinear(4), nn.LazyBatchNorm1d())
    with pytest.raises(ValueError, match=r"Invalid parameter '0\.weight': uninitialized"):
        core.param_groups_weight_decay(model)
    named = core.param_groups_weight_decay(model, additional_layers=["0.weight", "1."])
    assert [len(group["params"]) for group in named] == [4, 0]
    model(torch.randn(2, 3))  # materialized: decided by shape again
    no_decay, decay = core.param_groups_weight_decay(model)
    assert decay["params"] == [model[0].weight] and len(no_decay["params"]) == 3


@pytest.mark.bad_input
@pytest.mark.parametrize("value", ["embed", [1]])
def test_bad_additional_layers_are_refused_by_name(value: object) -> None:
    with pytest.raises(ValueError, match=r"Invalid additional_layers: .*Allowed: None or an"):
        core.param_groups_weight_decay(_Model(), additional_layers=value)  # type: ignore[arg-type]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_decay": -1}, r"Invalid weight_decay: -1\. Allowed: a finite number >= 0"),
        ({"weight_decay": "0.1"}, r"Invalid weight_decay: '0\.1'\. Allowed: a finite number"),
        ({"model": "parameters"}, r"Invalid model: a generator\. Allowed: an nn\.Module"),
    ],
    ids=["negative-decay", "text-decay", "parameters-not-model"],
)
def test_bad_param_groups_weight_decay_arguments_are_refused_by_name(
    kwargs: dict, message: str
) -> None:
    """The decay went into the groups unchecked (the optimizer refused it later, naming
    a group), and model.parameters() failed with an AttributeError."""
    model = _Model()
    if kwargs.get("model") == "parameters":
        kwargs = {"model": model.parameters()}
    with pytest.raises(ValueError, match=message):
        core.param_groups_weight_decay(**{"model": model, **kwargs})


# -- to_low_precision -----------------------------------------------------------------------


def _dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    return {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"dtype": torch.float16},
        {"fp32_modules": None, "fp32_buffers": None},
        {"fp32_modules": (nn.LayerNorm, nn.BatchNorm1d), "fp32_buffers": "ROTARY"},
        {"fp32_buffers": [_Rotary, "batch"]},
    ],
    ids=["defaults", "fp16", "nothing-kept", "norms-kept", "by-type"],
)
def test_to_low_precision_gives_optimis_dtypes(optimi: types.ModuleType, kwargs: dict) -> None:
    ours, theirs = _Model(), _Model()
    assert core.to_low_precision(ours, **kwargs) is ours
    optimi.to_low_precision(theirs, **kwargs)
    assert _dtypes(ours) == _dtypes(theirs)
    assert any(dtype == kwargs.get("dtype", torch.bfloat16) for dtype in _dtypes(ours).values())
    assert inspect.signature(core.to_low_precision).parameters.keys() == (
        inspect.signature(optimi.to_low_precision).parameters.keys()
    )


def test_to_low_precision_keeps_embeddings_and_rotary_buffers_in_fp32() -> None:
    dtypes = _dtypes(core.to_low_precision(_Model()))
    assert dtypes["embed.weight"] == dtypes["rotary.inv_freq"] == torch.float32
    assert dtypes["proj.weight"] == dtypes["batch_norm.running_var"] == torch.bfloat16
    assert dtypes["rotary.positions"] == dtypes["batch_norm.num_batches_tracked"] == torch.int64


def test_to_low_precision_then_kahan_lands_near_fp32() -> None:
    """The README's bf16 example: cast, then AdamW with Kahan (on by itself for bf16)."""
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))
        core.to_low_precision(model, dtype=dtype)
        optimizer = core.AdamW(core.param_groups_weight_decay(model), lr=3e-3)
        for x, y in make_batches(dtype, 300):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x).float(), y.float())
            loss.backward()
            optimizer.step()
        losses[dtype] = float(loss.detach())
    assert losses[torch.bfloat16] < 1.1 * losses[torch.float32]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": torch.int8}, r"Invalid dtype: torch.int8. Allowed: a floating torch.dtype"),
        ({"dtype": "bf16"}, r"Invalid dtype: 'bf16'. Allowed: a floating torch.dtype"),
        ({"fp32_modules": "embed"}, r"Invalid fp32_modules: 'embed'. Allowed: None, an nn"),
        ({"fp32_buffers": [3]}, r"Invalid fp32_buffers: \[3\]. Allowed: None, an nn.Module"),
        ({"device": "nowhere"}, r"Invalid device: 'nowhere'. Allowed: None, a torch.device"),
        ({"model": "parameters"}, r"Invalid model: a list\. Allowed: an nn\.Module \(the model"),
    ],
    ids=["int-dtype", "string-dtype", "module-name", "number-buffer", "device", "parameters"],
)
def test_bad_to_low_precision_arguments_are_refused_before_any_change(
    kwargs: dict, message: str
) -> None:
    model = _Model()
    before = _dtypes(model)
    if kwargs.get("model") == "parameters":
        kwargs = {"model": list(model.parameters())}
    with pytest.raises(ValueError, match=message):
        core.to_low_precision(**{"model": model, **kwargs})
    assert _dtypes(model) == before


def _torch_and_core_side_by_side(
    torch_optimizer: Any, core_optimizer: Any, steps: int, shape: tuple[int, ...] = (40,)
) -> tuple[torch.Tensor, torch.Tensor]:
    """(torch's parameter, core's) after `steps` steps on the same random gradients; each
    optimizer is a callable taking the parameter list."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(shape, generator=generator)
    theirs, ours = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    torch_step, core_step = torch_optimizer([theirs]), core_optimizer([ours])
    for _ in range(steps):
        grad = torch.randn(shape, generator=generator)
        theirs.grad, ours.grad = grad.clone(), grad.clone()
        torch_step.step()
        core_step.step()
    return theirs.detach(), ours.detach()


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_nadams_momentum_decay_is_torchs(backend: str) -> None:
    """A momentum_decay other than the default schedules μt as torch's does (every test
    before used 4e-3, so a μt that ignored the argument passed)."""
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "momentum_decay": 0.05}
    theirs, ours = _torch_and_core_side_by_side(
        lambda p: torch.optim.NAdam(p, **kwargs),
        lambda p: core.NAdam(p, **kwargs, **TRAINING_BACKENDS[backend]),
        steps=20,
    )
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


RHO_6_IS_5 = 0.8397685748659791
"""A β2 whose ρ6 is exactly 5.0 in float64: RAdam's threshold, where step 6 is still a
momentum step (torch.optim.RAdam: rectified only when ρt > 5)."""


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_radam_rectifies_only_above_rho_5_as_torch(backend: str) -> None:
    from core.radam import radam_coefficients

    coefficients = radam_coefficients(
        6.0, lr=1e-2, beta1=0.9, beta2=RHO_6_IS_5, eps=1e-12, l2_weight_decay=0.0, param_decay=1.0
    )
    assert not coefficients.adaptive
    kwargs = {"lr": 1e-2, "betas": (0.9, RHO_6_IS_5), "eps": 1e-12}
    theirs, ours = _torch_and_core_side_by_side(
        lambda p: torch.optim.RAdam(p, **kwargs),
        lambda p: core.RAdam(p, **kwargs, **TRAINING_BACKENDS[backend]),
        steps=7,
    )
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
