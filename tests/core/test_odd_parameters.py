"""Unusual parameters, as real models have them, in every backend (the default included):
views and non-contiguous tensors, zero-size and 0-dim tensors, complex, channels-last,
weights tied between two modules, frozen parameters inside a group, parameters without a
gradient on some steps, and mixed dtypes in one group. Each backend equals the loop."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import core
from core.backends import cpu_kernel
from core.quantization import MIN_QUANTIZED_NUMEL, moment_keys
from tests.core.cases import BACKENDS, TRAINING_BACKENDS, Case, one_case_per_algorithm
from tests.core.test_fused import LOW_PRECISION, _ordered

STEPS = 4


class OddModel(nn.Module):
    """Every kind of unusual parameter, all feeding one scalar loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the layers' own initialization
        generator = torch.Generator().manual_seed(0)

        def randn(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.randn(*shape, generator=generator).to(dtype)

        self.embed = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10)
        self.head.weight = self.embed.weight  # tied: one parameter, two modules
        self.conv = nn.Conv2d(2, 3, 3).to(memory_format=torch.channels_last)
        self.scale = nn.Parameter(randn(1).reshape(()))  # 0-dim
        self.empty = nn.Parameter(randn(0, 4))  # zero-size
        self.rotation = nn.Parameter(torch.complex(randn(3), randn(3)))  # complex
        self.transposed = nn.Parameter(randn(5, 6).t())  # dense, not contiguous
        self.view = nn.Parameter(randn(20)[2:12])  # a view with a storage offset
        self.strided = nn.Parameter(randn(6, 10)[:, ::3])  # not dense: gaps in memory
        self.frozen = nn.Parameter(randn(4), requires_grad=False)
        self.sometimes = nn.Parameter(randn(4))  # a gradient on even steps only
        self.bf16 = nn.Parameter(randn(64, dtype=torch.bfloat16))  # mixed dtypes, one group
        self.fp16 = nn.Parameter(randn(64, dtype=torch.float16))
        self.fp64 = nn.Parameter(randn(8, dtype=torch.float64))

    def forward(self, tokens: Tensor, image: Tensor, step: int) -> Tensor:
        logits = self.head(self.embed(tokens))
        loss = nn.functional.cross_entropy(logits, tokens) + self.conv(image).square().mean()
        loss = (
            loss * self.scale + self.empty.sum() + (self.rotation * self.rotation.conj()).real.sum()
        )
        loss = (
            loss + self.transposed.tanh().sum() + self.view.sin().sum() + self.strided.cos().sum()
        )
        loss = loss + (self.frozen * self.view[:4]).sum()
        if step % 2 == 0:
            loss = loss + self.sometimes.square().sum()
        loss = loss + self.bf16.float().sin().sum() + self.fp16.float().cos().sum()
        return loss + self.fp64.square().sum().float()


def _train(case: Case, flags: dict) -> list[list[Tensor]]:
    model = OddModel()
    optimizer = case.make(model.parameters(), **flags)
    generator = torch.Generator().manual_seed(1)
    history = []
    for step in range(STEPS):
        tokens = torch.randint(0, 10, (8,), generator=generator)
        image = torch.randn(2, 2, 5, 5, generator=generator).to(memory_format=torch.channels_last)
        model(tokens, image, step).backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append([p.detach().clone() for p in model.parameters()])
    return history


def _assert_close(actual: Tensor, expected: Tensor, ulps: int, what: str) -> None:
    if actual.dtype in LOW_PRECISION:
        gaps = (_ordered(actual) - _ordered(expected)).abs()
        assert int(gaps.max()) <= ulps, f"{what}: {int(gaps.max())} ulps apart"
    else:
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0, msg=what)


@pytest.mark.parametrize("backend", ["default", "foreach", "fused", "triton"])
@pytest.mark.parametrize("case", one_case_per_algorithm(), ids=lambda c: c.id)
def test_odd_parameters_equal_the_loop_backend(case: Case, backend: str) -> None:
    flags = {} if backend == "default" else BACKENDS[backend]
    expected = _train(case, BACKENDS["loop"])
    actual = _train(case, flags)
    names = [name for name, _ in OddModel().named_parameters()]
    for step, (got, want) in enumerate(zip(actual, expected, strict=True)):
        for name, a, b in zip(names, got, want, strict=True):
            assert a.dtype == b.dtype and a.stride() == b.stride(), name
            # one ulp per step for bf16/fp16: each step may round once differently
            _assert_close(a, b, step + 1, f"{name} after step {step + 1}")


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_gradient_laid_out_unlike_its_parameter_is_paired_by_index(backend: str) -> None:
    """A transposed parameter given a contiguous gradient (set by hand or by a hook:
    autograd gives it the parameter's strides): both dense, but not alike, so no flat pass
    may pair their elements by memory offset; every backend equals the loop."""
    results = []
    for flags in (TRAINING_BACKENDS["loop"], TRAINING_BACKENDS[backend]):
        torch.manual_seed(0)
        param = nn.Parameter(torch.randn(5, 6).t())
        optimizer = core.Adam([param], lr=0.1, **flags)
        for k in range(3):
            param.grad = torch.arange(30.0).reshape(6, 5) - 10.0 * k
            optimizer.step()
        results.append(param.detach())
    torch.testing.assert_close(results[1], results[0], atol=1e-6, rtol=0)


def test_tied_frozen_and_gradless_parameters_step_as_often_as_they_should() -> None:
    """The tied weight is one parameter stepped once per step; the frozen one never moves
    and gets no state; one without a gradient on a step does not count that step."""
    model = OddModel()
    names = [name for name, _ in model.named_parameters()]
    assert names.count("embed.weight") == 1 and "head.weight" not in names
    case = one_case_per_algorithm()[0]
    optimizer = case.make(model.parameters())
    frozen_before = model.frozen.detach().clone()
    for step in range(3):
        tokens = torch.arange(8) % 10
        image = torch.ones(2, 2, 5, 5).to(memory_format=torch.channels_last)
        model(tokens, image, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(model.frozen, frozen_before)
    assert model.frozen not in optimizer.state
    # stepped on steps 0 and 2 only
    assert float(optimizer.state[model.sometimes]["step"]) == 2.0
    assert float(optimizer.state[model.embed.weight]["step"]) == 3.0


@pytest.mark.bad_input
@pytest.mark.parametrize("state_precision", ["full", "8bit"])
@pytest.mark.parametrize("backend", ["default", *BACKENDS])
def test_state_of_a_parameter_replaced_by_another_shape_is_refused_before_any_change(
    backend: str, state_precision: str
) -> None:
    """`p.data = ` a tensor of another shape with as many elements: the loop and foreach
    backends failed halfway with torch's broadcast error, and the fused ones stepped,
    pairing state elements by memory order (8-bit codes decoded with another block's
    scale). Refused on every backend, naming the state, before anything changes; once
    the state is cleared the parameter trains on."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(32, 384))
    other = nn.Parameter(torch.randn(8))
    optimizer = core.AdamW(
        [other, weight],
        lr=1e-3,
        state_precision=state_precision,
        **({} if backend == "default" else BACKENDS[backend]),
    )
    for _ in range(2):
        for p in (weight, other):
            p.grad = torch.randn_like(p)
        optimizer.step()
    weight.data = torch.randn(64, 192)
    for p in (weight, other):
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in (weight, other)], copy.deepcopy(optimizer.state_dict())
    key = "exp_avg_codes" if state_precision == "8bit" else "exp_avg"
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"Invalid state of params[1] in param group 0: {key} of shape (32, 384) beside a "
            "parameter of shape (64, 192). Allowed: shape (64, 192)"
        ),
    ):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip((weight, other), before[0], strict=True))
    assert optimizer.state_dict()["state"][0]["step"] == before[1]["state"][0]["step"]
    del optimizer.state[weight]
    optimizer.step()
    assert float(optimizer.state[weight]["step"]) == 1.0


HAND_SET_STATE = {
    "integer moment": ("exp_avg", lambda m: m.to(torch.int16), "exp_avg of dtype torch.int16"),
    "complex moment": ("exp_avg", lambda m: m.to(torch.complex64), "of dtype torch.complex64"),
    "expanded moment": ("exp_avg_sq", lambda m: m[:1].expand_as(m), "several elements in one"),
    "0-dim moment": ("exp_avg", lambda m: m.sum(), "exp_avg of shape () beside"),
    "not a tensor": ("exp_avg", lambda m: 0.5, "exp_avg that is a float, not a tensor"),
    "negative step": ("step", lambda s: torch.tensor(-5.0), "step is of shape () holding -5.0"),
    "NaN step": ("step", lambda s: torch.tensor(float("nan")), "step is of shape () holding nan"),
    "step of no number": ("step", lambda s: torch.zeros(3), "step is of shape (3,)"),
    "negated view": (
        "exp_avg",
        lambda m: (-m)._neg_view(),
        "exp_avg of shape (8, 64) with torch's negative bit set",
    ),
    "ZeroTensor moment": (
        "exp_avg_sq",
        lambda m: torch._efficientzerotensor(m.shape),
        "exp_avg_sq of shape (8, 64) that is a ZeroTensor",
    ),
    "moment on another device": (
        "exp_avg",
        lambda m: torch.empty_like(m, device="meta"),
        "exp_avg on meta beside a parameter of shape (8, 64). Allowed: a tensor on the "
        "parameter's device (cpu)",
    ),
}


@pytest.mark.parametrize("how", ["loaded", "set by hand"])
@pytest.mark.parametrize("backend", ["default", *BACKENDS])
def test_complex_moments_follow_their_parameter_and_real_ones_are_refused(
    backend: str, how: str
) -> None:
    """A complex128 moment beside a complex64 parameter is cast to it, as real moments
    are (the step failed inside torch after the other parameter was updated); a real
    moment beside a complex parameter is refused by name before anything changes."""
    flags = {} if backend == "default" else BACKENDS[backend]

    def run(moment_dtype: torch.dtype | None) -> tuple[core.Adam, list[nn.Parameter]]:
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(4, dtype=torch.complex64))]
        optimizer = core.Adam(params, lr=1e-2, **flags)
        for step in range(3):
            if step == 1 and moment_dtype is not None:
                saved = optimizer.state_dict()
                state = saved["state"][1] if how == "loaded" else optimizer.state[params[1]]
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = state[key].to(moment_dtype)
                if how == "loaded":
                    optimizer.load_state_dict(saved)
            for p in params:
                p.grad = torch.full_like(p, 0.5 + 0.1 * step)
            optimizer.step()
        return optimizer, params

    _, expected = run(None)
    optimizer, cast = run(torch.complex128)
    assert optimizer.state[cast[1]]["exp_avg"].dtype == torch.complex64
    assert all(torch.equal(a, b) for a, b in zip(cast, expected, strict=True))
    message = r"exp_avg.* torch\.float32.* the parameter's kind \(torch\.complex64"
    with pytest.raises(ValueError, match=message):
        run(torch.float32)


@pytest.mark.bad_input
@pytest.mark.parametrize("stepped_before", [0, 2])
@pytest.mark.parametrize("backend", ["default", *BACKENDS])
def test_a_gradient_in_its_parameters_memory_is_refused_before_any_change(
    backend: str, stepped_before: int
) -> None:
    """p.grad = p.detach(): each backend read it in its own order around the update (the
    fused kernel's pointers are restrict), NAdam's 1e-4 apart after three steps; the
    functional forms refused it, the classes did not (also after a memoized step)."""
    torch.manual_seed(0)
    other, weight = nn.Parameter(torch.randn(8, 64)), nn.Parameter(torch.randn(8, 64))
    flags = {} if backend == "default" else BACKENDS[backend]
    optimizer = core.NAdam([other, weight], lr=1e-2, weight_decay=0.5, decouple_wd=True, **flags)
    for _ in range(stepped_before):
        for p in (other, weight):
            p.grad = torch.randn_like(p)
        optimizer.step()
    other.grad, weight.grad = torch.randn_like(other), weight.detach()
    before = [p.detach().clone() for p in (other, weight)]
    with pytest.raises(
        ValueError,
        match=r"Invalid grad of params\[1\] in param group 0: its memory is that of its parameter",
    ):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip((other, weight), before, strict=True))
    assert {float(optimizer.state[p].get("step", 0)) for p in (other, weight)} == {stepped_before}


@pytest.mark.bad_input
@pytest.mark.parametrize("backend", ["default", *BACKENDS])
def test_state_made_on_meta_is_refused_once_the_model_is_materialized(backend: str) -> None:
    """A model built on meta and stepped there, then materialized in place (to_empty with
    swapped parameters): its moments stayed on meta. torch's fused Adam ran such a step
    as nothing (the default flags: counts advanced, no parameter moved, silently); the
    loop failed midway. Refused by name before any change; a fresh state then trains."""
    flags = {} if backend == "default" else BACKENDS[backend]
    with torch.device("meta"):
        model = nn.Linear(64, 8)
    # fused=True is refused for meta parameters: set once they are materialized
    torch_values = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}
    optimizer = core.AdamW(model.parameters(), **torch_values, **{**flags, "fused": None})
    model(torch.randn(4, 64, device="meta")).sum().backward()
    optimizer.step()
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)
    model.reset_parameters()
    model.zero_grad()  # to_empty made the meta gradients empty CPU tensors too
    optimizer.param_groups[0]["fused"] = flags.get("fused")
    model(torch.randn(4, 64)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"exp_avg on meta beside .*del optimizer"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    optimizer.state.clear()
    reference = torch.optim.AdamW([b.clone().requires_grad_() for b in before], **torch_values)
    for p, q in zip(model.parameters(), reference.param_groups[0]["params"], strict=True):
        q.grad = p.grad.clone()
    optimizer.step()
    reference.step()
    for p, q in zip(model.parameters(), reference.param_groups[0]["params"], strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(HAND_SET_STATE))
@pytest.mark.parametrize("backend", ["default", *BACKENDS])
def test_state_set_by_hand_that_no_step_can_take_is_refused_before_any_change(
    backend: str, case: str
) -> None:
    """State replaced by hand with what no step can read: before, torch's errors (naming no
    argument) came from the middle of the step, after other parameters had been updated,
    and a negative step count made RAdam's rectification complex inside the C call."""
    key, replace, message = HAND_SET_STATE[case]
    torch.manual_seed(0)
    other, weight = nn.Parameter(torch.randn(8, 64)), nn.Parameter(torch.randn(8, 64))
    flags = {} if backend == "default" else BACKENDS[backend]
    optimizer = core.RAdam([other, weight], lr=1e-3, **flags)

    def edit(state: dict) -> None:
        state[key] = replace(state[key])

    _edited_state_is_refused_before_any_change(optimizer, edit, ".*" + re.escape(message))


def _edited_state_is_refused_before_any_change(
    optimizer: torch.optim.Optimizer, edit: Any, message: str
) -> None:
    """Two steps of both parameters (the second memoized), `edit` of the second's state,
    then a step refused with `message` (a regex after the parameter's index) before
    either parameter or the first's state changed."""
    other, weight = optimizer.param_groups[0]["params"]
    for _ in range(2):
        for p in (other, weight):
            p.grad = torch.randn_like(p)
        optimizer.step()
    edit(optimizer.state[weight])
    before = [p.detach().clone() for p in (other, weight)]
    other_state = {k: v.clone() for k, v in optimizer.state[other].items()}
    with pytest.raises(
        ValueError, match=r"Invalid state of params\[1\] in param group 0: " + message
    ):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip((other, weight), before, strict=True))
    for k, v in other_state.items():
        assert torch.equal(optimizer.state[other][k], v), k


def _param(optimizer: torch.optim.Optimizer, index: int) -> Tensor:
    return optimizer.param_groups[0]["params"][index]


SHARED_MEMORY = {
    # loop and foreach: NaN after one step; fused: finite; Triton: other numbers again
    "m given v": (
        lambda optimizer, state, m, v: state.__setitem__(m, state[v]),
        "{v} starts in the memory of params[1]'s {m},",
    ),
    "v of another parameter": (
        lambda optimizer, state, m, v: state.__setitem__(
            v, optimizer.state[_param(optimizer, 0)][v]
        ),
        "{v} starts in the memory of params[0]'s {v},",
    ),
    "m given the parameter's memory": (
        lambda optimizer, state, m, v: state.__setitem__(m, _param(optimizer, 1).data),
        "{m} starts in the memory of params[1],",
    ),
    # the counter and v[0, 0] both advanced, to 2.99 where the count should be 3
    "a counter that is a view of v": (
        lambda optimizer, state, m, v: state.__setitem__("step", state[v][0, 0]),
        "{v} starts in the memory of params[1]'s step,",
    ),
}
SHARED_MEMORY_CASES = [(case, "full") for case in SHARED_MEMORY] + [
    (case, "8bit")
    for case in ("m given v", "v of another parameter")  # the others: dtypes
]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("case", "state_precision"),
    SHARED_MEMORY_CASES,
    ids=[f"{c}-{p}" for c, p in SHARED_MEMORY_CASES],
)
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_state_sharing_memory_set_by_hand_is_refused_before_any_change(
    backend: str, case: str, state_precision: str
) -> None:
    """State tensors given one memory by hand were stepped, each backend writing it in its
    own order (NAdam: NaN on the loop and foreach backends, finite on the fused ones),
    while the functional forms refused the same lists. Refused by name now, as they are,
    before anything changes (compared by first address, as there)."""
    edit, message = SHARED_MEMORY[case]
    m, v = (
        moment_keys(key)[0] if state_precision == "8bit" else key
        for key in ("exp_avg", "exp_avg_sq")
    )
    torch.manual_seed(0)
    other, weight = nn.Parameter(torch.randn(64, 128)), nn.Parameter(torch.randn(64, 128))
    optimizer = core.NAdam(
        [other, weight], lr=1e-2, state_precision=state_precision, **TRAINING_BACKENDS[backend]
    )
    _edited_state_is_refused_before_any_change(
        optimizer, lambda state: edit(optimizer, state, m, v), re.escape(message.format(m=m, v=v))
    )


@pytest.mark.bad_input
@pytest.mark.parametrize("where", ["another group", "a parameter without a gradient"])
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_state_sharing_memory_beyond_the_stepped_group_is_refused(backend: str, where: str) -> None:
    """Memory shared with another group's state made its v negative and the parameter NaN
    after three steps; a moment in the memory of a parameter without a gradient that step
    rewrote that parameter's weights. Every group and parameter is compared."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(8, 64)) for _ in range(2)]
    groups = [{"params": [p]} for p in params] if where == "another group" else [{"params": params}]
    optimizer = core.AdamW(groups, lr=1e-2, **TRAINING_BACKENDS[backend])
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    if where == "another group":
        optimizer.state[params[1]]["exp_avg"] = optimizer.state[params[0]]["exp_avg_sq"]
        message = (
            "params[0] in param group 1: exp_avg starts in the memory of params[0]'s "
            "exp_avg_sq in param group 0,"
        )
    else:
        optimizer.state[params[1]]["exp_avg"] = params[0].data
        params[0].grad = None
        message = "params[1] in param group 0: exp_avg starts in the memory of params[0],"
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=re.escape(f"Invalid state of {message}")):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


@pytest.mark.bad_input
@pytest.mark.parametrize("entry", [None, [], 3], ids=["None", "list", "int"])
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_state_entry_set_by_hand_to_no_dict_is_refused_by_name(backend: str, entry: Any) -> None:
    """optimizer.state[p] = None (or a list, a number) failed inside the step with an
    AttributeError or TypeError naming nothing; loading such an entry was refused by name
    already. Nothing changes before the error."""
    torch.manual_seed(0)
    other, weight = nn.Parameter(torch.randn(8, 64)), nn.Parameter(torch.randn(8, 64))
    optimizer = core.AdamW([other, weight], lr=1e-2, **TRAINING_BACKENDS[backend])
    for _ in range(2):
        for p in (other, weight):
            p.grad = torch.randn_like(p)
        optimizer.step()
    optimizer.state[weight] = entry
    before = [p.detach().clone() for p in (other, weight)]
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"Invalid state of params[1] in param group 0: {type(entry).__name__} {entry!r}, "
            "not a dict. Allowed: a dict of the parameter's state"
        ),
    ):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip((other, weight), before, strict=True))
    assert float(optimizer.state[other]["step"]) == 2


@pytest.mark.bad_input
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_state_checks_see_dict_subclasses_and_parameters_without_gradients(backend: str) -> None:
    """An OrderedDict state was passed over by the sharing check (m given v's tensor,
    accepted), and a state entry that is no dict, of a parameter without a gradient that
    step, failed inside the step with an AttributeError. A count set by hand as an int is
    kept as a float32 tensor only once every check has passed."""
    from collections import OrderedDict

    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(8, 64)) for _ in range(2)]
    optimizer = core.AdamW(params, lr=1e-2, **TRAINING_BACKENDS[backend])
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    state = OrderedDict(optimizer.state[params[1]])
    state["exp_avg"], state["step"] = state["exp_avg_sq"], 1
    optimizer.state[params[1]] = state
    with pytest.raises(ValueError, match=r"params\[1\] in param group 0: exp_avg_sq starts in"):
        optimizer.step()
    assert state["step"] == 1  # not made a tensor before the refusal
    optimizer.state[params[1]], params[1].grad = [], None
    with pytest.raises(ValueError, match=r"params\[1\] in param group 0: list \[\], not a dict"):
        optimizer.step()


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_tensor_without_storage_under_a_key_of_ones_own_steps(backend: str) -> None:
    """State keys adamkit does not write are the user's: a sparse tensor kept there made
    every step fail reading its (absent) memory once memory sharing was compared."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(8, 64)) for _ in range(2)]
    optimizer = core.AdamW(params, lr=1e-2, **TRAINING_BACKENDS[backend])
    for round_ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        if round_ == 1:  # another list of parameters with gradients: no memo, all checked
            params[1].grad = None
        optimizer.step()
        if round_ == 0:
            optimizer.state[params[0]]["mine"] = torch.eye(3).to_sparse()
    assert [float(optimizer.state[p]["step"]) for p in params] == [3, 2]


@pytest.mark.bad_input
def test_a_state_dict_sharing_memory_is_refused_before_loading() -> None:
    """torch keeps a loaded tensor of the parameter's dtype and device as it is, so a
    state dict whose moments share memory (edited, or saved so) was loaded as it was."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(8, 64)) for _ in range(2)]
    optimizer = core.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    saved["state"][1]["exp_avg"] = saved["state"][0]["exp_avg"]
    before = {k: v.clone() for k, v in optimizer.state[params[1]].items()}
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Invalid state_dict for AdamW: state[1]['exp_avg'] starts in the memory of "
            "state[0]['exp_avg'], which a step also writes in place. Allowed: a tensor of "
            "its own (.clone() it)."
        ),
    ):
        optimizer.load_state_dict(saved)
    for key, value in before.items():
        assert torch.equal(optimizer.state[params[1]][key], value), key
    del saved["state"][1]  # a parameter without saved state is compared as well
    saved["state"][0]["exp_avg"] = params[1].data
    with pytest.raises(ValueError, match=re.escape("in the memory of the parameter of state[1],")):
        optimizer.load_state_dict(saved)
    for key, value in before.items():
        assert torch.equal(optimizer.state[params[1]][key], value), key


HAND_SET_8BIT_STATE = {
    # int8 codes stepped, each backend decoding them its own way (three different results)
    "int8 codes": (
        "exp_avg_codes",
        lambda codes: codes.view(torch.int8),
        "exp_avg_codes of dtype torch.int8 beside a parameter of shape (64, 128). Allowed: "
        "torch.uint8",
    ),
    # float64 scales failed midway through the step with torch's dtype error
    "float64 scales": (
        "exp_avg_sq_absmax",
        lambda scales: scales.double(),
        "exp_avg_sq_absmax of dtype torch.float64 beside a parameter of shape (64, 128). "
        "Allowed: torch.float32",
    ),
}


BROKEN_8BIT_FORMS = {
    # a KeyError from the middle of the step
    "codes without scales": (
        lambda state: state.pop("exp_avg_absmax"),
        "exp_avg_codes comes without 'exp_avg_absmax' beside a parameter of shape (64, 128). "
        "Allowed: an 8-bit moment's codes and scales together.",
    ),
    # m restarted from zero, silently
    "scales without codes": (
        lambda state: state.pop("exp_avg_sq_codes"),
        "exp_avg_sq_absmax comes without 'exp_avg_sq_codes' beside a parameter of shape "
        "(64, 128). Allowed: an 8-bit moment's codes and scales together.",
    ),
    # stepped, then its state_dict() was refused by load_state_dict
    "both forms": (
        lambda state: state.__setitem__("exp_avg", torch.zeros(64, 128)),
        "exp_avg comes with 'exp_avg_codes' as well beside a parameter of shape (64, 128). "
        "Allowed: a moment in one form: full precision or 8-bit codes and scales.",
    ),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(BROKEN_8BIT_FORMS))
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_8bit_moment_edited_out_of_its_form_is_refused_before_any_change(
    backend: str, case: str
) -> None:
    edit, message = BROKEN_8BIT_FORMS[case]
    torch.manual_seed(0)
    other, weight = nn.Parameter(torch.randn(64, 128)), nn.Parameter(torch.randn(64, 128))
    optimizer = core.AdamW(
        [other, weight], lr=1e-3, state_precision="8bit", **TRAINING_BACKENDS[backend]
    )
    _edited_state_is_refused_before_any_change(optimizer, edit, re.escape(message))


LOADED_8BIT_FORMS = {
    "codes without scales": "state[1]['exp_avg_codes'] comes without 'exp_avg_absmax'",
    # was refused as a state that "lacks ['exp_avg_sq']", naming no 8-bit key
    "scales without codes": "state[1]['exp_avg_sq_absmax'] comes without 'exp_avg_sq_codes'",
    "both forms": "state[1]['exp_avg'] comes with 'exp_avg_codes' as well",
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(BROKEN_8BIT_FORMS))
def test_a_loaded_8bit_moment_out_of_its_form_is_refused_by_its_key(case: str) -> None:
    edit, _ = BROKEN_8BIT_FORMS[case]
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(64, 128)) for _ in range(2)]
    optimizer = core.AdamW(params, lr=1e-3, state_precision="8bit")
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    before = copy.deepcopy(optimizer.state_dict())
    edit(saved["state"][1])
    with pytest.raises(ValueError, match=re.escape(LOADED_8BIT_FORMS[case])):
        optimizer.load_state_dict(saved)
    for key, value in before["state"][1].items():
        assert torch.equal(optimizer.state[params[1]][key], value), key


MISSING_PROGRESS = {
    # each was made afresh beside the others: v at 0 with the step kept, ~50x the update
    "v": (("exp_avg_sq",), "exp_avg_sq is missing from a state that holds ['exp_avg', 'step']"),
    "m": (("exp_avg",), "exp_avg is missing from a state that holds ['exp_avg_sq', 'step']"),
    "step": (("step",), "step is missing from a state that holds ['exp_avg', 'exp_avg_sq']"),
    "both moments": (
        ("exp_avg", "exp_avg_sq"),
        "exp_avg is missing from a state that holds ['step']",
    ),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("state_precision", ["full", "8bit"])
@pytest.mark.parametrize("case", list(MISSING_PROGRESS))
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_state_key_deleted_by_hand_is_refused_before_any_change(
    backend: str, case: str, state_precision: str
) -> None:
    """torch.optim fails with a KeyError; adamkit restarted that key alone, silently.
    Deleting the whole state (del optimizer.state[p]) still restarts the parameter."""
    keys, message = MISSING_PROGRESS[case]
    torch.manual_seed(0)
    other, weight = nn.Parameter(torch.randn(64, 128)), nn.Parameter(torch.randn(64, 128))
    optimizer = core.AdamW(
        [other, weight], lr=1e-3, state_precision=state_precision, **TRAINING_BACKENDS[backend]
    )

    def edit(state: dict) -> None:
        for key in keys:
            for stored in (key, *moment_keys(key)):
                state.pop(stored, None)

    _edited_state_is_refused_before_any_change(optimizer, edit, re.escape(message))
    del optimizer.state[weight]
    optimizer.step()
    assert float(optimizer.state[weight]["step"]) == 1


@pytest.mark.bad_input
@pytest.mark.parametrize("saved_and_loaded", [False, True])
@pytest.mark.parametrize("state_precision", ["full", "8bit"])
@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
def test_a_moment_deleted_from_an_open_window_at_step_0_is_refused(
    key: str, state_precision: str, saved_and_loaded: bool
) -> None:
    """Micro-batches folded into a window (optimizer accumulation) are progress at step 0:
    without v the closing update was ~107x the intact window's. Taken for an interrupted
    first step, it was accepted (loaded: since loading completes such a step too)."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(64, 128))
    optimizer = core.AdamW([weight], lr=1e-3, state_precision=state_precision)
    optimizer.optimizer_accumulation = True
    for _ in range(2):
        weight.grad = torch.randn_like(weight)
        optimizer.step()
    state = optimizer.state[weight]
    assert float(state["step"]) == 0 and float(state["window_microbatches"]) == 2
    for stored in (key, *moment_keys(key)):
        state.pop(stored, None)
    if saved_and_loaded:
        saved = optimizer.state_dict()
        loading = core.AdamW([weight], lr=1e-3, state_precision=state_precision)
        with pytest.raises(ValueError, match=rf"the state of parameter 0 lacks \['{key}'\]"):
            loading.load_state_dict(saved)
        assert not loading.state
        return
    optimizer.optimizer_accumulation = False
    before = weight.detach().clone()
    with pytest.raises(ValueError, match=rf"{key} is missing from a state that holds"):
        optimizer.step()
    assert torch.equal(weight, before)


@pytest.mark.parametrize("saved_and_loaded", [False, True])
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_first_step_that_failed_making_its_moments_is_completed_on_retry(
    backend: str, saved_and_loaded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An out-of-memory error while the first step makes v (Composer's automatic
    micro-batching catches it and retries) leaves {step: 0, exp_avg}: the retry completes
    it, where a stepped state lacking v is refused; so does the next step after loading a
    checkpoint of it (load_state_dict refused it)."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(64, 128))
    optimizer = core.AdamW([weight], lr=1e-3, **TRAINING_BACKENDS[backend])
    weight.grad = torch.randn_like(weight)
    real, made = torch.zeros_like, []

    def out_of_memory_at_the_second(*args: Any, **kwargs: Any) -> Tensor:
        made.append(args)
        if len(made) == 2:
            raise torch.OutOfMemoryError("simulated")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros_like", out_of_memory_at_the_second)
    with pytest.raises(torch.OutOfMemoryError):
        optimizer.step()
    monkeypatch.setattr(torch, "zeros_like", real)
    assert sorted(optimizer.state[weight]) == ["exp_avg", "step"]
    if saved_and_loaded:  # a checkpoint taken then is completed as the live state is
        saved = optimizer.state_dict()
        optimizer = core.AdamW([weight], lr=1e-3, **TRAINING_BACKENDS[backend])
        optimizer.load_state_dict(saved)
    before = weight.detach().clone()
    optimizer.step()
    reference = torch.optim.AdamW([before.requires_grad_()], lr=1e-3, betas=(0.9, 0.99), eps=1e-6)
    before.grad = weight.grad
    reference.step()
    torch.testing.assert_close(weight, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "count",
    [
        2,
        2.0,
        torch.tensor(2),
        torch.tensor([2.0]),
        torch.tensor(2.0, dtype=torch.float64),
        torch.tensor(2.0),
    ],
    ids=["int", "float", "int64 tensor", "1-element tensor", "float64 tensor", "shared counter"],
)
@pytest.mark.parametrize("groups", ["one group", "a group each"])
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_step_count_set_by_hand_as_any_number_steps_as_loaded(
    backend: str, count: Any, groups: str
) -> None:
    """As load_state_dict takes it: an int64 tensor failed after the parameters were
    updated (counters half advanced), a number or a 1-D tensor in torch.stack, and one
    float32 counter set into every state counted once per parameter each step (across
    groups, until the check saw all of them at once)."""
    count = count.clone() if isinstance(count, Tensor) else count  # the case's own object

    def by_loading(optimizer: core.RAdam, params: list[nn.Parameter]) -> None:
        saved = optimizer.state_dict()
        for state in saved["state"].values():
            state["step"] = count
        optimizer.load_state_dict(saved)

    def by_hand(optimizer: core.RAdam, params: list[nn.Parameter]) -> None:
        for p in params:  # one object in every state
            optimizer.state[p]["step"] = count

    runs = []
    for set_count in (by_loading, by_hand):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(8, 64)) for _ in range(3)]
        listed = [params] if groups == "one group" else [[p] for p in params]
        optimizer = core.RAdam(
            [{"params": each} for each in listed], lr=1e-3, **TRAINING_BACKENDS[backend]
        )
        for _ in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
        set_count(optimizer, params)
        optimizer.step()
        runs.append(params)
        for p in params:
            step = optimizer.state[p]["step"]
            assert step.dtype == torch.float32 and step.dim() == 0 and float(step) == 3
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_counter_of_another_groups_state_set_by_hand_counts_apart(backend: str) -> None:
    """The group whose state is unchanged steps from its memo, the other group checks
    only its own states: the one tensor advanced twice a step, for both, silently."""
    runs = []
    for share in (False, True):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(8, 64)) for _ in range(3)]
        groups = [{"params": params[:1]}, {"params": params[1:]}]
        optimizer = core.AdamW(groups, lr=1e-2, **TRAINING_BACKENDS[backend])
        for round_ in range(4):
            if share and round_ == 2:
                optimizer.state[params[2]]["step"] = optimizer.state[params[0]]["step"]
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
        assert [float(optimizer.state[p]["step"]) for p in params] == [4, 4, 4]
        runs.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(HAND_SET_8BIT_STATE))
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_8bit_state_set_by_hand_in_another_dtype_is_refused_before_any_change(
    backend: str, case: str
) -> None:
    key, replace, message = HAND_SET_8BIT_STATE[case]
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(64, 128))
    optimizer = core.AdamW([weight], lr=1e-3, state_precision="8bit", **TRAINING_BACKENDS[backend])
    for _ in range(2):
        weight.grad = torch.randn_like(weight)
        optimizer.step()
    optimizer.state[weight][key] = replace(optimizer.state[weight][key])
    before = weight.detach().clone()
    with pytest.raises(
        ValueError, match=r"Invalid state of params\[0\] in param group 0: " + re.escape(message)
    ):
        optimizer.step()
    assert torch.equal(weight, before)


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_lazy_modules_may_be_given_to_the_optimizer_before_their_first_forward(
    backend: str,
) -> None:
    """torch.optim takes a LazyLinear's parameters before the forward that gives them
    memory (filled in place, the same objects); core refused them with torch's internal
    "uninitialized parameter" error from its overlap check."""
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    y = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    hyperparameters = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}
    trained = []
    for make in (
        lambda params: torch.optim.AdamW(params, **hyperparameters),
        lambda params: core.AdamW(params, **hyperparameters, **TRAINING_BACKENDS[backend]),
    ):
        torch.manual_seed(2)
        model = nn.Sequential(nn.LazyLinear(8), nn.Tanh(), nn.Linear(8, 3))
        optimizer = make(model.parameters())
        for _ in range(STEPS):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        trained.append(list(model.parameters()))
    for expected, param in zip(*trained, strict=True):
        torch.testing.assert_close(param, expected, atol=1e-6, rtol=0)


ALGORITHMS = (core.Adam, core.AdamW, core.RAdam, core.NAdam, core.ADOPT)
LAZY_VALUES = {
    # a negative-bit view holds -values in its memory and reads as values
    "negated": (lambda values: (-values)._neg_view(), lambda values: values),
    # a ZeroTensor has no memory (data_ptr 0) and reads as zeros
    "ZeroTensor": (
        lambda values: torch._efficientzerotensor(values.shape, dtype=values.dtype),
        torch.zeros_like,
    ),
}
"""Tensors whose memory does not hold their values (core.backends.views.lazy_values): how to
make one from values, and the plain tensor it reads as."""


def _lazy_values_run(
    optimizer_class: type[core.AdamFamilyOptimizer], flags: dict, kind: str, lazy: bool
) -> list[Tensor]:
    """An fp32 and a bf16 parameter (8-bit state applies to both) stepped four times, the
    last two with gradients of this kind of lazy values (lazy) or the plain tensors they
    read as (not lazy): the first two steps leave each backend a memo to reuse."""
    generator = torch.Generator().manual_seed(0)
    params = [
        nn.Parameter(torch.randn(32, 128, generator=generator).to(dtype))
        for dtype in (torch.float32, torch.bfloat16)
    ]
    assert params[0].numel() >= MIN_QUANTIZED_NUMEL  # 8-bit state where asked
    optimizer = optimizer_class(params, lr=1e-2, **flags)
    make_lazy, read_as = LAZY_VALUES[kind]
    for step in range(4):
        for p in params:
            values = torch.randn(p.shape, generator=generator).to(p.dtype)
            p.grad = (make_lazy if lazy else read_as)(values) if step >= 2 else values
        optimizer.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("kind", list(LAZY_VALUES))
@pytest.mark.parametrize("state_precision", ["full", "8bit"])
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize("optimizer_class", ALGORITHMS, ids=lambda c: c.__name__)
def test_gradients_whose_memory_does_not_hold_their_values_step_as_their_values(
    optimizer_class: type[core.AdamFamilyOptimizer], backend: str, state_precision: str, kind: str
) -> None:
    """A gradient with torch's negative bit holds its values negated in memory, and a
    ZeroTensor has no memory at all. The C and Triton kernels read memory, so every fused
    step (the default included, on fp32 and bf16, full and 8-bit state) moved a parameter
    with a negated gradient the wrong way, and took a ZeroTensor's address 0 and crashed
    the process; torch's own fused kernel (fp32 AdamW) failed on both with its internal
    errors. Now each equals the same backend stepped with the plain gradients."""
    flags = {**TRAINING_BACKENDS[backend], "state_precision": state_precision}
    actual = _lazy_values_run(optimizer_class, flags, kind, lazy=True)
    expected = _lazy_values_run(optimizer_class, flags, kind, lazy=False)
    for got, want in zip(actual, expected, strict=True):
        assert torch.equal(got, want), got.dtype


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_complex_parameter_used_through_conj_trains_where_torch_optim_refuses(
    backend: str,
) -> None:
    """Autograd gives a complex parameter used through .conj() a gradient with the
    conjugate bit, on which torch.optim's AdamW (every backend) fails in view_as_real:
    core steps it as its values, equal to the same backend given the resolved gradient."""

    def train(resolve: bool) -> Tensor:
        generator = torch.Generator().manual_seed(0)
        param = nn.Parameter(torch.randn(16, 32, dtype=torch.complex64, generator=generator))
        optimizer = core.AdamW([param], lr=1e-2, **TRAINING_BACKENDS[backend])
        for _ in range(3):
            weight = torch.randn(16, 32, dtype=torch.complex64, generator=generator)
            optimizer.zero_grad()
            (param.conj() * weight).real.sum().backward()
            assert param.grad is not None and param.grad.is_conj()
            if resolve:
                param.grad = param.grad.resolve_conj()
            optimizer.step()
        return param.detach()

    param = nn.Parameter(torch.randn(4, dtype=torch.complex64))
    (param.conj() * 2).real.sum().backward()
    with pytest.raises(RuntimeError, match="view_as_real doesn't work on unresolved conj"):
        torch.optim.AdamW([param]).step()
    assert torch.equal(train(resolve=False), train(resolve=True))


PARAMETER_PROBLEMS = {
    "negated": "with torch's negative bit set (its memory holds its values negated), which "
    "the fused kernels would read and write wrongly. Allowed: a tensor holding its own "
    "values (.resolve_neg() it).",
    "ZeroTensor": "that is a ZeroTensor (no memory of its own), which the fused kernels would "
    "read and write wrongly. Allowed: a tensor holding its own values (.clone() it).",
}


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", list(LAZY_VALUES))
@pytest.mark.parametrize("backend", ["default", *BACKENDS])
def test_a_parameter_whose_memory_does_not_hold_its_values_is_refused_before_any_change(
    backend: str, kind: str
) -> None:
    """A parameter with torch's negative bit (made so, for instance, by `p.data =` a
    negated view) holds its values negated in memory, which the fused kernels would write
    as its values, and a ZeroTensor has no memory to write: refused when added and, after
    `.data` replacement, before a step changes anything."""
    flags = {} if backend == "default" else BACKENDS[backend]
    make_lazy = LAZY_VALUES[kind][0]
    message = re.escape(
        "Invalid params[1] in param group 0: a tensor of shape (8, 64) " + PARAMETER_PROBLEMS[kind]
    )
    other = nn.Parameter(torch.randn(8, 64))
    with pytest.raises(ValueError, match=message):
        core.AdamW([other, nn.Parameter(make_lazy(torch.randn(8, 64)))], lr=1e-3, **flags)
    weight = nn.Parameter(torch.randn(8, 64))
    optimizer = core.AdamW([other, weight], lr=1e-3, **flags)
    for _ in range(2):
        for p in (other, weight):
            p.grad = torch.randn_like(p)
        optimizer.step()
    weight.data = make_lazy(torch.randn(8, 64))
    before = [p.detach().clone() for p in (other, weight)]
    state = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=message):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip((other, weight), before, strict=True))
    assert optimizer.state_dict()["state"][0]["step"] == state["state"][0]["step"]
    weight.data = torch.randn(8, 64)
    optimizer.step()
    assert float(optimizer.state[weight]["step"]) == 3.0


@pytest.mark.parametrize("kind", list(LAZY_VALUES))
@pytest.mark.parametrize("state_precision", ["full", "8bit"])
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_state_whose_memory_does_not_hold_its_values_loads_and_counts_as_its_values(
    backend: str, state_precision: str, kind: str
) -> None:
    """torch's load_state_dict keeps a saved tensor as it is: the kernels then read and
    wrote the memory of one with the negative bit (its moments negated; the host-scalar
    helpers counted its step down) and read a ZeroTensor's address 0. Such a state dict
    (ZeroTensors exist in memory only: torch.save refuses them) now continues exactly as
    the same state dict of plain tensors."""
    flags = {**TRAINING_BACKENDS[backend], "state_precision": state_precision}
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(64, 128, generator=generator)
    grads = [torch.randn(64, 128, generator=generator) for _ in range(3)]
    source = nn.Parameter(start.clone())
    optimizer = core.AdamW([source], lr=1e-2, **flags)
    source.grad = grads[0]
    optimizer.step()
    saved = optimizer.state_dict()
    lazy = copy.deepcopy(saved)
    make_lazy, read_as = LAZY_VALUES[kind]
    plain = copy.deepcopy(saved)
    lazy["state"][0], plain["state"][0] = (
        {
            key: change(value) if value.is_floating_point() and key != "step" else value
            for key, value in saved["state"][0].items()
        }
        for change in (make_lazy, read_as)
    )
    if kind == "negated":  # the step counter too: 0-dim tensors take the host helpers
        lazy["state"][0]["step"] = make_lazy(saved["state"][0]["step"])
    results = []
    for state_dict in (lazy, plain):
        param = nn.Parameter(source.detach().clone())
        resumed = core.AdamW([param], lr=1e-2, **flags)
        resumed.load_state_dict(state_dict)
        for grad in grads[1:]:
            param.grad = grad
            resumed.step()
        assert float(resumed.state[param]["step"]) == 3.0
        results.append(param.detach())
    assert torch.equal(*results)


@pytest.mark.bad_input
@pytest.mark.parametrize("backend", ["default", *BACKENDS])
def test_a_float8_parameter_that_trains_is_refused_and_frozen_ones_are_skipped(
    backend: str,
) -> None:
    """The update math has no float8 (torch has no lerp or sqrt for it): a float8 parameter
    that requires grad failed midway through its first step with torch's
    NotImplementedError, after its state was made. It is refused by name when added; a
    frozen int8 or float8 weight among model.parameters() (a quantized base model) is
    accepted and never stepped, as torch.optim does."""
    flags = {} if backend == "default" else BACKENDS[backend]
    other = nn.Parameter(torch.randn(8, 64))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Invalid params[1] in param group 0: a tensor of shape (8, 64) and dtype "
            "torch.float8_e4m3fn, which no step computes in. Allowed: torch.bfloat16, "
        ),
    ):
        core.AdamW(
            [other, nn.Parameter(torch.randn(8, 64).to(torch.float8_e4m3fn))], lr=1e-3, **flags
        )
    frozen = [
        nn.Parameter(torch.randint(-8, 8, (8, 64), dtype=torch.int8), requires_grad=False),
        nn.Parameter(torch.randn(8, 64).to(torch.float8_e4m3fn), requires_grad=False),
    ]
    before = [p.detach().clone() for p in frozen]
    hyperparameters = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}
    ours = core.AdamW([other, *frozen], **hyperparameters, **flags)
    twin = nn.Parameter(other.detach().clone())
    theirs = torch.optim.AdamW([twin], **hyperparameters)
    for _ in range(3):
        other.grad = torch.randn_like(other)
        twin.grad = other.grad.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(other, twin, atol=1e-6, rtol=0)
    for param, saved in zip(frozen, before, strict=True):
        assert torch.equal(param.view(torch.int8), saved.view(torch.int8))
    assert not any(p in ours.state for p in frozen)


FREED = {
    "param": ("params[1]", lambda optimizer, weight: weight),
    "grad": ("grad of params[1]", lambda optimizer, weight: weight.grad),
    "state": (
        "state of params[1]",
        lambda optimizer, weight: optimizer.state[weight].get(
            "exp_avg", optimizer.state[weight].get("exp_avg_codes")
        ),
    ),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("target", list(FREED))
@pytest.mark.parametrize("state_precision", ["full", "8bit"])
@pytest.mark.parametrize("backend", ["default", *BACKENDS])
def test_a_tensor_whose_storage_was_freed_is_refused_before_any_change(
    backend: str, state_precision: str, target: str
) -> None:
    """`untyped_storage().resize_(0)` (how FSDP frees unsharded parameters) leaves a tensor
    its shape with no memory (address 0): the fused kernels, and torch's own foreach and
    loop operations, crashed the process on such a parameter, gradient or moment (as
    torch.optim's AdamW does). Refused by name with nothing changed, after memoized steps;
    with its storage allocated again the parameter trains on."""
    flags = {**({} if backend == "default" else BACKENDS[backend])}
    other = nn.Parameter(torch.randn(32, 128))
    weight = nn.Parameter(torch.randn(32, 128).to(torch.bfloat16))
    optimizer = core.AdamW([other, weight], lr=1e-2, state_precision=state_precision, **flags)
    for _ in range(2):
        for p in (other, weight):
            p.grad = torch.randn_like(p)
        optimizer.step()
    name, pick = FREED[target]
    freed = pick(optimizer, weight)
    kept = freed.detach().clone()
    before = other.detach().clone(), {k: v.clone() for k, v in optimizer.state[other].items()}
    freed.untyped_storage().resize_(0)
    needed = kept.numel() * kept.element_size()
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"Invalid {name} in param group 0: "
            + ("exp_avg" if target == "state" and state_precision == "full" else "")
            + ("exp_avg_codes" if target == "state" and state_precision == "8bit" else "")
        )
        + f".* whose storage holds 0 bytes, fewer than its elements need \\({needed}: freed",
    ):
        optimizer.step()
    assert torch.equal(other, before[0])
    for key, value in optimizer.state[other].items():
        assert torch.equal(value, before[1][key]), key
    freed.untyped_storage().resize_(needed)
    with torch.no_grad():
        freed.copy_(kept)
    optimizer.step()
    assert float(optimizer.state[weight]["step"]) == 3.0


@pytest.mark.bad_input
@pytest.mark.parametrize("backend", ["default", *BACKENDS])
def test_a_step_counter_whose_storage_was_freed_is_refused_before_any_change(
    backend: str,
) -> None:
    """From MIN_SCALARS parameters on, step counters are read and counted by C helpers
    through their addresses: one whose storage was freed (address 0) crashed the process
    in the check that reads them. Refused by name with nothing changed."""
    flags = {} if backend == "default" else BACKENDS[backend]
    params = [nn.Parameter(torch.randn(64)) for _ in range(cpu_kernel.MIN_SCALARS + 4)]
    optimizer = core.AdamW(params, lr=1e-2, **flags)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    before = [p.detach().clone() for p in params]
    optimizer.state[params[3]]["step"].untyped_storage().resize_(0)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Invalid state of params[3] in param group 0: step of shape () whose storage "
            "holds 0 bytes, fewer than its elements need (4: freed"
        ),
    ):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(float(optimizer.state[p]["step"]) == 2.0 for p in params if p is not params[3])


def _nested(rows: int, width: int) -> Tensor:
    return torch.nested.nested_tensor([torch.zeros(width) for _ in range(rows)])


@pytest.mark.bad_input
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_nested_tensor_is_refused_by_name_as_a_parameter_or_its_state(backend: str) -> None:
    """A nested tensor (same type and layout as a dense one) as a state tensor failed with
    torch's internal error from the checks ("doesn't support sizes"); as a functional
    form's argument it aborted the process inside the C++ checks. Refused by name, as a
    parameter, as state at a step (nothing changes) and as state in a checkpoint."""
    case = one_case_per_algorithm()[0]
    flags = TRAINING_BACKENDS[backend]
    with pytest.raises(ValueError, match=r"Invalid params\[0\] in param group 0: a nested"):
        case.make([nn.Parameter(_nested(4, 5))], **flags)
    param = nn.Parameter(torch.zeros(4, 5))
    optimizer = case.make([param], **flags)
    param.grad = torch.ones(4, 5)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    kept = param.detach().clone()
    for key, nested in (("exp_avg", _nested(4, 5)), ("step", _nested(1, 1))):
        held = optimizer.state[param][key]
        optimizer.state[param][key] = nested
        with pytest.raises(ValueError, match=rf"{key} that is a nested tensor beside"):
            optimizer.step()
        assert torch.equal(param.detach(), kept)
        optimizer.state[param][key] = held
    saved["state"][0]["exp_avg"] = _nested(4, 5)
    with pytest.raises(ValueError, match=r"state\[0\]\['exp_avg'\] is a nested tensor"):
        optimizer.load_state_dict(saved)
    # Among enough parameters that one C call reads the step counters: it read the nested
    # one's memory as a count, and recasting it failed with torch's internal error.
    params = [nn.Parameter(torch.zeros(3)) for _ in range(cpu_kernel.MIN_SCALARS + 4)]
    optimizer = case.make(params, **flags)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones(3)
        if optimizer.state:
            optimizer.state[params[5]]["step"] = _nested(1, 1)
            with pytest.raises(ValueError, match=r"params\[5\] .*step that is a nested"):
                optimizer.step()
        else:
            optimizer.step()
