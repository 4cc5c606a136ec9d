"""Checkpoints: resume continues identically, and state dicts interchange with torch.optim."""

from __future__ import annotations

import copy
import functools
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import core
from core.quantization import moment_keys
from tests.core.cases import (
    EPS,
    LR,
    TINY_EPS,
    TRAINING_BACKENDS,
    Case,
    assert_load_refused,
    make_batches,
    make_model,
    one_case_per_algorithm,
    train,
)

TOTAL = 40


def _resumed_run(
    case: Case, save_backend: dict, load_backend: dict
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(uninterrupted model, model resumed from a mid-run checkpoint through deepcopied dicts)."""
    batches = make_batches(torch.float32, TOTAL)
    full = make_model()
    train(full, case.make(full.parameters(), **save_backend), batches, total=TOTAL)

    first = make_model()
    optimizer = case.make(first.parameters(), **save_backend)
    train(first, optimizer, batches[: TOTAL // 2], total=TOTAL)
    model_state = copy.deepcopy(first.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())

    resumed = make_model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(model_state)
    resumed_optimizer = case.make(resumed.parameters(), **load_backend)
    resumed_optimizer.load_state_dict(optimizer_state)
    for key, value in load_backend.items():  # the backend is the resumer's, not the checkpoint's
        assert all(group[key] == value for group in resumed_optimizer.param_groups)
    train(resumed, resumed_optimizer, batches[TOTAL // 2 :], start=TOTAL // 2, total=TOTAL)
    return full, resumed


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize("case", one_case_per_algorithm(), ids=lambda c: c.id)
def test_resume_continues_bit_for_bit(case: Case, backend: str) -> None:
    full, resumed = _resumed_run(case, TRAINING_BACKENDS[backend], TRAINING_BACKENDS[backend])
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


SWITCHES = [
    ("default", "loop"),
    ("loop", "default"),
    ("loop", "foreach"),
    ("loop", "fused"),
    ("fused", "loop"),
    ("loop", "triton"),
    ("triton", "loop"),
]


@pytest.mark.parametrize(("saved_by", "loaded_by"), SWITCHES, ids=lambda name: name)
@pytest.mark.parametrize("case", one_case_per_algorithm(), ids=lambda c: c.id)
def test_switching_backend_at_resume_continues(case: Case, saved_by: str, loaded_by: str) -> None:
    """Turning fused on or off mid-run through a state dict continues the same trajectory."""
    full, resumed = _resumed_run(case, TRAINING_BACKENDS[saved_by], TRAINING_BACKENDS[loaded_by])
    atol = 1e-7 if {saved_by, loaded_by} <= {"loop", "foreach"} else 1e-6
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=atol, rtol=0)


TORCH_CLASSES = {"Adam": torch.optim.Adam, "RAdam": torch.optim.RAdam, "NAdam": torch.optim.NAdam}
INTERCHANGE_DECAY = {
    "none": ({"weight_decay": 0.0}, {"weight_decay": 0.0}),
    "l2": ({"weight_decay": 0.1}, {"weight_decay": 0.1}),
    "decoupled": (
        {"weight_decay": 0.1, "decouple_wd": True},
        {"weight_decay": 0.1, "decoupled_weight_decay": True},
    ),
}
"""Decay mode -> (core kwargs, torch kwargs) of the same decay."""


def _interchange_cases() -> list[tuple[str, type, type, dict, dict]]:
    """(id, torch class, core class, core kwargs, torch kwargs): every class x decay x amsgrad.

    torch.optim.AdamW stands in for Adam's decoupled mode too: it always decays decoupled."""
    cases = []
    for name, torch_class in TORCH_CLASSES.items():
        core_class = getattr(core, name)
        for mode, (core_decay, torch_decay) in INTERCHANGE_DECAY.items():
            for amsgrad in (False, True) if name == "Adam" else (False,):
                extra = {"amsgrad": True} if amsgrad else {}
                eps = {"eps": TINY_EPS if name == "RAdam" else EPS}
                suffix = "-amsgrad" if amsgrad else ""
                core_kwargs, torch_kwargs = {**core_decay, **extra, **eps}, {**torch_decay, **extra}
                cases.append(
                    (
                        f"{name}-{mode}{suffix}",
                        torch_class,
                        core_class,
                        core_kwargs,
                        {**torch_kwargs, **eps},
                    )
                )
                if mode == "decoupled" and name == "Adam":
                    adamw_kwargs = {k: v for k, v in torch_kwargs.items() if "decoupled" not in k}
                    cases.append(
                        (
                            f"AdamW-{mode}{suffix}",
                            torch.optim.AdamW,
                            core.AdamW,
                            core_kwargs,
                            {**adamw_kwargs, **eps},
                        )
                    )
    return cases


INTERCHANGE = {case[0]: case[1:] for case in _interchange_cases()}
CONTINUED = TOTAL // 2


def _continued_in_other(
    writer: Any, reader: Any, convert: Any = None
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(model the writer trained on, model the reader continued from the writer's state dict
    at step TOTAL // 2): CONTINUED more steps each. The reader is built with only lr, so its
    hyperparameters must come from the loaded param groups, as between torch optimizers."""
    batches = make_batches(torch.float64, TOTAL)
    model = make_model(torch.float64)
    optimizer = writer(model.parameters())
    train(model, optimizer, batches[:CONTINUED], total=TOTAL)
    model_state = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    train(model, optimizer, batches[CONTINUED:], start=CONTINUED, total=TOTAL)

    resumed = make_model(torch.float64, seed=7)
    resumed.load_state_dict(model_state)
    reader_optimizer = reader(resumed.parameters(), lr=LR)
    reader_optimizer.load_state_dict(optimizer_state)
    if convert is not None:
        convert(reader_optimizer)
    train(resumed, reader_optimizer, batches[CONTINUED:], start=CONTINUED, total=TOTAL)
    return model, resumed


@pytest.mark.parametrize("direction", ["torch_to_core", "core_to_torch"])
@pytest.mark.parametrize("name", list(INTERCHANGE))
def test_state_dict_interchange_with_torch(name: str, direction: str) -> None:
    """A checkpoint of one continues in the other (20 steps) exactly as the first would have
    gone on: for every class, decay mode and AMSGrad, each way. A core checkpoint carries
    the keys torch reads (decoupled_weight_decay above all; before, torch.optim.RAdam and
    NAdam silently continued a decoupled run with L2 decay)."""
    torch_class, core_class, core_kwargs, torch_kwargs = INTERCHANGE[name]
    core_writer = functools.partial(core_class, lr=LR, betas=(0.9, 0.99), **core_kwargs)
    torch_writer = functools.partial(torch_class, lr=LR, betas=(0.9, 0.99), **torch_kwargs)
    if direction == "torch_to_core":
        model, resumed = _continued_in_other(torch_writer, core_class)
    else:
        model, resumed = _continued_in_other(core_writer, torch_class)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=0)


@pytest.mark.parametrize("writer", ["torch", "core"])
@pytest.mark.parametrize("name", list(INTERCHANGE))
def test_a_resumed_group_has_the_keys_of_a_fresh_one(name: str, writer: str) -> None:
    """torch's flags (maximize) and its name for decouple_wd (decoupled_weight_decay),
    which every checkpoint carries for torch's sake, are not kept in the loaded groups:
    they stayed there, so a resumed group's keys differed from a fresh group's."""
    torch_class, core_class, core_kwargs, torch_kwargs = INTERCHANGE[name]
    model = make_model()
    if writer == "torch":
        saved = torch_class(model.parameters(), lr=LR, **torch_kwargs)
    else:
        saved = core_class(model.parameters(), lr=LR, **core_kwargs)
    model(make_batches(torch.float32, 1)[0][0]).sum().backward()
    saved.step()
    fresh = core_class(make_model().parameters(), lr=LR)
    resumed = core_class(make_model().parameters(), lr=LR)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.param_groups[0].keys() == fresh.param_groups[0].keys()
    # ... and its state dict still says them for torch, as the checkpoint did
    written = resumed.state_dict()["param_groups"][0]
    for key, value in saved.state_dict()["param_groups"][0].items():
        if key in ("maximize", "decoupled_weight_decay"):  # torch 2.7's Adam has no such key
            assert written[key] == value, key


@pytest.mark.parametrize("name", [n for n in INTERCHANGE if "-none" not in n])
def test_a_torch_checkpoint_in_a_fully_decoupled_optimizer_warns_and_continues_once_told(
    name: str,
) -> None:
    """Built fully decoupled (the README's advice), the reader takes the checkpoint's
    weight_decay (torch's, by lr) and keeps its own decouple_lr, which cannot be told from
    a Composer checkpoint's (the same keys): it silently decayed 1/lr times harder than
    torch (0.05 per step instead of 5e-5 at lr 1e-3). It now says so at load, and with
    decouple_lr set back as the warning says the run continues exactly."""
    torch_class, core_class, _, torch_kwargs = INTERCHANGE[name]
    torch_writer = functools.partial(torch_class, lr=LR, betas=(0.9, 0.99), **torch_kwargs)
    reader = functools.partial(core_class, decouple_lr=True, weight_decay=1e-5)

    def as_torch(optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            group["decouple_lr"] = False

    with pytest.warns(RuntimeWarning, match=r"param group\(s\) \[0\] come without decouple_lr"):
        model, resumed = _continued_in_other(torch_writer, reader, as_torch)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=0)


def test_a_torch_checkpoint_in_an_optimizer_decaying_by_lr_loads_without_a_warning() -> None:
    state_dict = torch.optim.AdamW(make_model().parameters(), lr=LR).state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        core.AdamW(make_model().parameters(), lr=LR).load_state_dict(state_dict)


def test_torch_adamw_always_decays_decoupled_so_an_l2_run_continues_in_torch_adam() -> None:
    model = make_model()
    state_dict = core.Adam(model.parameters(), lr=LR, weight_decay=0.1).state_dict()
    assert state_dict["param_groups"][0]["decoupled_weight_decay"] is False
    adamw = torch.optim.AdamW(model.parameters(), lr=LR)
    adamw.load_state_dict(copy.deepcopy(state_dict))
    adam = torch.optim.Adam(model.parameters(), lr=LR)
    adam.load_state_dict(copy.deepcopy(state_dict))
    assert adamw.param_groups[0]["decoupled_weight_decay"] is True
    assert adam.param_groups[0]["decoupled_weight_decay"] is False


@pytest.mark.parametrize("name", list(TORCH_CLASSES))
def test_fully_decoupled_decay_continues_in_torch_once_weight_decay_is_divided_by_max_lr(
    name: str,
) -> None:
    """torch has no decay relative to max_lr. A core checkpoint marks fully decoupled decay
    decoupled and keeps adamkit's weight_decay, so torch alone would decay by lr·λ (max_lr
    times too little); with weight_decay set to λ / max_lr it continues exactly."""
    core_class = getattr(core, name)
    eps = TINY_EPS if name == "RAdam" else EPS
    writer = functools.partial(
        core_class, lr=LR, betas=(0.9, 0.99), eps=eps, weight_decay=1e-3, decouple_lr=True
    )
    saved = writer(make_model().parameters()).state_dict()["param_groups"][0]
    assert saved["decoupled_weight_decay"] is True and saved["weight_decay"] == 1e-3

    def convert(optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            group["weight_decay"] = group["weight_decay"] / group["max_lr"]

    model, resumed = _continued_in_other(writer, TORCH_CLASSES[name], convert)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=0)
    model, unconverted = _continued_in_other(writer, TORCH_CLASSES[name])
    assert any(
        not torch.allclose(a, b, atol=1e-7, rtol=0)
        for a, b in zip(model.parameters(), unconverted.parameters(), strict=True)
    )


@pytest.mark.parametrize("state_precision", ["full", "8bit"])
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize(
    "dtypes", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
)
def test_a_model_cast_mid_run_continues_as_its_checkpoint_would(
    dtypes: tuple[torch.dtype, torch.dtype], backend: str, state_precision: str
) -> None:
    """model.to(dtype) after some steps: the moments follow the parameter's dtype, as they
    do when a checkpoint loads (torch's policy). Before, the live run kept the old dtype's
    moments, so it and a run resumed from its checkpoint went apart."""
    before, after = dtypes
    batches = make_batches(torch.float32, 8)
    torch.manual_seed(0)
    model = torch.nn.Sequential(  # the (64, 64) weight has 8-bit moments under "8bit"
        torch.nn.Linear(6, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Linear(64, 3)
    )
    model.to(before)
    optimizer = core.AdamW(
        model.parameters(), lr=LR, state_precision=state_precision, **TRAINING_BACKENDS[backend]
    )

    def step(net: torch.nn.Module, opt: core.AdamW, batch: tuple) -> None:
        x, y = batch
        dtype = next(net.parameters()).dtype
        torch.nn.functional.mse_loss(net(x.to(dtype)).float(), y).backward()
        opt.step()
        opt.zero_grad()

    for batch in batches[:3]:
        step(model, optimizer, batch)
    model.to(after)
    step(model, optimizer, batches[3])
    for param in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "kahan_comp"):
            if key in optimizer.state[param]:
                assert optimizer.state[param][key].dtype == after, key
        # An fp32 parameter has no use for a Kahan buffer: it was kept (one more copy of
        # the parameters, in memory and in every checkpoint) where a resumed run drops it.
        assert ("kahan_comp" in optimizer.state[param]) == (after == torch.bfloat16)
    build = functools.partial(
        core.AdamW, lr=LR, state_precision=state_precision, **TRAINING_BACKENDS[backend]
    )
    _assert_continues_as_its_checkpoint(model, optimizer, build, batches[4:], step)


def _assert_continues_as_its_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    build: Any,
    batches: list[Any],
    step: Any,
) -> None:
    """The live run and one resumed from its checkpoint (a copy of the model, an optimizer
    from build(parameters) loading the state dict) take step over each batch: equal."""
    resumed = copy.deepcopy(model)
    resumed_optimizer = build(resumed.parameters())
    resumed_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for batch in batches:
        step(model, optimizer, batch)
        step(resumed, resumed_optimizer, batch)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state_precision", ["full", "8bit"])
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize(
    "formats",
    [
        (torch.channels_last, torch.contiguous_format),
        (torch.contiguous_format, torch.channels_last),
    ],
    ids=["to contiguous", "to channels-last"],
)
def test_a_model_given_another_memory_format_mid_run_continues_as_its_checkpoint_would(
    formats: tuple[torch.memory_format, torch.memory_format],
    backend: str,
    state_precision: str,
    dtype: torch.dtype,
) -> None:
    """model.to(memory_format=...) after some steps: the moments (and Kahan buffer) kept
    the old layout, so every later step of the weight left the fused kernels for the loop
    (silently, for the rest of the run) and the run went apart from one resumed from its
    checkpoint (9.5e-7 in bf16), which lays state out as a step makes it."""
    before, after = formats
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(2, 16, 6, 6, generator=generator).to(dtype) for _ in range(7)]
    torch.manual_seed(0)
    model = torch.nn.Conv2d(16, 32, 3).to(dtype).to(memory_format=before)  # 4608: 8-bit
    kwargs = {"lr": LR, "state_precision": state_precision, **TRAINING_BACKENDS[backend]}
    optimizer = core.AdamW(model.parameters(), **kwargs)

    def step(net: torch.nn.Module, opt: core.AdamW, x: torch.Tensor) -> None:
        net(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()

    for x in inputs[:3]:
        step(model, optimizer, x)
    model.to(memory_format=after)
    step(model, optimizer, inputs[3])
    for key, value in optimizer.state[model.weight].items():
        if key in ("exp_avg", "exp_avg_sq", "kahan_comp"):
            assert value.stride() == model.weight.stride(), key
    _assert_continues_as_its_checkpoint(
        model, optimizer, functools.partial(core.AdamW, **kwargs), inputs[4:], step
    )


def test_loaded_host_scalars_stay_float32_on_cpu() -> None:
    """torch casts state to the parameter's dtype on load; step and mu_product must not be."""
    model = make_model(torch.bfloat16)
    optimizer = core.NAdam(model.parameters(), lr=LR)
    train(model, optimizer, make_batches(torch.bfloat16, 3))
    state_dict = copy.deepcopy(optimizer.state_dict())
    expected = [float(s["mu_product"]) for s in state_dict["state"].values()]
    fresh = core.NAdam(model.parameters(), lr=LR)
    fresh.load_state_dict(state_dict)
    for state, mu_product in zip(fresh.state.values(), expected, strict=True):
        for key in ("step", "mu_product"):
            assert state[key].dtype == torch.float32 and state[key].device.type == "cpu"
        assert float(state["mu_product"]) == mu_product
        assert state["kahan_comp"].dtype == torch.bfloat16


@pytest.mark.bad_input
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_a_state_dict_of_another_optimizer_is_refused_before_loading(momentum: float) -> None:
    """SGD without momentum keeps no state: its state dict loaded, wiping the moments and
    taking SGD's lr and weight decay (its groups were filled in with AdamW's defaults)."""
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    train(model, sgd, make_batches(torch.float32, 2))
    optimizer = core.AdamW(model.parameters(), lr=LR)
    train(model, optimizer, make_batches(torch.float32, 2))
    assert_load_refused(
        model,
        optimizer,
        sgd.state_dict(),
        r"Invalid state_dict for AdamW: param group 0 has no 'betas' or 'eps' \(it holds "
        r"\[.*'momentum'.*\]\), so it is no Adam-family optimizer's\. Allowed: ",
    )


@pytest.mark.bad_input
def test_state_dict_with_missing_keys_is_refused_before_loading() -> None:
    model = make_model()
    optimizer = core.AdamW(model.parameters(), lr=LR)
    train(model, optimizer, make_batches(torch.float32, 2))
    saved = copy.deepcopy(optimizer.state_dict())
    for state in saved["state"].values():
        del state["exp_avg_sq"]
    assert_load_refused(model, optimizer, saved, r"lacks \['exp_avg_sq'\]")


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("writer", "reader", "message"),
    [
        (core.ADOPT, core.NAdam, "from an ADOPT-type optimizer, whose exp_avg averages normalised"),
        (core.ADOPT, core.Adam, "Allowed: the state of torch.optim.Adam/AdamW/NAdam/RAdam or"),
        (core.AdamW, core.ADOPT, "from an Adam-type optimizer, whose exp_avg averages gradients"),
        (torch.optim.Adam, core.ADOPT, "Allowed: the state of adamkit's ADOPT"),
    ],
    ids=["ADOPT-to-NAdam", "ADOPT-to-Adam", "AdamW-to-ADOPT", "torch-Adam-to-ADOPT"],
)
def test_state_dict_of_the_other_moment_family_is_refused_before_loading(
    writer: type, reader: type, message: str
) -> None:
    """ADOPT's exp_avg averages normalised gradients, Adam's the gradients themselves: the
    shapes and keys agree, so only this check stops a resume taking steps of the wrong size
    (ADOPT state loaded into Adam moved the parameters about 15x further than Adam's own)."""
    model = make_model()
    source = writer(model.parameters(), lr=LR)
    train(model, source, make_batches(torch.float32, 3))
    optimizer = reader(model.parameters(), lr=LR)
    train(model, optimizer, make_batches(torch.float32, 2))
    before = assert_load_refused(
        model,
        optimizer,
        source.state_dict(),
        rf"Invalid state_dict for {reader.__name__}: .*{message}",
    )
    assert optimizer.state_dict()["param_groups"] == before[1]["param_groups"]


@pytest.mark.bad_input
@pytest.mark.parametrize("family", ["adopt", "garbage", None, ["Adam"]])  # a list: unhashable
def test_an_unknown_moment_family_is_refused_by_name(family: object) -> None:
    """A family other than state_dict()'s own fell back to the rule for checkpoints from
    before the key (ADOPT's groups hold a bool clip): an ADOPT checkpoint edited to say
    'adopt' and without clip loaded into AdamW, whose steps then misread its moments."""
    model = make_model()
    source = core.ADOPT(model.parameters(), lr=LR)
    train(model, source, make_batches(torch.float32, 2))
    saved = copy.deepcopy(source.state_dict())
    for group in saved["param_groups"]:
        group["moment_family"] = family
        del group["clip"]
    optimizer = core.AdamW(model.parameters(), lr=LR)
    train(model, optimizer, make_batches(torch.float32, 1))
    assert_load_refused(
        model,
        optimizer,
        saved,
        r"Invalid state_dict for AdamW: param group 0's moment_family: "
        rf"{re.escape(repr(family))}\. "
        r"Allowed: one of Adam, ADOPT \(as state_dict\(\) writes it\), or absent\.",
    )


@pytest.mark.parametrize(
    ("writer", "clip"),
    [
        *((c, v) for c in (core.Adam, core.AdamW, core.RAdam, core.NAdam) for v in (1.0, True)),
        (torch.optim.AdamW, 1.0),  # torch writes no moment_family: a bool would read as ADOPT's
    ],
)  # fmt: skip
def test_a_group_key_of_the_users_named_clip_resumes(writer: type, clip: object) -> None:
    """A per-group clipping setting kept under 'clip' (torch keeps extra group keys) made
    the checkpoint read as ADOPT's, whose groups hold a bool 'clip': refused on resume.
    adamkit's state dicts now say which family's moments they hold."""
    reader = core.AdamW if writer is torch.optim.AdamW else writer
    batches = make_batches(torch.float32, 6)
    full = make_model()
    resumed = copy.deepcopy(full)
    hyper = {"lr": LR, "betas": (0.9, 0.999), "eps": 1e-8}  # torch's and adamkit's alike
    optimizer = reader([{"params": list(full.parameters()), "clip": clip}], **hyper)
    train(full, optimizer, batches, total=6)
    source = writer([{"params": list(resumed.parameters()), "clip": clip}], **hyper)
    train(resumed, source, batches[:3], total=6)
    saved = copy.deepcopy(source.state_dict())
    optimizer = reader([{"params": list(resumed.parameters()), "clip": clip}], **hyper)
    optimizer.load_state_dict(saved)
    train(resumed, optimizer, batches[3:], start=3, total=6)
    assert optimizer.param_groups[0]["clip"] == clip
    tolerance = 0.0 if writer is reader else 1e-6  # torch's first half is torch's math
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=tolerance, rtol=0)


@pytest.mark.bad_input
def test_state_dict_with_wrong_shapes_is_refused() -> None:
    model, other = make_model(), torch.nn.Linear(3, 6)
    source = core.Adam(list(other.parameters()) * 1, lr=LR)
    other(torch.randn(2, 3)).sum().backward()
    source.step()
    target = core.Adam(list(model.parameters())[:2], lr=LR)
    with pytest.raises(ValueError, match="has shape"):
        target.load_state_dict(source.state_dict())


def _corrupt(key: str, value: Any) -> Callable[[dict], None]:
    """Sets one key of parameter 0's saved state (the 8192-element weight)."""
    return lambda state: state.__setitem__(key, value)


BAD_STATE_VALUES = {
    "step-vector": (
        "full",
        _corrupt("step", torch.tensor([1.0, 2.0])),
        r"\['step'\] is Tensor of shape \(2,\)\. Allowed: one finite number >= 0",
    ),
    "step-text": ("full", _corrupt("step", "3"), r"\['step'\] is '3'\. Allowed: one finite"),
    "step-nan": (
        "8bit",
        _corrupt("step", torch.tensor(float("nan"))),
        r"\['step'\] is Tensor of shape \(\) holding nan\.",
    ),
    "step-negative": ("full", _corrupt("step", -1.0), r"\['step'\] is -1\.0\."),
    "step-meta": (  # torch.load(map_location="meta"): the message said what was allowed
        "full",
        _corrupt("step", torch.tensor(1.0, device="meta")),
        r"\['step'\] is Tensor of shape \(\) on meta \(no value\)\.",
    ),
    "step-beyond-float32": (  # loaded as inf, the steps kept in float32
        "full",
        _corrupt("step", torch.tensor(1e300, dtype=torch.float64)),
        r"\['step'\] is Tensor of shape \(\) holding 1e\+300\. Allowed: one finite number "
        r">= 0 and at most float32's largest",
    ),
    "moment-list": (
        "full",
        _corrupt("exp_avg", [0.0] * 8192),
        r"\['exp_avg'\] is list\. Allowed: a tensor of shape \(64, 128\)",
    ),
    "moment-meta": (
        "full",
        _corrupt("exp_avg_sq", torch.empty(64, 128, device="meta")),
        r"\['exp_avg_sq'\] is a meta tensor",
    ),
    "moment-integer": (  # cast as torch casts it: its fractions were gone
        "full",
        _corrupt("exp_avg_sq", torch.full((64, 128), 3, dtype=torch.int32)),
        r"\['exp_avg_sq'\] has dtype torch\.int32\. Allowed: a dtype of the parameter's "
        r"kind \(torch\.float32",
    ),
    "moment-complex": (  # cast as torch casts it: its imaginary part was dropped
        "full",
        _corrupt("exp_avg", torch.full((64, 128), 1 + 1j, dtype=torch.complex64)),
        r"\['exp_avg'\] has dtype torch\.complex64\. Allowed: a dtype of the parameter's kind",
    ),
    "codes-without-scales": (
        "8bit",
        lambda state: state.pop("exp_avg_absmax"),
        r"\['exp_avg_codes'\] comes without 'exp_avg_absmax'",
    ),
    "scales-without-codes": (
        "8bit",
        lambda state: state.pop("max_exp_avg_sq_codes"),
        r"\['max_exp_avg_sq_absmax'\] comes without 'max_exp_avg_sq_codes'",
    ),
    "codes-int64": (
        "8bit",
        lambda state: state.__setitem__("exp_avg_codes", state["exp_avg_codes"].long()),
        r"\['exp_avg_codes'\] has dtype torch\.int64\. Allowed: torch\.uint8",
    ),
    "scales-integer": (
        "8bit",
        _corrupt("exp_avg_absmax", torch.ones(64, 1, dtype=torch.int32)),
        r"\['exp_avg_absmax'\] has dtype torch\.int32\. Allowed: a floating dtype",
    ),
    "scales-negative": (
        "8bit",
        _corrupt("exp_avg_sq_absmax", torch.full((64, 1), -0.5)),
        r"\['exp_avg_sq_absmax'\] holds -0\.5\. Allowed: scales >= 0",
    ),
    "scales-infinite": (
        "8bit",
        _corrupt("exp_avg_absmax", torch.full((64, 1), float("inf"))),
        r"\['exp_avg_absmax'\] holds inf\. Allowed: scales >= 0 and finite in float32",
    ),
    "scales-beyond-float32": (  # finite as saved, inf once kept as float32: loaded before
        "8bit",
        _corrupt("exp_avg_absmax", torch.full((64, 1), 1e300, dtype=torch.float64)),
        r"\['exp_avg_absmax'\] holds 1e\+300\. Allowed: scales >= 0 and finite in float32",
    ),
    "v-negative": (
        "full",
        _corrupt("exp_avg_sq", torch.full((64, 128), -0.25)),
        r"\['exp_avg_sq'\] holds -0\.25\. Allowed: values >= 0",
    ),
    "v-max-negative": (
        "full",
        _corrupt("max_exp_avg_sq", -torch.rand(64, 128)),
        r"\['max_exp_avg_sq'\] holds -0\.\d+\. Allowed: values >= 0",
    ),
    "moment-in-both-forms": (
        "8bit",
        _corrupt("exp_avg", torch.zeros(64, 128)),
        r"\['exp_avg'\] comes with 'exp_avg_codes' as well\. Allowed: a moment in one form.*"
        r"dropped on load, its live tensors or all zeros, in one process or for DTensor",
    ),
    "moment-expanded": (
        "full",
        _corrupt("exp_avg", torch.zeros(1, 128).expand(64, 128)),
        r"\['exp_avg'\] has strides \(0, 1\), so several elements are one memory location",
    ),
    # A sparse tensor has no storage to measure: torch's internal error before.
    **{
        f"{key}-{name}": (
            precision,
            lambda state, key=key, layout=layout: state.__setitem__(
                key, state[key].to_sparse(layout=layout)
            ),
            rf"\['{key}'\] has layout torch\.{name}\. Allowed: a dense \(strided\) tensor",
        )
        for key, precision in (("exp_avg", "full"), ("exp_avg_codes", "8bit"))
        for name, layout in (("sparse_coo", torch.sparse_coo), ("sparse_csr", torch.sparse_csr))
    },
    # Reading a tensor whose storage was freed (these checks did, as does torch's copy
    # into the parameter's dtype) crashed the process.
    **{
        f"{key}-freed": (
            precision,
            lambda state, key=key: _free(state[key]),
            rf"\['{key}'\] has shape \({shape}\) whose storage holds 0 bytes, fewer than "
            rf"its elements need \({needed}: freed by untyped_storage\(\)\.resize_\(0\).*"
            r"Allowed: a tensor whose storage holds its elements",
        )
        for key, precision, shape, needed in (
            ("step", "full", "", 4),
            ("exp_avg", "full", "64, 128", 32768),
            ("exp_avg_sq", "full", "64, 128", 32768),
            ("max_exp_avg_sq", "full", "64, 128", 32768),
            ("exp_avg_sq_codes", "8bit", "64, 128", 8192),
            ("exp_avg_sq_absmax", "8bit", "64, 1", 256),
        )
    },
}


def _free(tensor: torch.Tensor) -> None:
    """Frees a tensor's storage in place, as FSDP frees an unsharded parameter's."""
    tensor.untyped_storage().resize_(0)


BAD_SAVED_GROUPS = {
    "lr-nan": ("lr", float("nan")),
    "betas-above-one": ("betas", (1.5, 0.9)),
    "weight-decay-negative": ("weight_decay", -3.0),
    "rounding-seed-negative": ("rounding_seed", -3),
    "max-lr-zero": ("max_lr", 0.0),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("bad", list(BAD_SAVED_GROUPS))
@pytest.mark.parametrize("cls", [core.AdamW, core.NAdam])
def test_saved_hyperparameters_a_step_cannot_use_are_refused_before_loading(
    cls: type, bad: str
) -> None:
    """These loaded before, replaced the groups and state, and failed at the next step."""
    key, value = BAD_SAVED_GROUPS[bad]
    model = torch.nn.Linear(128, 64)
    optimizer = cls(model.parameters(), lr=LR)
    model(torch.randn(4, 128)).square().sum().backward()
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    saved["param_groups"][0][key] = value
    assert_load_refused(
        model,
        optimizer,
        saved,
        rf"Invalid {key} in param group 0 of the loaded state dict: {re.escape(repr(value))}",
    )
    assert optimizer.param_groups[0][key] != value


@pytest.mark.bad_input
@pytest.mark.parametrize("bad", list(BAD_STATE_VALUES))
def test_state_values_a_step_cannot_read_are_refused_before_loading(bad: str) -> None:
    """Each of these loaded before and then failed mid-step with torch's own message (or
    stepped with the wrong meaning: scales below 0 turn v negative)."""
    precision, corrupt, message = BAD_STATE_VALUES[bad]
    model = torch.nn.Linear(128, 64)
    optimizer = core.AdamW(model.parameters(), lr=LR, amsgrad=True, state_precision=precision)
    model(torch.randn(4, 128)).square().sum().backward()
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    corrupt(saved["state"][0])
    assert_load_refused(
        model, optimizer, saved, r"Invalid state_dict for AdamW: state\[0\]" + message
    )


@pytest.mark.bad_input
@pytest.mark.parametrize("state_precision", ["full", "8bit"])
def test_state_loaded_before_the_model_is_materialized_is_refused(state_precision: str) -> None:
    """Parameters still on meta: torch's loader moved the moments there, keeping no
    values, and the step then refused them as state made on meta, whose advice (delete
    it) silently dropped the checkpoint's moments."""
    model = torch.nn.Linear(128, 64)
    optimizer = core.AdamW(model.parameters(), lr=LR, state_precision=state_precision)
    model(torch.randn(4, 128)).square().sum().backward()
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    with torch.device("meta"):
        deferred = torch.nn.Linear(128, 64)
    fresh = core.AdamW(deferred.parameters(), lr=LR, state_precision=state_precision)
    with pytest.raises(ValueError, match=r"parameter 0 is on meta \(not materialized yet\)"):
        fresh.load_state_dict(saved)
    assert not fresh.state
    deferred.to_empty(device="cpu")  # new parameters (unless swapped): a new optimizer
    deferred.load_state_dict(model.state_dict())
    fresh = core.AdamW(deferred.parameters(), lr=LR, state_precision=state_precision)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.state_dict()["state"][0]["step"], saved["state"][0]["step"])


@pytest.mark.bad_input
@pytest.mark.parametrize("entry", [None, []], ids=["None", "list"])
def test_a_state_entry_that_is_no_dict_is_refused_before_loading(entry: object) -> None:
    """It loaded (an empty entry was skipped by the checks) and the next step failed with
    AttributeError or TypeError from inside the optimizer."""
    model = torch.nn.Linear(128, 64)
    optimizer = core.AdamW(model.parameters(), lr=LR)
    model(torch.randn(4, 128)).square().sum().backward()
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    saved["state"][0] = entry
    assert_load_refused(
        model,
        optimizer,
        saved,
        rf"Invalid state_dict for AdamW: state\[0\] is {type(entry).__name__} .*Allowed: "
        r"a dict of the parameter's state",
    )


def test_a_step_count_beyond_int64_loads() -> None:
    """A saved int step of 2**63 + 5 is a finite number >= 0, as the check allows; loading
    it overflowed torch.tensor after the groups and state had been replaced."""
    model = torch.nn.Linear(128, 64)
    optimizer = core.AdamW(model.parameters(), lr=LR)
    model(torch.randn(4, 128)).square().sum().backward()
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    saved["state"][0]["step"] = 2**63 + 5
    optimizer.load_state_dict(saved)
    assert float(optimizer.state[model.weight]["step"]) == float(2**63 + 5)
    optimizer.step()  # bias corrections of 1, and nothing else to say about it


STRIDED_IN_CHECKPOINT = {
    "8bit": ("exp_avg_codes", "exp_avg_sq_codes", "max_exp_avg_sq_codes"),
    "full": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
}


@pytest.mark.parametrize("state_precision", list(STRIDED_IN_CHECKPOINT))
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_strided_state_in_a_checkpoint_loads_laid_out_as_a_step_makes_it(
    backend: str, state_precision: str
) -> None:
    """A checkpoint may hold moments, codes and scales as strided views (written by other
    code, or transposed and back). They load laid out as a step makes them (contiguous
    here): kept strided, as torch keeps them, every later step of the parameter skipped
    the fused kernels, and a full-precision run then differed in the last bit from the
    same checkpoint held contiguously. Training continues bit for bit as from that one."""
    runs = []
    for strided in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(128, 64)
        optimizer = core.AdamW(
            model.parameters(),
            lr=LR,
            amsgrad=True,
            state_precision=state_precision,
            **TRAINING_BACKENDS[backend],
        )
        model(torch.randn(4, 128, generator=torch.Generator().manual_seed(0))).sum().backward()
        optimizer.step()
        saved = copy.deepcopy(optimizer.state_dict())
        if strided:
            for key in STRIDED_IN_CHECKPOINT[state_precision]:
                value = saved["state"][0][key]
                saved["state"][0][key] = value.t().contiguous().t()
                assert not saved["state"][0][key].is_contiguous()
        optimizer.load_state_dict(saved)
        state = optimizer.state[model.weight]
        assert all(state[key].is_contiguous() for key in state)
        optimizer.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("state_precision", ["full", "8bit"])
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_state_of_a_parameter_taken_out_of_its_group_is_left_out_of_the_state_dict(
    backend: str, state_precision: str
) -> None:
    """A parameter taken out of every group after stepping (Composer's LayerFreezing
    filters group["params"]) keeps its state in optimizer.state, as in torch, whose
    state_dict then raised a KeyError. The dict holds the state of the parameters still
    trained, and a run resumed from it continues bit for bit."""
    flags = {"lr": LR, "state_precision": state_precision, **TRAINING_BACKENDS[backend]}

    torch.manual_seed(0)
    model = torch.nn.Linear(128, 64)
    optimizer = core.AdamW(model.parameters(), **flags)
    for _ in range(2):
        model(torch.randn(4, 128)).square().sum().backward()
        optimizer.step()
    optimizer.param_groups[0]["params"] = [model.bias]  # the weight is frozen
    saved = copy.deepcopy(optimizer.state_dict())
    assert model.weight in optimizer.state and list(saved["state"]) == [0]
    bias = torch.nn.Parameter(model.bias.detach().clone())
    resumed = core.AdamW([bias], **flags)
    resumed.load_state_dict(saved)
    for param, run in ((model.bias, optimizer), (bias, resumed)):
        param.grad = torch.linspace(-1, 1, 64)
        run.step()
    assert torch.equal(model.bias, bias)


def _wide_model() -> torch.nn.Module:
    """A 1-D parameter of 4096 elements (the first Linear's bias): quantized by one process
    or DDP, kept full by FSDP2, where it is a 1-D DTensor shard."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 4096), torch.nn.Tanh(), torch.nn.Linear(4096, 4))


@pytest.mark.parametrize("backend", ["default", "loop", "foreach", "fused"])
@pytest.mark.parametrize(("saved", "receiving"), [("8bit", "full"), ("full", "8bit")])
def test_full_state_dcp_loader_takes_a_checkpoint_of_the_other_precision(
    saved: str, receiving: str, backend: str
) -> None:
    """torch's set_optimizer_state_dict(full_state_dict=True) makes the receiving
    optimizer's own (zero) state and lays the checkpoint's over it key by key, so a moment
    of the other form arrived in both forms and was refused: every change of
    state_precision across such a checkpoint, and every 8-bit checkpoint moved between one
    process or DDP and FSDP2 of a model with a wide 1-D parameter (a norm or bias of 4096+
    elements), with advice that did not apply. Now the zero filler is dropped and the load
    is optimizer.load_state_dict's of the same checkpoint: the same state, bit for bit,
    and the same next step. (The load is the same code on every backend; Triton's
    interpreter would take a minute over these tensors for the step after it.)"""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    flags = TRAINING_BACKENDS[backend]
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))

    def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    source = _wide_model()
    trained = core.AdamW(source.parameters(), lr=1e-2, state_precision=saved, **flags)
    for _ in range(3):
        train(source, trained)
    options = StateDictOptions(full_state_dict=True)
    checkpoint = get_optimizer_state_dict(source, trained, options=options)
    assert any(key.endswith("_codes") for key in checkpoint["state"]["0.bias"]) == (saved == "8bit")
    runs = []
    for through_dcp in (False, True):
        model = copy.deepcopy(source)
        optimizer = core.AdamW(model.parameters(), lr=1e-2, state_precision=receiving, **flags)
        if through_dcp:
            set_optimizer_state_dict(model, optimizer, copy.deepcopy(checkpoint), options=options)
        else:
            optimizer.load_state_dict(copy.deepcopy(trained.state_dict()))
        loaded = copy.deepcopy(optimizer.state_dict()["state"])
        train(model, optimizer)
        runs.append((loaded, [p.detach().clone() for p in model.parameters()]))
    (plain_state, plain_params), (dcp_state, dcp_params) = runs
    assert plain_state.keys() == dcp_state.keys()
    quantized = [any(key.endswith("_codes") for key in state) for state in plain_state.values()]
    assert any(quantized) == (receiving == "8bit")
    for index, state in plain_state.items():
        assert state.keys() == dcp_state[index].keys(), index
        for key, value in state.items():
            assert torch.equal(dcp_state[index][key], value), (index, key)
    assert all(torch.equal(a, b) for a, b in zip(plain_params, dcp_params, strict=True))


@pytest.mark.parametrize("state_precision", ["full", "8bit"])
def test_a_group_emptied_before_saving_resumes_through_torch_distributed_checkpoint(
    state_precision: str,
) -> None:
    """torch's set_optimizer_state_dict passes a param group without parameters as
    {'params': []}, every hyperparameter dropped: a per-layer group emptied by Composer's
    LayerFreezing made the resume fail ("param group 0 has no 'betas' or 'eps"), and
    torch's own AdamW loads it and fails at the next step (KeyError 'betas'). The empty
    group keeps the live group's hyperparameters; the rest continues bit for bit."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    batches = [torch.randn(16, 128, generator=torch.Generator().manual_seed(i)) for i in range(6)]

    def optimizer_of(model: torch.nn.Module) -> core.AdamW:
        groups = [{"params": [], "lr": 0.5}, {"params": list(model.parameters())}]
        return core.AdamW(groups, lr=1e-2, state_precision=state_precision)

    def train(model: torch.nn.Module, optimizer: core.AdamW, part: list[torch.Tensor]) -> None:
        for x in part:
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()

    torch.manual_seed(0)
    full = torch.nn.Linear(128, 64)  # an 8192-element weight: 8-bit state where asked
    resumed = copy.deepcopy(full)
    train(full, optimizer_of(full), batches)
    train(resumed, first := optimizer_of(resumed), batches[:3])
    checkpoint = get_optimizer_state_dict(resumed, first)
    optimizer = optimizer_of(resumed)
    set_optimizer_state_dict(resumed, optimizer, checkpoint)
    assert optimizer.param_groups[0]["params"] == []
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    train(resumed, optimizer, batches[3:])
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_full_state_load_into_a_pending_switch_of_state_precision_keeps_the_checkpoint() -> None:
    """A group switched to another state_precision converts at its next step, so until
    then the live state is in the old form. Leftovers of the full-state route are the
    form the optimizer holds, not the one its group will make: a checkpoint's all-zero
    moments were taken for the leftover and dropped, and the optimizer's old trained
    moments loaded under the checkpoint's step."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    for saved, live in (("full", "8bit"), ("8bit", "full")):
        untrained = _wide_model()
        fresh = core.AdamW(untrained.parameters(), lr=1e-2, state_precision=saved)
        checkpoint = get_optimizer_state_dict(untrained, fresh, options=options)  # m = v = 0
        loaded = []
        for through_dcp in (False, True):
            model = _wide_model()
            optimizer = core.AdamW(model.parameters(), lr=1e-2, state_precision=live)
            for _ in range(3):
                optimizer.zero_grad()
                model(x).square().mean().backward()
                optimizer.step()
            for group in optimizer.param_groups:
                group["state_precision"] = saved  # pending until the next step
            if through_dcp:
                set_optimizer_state_dict(
                    model, optimizer, copy.deepcopy(checkpoint), options=options
                )
            else:
                optimizer.load_state_dict(copy.deepcopy(fresh.state_dict()))
            loaded.append(optimizer.state_dict()["state"])
        for index, state in loaded[0].items():
            assert state.keys() == loaded[1][index].keys()
            assert all(torch.equal(loaded[1][index][k], v) for k, v in state.items())


def test_a_torch_checkpoint_saved_mid_warmup_takes_max_lr_from_its_schedule() -> None:
    """A torch group a scheduler ran carries initial_lr: fully decoupled decay is relative
    to it, not to the lr the warmup had reached when the checkpoint was written (3.3x too
    strong here, for the rest of the run)."""
    param = nn.Parameter(torch.ones(4))
    saved = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(saved, lambda step: min(1.0, 0.1 * (step + 1)))
    for _ in range(2):
        param.grad = torch.ones(4)
        saved.step()
        schedule.step()
    state_dict = saved.state_dict()
    assert state_dict["param_groups"][0]["lr"] == pytest.approx(3e-4)
    resumed = core.AdamW([nn.Parameter(torch.ones(4))], lr=5.0, decouple_lr=True)
    with pytest.warns(RuntimeWarning, match="come without decouple_lr"):
        resumed.load_state_dict(state_dict)
    assert resumed.param_groups[0]["max_lr"] == 1e-3


@pytest.mark.parametrize("state_precision", ["full", "8bit"])
def test_loading_copies_step_counts_and_8bit_state_and_takes_full_moments_as_torch(
    state_precision: str,
) -> None:
    """What a loaded dict shares with the optimizer after load_state_dict, as README says:
    step counts (host scalars) and 8-bit codes and scales are copied, so the next steps
    leave the dict as it was (one dict loaded into two optimizers resumes both exactly);
    full-precision moments are taken as torch takes them, without a second copy."""
    generator = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.randn(64, 64, generator=generator))
    optimizer = core.AdamW([param], lr=LR, state_precision=state_precision)
    for _ in range(3):
        param.grad = torch.randn(64, 64, generator=generator)
        optimizer.step()
    state_dict = optimizer.state_dict()
    saved = copy.deepcopy(state_dict)
    resumed_param = nn.Parameter(param.detach().clone())
    resumed = core.AdamW([resumed_param], lr=LR, state_precision=state_precision)
    resumed.load_state_dict(state_dict)
    resumed_param.grad = torch.randn(64, 64, generator=generator)
    resumed.step()
    weight = resumed.state[resumed_param]
    assert float(weight["step"]) == 4
    eight_bit = [name for key in ("exp_avg", "exp_avg_sq") for name in moment_keys(key)]
    for index, state in state_dict["state"].items():
        assert float(state["step"]) == 3
        if state_precision == "8bit":
            for name in eight_bit:  # codes and scales, each in the dict and unchanged
                assert torch.equal(state[name], saved["state"][index][name]), name
    if state_precision == "full":
        assert weight["exp_avg"] is state_dict["state"][0]["exp_avg"]


def test_a_kahan_checkpoint_loaded_without_kahan_sum_holds_no_compensation_at_once() -> None:
    """load_state_dict converts the state to what this optimizer keeps at once, so a
    state_dict taken before the first step already leaves the compensation out."""
    param = nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    optimizer = core.AdamW([param], lr=LR)
    for _ in range(3):
        param.grad = torch.full_like(param, 0.3)
        optimizer.step()
    assert "kahan_comp" in optimizer.state[param]
    resumed_param = nn.Parameter(param.detach().clone())
    resumed = core.AdamW([resumed_param], lr=LR, kahan_sum=False)
    resumed.load_state_dict(optimizer.state_dict())
    assert "kahan_comp" not in resumed.state[resumed_param]
    assert "kahan_comp" not in resumed.state_dict()["state"][0]
