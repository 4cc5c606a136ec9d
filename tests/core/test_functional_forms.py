"""Direct calls of the functional forms (core.adam, core.radam, core.nadam, core.adopt):
they check what they are handed, as the classes check their groups and state.

Before, a direct call took anything: an lr of NaN turned every parameter NaN, a moment
whose storage was freed or shrunk crashed the process (or had the fused kernels write
past it), a list shorter than params stepped a prefix, a moment passed twice or a
gradient that is its parameter stepped differently per backend, and a negated gradient
moved its parameter the wrong way on the fused kernels. Each case here runs as users call
the functional forms (no backend flag) and on each backend.
"""

from __future__ import annotations

import dataclasses
import fractions
from collections.abc import Callable
from typing import Any

import pytest
import torch

import core
from core.quantization import QuantizedMoment, quantized_state
from tests.core.cases import TRAINING_BACKENDS

FUNCTIONS = {"adam": core.adam, "radam": core.radam, "nadam": core.nadam, "adopt": core.adopt}
SHAPE = (64, 128)  # 8192 elements: the fused kernels' path, not a small-tensor one


def _arguments(name: str, backend: str, count: int = 2) -> dict[str, Any]:
    """Everything one call of the functional form takes, with fresh tensors."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(SHAPE, generator=generator) for _ in range(count)]
    arguments: dict[str, Any] = {
        "params": params,
        "grads": [torch.randn(SHAPE, generator=generator) for _ in params],
        "exp_avgs": [torch.randn(SHAPE, generator=generator) * 0.1 for _ in params],
        "exp_avg_sqs": [torch.rand(SHAPE, generator=generator) * 0.1 for _ in params],
        "state_steps": [torch.tensor(3.0) for _ in params],
        "lr": 1e-2,
        "beta1": 0.9,
        "beta2": 0.99,
        "eps": 1e-8,
        **TRAINING_BACKENDS[backend],
    }
    if name == "adam":
        arguments["max_exp_avg_sqs"] = [v.clone() for v in arguments["exp_avg_sqs"]]
        arguments["amsgrad"] = True
    if name == "nadam":
        arguments["mu_products"] = [torch.tensor(0.5) for _ in params]
    return arguments


def _tensors(arguments: dict[str, Any]) -> list[torch.Tensor]:
    """Copies of every tensor a call may change."""
    return [
        t.clone()
        for key, values in arguments.items()
        if isinstance(values, list) and key != "grads"
        for t in values
        if isinstance(t, torch.Tensor)
        and t.layout == torch.strided
        and not t.is_nested
        and not t.is_meta
        and t.untyped_storage().nbytes() >= t.nbytes  # not the freed or shrunk one
    ]


def _call(name: str, arguments: dict[str, Any]) -> None:
    FUNCTIONS[name](**arguments)


def _reference(name: str, backend: str, change: Callable[[dict], None] | None = None) -> list:
    """The parameters after one call with plain arguments (change: applied first)."""
    arguments = _arguments(name, backend)
    if change is not None:
        change(arguments)
    _call(name, arguments)
    return [p.clone() for p in arguments["params"]]


def _free(tensor: torch.Tensor) -> torch.Tensor:
    tensor.untyped_storage().resize_(0)
    return tensor


def _shrink(tensor: torch.Tensor) -> torch.Tensor:
    tensor.untyped_storage().resize_(tensor.untyped_storage().nbytes() // 2)
    return tensor


def _quantized(
    moment: torch.Tensor, signed: bool = True, codes_dtype: torch.dtype = torch.uint8
) -> QuantizedMoment:
    """moment in 8 bits (core.quantization's format), its codes viewed as codes_dtype."""
    codes, absmax = quantized_state(moment, moment, signed)
    return QuantizedMoment(codes.view(codes_dtype), absmax, signed)


def _inference_copy(tensor: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return tensor.clone()


def _set(key: str, index: int, make: Callable[[dict], Any]) -> Callable[[dict], None]:
    def change(arguments: dict) -> None:
        arguments[key][index] = make(arguments)

    return change


def _put(key: str, value: Callable[[dict], Any]) -> Callable[[dict], None]:
    return lambda arguments: arguments.__setitem__(key, value(arguments))


REFUSED = {
    "lr-nan": (_put("lr", lambda a: float("nan")), r"Invalid lr: nan\. Allowed: a finite"),
    "lr-text": (_put("lr", lambda a: "1e-3"), r"Invalid lr: '1e-3'\."),
    "beta1-one": (_put("beta1", lambda a: 1.0), r"Invalid beta1: 1\.0\. Allowed: a number in"),
    "beta2-negative": (_put("beta2", lambda a: -0.5), r"Invalid beta2: -0\.5\."),
    "eps-beyond-float32": (_put("eps", lambda a: 1e39), r"Invalid eps: 1e\+39\. Allowed: at most"),
    "fused-and-foreach": (
        lambda a: a.update(fused=True, foreach=True),
        r"Invalid fused: True\. Allowed: None or False when foreach=True",
    ),
    "grads-one-short": (
        _put("grads", lambda a: a["grads"][:1]),
        r"Invalid grads: 1 entries for 2 parameters\. Allowed: one entry per parameter",
    ),
    "moments-a-tensor": (
        _put("exp_avgs", lambda a: a["exp_avgs"][0]),
        r"Invalid exp_avgs: a tensor of shape \(64, 128\).*Allowed: a list or tuple",
    ),
    "moment-freed": (
        _set("exp_avgs", 1, lambda a: _free(a["exp_avgs"][1])),
        r"Invalid exp_avgs\[1\]: .* whose storage holds 0 bytes, fewer than its elements need",
    ),
    "moment-shrunk": (
        _set("exp_avg_sqs", 0, lambda a: _shrink(a["exp_avg_sqs"][0])),
        r"Invalid exp_avg_sqs\[0\]: .* whose storage holds 16384 bytes, fewer than its "
        r"elements need \(32768",
    ),
    "grad-freed": (
        _set("grads", 0, lambda a: _free(a["grads"][0])),
        r"Invalid grads\[0\]: a tensor of shape \(64, 128\) whose storage holds 0 bytes",
    ),
    "param-freed": (
        _set("params", 1, lambda a: _free(a["params"][1])),
        r"Invalid params\[1\]: a tensor of shape \(64, 128\) whose storage holds 0 bytes",
    ),
    "step-freed": (
        _set("state_steps", 0, lambda a: _free(a["state_steps"][0])),
        r"Invalid state_steps\[0\]: a value of shape \(\) whose storage holds 0 bytes",
    ),
    "moment-other-shape": (
        _set("exp_avgs", 0, lambda a: torch.zeros(128, 64)),
        r"Invalid exp_avgs\[0\]: a value of shape \(128, 64\) beside a parameter of shape "
        r"\(64, 128\)",
    ),
    "moment-other-dtype": (
        _set("exp_avg_sqs", 1, lambda a: a["exp_avg_sqs"][1].double()),
        r"Invalid exp_avg_sqs\[1\]: a value of dtype torch\.float64 .*Allowed: a tensor of "
        r"the parameter's dtype \(torch\.float32\)",
    ),
    "moment-meta": (
        _set("exp_avgs", 0, lambda a: a["exp_avgs"][0].to("meta")),
        r"Invalid exp_avgs\[0\]: a value on meta beside .*Allowed: a tensor on the "
        r"parameter's device \(cpu\)",
    ),
    "moment-sparse": (
        _set("exp_avg_sqs", 0, lambda a: a["exp_avg_sqs"][0].to_sparse()),
        r"Invalid exp_avg_sqs\[0\]: a value of shape \(64, 128\) with layout "
        r"torch\.sparse_coo",
    ),
    "moment-none": (
        _set("exp_avgs", 1, lambda a: None),
        r"Invalid exp_avgs\[1\]: a value that is a NoneType, not a tensor",
    ),
    "moment-negated": (
        _set("exp_avgs", 0, lambda a: a["exp_avgs"][0].clone()._neg_view()),
        r"Invalid exp_avgs\[0\]: .* negative bit",
    ),
    "moments-one-tensor": (
        _set("exp_avg_sqs", 1, lambda a: a["exp_avgs"][1]),
        r"Invalid exp_avg_sqs\[1\]: its memory is that of exp_avgs\[1\], and the step "
        r"writes both in place",
    ),
    "grad-is-its-parameter": (
        _set("grads", 0, lambda a: a["params"][0].view(SHAPE)),
        r"Invalid grads\[0\]: its memory is that of its parameter, which the step writes",
    ),
    "one-step-counter-for-two": (
        _set("state_steps", 1, lambda a: a["state_steps"][0]),
        r"Invalid state_steps\[1\]: its memory is that of state_steps\[0\]",
    ),
    "step-counter-int": (
        _set("state_steps", 0, lambda a: torch.tensor(3)),
        r"Invalid state_steps\[0\]: a value of shape \(\) of dtype torch\.int64 .*Allowed: a "
        r"0-dim float32 tensor",
    ),
    "step-counter-negative": (
        _set("state_steps", 1, lambda a: torch.tensor(-2.0)),
        r"Invalid state_steps\[1\]: .*Allowed: one finite number >= 0",
    ),
    "8bit-moment-of-the-other-sign": (
        _set("exp_avgs", 0, lambda a: _quantized(a["exp_avgs"][0], signed=False)),
        r"Invalid exp_avgs\[0\]: a value that is an 8-bit moment with signed=False .*"
        r"Allowed: signed=True for exp_avg",
    ),
    "8bit-codes-int8": (
        _set("exp_avgs", 1, lambda a: _quantized(a["exp_avgs"][1], codes_dtype=torch.int8)),
        r"Invalid exp_avgs\[1\]: a value of dtype torch\.int8 .*Allowed: torch\.uint8",
    ),
    "8bit-first-index-fractional": (
        _set(
            "exp_avgs",
            0,
            lambda a: dataclasses.replace(_quantized(a["exp_avgs"][0]), first_index=0.5),
        ),
        r"Invalid exp_avgs\[0\]: a value that is an 8-bit moment with first_index=0\.5 .*"
        r"Allowed: an int in \[0, 2\*\*63\)",
    ),
    "8bit-m-and-v-on-two-streams": (  # the backends each rounded v with another one's bits
        lambda a: (
            a["exp_avgs"].__setitem__(
                0, dataclasses.replace(_quantized(a["exp_avgs"][0]), stream=5)
            ),
            a["exp_avg_sqs"].__setitem__(0, _quantized(a["exp_avg_sqs"][0], signed=False)),
        ),
        r"Invalid exp_avg_sqs\[0\]\.stream: 0\. Allowed: exp_avgs\[0\]\.stream \(5\)",
    ),
    "param-listed-twice": (
        lambda a: [a[k].__setitem__(1, a[k][0]) for k in ("params",)],
        r"Invalid params\[1\]: the same tensor as an earlier entry",
    ),
    # Each of these was taken, then failed on some backends after state had changed (or,
    # a compensation buffer beside a float32 parameter, zeroed it on loop and foreach).
    "kahan-beside-float32": (
        _put("kahan_comps", lambda a: [torch.zeros_like(p) for p in a["params"]]),
        r"Invalid kahan_comps\[0\]: a value that is a compensation buffer for a "
        r"torch\.float32 parameter .*Allowed: None: only bfloat16 and float16",
    ),
    "step-counter-beyond-float32": (  # ADOPT's loop backend failed on its fourth root
        _set("state_steps", 0, lambda a: torch.tensor(1e300, dtype=torch.float64)),
        r"Invalid state_steps\[0\]: a value that is of shape \(\) holding 1e\+300 .*at most "
        r"float32's largest",
    ),
    "step-counter-1d": (
        _set("state_steps", 0, lambda a: torch.tensor([3.0])),
        r"Invalid state_steps\[0\]: a value of shape \(1,\) .*Allowed: a 0-dim float32",
    ),
    "grad-float64": (
        _set("grads", 1, lambda a: a["grads"][1].double()),
        r"Invalid grads\[1\]: torch\.float64 .* that a step computes with",
    ),
    "8bit-scales-expanded": (
        _set(
            "exp_avgs",
            0,
            lambda a: (
                lambda q: QuantizedMoment(q.codes, q.absmax[:1].expand(q.absmax.shape), True)
            )(_quantized(a["exp_avgs"][0])),
        ),
        r"Invalid exp_avgs\[0\]: a value with strides \(0, 1\), several elements in one",
    ),
    "param-made-in-inference-mode": (
        _set("params", 0, lambda a: _inference_copy(a["params"][0])),
        r"Invalid params\[0\]: a tensor made under torch\.inference_mode\(\)",
    ),
    # Sparse layouts other than COO and mkldnn's failed inside the checks with torch's
    # errors, naming nothing; 8-bit moments beside float64 failed inside every backend.
    **{
        f"grad-{name}": (
            _set("grads", 1, lambda a, convert=convert: convert(a["grads"][1])),
            rf"Invalid grads\[1\]: a gradient of layout torch\.{name} beside a parameter",
        )
        for name, convert in (
            ("sparse_csr", torch.Tensor.to_sparse_csr),
            ("_mkldnn", torch.Tensor.to_mkldnn),
        )
    },
    "8bit-moment-beside-float64": (
        lambda a: [
            *(a[key].__setitem__(0, a[key][0].double()) for key in ("params", "grads")),
            a["exp_avg_sqs"].__setitem__(0, a["exp_avg_sqs"][0].double()),
            a["exp_avgs"].__setitem__(0, _quantized(a["exp_avgs"][0])),
        ],
        r"Invalid exp_avgs\[0\]: a value that is an 8-bit moment beside a parameter of shape "
        r"\(64, 128\)\. Allowed: a full-precision tensor for a torch\.float64 parameter",
    ),
    # A nested tensor is a torch.Tensor of strided layout whose sizes and strides torch
    # refuses to give: reading them in the C++ checks aborted the process.
    **{
        f"nested-{key}": (
            _set(key, 0, lambda a: torch.nested.nested_tensor(list(torch.zeros(SHAPE)))),
            rf"Invalid {key}\[0\]: .*a nested tensor.* Allowed: a (dense |0-dim float32 )?tensor",
        )
        for key in ("params", "grads", "exp_avgs", "state_steps")
    },
}


@pytest.mark.bad_input
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize("bad", list(REFUSED))
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_a_direct_call_refuses_what_no_step_can_take_before_anything_changes(
    name: str, bad: str, backend: str
) -> None:
    change, message = REFUSED[bad]
    arguments = _arguments(name, backend)
    change(arguments)
    before = _tensors(arguments)
    with pytest.raises(ValueError, match=message):
        _call(name, arguments)
    assert all(torch.equal(a, b) for a, b in zip(before, _tensors(arguments), strict=True))


@pytest.mark.bad_input
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize("name", ["adam", "radam"])
def test_accumulate_without_its_window_counts_is_refused_before_anything_changes(
    name: str, backend: str
) -> None:
    """Every moment was folded, then the counters' update refused the missing list."""
    arguments = _arguments(name, backend)
    arguments["accumulate"] = True
    before = _tensors(arguments)
    with pytest.raises(ValueError, match=r"Invalid window_microbatches: None\. Allowed: a list"):
        _call(name, arguments)
    assert all(torch.equal(a, b) for a, b in zip(before, _tensors(arguments), strict=True))


@pytest.mark.parametrize("kind", ["tensor", "fraction"])
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_hyperparameters_given_as_other_numbers_step_as_their_floats(
    name: str, backend: str, kind: str
) -> None:
    """A 1-element lr made the loop and foreach backends fail after moments were written,
    Triton refused a 0-dim lr or beta2, and torch's fused Adam a fractions.Fraction lr
    (which the checks take, as the classes do); each is read as its number now."""

    def as_other_numbers(arguments: dict) -> None:
        if kind == "tensor":
            arguments["lr"] = torch.tensor([arguments["lr"]], dtype=torch.float64)
            arguments["beta2"] = torch.tensor(arguments["beta2"], dtype=torch.float64)
        else:  # each float's exact value
            for key in ("lr", "beta2", "eps"):
                arguments[key] = fractions.Fraction(arguments[key])

    tensors = _reference(name, backend, as_other_numbers)
    for a, b in zip(tensors, _reference(name, backend), strict=True):
        assert torch.equal(a, b)


LAZY_GRADIENTS = {
    "negated": lambda g: (-g)._neg_view(),  # the memory holds g negated: its values are g
    "zero-tensor": lambda g: torch._efficientzerotensor(g.shape, dtype=g.dtype),
}


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize("kind", list(LAZY_GRADIENTS))
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_a_gradient_whose_memory_does_not_hold_its_values_steps_as_its_values(
    name: str, kind: str, backend: str
) -> None:
    """A negated gradient moved its parameter the wrong way on the fused kernels, and a
    ZeroTensor one crashed the process on them; both step as the plain tensor would."""
    make = LAZY_GRADIENTS[kind]

    def lazy(arguments: dict) -> None:
        arguments["grads"][0] = make(arguments["grads"][0])

    def plain(arguments: dict) -> None:
        arguments["grads"][0] = make(arguments["grads"][0]).clone().resolve_neg()

    for a, b in zip(_reference(name, backend, lazy), _reference(name, backend, plain), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_a_direct_call_steps_parameters_that_require_grad_outside_no_grad(
    name: str, backend: str
) -> None:
    """The classes step under no_grad, and so does a direct call now: before, the loop and
    foreach backends failed on a leaf that requires grad ("used in an in-place
    operation") where the fused ones stepped it."""
    expected = _reference(name, backend)
    arguments = _arguments(name, backend)
    arguments["params"] = [torch.nn.Parameter(p) for p in arguments["params"]]
    assert torch.is_grad_enabled()
    _call(name, arguments)
    for a, b in zip(arguments["params"], expected, strict=True):
        assert torch.equal(a.detach(), b) and a.requires_grad


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_a_direct_call_with_no_parameters_changes_nothing(name: str) -> None:
    """torch's foreach operations refuse empty lists; nothing to step is no step."""
    arguments = {key: [] if isinstance(value, list) else value for key, value in
                 _arguments(name, "default").items()}  # fmt: skip
    _call(name, arguments)


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_a_direct_call_equals_the_classes_step(name: str, backend: str) -> None:
    """The checks change nothing a valid call computes: the functional form equals the
    class of its name, one step from the same state, on every backend and the default."""
    cls = {"adam": core.Adam, "radam": core.RAdam, "nadam": core.NAdam, "adopt": core.ADOPT}[name]
    arguments = _arguments(name, backend)
    params = [torch.nn.Parameter(p.clone()) for p in arguments["params"]]
    options = {"amsgrad": True} if name == "adam" else {}
    optimizer = cls(
        params, lr=arguments["lr"], betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
        **options, **TRAINING_BACKENDS[backend],
    )  # fmt: skip
    for index, param in enumerate(params):
        param.grad = arguments["grads"][index].clone()
        state = optimizer.state[param]
        state["step"] = arguments["state_steps"][index].clone()
        state["exp_avg"] = arguments["exp_avgs"][index].clone()
        state["exp_avg_sq"] = arguments["exp_avg_sqs"][index].clone()
        if name == "adam":
            state["max_exp_avg_sq"] = arguments["max_exp_avg_sqs"][index].clone()
        if name == "nadam":
            state["mu_product"] = arguments["mu_products"][index].clone()
    optimizer.step()
    _call(name, arguments)
    for a, b in zip(params, arguments["params"], strict=True):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_a_direct_call_inside_torch_compile_runs_as_called_eagerly(name: str, backend: str) -> None:
    """Kept out of the graph, as the classes' steps are: compiled, a direct call failed
    inside inductor with torch's "mutating a non-functional tensor" assertion."""
    expected = _reference(name, backend)
    arguments = _arguments(name, backend)
    torch.compile(lambda: _call(name, arguments))()
    for a, b in zip(arguments["params"], expected, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_fully_decoupled_decay_without_a_max_lr_removes_weight_decay_per_step(
    name: str, backend: str
) -> None:
    """Without a max_lr (a group created at lr 0, or a direct call that names none) the
    ratio lr/max_lr is 1 whenever lr > 0, as Composer decays a group whose initial_lr is
    0: weight_decay of each weight per step. Zero gradients, so only the decay moves θ
    (ADOPT's first call only seeds v)."""
    arguments = _arguments(name, backend)
    for values in ("grads", "exp_avgs"):
        arguments[values] = [torch.zeros_like(p) for p in arguments["params"]]
    start = [p.clone() for p in arguments["params"]]
    _call(name, {**arguments, "lr": 0.5, "weight_decay": 0.1, "decouple_lr": True, "max_lr": None})
    for before, after in zip(start, arguments["params"], strict=True):
        torch.testing.assert_close(after, before * 0.9, atol=0, rtol=1e-6)

    cls = {"adam": core.Adam, "radam": core.RAdam, "nadam": core.NAdam, "adopt": core.ADOPT}[name]
    param = torch.nn.Parameter(start[0].clone())
    optimizer = cls(
        [param], lr=0.0, weight_decay=0.1, decouple_lr=True, **TRAINING_BACKENDS[backend]
    )
    assert optimizer.param_groups[0]["max_lr"] is None
    optimizer.param_groups[0]["lr"] = 0.5  # a warmup written by hand: no scheduler
    for _ in range(2):
        param.grad = torch.zeros_like(param)
        optimizer.step()
    decays = 1 if name == "adopt" else 2
    torch.testing.assert_close(param.detach(), start[0] * 0.9**decays, atol=0, rtol=1e-6)
