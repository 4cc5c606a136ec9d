"""The optimizer contract: closures, skipped parameters, lr = 0, max_lr, Kahan, bad input."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import core
from core.quantization import stored_moment
from tests.core.cases import (
    BACKENDS,
    EAGER_BACKENDS,
    LR,
    TRAINING_BACKENDS,
    Case,
    assert_unchanged,
    make_batches,
    make_model,
    one_case_per_algorithm,
    snapshot,
    train,
)

ALL_CLASSES = [core.Adam, core.AdamW, core.RAdam, core.NAdam, core.ADOPT]


def test_closure_runs_once_with_grad_enabled_and_its_loss_is_returned() -> None:
    model = make_model()
    optimizer = core.AdamW(model.parameters(), lr=LR)
    x, y = make_batches(torch.float32, 1)[0]
    calls = []

    def closure() -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = optimizer.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor) and loss.requires_grad


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_parameters_without_grad_are_skipped(cls: type) -> None:
    used, unused = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    optimizer = cls([used, unused], lr=LR)
    for _ in range(3):
        (used * torch.arange(3.0)).sum().backward()
        optimizer.step()
        used.grad = None
    assert torch.equal(unused, torch.ones(3)) and len(optimizer.state[unused]) == 0
    assert float(optimizer.state[used]["step"]) == 3


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_l2_mode_never_writes_into_grad(cls: type, backend: str) -> None:
    param = nn.Parameter(torch.linspace(-1, 1, 7))
    flags = TRAINING_BACKENDS[backend]
    optimizer = cls([param], lr=LR, weight_decay=0.5, decouple_wd=False, **flags)
    for _ in range(3):
        grad = torch.linspace(0.5, -0.5, 7)
        param.grad = grad.clone()
        optimizer.step()
        assert torch.equal(param.grad, grad)


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", one_case_per_algorithm(), ids=lambda c: c.id)
def test_lr_zero_leaves_parameters_exactly_unchanged(
    case: Case, dtype: torch.dtype, backend: str
) -> None:
    """torch's distributed checkpointing steps once with lr = 0 to create state."""
    model = make_model(dtype)
    optimizer = case.make(model.parameters(), **TRAINING_BACKENDS[backend])
    batches = make_batches(dtype, 6)
    train(model, optimizer, batches[:3])  # Kahan buffers and moments are non-trivial now
    before = [p.detach().clone() for p in model.parameters()]
    comps = [s.get("kahan_comp", torch.empty(0)).clone() for s in optimizer.state.values()]
    for x, y in batches[3:]:
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    for state, comp in zip(optimizer.state.values(), comps, strict=True):
        assert torch.equal(state.get("kahan_comp", torch.empty(0)), comp)
        assert float(state["step"]) == 6


def test_max_lr_defaults_to_each_groups_own_lr_when_created() -> None:
    a, b, c = (nn.Parameter(torch.ones(2)) for _ in range(3))
    optimizer = core.AdamW([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1, decouple_lr=True)
    optimizer.add_param_group({"params": [c], "lr": 0.25})
    assert [g["max_lr"] for g in optimizer.param_groups] == [0.1, 0.5, 0.25]
    explicit = core.AdamW([a], lr=0.1, max_lr=1.0)
    assert explicit.param_groups[0]["max_lr"] == 1.0


def test_fully_decoupled_decay_follows_the_schedule() -> None:
    """With zero gradients the only change is decay: θ·(1 − lr/max_lr·λ) each step."""
    param = nn.Parameter(torch.ones(4, dtype=torch.float64))
    optimizer = core.AdamW([param], lr=0.2, weight_decay=0.01, decouple_lr=True)
    expected = 1.0
    for lr in (0.2, 0.1, 0.05, 0.0):
        optimizer.param_groups[0]["lr"] = lr
        param.grad = torch.zeros_like(param)
        optimizer.step()
        expected *= 1 - lr / 0.2 * 0.01
        torch.testing.assert_close(param, torch.full_like(param, expected), atol=1e-15, rtol=0)


def _train_bf16_regression(kahan_sum: bool | None, dtype: torch.dtype, cls: type) -> float:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
    x = torch.randn(512, 16)
    with torch.no_grad():
        y = teacher(x)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4)).to(dtype)
    optimizer = cls(model.parameters(), lr=3e-4, weight_decay=0.0, kahan_sum=kahan_sum)
    for _ in range(400):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x.to(dtype)).float(), y).backward()
        optimizer.step()
    with torch.no_grad():
        return nn.functional.mse_loss(model.float()(x), y).item()


@pytest.mark.parametrize("cls", [core.AdamW, core.RAdam, core.NAdam, core.ADOPT])
def test_kahan_summation_recovers_fp32_quality_in_pure_bf16(cls: type) -> None:
    fp32 = _train_bf16_regression(None, torch.float32, cls)
    kahan = _train_bf16_regression(None, torch.bfloat16, cls)  # None: on for bf16
    plain = _train_bf16_regression(False, torch.bfloat16, cls)
    assert kahan < 1.1 * fp32, (fp32, kahan)
    assert plain > 1.1 * fp32, (fp32, plain)


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
@pytest.mark.parametrize(
    ("cls", "dtype"),
    [
        *[(cls, torch.bfloat16) for cls in (core.AdamW, core.RAdam, core.NAdam, core.ADOPT)],
        (core.AdamW, torch.float16),  # the compensation's code is the same for every algorithm
    ],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_kahan_keeps_the_steps_16_bit_floats_cannot_hold_on_every_backend(
    cls: type, backend: str, dtype: torch.dtype
) -> None:
    """Steps of ~1e-4 on weights near 1 are below half an ulp (2^-8 in bf16, 2^-10 in
    fp16): plain 16-bit parameters never move, Kahan's θ + compensation (on by itself for
    both) follows the fp32 run. The test above runs the default backend only; an eager
    compensation of the wrong sign lost every step there too, and a fused fp16 remainder
    zeroed or negated passed the one-step tests (each starts from the loop's state)."""
    generator = torch.Generator().manual_seed(0)
    start = (1 + 0.01 * torch.randn(64, generator=generator)).to(dtype).float()
    direction = torch.randn(64, generator=generator).sign()
    grads = [direction * (1 + torch.rand(64, generator=generator)) for _ in range(120)]
    runs = []
    for run_dtype, flags in ((torch.float32, {}), (dtype, TRAINING_BACKENDS[backend])):
        param = nn.Parameter(start.to(run_dtype, copy=True))
        optimizer = cls([param], lr=1e-4, weight_decay=0.0, **flags)
        for grad in grads:
            param.grad = grad.to(run_dtype)
            optimizer.step()
        runs.append((param, optimizer))
    (fp32, _), (low, optimizer) = runs
    compensated = low.detach().float() + optimizer.state[low]["kahan_comp"].float()
    travelled = (fp32.detach() - start).abs().min()
    assert travelled > 4e-3  # more than half an ulp: plain 16-bit would be that far off
    assert (compensated - fp32.detach()).abs().max() < 0.05 * travelled


@pytest.mark.parametrize("state_precision", ["full", "8bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_amsgrad_keeps_the_largest_v_when_gradients_shrink(
    backend: str, dtype: torch.dtype, state_precision: str
) -> None:
    """AMSGrad's maximum is v's running maximum in every backend's state, held when v
    falls (an eager backend that computed the maximum but did not store it for 16-bit
    state, or 8-bit state, restarted from v each step)."""
    param = nn.Parameter(torch.ones(4096, dtype=dtype))
    optimizer = core.Adam(
        [param],
        lr=LR,
        betas=(0.9, 0.5),
        amsgrad=True,
        state_precision=state_precision,
        **TRAINING_BACKENDS[backend],
    )
    largest = None
    for scale in (10.0, 0.01, 0.01):
        param.grad = torch.full_like(param, scale)
        optimizer.step()
        v = stored_moment(optimizer.state[param], "exp_avg_sq", param).clone()
        largest = v if largest is None else torch.maximum(largest, v)
    kept = stored_moment(optimizer.state[param], "max_exp_avg_sq", param)
    assert bool((kept > 3 * v).all())  # v fell to a quarter; the maximum did not
    torch.testing.assert_close(kept, largest, rtol=0.01, atol=0)


def test_kahan_buffers_only_for_low_precision_parameters() -> None:
    p32, p16 = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    for kahan_sum, expected in ((None, {p16}), (True, {p16}), (False, set())):
        optimizer = core.AdamW([p32, p16], lr=LR, kahan_sum=kahan_sum)
        p32.grad, p16.grad = torch.ones(3), torch.ones(3, dtype=torch.bfloat16)
        optimizer.step()
        assert {p for p in (p32, p16) if "kahan_comp" in optimizer.state[p]} == expected
        assert all(
            s.get("kahan_comp", p16).dtype == torch.bfloat16 for s in optimizer.state.values()
        )


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_bf16_kahan_eager_backends_agree_exactly(backend: str) -> None:
    """The fused backends are held to one ulp per step instead (test_fused.py)."""
    models = []
    for name in ("loop", backend):
        model = make_model(torch.bfloat16)
        train(
            model,
            core.NAdam(model.parameters(), lr=LR, **BACKENDS[name]),
            make_batches(torch.bfloat16, 20),
        )
        models.append(model)
    for a, b in zip(*(m.parameters() for m in models), strict=True):
        assert torch.equal(a, b)


def test_complex_parameters_match_torch() -> None:
    torch.manual_seed(0)
    init = torch.randn(5, 3, dtype=torch.complex64)
    ours, theirs = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    optimizer = core.AdamW([ours], lr=LR, eps=1e-3, weight_decay=0.1)
    reference = torch.optim.AdamW([theirs], lr=LR, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.1)
    target = torch.randn(5, 3, dtype=torch.complex64)
    for _ in range(20):
        for p, opt in ((ours, optimizer), (theirs, reference)):
            opt.zero_grad()
            (p - target).abs().pow(2).sum().backward()
            opt.step()
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=0)


def test_functional_form_equals_the_class() -> None:
    model, functional_model = make_model(torch.float64), make_model(torch.float64)
    optimizer = core.Adam(model.parameters(), lr=LR, weight_decay=0.1, amsgrad=True)
    params = list(functional_model.parameters())
    buffers = {k: [torch.zeros_like(p) for p in params] for k in ("m", "v", "vmax")}
    steps = [torch.tensor(0.0) for _ in params]
    for x, y in make_batches(torch.float64, 10):
        for m in (model, functional_model):
            m.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
        optimizer.step()
        with torch.no_grad():
            core.adam(
                params,
                [p.grad for p in params],
                buffers["m"],
                buffers["v"],
                buffers["vmax"],
                steps,
                lr=LR,
                beta1=0.9,
                beta2=0.99,
                eps=1e-6,
                weight_decay=0.1,
                amsgrad=True,
            )
    for a, b in zip(model.parameters(), params, strict=True):
        assert torch.equal(a, b)


# -- bad input ------------------------------------------------------------------------------

BAD_HYPERPARAMETERS = [
    ("lr", -1e-3),
    ("lr", float("nan")),
    ("lr", float("inf")),
    ("lr", "1e-3"),  # what PyYAML makes of `lr: 1e-3`
    ("eps", -1e-8),
    ("eps", float("nan")),
    ("betas", (1.0, 0.99)),
    ("betas", (0.9, -0.1)),
    ("betas", (0.9, float("nan"))),
    ("betas", (0.9,)),
    ("weight_decay", -0.1),
    ("weight_decay", float("inf")),
    ("max_lr", 0.0),
    ("max_lr", -1.0),
    ("max_lr", float("inf")),
    ("decouple_wd", "yes"),
    ("decouple_lr", 1),
    ("gradient_release", None),
    ("kahan_sum", 1),
    ("foreach", "fast"),
    ("fused", "yes"),
    ("lr", 10**400),  # beyond float: OverflowError before this was checked
    # beyond float32, what the steps compute in: overflowed mid-step (after some state
    # changed) on the loop and foreach backends, ran to inf elsewhere
    ("lr", 1e39),
    ("eps", 1e39),
    ("weight_decay", 1e39),
    ("max_lr", 1e39),
    ("lr", torch.tensor(True)),
    ("eps", torch.tensor(1e-6, device="meta")),
]
ALGORITHM_SPECIFIC = [
    (core.Adam, "amsgrad", None),
    (core.NAdam, "momentum_decay", -4e-3),
    (core.NAdam, "momentum_decay", float("inf")),
    (core.ADOPT, "clip", 0.25),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("name", "value"), BAD_HYPERPARAMETERS, ids=lambda v: repr(v))
@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_invalid_hyperparameter_is_named_with_value_and_allowed_range(
    cls: type, name: str, value: object
) -> None:
    with pytest.raises(ValueError, match=rf"Invalid {name}: ") as error:
        cls([nn.Parameter(torch.ones(2))], **{"lr": 1e-3, name: value})
    assert repr(value) in str(error.value) and "Allowed: " in str(error.value)


@pytest.mark.bad_input
@pytest.mark.parametrize(("cls", "name", "value"), ALGORITHM_SPECIFIC)
def test_invalid_algorithm_hyperparameter(cls: type, name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"Invalid {name}: {value!r}\. Allowed: \w"):
        cls([nn.Parameter(torch.ones(2))], lr=1e-3, **{name: value})


@pytest.mark.bad_input
def test_invalid_value_in_a_param_group_names_the_group() -> None:
    with pytest.raises(ValueError, match=r"Invalid lr in param group 1: -0\.5"):
        core.AdamW(
            [
                {"params": [nn.Parameter(torch.ones(2))]},
                {"params": [nn.Parameter(torch.ones(2))], "lr": -0.5},
            ],
            lr=1e-3,
        )


@pytest.mark.bad_input
@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_invalid_value_set_during_training_is_refused_before_any_change(cls: type) -> None:
    model = make_model()
    optimizer = cls(model.parameters(), lr=LR)
    batches = make_batches(torch.float32, 3)
    train(model, optimizer, batches[:2])
    before = snapshot(model, optimizer)
    optimizer.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"Invalid lr in param group 0: -1\.0"):
        optimizer.step()
    assert_unchanged(model, optimizer, before)


@pytest.mark.bad_input
@pytest.mark.parametrize("key", ["lr", "betas", "eps", "kahan_sum", "state_precision"])
@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_a_key_deleted_from_a_group_is_refused_by_name_before_any_change(
    cls: type, key: str
) -> None:
    """A bare KeyError from deep inside the step, before (torch.optim's too)."""
    model = make_model()
    optimizer = cls(model.parameters(), lr=LR)
    batches = make_batches(torch.float32, 3)
    train(model, optimizer, batches[:2])
    before = snapshot(model, optimizer)
    del optimizer.param_groups[0][key]
    x, y = batches[2]
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(ValueError, match=rf"Invalid {key} in param group 0: missing \(its key"):
        optimizer.step()
    assert_unchanged(model, optimizer, before)


@pytest.mark.bad_input
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_an_lr_beyond_float32_set_during_training_is_refused_before_any_change(
    backend: str,
) -> None:
    """lr = 1e39 set by hand or a scheduler: the loop and foreach backends raised torch's
    overflow error after exp_avg had changed; the fused ones stepped to -inf."""
    model = make_model()
    optimizer = core.ADOPT(model.parameters(), lr=LR, **TRAINING_BACKENDS[backend])
    batches = make_batches(torch.float32, 3)
    train(model, optimizer, batches[:2])
    before = snapshot(model, optimizer)
    optimizer.param_groups[0]["lr"] = 1e39
    x, y = batches[2]
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(ValueError, match=r"Invalid lr in param group 0: 1e\+39\. Allowed: at most"):
        optimizer.step()
    assert_unchanged(model, optimizer, before)


@pytest.mark.bad_input
@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_sparse_gradients_are_refused_before_any_change(cls: type) -> None:
    dense, embedding = nn.Linear(3, 3), nn.Embedding(10, 3, sparse=True)
    model = nn.ModuleList([dense, embedding])
    optimizer = cls(model.parameters(), lr=LR)
    before = snapshot(model, optimizer)
    (dense(torch.ones(2, 3)).sum() + embedding(torch.tensor([1, 2])).sum()).backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        optimizer.step()
    assert_unchanged(model, optimizer, before)


BAD_GRADIENTS = {
    "float64": lambda grad: grad.double(),
    "one-row": lambda grad: grad[:1].clone(),  # broadcast to every row before this was checked
    "transposed-shape": lambda grad: grad.t().contiguous(),  # same element count
}


def _two_layers(cls: type, backend: str, state_precision: str) -> tuple[nn.Module, Any]:
    """Two 5120-element weights (quantized with '8bit') and their biases, after two steps
    (so the next step may reuse the step memo, whose own checks then apply)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 80), nn.Linear(80, 64))
    optimizer = cls(
        model.parameters(), lr=LR, state_precision=state_precision, **TRAINING_BACKENDS[backend]
    )
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.ones(8, 64)).square().mean().backward()
        if _ < 2:
            optimizer.step()
    return model, optimizer


GRADIENT_CASES = [
    (cls, backend, state_precision, bad)
    for cls in ALL_CLASSES
    for backend in TRAINING_BACKENDS
    for state_precision in ("full", "8bit")
    for bad in BAD_GRADIENTS
    # Triton's interpreter takes seconds a case: it gets the one the memo's own check sees
    if backend != "triton" or bad == "transposed-shape"
]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("cls", "backend", "state_precision", "bad"),
    GRADIENT_CASES,
    ids=["-".join([c.__name__, *rest]) for c, *rest in GRADIENT_CASES],
)
def test_a_gradient_unlike_its_parameter_is_refused_before_any_change(
    cls: type, backend: str, state_precision: str, bad: str
) -> None:
    """A gradient replaced through .data (autograd never makes one unlike its parameter)
    was checked per backend bucket: the parameters of earlier buckets were updated and
    their step counts not, or it was broadcast, or paired with the parameter by memory
    order. Now nothing changes, and once it is put right the step is the one it would
    have been."""
    model, optimizer = _two_layers(cls, backend, state_precision)
    weight = model[1].weight
    good = weight.grad.clone()
    weight.grad.data = BAD_GRADIENTS[bad](good)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=r"Invalid grad of params\[2\] in param group 0: "):
        optimizer.step()
    assert_unchanged(model, optimizer, before)
    weight.grad.data = good
    optimizer.step()
    twin, twin_optimizer = _two_layers(cls, backend, state_precision)
    twin_optimizer.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.bad_input
@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_refused_functional_nadam_step_leaves_its_mu_product(backend: str) -> None:
    """NAdam multiplied Π before the backend ran, so a step the backend refused left Π
    advanced and every later step wrong."""
    from core.nadam import nadam

    param = torch.zeros(64, 80)
    mu_product, step = torch.tensor(0.9), torch.tensor(3.0)
    with pytest.raises(ValueError, match=r"Invalid grads\[0\]: torch\.float64"):
        nadam(
            [param],
            [torch.ones(64, 80, dtype=torch.float64)],
            [torch.zeros_like(param)],
            [torch.zeros_like(param)],
            [mu_product],
            [step],
            lr=LR,
            beta1=0.9,
            beta2=0.99,
            eps=1e-8,
            **TRAINING_BACKENDS[backend],
        )
    assert mu_product.item() == torch.tensor(0.9).item() and step.item() == 3.0


@pytest.mark.parametrize("backend", list(TRAINING_BACKENDS))
def test_a_functional_nadam_step_failing_past_the_checks_leaves_its_mu_product(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure inside the backend, after every check passed (memory exhausted in the
    kernel: injected here, nothing on this machine makes one), also leaves Π and the
    step count as they were, so the retried step is the one it would have been."""
    nadam_module = importlib.import_module("core.nadam")  # core.nadam is the function

    def fail(*_: object) -> None:
        raise RuntimeError("out of memory (injected)")

    gradient = torch.randn(64, 80, generator=torch.Generator().manual_seed(0))
    runs = []
    for failing_first in (True, False):
        param, moments = torch.ones(64, 80), [torch.zeros(64, 80) for _ in range(2)]
        mu_product, step = torch.tensor(0.9), torch.tensor(3.0)
        arguments = ([param], [gradient], *[[m] for m in moments], [mu_product], [step])
        settings = {"lr": LR, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}
        if failing_first:
            with monkeypatch.context() as patched:
                patched.setattr(nadam_module, "call_backend", fail)
                with pytest.raises(RuntimeError, match="injected"):
                    nadam_module.nadam(*arguments, **settings, **TRAINING_BACKENDS[backend])
            assert mu_product.item() == torch.tensor(0.9).item() and step.item() == 3.0
            assert torch.equal(param, torch.ones(64, 80))
        nadam_module.nadam(*arguments, **settings, **TRAINING_BACKENDS[backend])
        runs.append((param, mu_product, step))
    for retried, fresh in zip(*runs, strict=True):
        assert torch.equal(retried, fresh)


@pytest.mark.bad_input
def test_expanded_and_repeated_parameters_are_refused() -> None:
    """An expand()ed parameter failed mid-step after its moments were written; one listed
    twice in a group was stepped twice per step."""
    shared = nn.Parameter(torch.randn(1, 80).expand(64, 80))
    with pytest.raises(
        ValueError,
        match=r"Invalid params\[1\] in param group 0: shape \(64, 80\) with strides \(0, 1\)",
    ):
        core.AdamW([nn.Parameter(torch.ones(2)), shared], lr=LR)
    p = nn.Parameter(torch.ones(2))
    optimizer = core.AdamW([nn.Parameter(torch.ones(3))], lr=LR)
    with pytest.raises(ValueError, match=r"Invalid params\[1\] in param group 1: the same tensor"):
        optimizer.add_param_group({"params": [p, p]})
    assert len(optimizer.param_groups) == 1


@pytest.mark.bad_input
def test_empty_and_duplicate_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="empty parameter list"):
        core.AdamW([], lr=1e-3)
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="more than one parameter group"):
        core.AdamW([{"params": [p]}, {"params": [p]}], lr=1e-3)


@pytest.mark.bad_input
def test_lr_is_required_except_for_adopt() -> None:
    with pytest.raises(TypeError, match="lr"):
        core.Adam([nn.Parameter(torch.ones(2))])  # type: ignore[call-arg]
    assert core.ADOPT([nn.Parameter(torch.ones(2))]).defaults["lr"] == 1e-3


def test_documented_defaults() -> None:
    p = [nn.Parameter(torch.ones(2))]
    adam, adamw, nadam, adopt = (
        core.Adam(p, lr=1),
        core.AdamW(p, lr=1),
        core.NAdam(p, lr=1),
        core.ADOPT(p),
    )
    assert (adam.defaults["betas"], adam.defaults["eps"], adam.defaults["weight_decay"]) == (
        (0.9, 0.99),
        1e-6,
        0,
    )
    assert adam.defaults["decouple_wd"] is False and adamw.defaults["decouple_wd"] is True
    assert adamw.defaults["weight_decay"] == 1e-2 and nadam.defaults["momentum_decay"] == 4e-3
    assert (adopt.defaults["betas"], adopt.defaults["eps"], adopt.defaults["clip"]) == (
        (0.9, 0.9999),
        1e-6,
        True,
    )


def _adopt_after_underflow(dtype: torch.dtype, clip: bool) -> tuple[core.ADOPT, nn.Parameter]:
    """ADOPT whose v underflowed on the first call (|g| = 1e-5, g² below float16's range),
    then stepped with |g| = 1, more than 65504 · eps / (1 − β1)."""
    param = nn.Parameter(torch.zeros(8, dtype=dtype))
    optimizer = core.ADOPT([param], lr=1e-3, eps=1e-6, clip=clip)
    for grad in (1e-5, 1.0, 1.0):
        param.grad = torch.full_like(param, grad)
        optimizer.step()
    return optimizer, param


def test_unclipped_adopt_on_float16_warns_of_the_overflow_it_then_meets() -> None:
    with pytest.warns(UserWarning, match=r"65504 \* eps / \(1 - beta1\) = 0.655"):
        optimizer, param = _adopt_after_underflow(torch.float16, clip=False)
    assert not bool(optimizer.state[param]["exp_avg"].isfinite().all())
    assert not bool(param.isfinite().all())


def test_an_unclipped_float16_group_added_later_is_warned_of_too() -> None:
    """The constructor's groups were looked at, a group added with add_param_group was
    not; the warning names the caller's line either way."""
    optimizer = core.ADOPT([torch.nn.Parameter(torch.zeros(4))], lr=1e-3)
    half = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    with pytest.warns(UserWarning, match=r"65504 \* eps / \(1 - beta1\) = 0.655") as caught:
        optimizer.add_param_group({"params": [half], "clip": False})
    assert caught[0].filename == __file__
    with pytest.warns(UserWarning, match=r"clip=False with float16") as caught:
        core.ADOPT([half], lr=1e-3, clip=False)
    assert caught[0].filename == __file__


@pytest.mark.parametrize(
    ("dtype", "clip"),
    [(torch.float16, True), (torch.bfloat16, False), (torch.float32, False)],
    ids=["float16-clipped", "bfloat16-unclipped", "float32-unclipped"],
)
def test_adopt_stays_finite_and_silent_where_float16_overflow_cannot_happen(
    dtype: torch.dtype, clip: bool
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, param = _adopt_after_underflow(dtype, clip)
    assert bool(param.isfinite().all())
