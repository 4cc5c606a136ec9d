"""No Python input sends a kernel through a wrong address: tensor subclasses are unwrapped
(DTensor) or routed to a backend that dispatches through them, and the C kernel refuses
anything but plain dense tensors of its dtype, by name, before reading an address."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

import core
from core.backends import cpu_kernel
from core.backends.kernel_arguments import SWITCHES
from tests.core.configuration_cases import BACKENDS, OPTIMIZERS
from tests.processes import gloo_group

COEFFICIENTS = [0.9, 0.99, 1e-8, 1.0, 1e-3, 0.0, 1.0, 0.0, 0.0, 0.0]


class Wrapped(Tensor):
    """A wrapper subclass in the manner of DTensor or a quantized tensor: it owns no
    storage of its own (data_ptr() is not its data), and torch ops reach its inner tensor
    through __torch_dispatch__."""

    inner: Tensor

    @staticmethod
    def __new__(cls, inner: Tensor, requires_grad: bool = False) -> Wrapped:
        wrapper = Tensor._make_wrapper_subclass(
            cls, inner.shape, dtype=inner.dtype, device=inner.device, requires_grad=requires_grad
        )
        wrapper.inner = inner
        return wrapper

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        def unwrap(value: object) -> object:
            return value.inner if isinstance(value, Wrapped) else value

        def wrap(value: object) -> object:
            return Wrapped(value) if isinstance(value, Tensor) else value

        result = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        if not func._schema.returns:  # foreach in-place ops return nothing
            return None
        if func._schema.name.endswith("_"):  # in place: self
            return args[0]
        return tree_map(wrap, result)


def _config(dtype: torch.dtype = torch.float32) -> cpu_kernel.KernelConfig:
    switches = tuple((name, name in ("UPDATE", "ADAPTIVE")) for name in SWITCHES)
    return cpu_kernel.KernelConfig("adam", dtype, switches)


def _freed() -> Tensor:
    """A tensor whose storage was freed under it, as FSDP frees unsharded parameters."""
    freed = torch.zeros(8)
    freed.untyped_storage().resize_(0)
    return freed


def _shrunk_view_at_an_offset() -> Tensor:
    """The second half of a buffer whose storage was then cut to 10 of its 16 elements."""
    buffer = torch.zeros(16)
    view = buffer[8:]
    buffer.untyped_storage().resize_(40)
    return view


def _lists(make: callable) -> list[list[Tensor]]:  # type: ignore[valid-type]
    return [[make()] for _ in range(4)]


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    with gloo_group():
        yield


@pytest.mark.skipif(cpu_kernel.compiler() is None, reason="no C compiler")
@pytest.mark.bad_input
@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda: Wrapped(torch.zeros(8)), r"grad\[0\].*a Wrapped of torch.float32 on cpu, not"),
        (lambda: torch.zeros(8, dtype=torch.float64), "a Tensor of torch.float64 on cpu"),
        (lambda: torch.zeros(16)[::2], "with gaps"),
        (lambda: torch.zeros(9), "9 elements beside a parameter of 8"),
        (lambda: torch.zeros(8).to_sparse(), "layout torch.sparse_coo"),
        (
            _freed,
            r"storage holds 0 bytes, fewer than its elements need \(32",
        ),  # read at address 0: a crash
        (lambda: torch.ones(8)._neg_view(), "negative bit set"),  # read unnegated
        (lambda: torch._efficientzerotensor(8), "a ZeroTensor"),
        (lambda: torch.zeros(8, device="meta"), "a Tensor of torch.float32 on meta"),  # a crash
        (lambda: torch.zeros(7), "7 elements beside a parameter of 8"),  # read past its end
        (  # storage short of a view that starts at an offset: read past the storage
            _shrunk_view_at_an_offset,
            r"storage holds 40 bytes, fewer than its elements need \(64",
        ),
    ],
    ids=[
        "wrapper-subclass",
        "dtype",
        "strided",
        "size",
        "sparse",
        "freed",
        "negated",
        "zero",
        "meta",
        "smaller",
        "shrunk-at-offset",
    ],
)
def test_the_c_kernel_refuses_what_it_cannot_address(make_bad, message: str) -> None:
    params, grads, exp_avgs, exp_avg_sqs = _lists(lambda: torch.zeros(8))
    before = [t.clone() for t in (params[0], exp_avgs[0], exp_avg_sqs[0])]
    grads = [make_bad()]
    with pytest.raises(ValueError, match=message):
        cpu_kernel.run(_config(), params, grads, exp_avgs, exp_avg_sqs, None, None, COEFFICIENTS)
    after = (params[0], exp_avgs[0], exp_avg_sqs[0])
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


@pytest.mark.skipif(cpu_kernel.compiler() is None, reason="no C compiler")
@pytest.mark.bad_input
def test_the_c_kernel_refuses_a_gradient_transposed_against_its_parameter() -> None:
    """Same shape, other strides: stepped element by element in memory it would pair
    each parameter with another element's gradient."""
    params, _, exp_avgs, exp_avg_sqs = _lists(lambda: torch.zeros(3, 3))
    grads = [torch.arange(9.0).reshape(3, 3).t()]
    with pytest.raises(ValueError, match=r"strides \(1, 3\) beside a parameter with strides"):
        cpu_kernel.run(_config(), params, grads, exp_avgs, exp_avg_sqs, None, None, COEFFICIENTS)
    assert not params[0].any()


@pytest.mark.skipif(cpu_kernel.compiler() is None, reason="no C compiler")
@pytest.mark.bad_input
@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda: torch.ones(8, device="meta"), "on meta"),
        (_freed, r"storage holds 0 bytes, fewer than its elements need \(32"),
        (lambda: torch.ones(8)._neg_view(), "negative bit set"),
        (lambda: torch.ones(8, dtype=torch.float64), "torch.float64"),
        (lambda: torch.nested.nested_tensor([torch.ones(8)]), "a nested torch.float32 tensor"),
        (lambda: Wrapped(torch.ones(8)), "of shape"),  # its data_ptr is not its data
        (lambda: torch.ones(1, 8).to_sparse_csr(), "of shape"),
    ],
    ids=["meta", "freed", "negated", "dtype", "nested", "wrapper-subclass", "csr"],
)
@pytest.mark.parametrize("hook", ["round", "round stochastically", "quantize"])
def test_the_coding_hooks_refuse_what_c_cannot_read(hook: str, make_bad, message: str) -> None:
    """The kernels' own rounding and coding, which tests hold to their references: a
    meta or freed tensor's address was read as host memory (a crash), a negated view
    was read unnegated."""
    call = {
        "round": lambda values: cpu_kernel.round_as_kernels_do(values, torch.bfloat16),
        "round stochastically": lambda values: cpu_kernel.round_stochastically_as_kernels_do(
            values, torch.bfloat16, 7
        ),
        "quantize": lambda values: cpu_kernel.quantize_as_kernels_do(values, signed=True),
    }[hook]
    with pytest.raises(ValueError, match=r"Invalid values: .*" + message):
        call(make_bad())


@pytest.mark.skipif(cpu_kernel.compiler() is None, reason="no C compiler")
@pytest.mark.bad_input
@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: cpu_kernel.round_as_kernels_do(torch.ones(8), torch.int8),
            "dtype: torch.int8. Allowed: ",
        ),
        (
            lambda: cpu_kernel.round_stochastically_as_kernels_do(torch.ones(8), torch.float64, 7),
            "dtype: torch.float64. Allowed: ",
        ),
        (
            lambda: cpu_kernel.quantize_as_kernels_do(torch.ones(8), signed=None),
            "signed: None. Allowed: ",
        ),
        (
            lambda: cpu_kernel.dequantize_as_kernels_do(
                torch.zeros(8, dtype=torch.uint8), torch.ones(1, 1), signed=2
            ),
            "signed: 2. Allowed: ",
        ),
        (  # coded as one row of 600: blocks would cross rows
            lambda: cpu_kernel.quantize_as_kernels_do(torch.ones(2, 300), signed=True),
            r"values: .* of shape \(2, 300\)\. Allowed: .* of one dimension",
        ),
        (
            lambda: cpu_kernel.dequantize_as_kernels_do(
                torch.zeros(2, 300, dtype=torch.uint8), torch.ones(2, 2), signed=True
            ),
            r"codes: .* of shape \(2, 300\)",
        ),
        *[
            (
                lambda key=key: cpu_kernel.round_stochastically_as_kernels_do(
                    torch.ones(8), torch.bfloat16, key
                ),
                rf"keys: {key!r} for tensor 0\. Allowed: each an int in",
            )
            for key in (-1, 1 << 32, True)
        ],
    ],
    ids=[
        "round-int8",
        "round-stochastically-float64",
        "quantize-signed-none",
        "dequantize-2",
        "quantize-2-d",
        "dequantize-2-d",
        "key-negative",
        "key-2**32",
        "key-bool",
    ],
)
def test_the_coding_hooks_refuse_a_dtype_or_map_they_have_not(call, message: str) -> None:
    """Rounding to int8 failed with a KeyError naming nothing, to float64 was built into a
    kernel; int() of any `signed` chose a map (None failed inside it)."""
    with pytest.raises(ValueError, match=f"Invalid {message}"):
        call()


@pytest.mark.skipif(cpu_kernel.compiler() is None, reason="no C compiler")
@pytest.mark.bad_input
def test_the_c_kernel_refuses_a_list_its_switches_do_not_expect() -> None:
    params, grads, exp_avgs, exp_avg_sqs = _lists(lambda: torch.zeros(8))
    with pytest.raises(ValueError, match="kahan_comps for a kernel built with KAHAN=0"):
        cpu_kernel.run(
            _config(), params, grads, exp_avgs, exp_avg_sqs, None, [torch.zeros(8)], COEFFICIENTS
        )
    amsgrad = _with(_config(), AMSGRAD=True)  # would read v_max at address 0: a crash
    with pytest.raises(ValueError, match="max_exp_avg_sqs for a kernel built with AMSGRAD=1: None"):
        cpu_kernel.run(amsgrad, params, grads, exp_avgs, exp_avg_sqs, None, None, COEFFICIENTS)
    full = cpu_kernel.KernelConfig("adam", torch.float32, _config().switches, quantized=True)
    with pytest.raises(ValueError, match=r"Invalid config: quantized=True\. Allowed: False"):
        cpu_kernel.run(full, params, grads, exp_avgs, exp_avg_sqs, None, None, COEFFICIENTS)
    with pytest.raises(ValueError, match="Invalid config for 8-bit moments: quantized=False"):
        cpu_kernel.run_quantized(
            _config(), params, grads, exp_avgs, exp_avg_sqs, None, None, COEFFICIENTS
        )


def _with(config: cpu_kernel.KernelConfig, **switches: bool) -> cpu_kernel.KernelConfig:
    """config with some switches set otherwise."""
    changed = {**dict(config.switches), **switches}
    return dataclasses.replace(config, switches=tuple(changed.items()))


@pytest.mark.skipif(cpu_kernel.compiler() is None, reason="no C compiler")
@pytest.mark.bad_input
@pytest.mark.parametrize(
    "change, message",
    [
        ({"switch": "KAHAN"}, r"Invalid config .* differs only in switches other than"),
        ({"switch": "AMSGRAD"}, r"Invalid config .* differs only in switches other than"),
        ({"dtype": torch.bfloat16}, r"Invalid config .* differs only in switches other than"),
        ({"grads": 2}, "Invalid grads: 2 tensors for a call over 1 parameters"),
        ({"coefficients": 9}, "Invalid coefficients: 9 values. Allowed: 10"),
        ({"grads": 0}, "Invalid grads: 0 tensors for a call over 1 parameters"),
        ({"coefficients": 11}, "Invalid coefficients: 11 values. Allowed: 10"),
    ],
    ids=["kahan", "amsgrad", "dtype", "grads", "coefficients", "no-grads", "more-coefficients"],
)
def test_a_prepared_call_refuses_what_it_was_not_prepared_for(change: dict, message: str) -> None:
    """A step memo calls again what it prepared: a call that would read other lists, or
    other counts, than those checked is refused before any element changes; one that
    changes only switches selecting no list (decay here) runs."""
    params, grads, exp_avgs, exp_avg_sqs = _lists(lambda: torch.ones(8))
    prepared = cpu_kernel.prepare(_config(), params, grads, exp_avgs, exp_avg_sqs, None, None)
    switches = dict(_config().switches)
    switches[change.get("switch", "DECAY")] = True
    config = cpu_kernel.KernelConfig(
        "adam", change.get("dtype", torch.float32), tuple(switches.items())
    )
    before = [t.clone() for t in (params[0], exp_avgs[0], exp_avg_sqs[0])]
    with pytest.raises(ValueError, match=message):
        prepared.call(
            config if "switch" in change or "dtype" in change else _config(),
            grads * change.get("grads", 1),
            [*COEFFICIENTS, 0.0][: change.get("coefficients", 10)],
        )
    after = (params[0], exp_avgs[0], exp_avg_sqs[0])
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    decayed = cpu_kernel.KernelConfig("adam", torch.float32, tuple(switches.items()))
    if "switch" not in change:  # DECAY set: the same lists, so it runs
        prepared.call(decayed, grads, COEFFICIENTS)
        assert not torch.equal(params[0], before[0])


@pytest.mark.skipif(cpu_kernel.compiler() is None, reason="no C compiler")
@pytest.mark.bad_input
def test_a_prepared_call_refuses_stochastic_rounding_it_was_not_prepared_for() -> None:
    params, grads, exp_avgs, exp_avg_sqs = _lists(lambda: torch.ones(8, dtype=torch.bfloat16))
    prepared = cpu_kernel.prepare(
        _config(torch.bfloat16), params, grads, exp_avgs, exp_avg_sqs, None, None
    )
    stochastic = dataclasses.replace(_config(torch.bfloat16), stochastic=True)
    with pytest.raises(ValueError, match=r"Invalid config .* for a call prepared with"):
        prepared.call(stochastic, grads, COEFFICIENTS, keys=[7])
    assert bool(params[0].eq(1).all())


def _gradient_like(param: Tensor, grad: Tensor) -> Tensor:
    """grad in param's kind of tensor, as autograd would hand it over."""
    if isinstance(param, Wrapped):
        return Wrapped(grad)
    if hasattr(param, "device_mesh"):  # a DTensor
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(grad, param.device_mesh, param.placements)
    return grad


def _steps(params: list[Tensor], optimizer_name: str, flags: dict) -> core.AdamFamilyOptimizer:
    optimizer = OPTIMIZERS[optimizer_name](params, **flags)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p in params:
            p.grad = _gradient_like(p, torch.randn(p.shape, generator=generator).to(p.dtype))
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("backend", ["default", "foreach", "loop"])
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_a_wrapper_subclass_parameter_steps_through_torch_dispatch(
    optimizer_name: str, backend: str
) -> None:
    """Not DTensor, so nothing to unwrap: the default goes to the loop backend."""
    plain = [nn.Parameter(torch.linspace(-1, 1, 12).reshape(3, 4))]
    wrapped = [nn.Parameter(Wrapped(plain[0].detach().clone(), requires_grad=True))]
    _steps(plain, optimizer_name, BACKENDS["loop"])
    _steps(wrapped, optimizer_name, BACKENDS[backend])
    torch.testing.assert_close(wrapped[0].inner, plain[0].detach(), atol=1e-6, rtol=0)


@pytest.mark.bad_input
def test_fused_true_with_a_wrapper_subclass_is_refused_by_name() -> None:
    param = nn.Parameter(Wrapped(torch.ones(4), requires_grad=True))
    with pytest.raises(ValueError, match=r"Invalid fused.*: True.*\['Wrapped'\]"):
        core.AdamW([param], lr=1e-2, fused=True)
    optimizer = core.AdamW([param], lr=1e-2)
    optimizer.param_groups[0]["fused"] = True  # set after construction: refused at step
    param.grad = Wrapped(torch.ones(4))
    with pytest.raises(ValueError, match=r"Invalid fused.*: True.*\['Wrapped'\]"):
        optimizer.step()
    assert torch.equal(param.inner, torch.ones(4)) and not optimizer.state[param]
    moments = [Wrapped(torch.zeros(4)), Wrapped(torch.zeros(4))]
    with pytest.raises(ValueError, match=r"Invalid fused.*: True.*\['Wrapped'\]"):
        core.adam(
            [param], [param.grad], *[[m] for m in moments], None, [torch.tensor(0.0)],
            lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, fused=True,
        )  # fmt: skip
    assert torch.equal(param.inner, torch.ones(4))


@pytest.mark.usefixtures("one_rank_group")
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dtensor_parameters_step_on_their_local_tensor(backend: str, dtype: torch.dtype) -> None:
    """A DTensor's data_ptr() is not its shard's; every backend, fused included, steps the
    local tensor it owns, exactly as it steps a plain tensor (the multi-rank cases are in
    test_configurations.py)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    full = torch.linspace(-1, 1, 40).reshape(8, 5).to(dtype)
    plain = [nn.Parameter(full.clone())]
    sharded = [nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(0)]))]
    for name in OPTIMIZERS:
        reference = _steps([nn.Parameter(plain[0].detach().clone())], name, BACKENDS[backend])
        optimizer = _steps([nn.Parameter(sharded[0].detach().clone())], name, BACKENDS[backend])
        (expected,) = reference.param_groups[0]["params"]
        (actual,) = optimizer.param_groups[0]["params"]
        torch.testing.assert_close(actual.full_tensor(), expected.detach(), atol=0, rtol=0)


@pytest.fixture
def rank_one_of_two() -> Iterator[None]:
    """This process as rank 1 of 2 in torch's fake process group (no peer: DTensors are
    built from local shards, and nothing here communicates)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def test_a_shard_above_rank_0_draws_by_its_global_indices(rank_one_of_two: None) -> None:
    """Rank 1's rows 3-5 of a (6, 5) weight start at element 15 of the whole tensor: its
    8-bit moments and its stochastic rounding draw the bits of elements 15-29, as one
    process does (2-process matrices aside, every DTensor test runs one rank, offset 0).
    A shard of columns is no run of whole rows: it draws by local index."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from core.backends.precision import StochasticRounding
    from core.backends.views import _local, _whole_rows
    from core.quantization import QuantizedMoment

    mesh = init_device_mesh("cpu", (2,))

    def rows(local: Tensor, shape: tuple[int, int]) -> DTensor:
        return DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=(shape[1], 1)
        )

    param = rows(torch.zeros(3, 5), (6, 5))
    moment = QuantizedMoment(
        rows(torch.zeros(3, 5, dtype=torch.uint8), (6, 5)), rows(torch.ones(3, 1), (6, 1)), True
    )
    assert _local(moment, param, "exp_avgs", DTensor).first_index == 15
    rounding = StochasticRounding(seed=1, stream=2)
    assert _local(rounding, param, "kahan_comps", DTensor).first_index == 15
    columns = DTensor.from_local(
        torch.zeros(6, 2), mesh, [Shard(1)], run_check=False, shape=torch.Size([6, 4]),
        stride=(4, 1),
    )  # fmt: skip
    assert not _whole_rows(columns)
    assert _local(rounding, columns, "kahan_comps", DTensor).first_index == 0


def _sharded_unlike(case: str, state: dict, key: str, mesh: object) -> None:
    """state with state[key] laid out over the ranks unlike its parameter (case)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    value = state[key]
    if case == "whole-beside-a-shard":  # a one-process checkpoint's moment under FSDP2
        state[key] = value.full_tensor()
    elif case == "replicated-beside-a-shard":
        state[key] = value.redistribute(mesh, [Replicate()])
    else:  # a DTensor of the whole tensor's shape (rank 1's half of it) beside a plain one
        half = value[: value.shape[0] // 2]
        state[key] = DTensor.from_local(
            half.clone(),
            mesh,
            [Shard(0)],
            run_check=False,
            shape=value.shape,
            stride=value.stride(),
        )


SHARDING_CASES = {
    "whole-beside-a-shard": "is a plain tensor (the parameter is a DTensor)",
    "replicated-beside-a-shard": "is a DTensor with placements (Replicate(),)",
    "sharded-beside-a-plain-parameter": "is a DTensor (the parameter is a plain tensor)",
}
SHARDED_STATE = {
    # key: (parameter dtype, optimizer options)
    "exp_avg": (torch.float32, {}),
    "exp_avg_codes": (torch.float32, {"state_precision": "8bit"}),
    "exp_avg_sq_absmax": (torch.float32, {"state_precision": "8bit"}),
    "kahan_comp": (torch.bfloat16, {}),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("key", list(SHARDED_STATE))
@pytest.mark.parametrize("case", list(SHARDING_CASES))
def test_state_laid_out_over_the_ranks_unlike_its_parameter_is_refused_before_any_change(
    rank_one_of_two: None, case: str, key: str, backend: str
) -> None:
    """Every backend steps a DTensor parameter's shard beside its state's shards, so state
    of another layout (set by hand, or a whole checkpoint loaded under FSDP2) pairs one
    rank's rows with another's: refused by name at the step, before any change, and at
    load_state_dict. Unchecked, a whole moment passed the shape checks (it has the
    DTensor's global shape) and the loop backend failed inside torch after updating the
    parameters before it; torch's fused Adam stepped rank 1's rows with rank 0's moment.
    A (64, 128) weight: 8-bit state is kept for a shard of whole rows of 4096+ elements."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (2,))
    sharded = case != "sharded-beside-a-plain-parameter"
    dtype, options = SHARDED_STATE[key]
    shape = torch.Size((64, 128))

    def value(local: Tensor) -> Tensor:
        local = local.to(dtype)
        if not sharded:
            return torch.cat([local, local])  # the whole tensor, plain
        return DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=shape, stride=(128, 1)
        )

    half = (32, 128)
    params = [nn.Parameter(value(torch.linspace(-1, 1, 4096).reshape(half))) for _ in range(2)]
    optimizer = core.AdamW(params, lr=1e-2, **options, **BACKENDS[backend])
    for param in params:
        param.grad = value(torch.full(half, 0.1))
    optimizer.step()
    assert key in optimizer.state[params[1]]
    saved = copy.deepcopy(optimizer.state_dict())
    _sharded_unlike(case, optimizer.state[params[1]], key, mesh)

    def local_copies() -> list[Tensor]:
        states = [optimizer.state[p] for p in params]
        return [_as_local(t).clone() for t in [*params, *(v for s in states for v in s.values())]]

    before = local_copies()
    for param in params:
        param.grad = value(torch.full(half, 0.2))
    with pytest.raises(
        ValueError,
        match=re.escape(f"params[1] in param group 0: {key} that {SHARDING_CASES[case]}"),
    ):
        optimizer.step()
    assert all(map(torch.equal, local_copies(), before))
    _sharded_unlike(case, saved["state"][1], key, mesh)
    with pytest.raises(ValueError, match=re.escape(f"state[1]['{key}'] {SHARDING_CASES[case]}")):
        optimizer.load_state_dict(saved)
    assert all(map(torch.equal, local_copies(), before))


def _as_local(tensor: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor.detach()
