"""The base class every adamkit optimizer shares, and the helpers its functional forms use.

What lives here is what is the same for every algorithm: param groups holding every
hyperparameter (so frameworks may rebuild them), lazy state in torch.optim's layout,
validation that names the argument, the three weight-decay modes, Kahan bookkeeping,
state-dict interchange with torch.optim, and backend choice. The algorithm files only
add their own hyperparameters and per-step scalars.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import numbers
import operator
import os
import sys
import warnings
from abc import ABCMeta, abstractmethod
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, ClassVar, NamedTuple, TypeAlias, TypeVar, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from core.backends import cpu_kernel, fused_unavailable_reason
from core.backends.checked import (
    CheckedStep,
    checked_for,
    lists_vouched,
    unvouch,
    unvouch_lists,
    vouch,
    vouch_lists,
)
from core.backends.cpu_kernel import HostScalarAccess, float32_array, host_scalar_access
from core.backends.grouping import dtype_of
from core.backends.host_checks import (
    Layout,
    any_lazy_values,
    host_checks,
    host_checks_setting,
    storage_shortfall,
)
from core.backends.precision import LOW_PRECISION_DTYPES, StochasticRounding
from core.backends.views import (
    BACKED,
    PLAIN_TENSOR_TYPES,
    dense,
    dtensor_type,
    lazy_values,
    memory_problem,
    shortfall_problem,
)
from core.coefficients import AdamStepCoefficients, AdoptStepCoefficients
from core.quantization import (
    CODE_FORMAT,
    CODE_FORMAT_KEY,
    FSDP1_FULL_PRECISION,
    QUANTIZABLE_DTYPES,
    SIGNED_KEYS,
    STOCHASTIC_KEYS,
    QuantizedMoment,
    absmax_shape,
    dequantize,
    full_precision,
    laid_out_as,
    moment_keys,
    moment_view,
    quantizable,
    quantize,
    quantized_state,
    stochastic_stream,
    validate_state_precision,
)
from core.random_bits import rounding_draw

ParamsT: TypeAlias = Iterable[Tensor] | Iterable[dict[str, Any]]

_grad_of, _is_sparse = operator.attrgetter("grad"), operator.attrgetter("is_sparse")
_layout_of = operator.attrgetter("layout")
_dtype_of, _shape_of, _device_of = map(operator.attrgetter, ("dtype", "shape", "device"))


# torch.compiler.disable as torch applies it to its own optimizers: torch._dynamo (about
# 1.4 s of imports) loads at the first call instead of at `import core`, and dynamo skips
# the wrapper as it skips torch.compiler.disable. Older or newer torch without it: the
# public decorator.
keep_out_of_graphs = getattr(torch, "_disable_dynamo", torch.compiler.disable)

_IMMUTABLE_TYPES = frozenset({float, int, bool, str, type(None)})


def _immutable(value: object) -> bool:
    """Whether value cannot change without being replaced: a number, bool, string, None,
    or a tuple of those (betas)."""
    if type(value) is tuple:
        return _IMMUTABLE_TYPES.issuperset(map(type, value))
    return type(value) in _IMMUTABLE_TYPES


def _with_gradients(
    params: Sequence[Tensor], stepped: dict[Tensor, bool]
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The parameters a full step updates and their gradients: those with a gradient, less
    any a release hook stepped since the last full step; and, third, those a release hook
    stepped and freed that hold a gradient again (it came after their step). Each gradient
    is read once (~55 ns apiece). A released parameter whose hook did not step it keeps its
    gradient for this step: set by hand (torch.distributed.checkpoint's zero gradient at
    lr 0, which creates the state a checkpoint loads into), accumulated in micro-batches
    whose hooks were paused (Composer's), or arrived inside a nested backward."""
    grads = list(map(_grad_of, params))
    if any(map(operator.is_, grads, repeat(None))):
        pairs = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
        params, grads = [p for p, _ in pairs], [g for _, g in pairs]
    else:
        params = list(params)
    late: list[Tensor] = []
    if stepped:  # a dict lookup hashes in Python: skip it when nothing was stepped
        kept = []
        for i, p in enumerate(params):
            freed = stepped.get(p)
            if freed is None:
                kept.append(i)
            elif freed:
                late.append(p)
        params, grads = [params[i] for i in kept], [grads[i] for i in kept]
    return params, grads, late  # type: ignore[return-value]


def _group_index_key(groups: list[dict[str, Any]]) -> tuple[tuple[int, int, int], ...]:
    """What _find_group's index of parameters is valid for: each group and its params
    list, by identity and length."""
    return tuple((id(g), id(g["params"]), len(g["params"])) for g in groups)


def _leave_out_closed_windows(packed: dict[Any, Any]) -> None:
    """A state dict's per-parameter states without the counters of windows that have
    closed (a count of 0: what a window-less state means, and what loading restores). Kept,
    every checkpoint taken between windows held them, and torch's full-state DCP route into
    a receiver without them failed (`KeyError: 'state.<name>.window_microbatches'`: Composer
    FSDP2 with state_dict_type="full" could not resume any run with optimizer accumulation).
    torch packs the live state dicts themselves: the ones changed are copies."""
    for key, state in packed.items():
        count = state.get("window_microbatches") if isinstance(state, dict) else None
        if isinstance(count, Tensor) and not count.is_meta and count.numel() == 1 and not count:
            packed[key] = {
                name: value for name, value in state.items() if name not in _WINDOW_COUNTERS
            }


_WINDOW_COUNTERS = ("window_microbatches", "window_shares")


def _forget_removed_groups(kept: dict[int, Any], groups: list[dict[str, Any]]) -> None:
    """Drop the entries (keyed by id(group): validated records, step memos, replays) of
    groups no longer in param_groups: each holds its group's tensors, which torch.optim
    would have let go."""
    live = set(map(id, groups))
    for key in [key for key in kept if key not in live]:
        del kept[key]


def _repeated_entry(index: int, group: int, earlier_group: int, earlier: int) -> ValueError:
    """The error for a parameter in two entries of param_groups (written there by hand)."""
    return ValueError(
        f"Invalid params[{index}] in param group {group}: the same tensor as "
        f"params[{earlier}] of param group {earlier_group}, so this step would update it "
        "twice. Allowed: each parameter in one entry of one group (a module surgery that "
        "tied a new weight to one already trained listed it again: remove the repeated "
        "entry from optimizer.param_groups)."
    )


def _refuse_params_not_a_list(params: object, where: str) -> None:
    """A group's params written by hand as no list: a bare tensor stepped nothing (its
    rows have no gradients), None failed deep inside the step."""
    if not isinstance(params, (list, tuple)):
        raise ValueError(
            f"Invalid params{where}: {_described_entry(params)}. Allowed: a list (or "
            "tuple) of tensors (add_param_group makes a list of any iterable of them)."
        )


def _refuse_entries_not_tensors(params: Sequence[object], where: str) -> None:
    """Name the first entry of a group's params that is no tensor (written by hand into a
    live group: torch's add_param_group refuses one), where it failed deep in the step."""
    for index, value in enumerate(params):
        if not isinstance(value, Tensor):
            raise ValueError(
                f"Invalid params[{index}]{where}: {_described_entry(value)}. Allowed: a "
                "tensor (a parameter)."
            )


def _refuse_release_turned_off(released: set[Tensor], group: dict[str, Any], where: str) -> None:
    """gradient_release=False written into a group (or a released parameter moved into a
    group without it) whose parameters release hooks step: the hooks went on stepping and
    freeing its gradients, silently. Asked once per backward, before anything is stepped."""
    require(
        released.isdisjoint(group["params"]),
        "gradient_release",
        False,
        "True while release hooks step the group's parameters inside backward "
        "(prepare_for_gradient_release or a GradientRelease callback put them there; "
        "writing the flag does not remove them). To stop releasing, call "
        "core.remove_gradient_release(model) (or drop the GradientRelease callback) "
        "first; the flag may then be False",
        where,
    )


def _refuse_gradients_after_release(late: list[Tensor], where: str) -> None:
    """A gradient reached parameters release had stepped and freed in this training step:
    their update was applied without it, and the full step (which skips them) would drop
    it silently, where training without release adds it to the step. Refused before this
    step changes anything. A zero gradient changes nothing (a loop that fills missing
    gradients with zeros before the step): those pass, one host read per device."""
    late = [p for p, nonzero in zip(late, _nonzero(late), strict=True) if nonzero]
    if not late:
        return
    shapes = ", ".join(str(tuple(p.shape)) for p in late[:4])
    more = f" and {len(late) - 4} more" if len(late) > 4 else ""
    raise RuntimeError(
        f"Invalid gradient for gradient release{where}: {len(late)} parameter(s) of "
        f"shape {shapes}{more} got a gradient after release had stepped them and freed "
        "their gradient in this training step, so their update was applied without it "
        "and optimizer.step() would drop it; this step changed nothing. It comes from a "
        "backward after the one that released them: a reentrant activation-checkpoint "
        "segment (torch.utils.checkpoint with use_reentrant=True) using a parameter also "
        "used after it in the forward, or a backward run by a hook or callback after the "
        "training backward (a LightningModule's on_after_backward), or with "
        "release_paused=True after it. Allowed: "
        "use_reentrant=False, such a backward before the training backward (in "
        "training_step, before the loss is returned), or training without release."
    )


def _nonzero(params: list[Tensor]) -> list[bool]:
    """Whether each parameter's gradient holds a nonzero (or NaN) value: one stacked
    answer per device, so a GPU syncs once per device, not once per parameter."""
    answers: dict[int, bool] = {}
    by_device: dict[torch.device, list[int]] = {}
    for index, param in enumerate(params):
        by_device.setdefault(param.grad.device, []).append(index)  # type: ignore[union-attr]
    dtensor = dtensor_type()
    for indices in by_device.values():
        flags = []
        for index in indices:
            grad = params[index].grad
            values = grad._values() if grad.is_sparse else grad  # type: ignore[union-attr]
            flag = values.ne(0).any()
            if dtensor is not None and isinstance(flag, dtensor):
                # over every rank's shard (each rank in the same order: the same answer
                # everywhere, so all refuse or none)
                flag = flag.full_tensor()
            flags.append(flag)
        answers.update(zip(indices, torch.stack(flags).tolist(), strict=True))
    return [answers[index] for index in range(len(params))]


_LOW_PRECISION = frozenset(LOW_PRECISION_DTYPES)
_MIXED_DTYPES = frozenset({torch.float32, *LOW_PRECISION_DTYPES})
"""Dtypes a gradient and its parameter may differ in (a step reads either into float32)."""

MEMO_FLAGS = (
    "foreach",
    "fused",
    "amsgrad",
    "kahan_sum",
    "state_precision",
    "stochastic_rounding",
    "rounding_seed",
)
"""Group keys that decide which lists a step hands its backend and which backend runs:
a step memo holds only while they keep the values it was made with."""


@dataclass(eq=False, repr=False)
class StepMemo(CheckedStep):
    """A group's last full step, reused while nothing it was built from has changed.

    A step over 300 parameters spent most of its ~500 µs of host work finding out again
    what the last step found: each parameter's state and moments, the backend, the Triton
    plan. The memo keeps those (as tuples, so nothing can change them), and each step
    checks in one pass per list (core.backends.host_checks, in C++ where it builds) what
    they depend on: the same parameters, and the same state dicts (StateTable.writes) each
    holding the same tensors, every one of them with the same address, element count,
    block rows, dtype and contiguity; unchanged flags; gradients that are plain, dense,
    contiguous and of their parameter's dtype, shape and device. Anything else takes the
    full path, which checks everything as before and makes a new memo. Memos are made for
    groups rounded to nearest, with Kahan buffers or stochastically, on plain tensors, with
    either state precision; tensor subclasses and optimizer accumulation always take the
    full path. A stochastically rounded memo keeps each parameter's seed and stream (its
    position among all the optimizer's parameters) and checks that the positions still
    hold (`streams`); each step then rounds at its own step number (step_lists).

    With state_precision='8bit' a group's moments come in two forms (parameters under
    MIN_QUANTIZED_NUMEL keep theirs full), so a moment is three columns: its tensors, its
    codes and its scales, each None in the rows that store the other form (the check then
    requires the state not to hold that key). The backends check what reaches their
    kernels on the memo's first checked step and then rely on it: the fused CPU backend
    calls the checked kernel call again with the new gradients, the Triton backend
    launches its plans again (core.backends.checked). That spares the Python work of a
    step (bucketing, checks, argument arrays: ~40 µs per released 8-bit parameter on
    CPU), which gradient release pays for every parameter it steps.
    """

    group: dict[str, Any] | None = None
    flags: tuple[Any, ...] = ()
    state_table: object = None
    """The optimizer's state dict the states came from (load_state_dict replaces it)."""
    state_writes: int = 0
    """Its StateTable.writes when the states were taken."""
    states: tuple[dict[str, Any], ...] = ()
    columns: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    """state key -> that entry of each state, as the step handed it down (None where
    the state has no such entry: see above)."""
    moments: dict[str, tuple[Tensor | QuantizedMoment, ...]] = field(default_factory=dict)
    """moment key -> what the step handed its backend (core.quantization.moment_view of
    each state), valid while the columns it is made of are."""
    rounding: tuple[Tensor | None, ...] | None = None
    """The kahan_comps list of the step (None until the step built it)."""
    windowless: bool = False
    """No state holds an optimizer-accumulation window (found when the memo was made:
    windows open only under optimizer_accumulation, which no memo outlives)."""
    param_layout: Layout = b""
    """The parameters' addresses and sizes (core.backends.host_checks)."""
    addresses: dict[str, Layout] = field(default_factory=dict)
    """state key -> the addresses of its column's tensors (a storage swapped in place,
    by .data = or set_, is seen: the step follows it, as every backend does)."""
    recorded: list[tuple[Callable[..., None], list[Any], Any]] | None = None
    """While a released step records (see _GroupReplay): each call_backend of the step."""
    replay: tuple[Callable[..., None], list[Any]] | None = None
    """A released parameter's backend call, its gradient list left out (None): what a
    replay runs with the new gradient and its group's coefficients."""
    host_keys: tuple[str, ...] = ()
    """The host-scalar state keys of the step (step, NAdam's mu_product), in the order of
    scalar_access."""
    scalar_access: HostScalarAccess | None = None
    """Reads and writes those scalars in one C call each (None: no replays)."""
    streams: tuple[int, tuple[int, ...], tuple[int, ...]] | None = None
    """Under stochastic rounding, what the parameters' streams (positions) rest on: the
    group's index in param_groups, the lengths of the groups before it, and each
    parameter's index in its group's params."""


@dataclass(frozen=True, slots=True, eq=False)
class _GroupReplay:
    """The last released step of a group, for its other parameters to replay.

    Under gradient release each parameter steps alone, and all of a group's parameters
    take the same step: same hyperparameters, same step count. The generic path works the
    same coefficients out again for each (~10 µs of a ~30 µs step). A step's coefficients
    and its host-scalar updates are functions of the group's hyperparameters and the
    parameter's host scalars (step count; NAdam's Π) alone, so a parameter whose memo
    holds, whose group holds the very values it held (`_validate_stepped_group`'s record)
    and whose scalars read the same as its twin's before the step can take the twin's
    coefficients, then set its scalars to the twin's values after: the same floats the
    generic path computes (step + 1 and Π·μ are deterministic in float32).
    """

    passed: tuple[Any, ...]
    """_validate_stepped_group's record of the group when the twin stepped."""
    host_keys: tuple[str, ...]
    before: list[float]
    coefficients: AdamStepCoefficients | AdoptStepCoefficients
    after: Any
    """The twin's host scalars after its step (a C float array)."""


class StateTable(defaultdict):
    """The optimizer's `state` (torch's defaultdict(dict)) counting writes of whole entries
    (a parameter's state set, replaced or removed), so a step memo knows its states are
    still the parameters' without hashing every parameter each step (~20 µs for 300)."""

    writes = 0

    def __setitem__(self, key: Any, value: Any) -> None:
        self.writes += 1
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self.writes += 1
        super().__delitem__(key)

    def pop(self, *args: Any) -> Any:
        self.writes += 1
        return super().pop(*args)

    def popitem(self) -> Any:
        self.writes += 1
        return super().popitem()

    def clear(self) -> None:
        self.writes += 1
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.writes += 1
        super().update(*args, **kwargs)

    def __ior__(self, other: Any) -> StateTable:
        self.update(other)
        return self


def _memo_flags(group: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(map(group.get, MEMO_FLAGS))


HOST_SCALAR_STATE = ("step", "mu_product", "window_microbatches", "window_shares")
"""Per-parameter state kept as 0-dim float32 CPU tensors, read on the host without a sync."""
MOMENT_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
"""Moments every algorithm may keep, each a tensor or (state_precision='8bit') codes and
scales (core.quantization)."""
NON_NEGATIVE_MOMENTS = frozenset(MOMENT_STATE) - SIGNED_KEYS
"""Averages of squares: a negative value is no state any step wrote."""

EXECUTION_KEYS = (
    "foreach",
    "fused",
    "gradient_release",
    "state_precision",
    "kahan_sum",
    "stochastic_rounding",
)
"""Group keys that choose how a step runs and its state is stored, not what was learnt:
on load the running optimizer keeps its own, so a checkpoint can be resumed on another
backend, 8-bit state continues in full precision (or back) by de/quantizing, and bf16
parameters continue with the rounding the running optimizer asks for (a Kahan buffer
it does not use is dropped: at most one rounding of each parameter is lost)."""


MOMENT_FAMILIES = {
    "Adam": (
        "gradients",
        "the state of torch.optim.Adam/AdamW/NAdam/RAdam or adamkit's Adam, AdamW, RAdam, "
        "NAdam (or their Composer classes)",
    ),
    "ADOPT": ("normalised gradients", "the state of adamkit's ADOPT (or DecoupledADOPT)"),
}
"""What exp_avg averages in each family, and whose state a member can continue from."""


TORCH_FLAGS = {"maximize": False, "capturable": False, "differentiable": False}
"""Flags torch.optim's Adam, AdamW, RAdam and NAdam read from every group, at the values
adamkit's steps compute (maximize=True state is refused on load)."""

TORCH_EXECUTION_FLAGS = ("capturable", "differentiable")
"""How torch stepped, not what was learnt: dropped from groups a checkpoint brings."""

_UNSUPPORTED_TORCH_FLAGS = {
    "maximize": "only minimizes; negate the loss to maximize",
    "capturable": "reads step counts and hyperparameters on the host, so a CUDA graph "
    "cannot capture its step",
    "differentiable": "steps under no_grad, so nothing can differentiate through them",
}
"""torch.optim flags a group may carry (written by hand or by code written for torch),
refused when set rather than ignored."""


def torch_group_keys(group: dict[str, Any]) -> dict[str, Any]:
    """The keys torch.optim reads that adamkit's groups name differently or leave out, so a
    torch optimizer loading the group continues the run rather than its own defaults.

    Fully decoupled decay (decouple_lr) is marked decoupled: torch has no decay relative
    to max_lr, and weight_decay keeps adamkit's (optimi's, Composer's) meaning, so torch
    decays by lr·weight_decay unless its weight_decay is set to weight_decay / max_lr.
    """
    decoupled = bool(group["decouple_wd"] or group["decouple_lr"])
    return {**TORCH_FLAGS, "decoupled_weight_decay": decoupled}


MOMENT_FAMILY_KEY = "moment_family"
"""Saved in every param group by state_dict(): which family's moments the state holds."""


def saved_moment_family(group: dict[str, Any]) -> str:
    """The family a saved param group comes from: what adamkit's state_dict() wrote under
    MOMENT_FAMILY_KEY; before that key, ADOPT's groups were the ones holding 'clip', a
    bool. A group key of the user's own named 'clip' (kept as torch keeps extra keys) made
    an Adam checkpoint read as ADOPT's, which could not load."""
    written = group.get(MOMENT_FAMILY_KEY)
    if written in MOMENT_FAMILIES:
        return written
    return "ADOPT" if isinstance(group.get("clip"), bool) else "Adam"


def require(ok: bool, name: str, value: object, allowed: str, where: str = "") -> None:
    """Raise a ValueError naming the argument, the value given and what is allowed."""
    if not ok:
        raise ValueError(f"Invalid {name}{where}: {value!r}. Allowed: {allowed}.")


def _is_number(value: object) -> bool:
    """A real number a step can read on the host: an int or float (numpy's included; not a
    bool, nor an int beyond float's range), or a one-element real, non-bool tensor with
    data."""
    if isinstance(value, Tensor):
        return (
            value.numel() == 1
            and not value.is_complex()
            and value.dtype != torch.bool
            and not value.is_meta
        )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's floats too
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _is_count(value: object) -> bool:
    """A host scalar's value (a step, a micro-batch count, NAdam's Π): one number >= 0 that
    float32 holds (the optimizers keep them in float32; a float64 1e300 loaded as inf, and
    ADOPT's loop backend failed on its fourth root)."""
    return finite_at_least(value, 0.0) and float(value) <= FLOAT32_MAX  # type: ignore[arg-type]


_COUNT_ALLOWED = (
    "one finite number >= 0 and at most float32's largest, 3.4e38 (a float or a 1-element tensor)"
)


def finite_at_least(value: object, low: float) -> bool:
    return _is_number(value) and math.isfinite(float(value)) and float(value) >= low  # type: ignore[arg-type]


def _is_optional_bool(value: object) -> bool:
    return value is None or isinstance(value, bool)


def _is_beta(value: object) -> bool:
    return _is_number(value) and 0.0 <= float(value) < 1.0  # type: ignore[arg-type]


def _is_max_lr(value: object) -> bool:
    return value is None or (
        _is_number(value) and math.isfinite(float(value)) and float(value) > 0  # type: ignore[arg-type]
    )


def validate_update_numbers(values: dict[str, Any], where: str = "") -> None:
    """Check the numbers every algorithm's update reads (lr, eps, weight_decay, max_lr),
    for a param group and a functional form's arguments alike."""
    for key in ("lr", "eps", "weight_decay"):
        require(finite_at_least(values[key], 0.0), key, values[key], "a finite number >= 0", where)
    require(_is_max_lr(values["max_lr"]), "max_lr", values["max_lr"], _MAX_LR_ALLOWED, where)
    for key in ("lr", "eps", "weight_decay", "max_lr"):
        # The steps compute in float32: a larger value overflowed mid-step on the loop
        # and foreach backends, after some state had changed (and ran to inf elsewhere).
        require(
            values[key] is None or float(values[key]) <= FLOAT32_MAX,
            key,
            values[key],
            f"at most {FLOAT32_MAX:.7g} (float32's largest: the steps compute in float32)",
            where,
        )


_MAX_LR_ALLOWED = "None or a finite number > 0"
_BETA_ALLOWED = "a number in [0, 1)"


def validate_common_hyperparameters(group: dict[str, Any], where: str = "") -> None:
    """Check the hyperparameters every algorithm shares, before anything is changed."""
    validate_update_numbers(group, where)
    betas = group["betas"]
    require(
        isinstance(betas, (tuple, list)) and len(betas) == 2 and all(map(_is_beta, betas)),
        "betas",
        betas,
        "two numbers (beta1, beta2), each in [0, 1)",
        where,
    )
    for flag in ("decouple_wd", "decouple_lr", "gradient_release"):
        require(isinstance(group[flag], bool), flag, group[flag], "True or False", where)
    for flag in ("kahan_sum", "foreach", "fused"):
        require(_is_optional_bool(group[flag]), flag, group[flag], "None, True or False", where)
    validate_state_precision(group["state_precision"], where)
    require(
        isinstance(group["stochastic_rounding"], bool),
        "stochastic_rounding",
        group["stochastic_rounding"],
        "True or False",
        where,
    )
    seed = group["rounding_seed"]
    require(
        isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32,
        "rounding_seed",
        seed,
        "an integer in [0, 2**32)",
        where,
    )
    require(
        not (group["stochastic_rounding"] and group["kahan_sum"]),
        "kahan_sum",
        group["kahan_sum"],
        "None or False with stochastic_rounding=True (each replaces the other)",
        where,
    )
    require(
        not (group["fused"] and group["foreach"]),
        "fused",
        group["fused"],
        "None or False when foreach=True (pick one backend)",
        where,
    )


_TRITON_ALLOWED = "None, True or False (optimi's name for fused)"
_TRITON_WITH_FOREACH = "None or False when foreach=True (pick one backend)"


def fold_triton_into_fused(options: dict[str, Any]) -> bool:
    """Replace optimi's `triton` switch in options (constructor defaults or a param group)
    by torch's `fused`, in place; True when triton was given.

    Both name the one-pass backend (Triton on GPU, the fused CPU backend on CPU) and None
    lets adamkit choose, so only `fused` is stored and checkpoints hold one key.
    """
    triton = options.pop("triton", None)
    require(_is_optional_bool(triton), "triton", triton, _TRITON_ALLOWED)
    if triton is None:
        return False
    fused = options.get("fused")
    if fused is not None and fused is not triton:
        raise ValueError(
            f"Invalid triton={triton!r} with fused={fused!r}: they are one switch (optimi's "
            "name and torch's for the one-pass backend), here set both on and off. Allowed: "
            "one of them, or the same value for both."
        )
    require(not (triton and options.get("foreach")), "triton", triton, _TRITON_WITH_FOREACH)
    options["fused"] = triton
    return True


HIGH_FULLY_DECOUPLED_WEIGHT_DECAY = 1e-3
"""From here on fully decoupled decay (a fraction of θ per step at max_lr) is unusually
strong; optimi and Composer warn from the same value."""
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
"""The largest hyperparameter the steps, which compute in float32, can take."""


def decoupled_decay_rate(
    lr: float,
    weight_decay: float,
    decouple_wd: bool,
    decouple_lr: bool,
    max_lr: float | None,
) -> float:
    """λ' of a decoupled decay θ ← θ·(1 − lr·λ'): λ (AdamW), λ/max_lr (fully decoupled), else 0.

    Written as torch.optim.AdamW's weight_decay, which is what its native fused kernels take;
    NaN when that overflows (a tiny max_lr), so no native kernel is used for the step.
    """
    if weight_decay == 0 or not (decouple_wd or decouple_lr):
        return 0.0
    if decouple_lr:
        reference_lr = lr if max_lr is None else max_lr
        rate = 0.0 if reference_lr == 0 else weight_decay / reference_lr
        return rate if math.isfinite(rate) else math.nan
    return weight_decay


def weight_decay_terms(
    lr: float,
    weight_decay: float,
    decouple_wd: bool,
    decouple_lr: bool,
    max_lr: float | None,
) -> tuple[float, float]:
    """The weight-decay mode as (L2 coefficient added to the gradient, factor applied to θ).

    Fully decoupled decay (decouple_lr) scales with lr / max_lr, so an LR schedule also
    schedules the decay and lr = 0 decays nothing; it wins over decouple_wd. Without a
    max_lr the ratio is 1 (weight_decay per step whenever lr > 0), as in Composer.
    """
    if weight_decay == 0:
        return 0.0, 1.0
    if decouple_lr:
        # lr/max_lr first: λ/max_lr alone can overflow for a tiny max_lr.
        ratio = 0.0 if lr == 0 else (1.0 if max_lr is None else lr / max_lr)
        return 0.0, 1.0 - ratio * weight_decay
    if decouple_wd:
        return 0.0, 1.0 - lr * weight_decay
    return weight_decay, 1.0


def partition_by_host_scalars(
    *scalar_lists: Sequence[Tensor],
) -> list[tuple[tuple[float, ...], list[int] | None]]:
    """Group parameters whose host scalars (step, mu_product) agree.

    In ordinary training every parameter of a group has the same step count, so this is
    one partition covering everything (indices None); parameters that skipped steps
    (grad None, gradient release) get their own coefficients.
    """
    if not scalar_lists[0]:
        return []
    columns = [read_host_scalars(values) for values in scalar_lists]
    if all(values.count(values[0]) == len(values) for values in columns):
        return [(tuple(values[0] for values in columns), None)]  # without a tuple apiece
    keys = list(zip(*columns, strict=True))
    partitions: dict[tuple[float, ...], list[int]] = {}
    for i, key in enumerate(keys):
        partitions.setdefault(key, []).append(i)
    return list(partitions.items())


def read_host_scalars(scalars: Sequence[Tensor]) -> list[float]:
    """The values of 0-dim host tensors: one C call where possible, else one stack and
    tolist (float() of each 0-dim tensor costs ~1 µs apiece)."""
    if len(scalars) == 1:  # gradient release: one parameter per step
        return [scalars[0].item()]
    values = cpu_kernel.read_scalars(scalars)
    return values if values is not None else torch.stack(list(scalars)).tolist()


def add_to_host_scalars(scalars: Sequence[Tensor], amount: float) -> None:
    """Count a step (or micro-batch) for every parameter at once."""
    if cpu_kernel.add_to_scalars(scalars, amount):
        return
    if len(scalars) == 1:  # torch's CPU foreach ops are a loop of these
        scalars[0].add_(amount)
    else:
        torch._foreach_add_(list(scalars), amount)


def multiply_host_scalars(scalars: Sequence[Tensor], factor: float) -> None:
    """Scale every parameter's host scalar at once (NAdam's running product Π)."""
    if not cpu_kernel.multiply_scalars(scalars, factor):
        torch._foreach_mul_(list(scalars), factor)


def window_position(
    state_steps: Sequence[Tensor],
    window_microbatches: Sequence[Tensor] | None,
    window_shares: Sequence[Tensor] | None = None,
) -> list[tuple[float, int, float | None, list[int] | None]]:
    """Partition parameters by (step count, 1-based micro-batch index in the current
    window, share of the window already folded: None without window_shares).

    Without optimizer accumulation every micro-batch is the first of its window.
    """
    if window_microbatches is None:
        return [
            (step, 1, None, indices) for (step,), indices in partition_by_host_scalars(state_steps)
        ]
    if window_shares is None:
        return [
            (step, int(seen) + 1, None, indices)
            for (step, seen), indices in partition_by_host_scalars(state_steps, window_microbatches)
        ]
    return [
        (step, int(seen) + 1, folded, indices)
        for (step, seen, folded), indices in partition_by_host_scalars(
            state_steps, window_microbatches, window_shares
        )
    ]


def window_terms(
    step: float,
    microbatch: int,
    beta2: float,
    l2_weight_decay: float,
    folded_share: float | None = None,
    microbatch_share: float | None = None,
) -> dict[str, Any]:
    """Moment-fold scalars for micro-batch k (1-based) of an optimizer-accumulation window
    of step `step`, and the random bits its 8-bit m and v round with (state_draw).

    m is exact: the window adds (1 − β1)·(Σ g_k + λθ), as ordinary accumulation would; the
    L2 term enters once, with the first micro-batch (θ does not change within a window).
    v needs (Σ g_k)², which cannot be formed without keeping a gradient buffer; micro-batch
    k adds w_k·g_k² instead, the growth of the squared running sum if g_k is in proportion
    to the micro-batch gradients before it. With shares (a loss scaled by each
    micro-batch's share of the samples, as Composer scales it: s this one's, c the sum of
    those this parameter already folded in the window) that growth is
    ((c + s)² − c²)/s² = 1 + 2c/s; without, every micro-batch has an equal share and
    w_k = 2k − 1. It is exact when micro-batch gradients agree per share (and no L2 decay
    is used); with noisy micro-batches v carries their variance, so steps are somewhat
    smaller.
    """
    state_draw = rounding_draw(step, microbatch)
    if microbatch == 1:
        return {"l2_weight_decay": l2_weight_decay, "state_draw": state_draw}
    if folded_share is None or microbatch_share is None:
        growth = 2.0 * microbatch - 1.0
    else:
        growth = 1.0 + 2.0 * float(folded_share) / float(microbatch_share)
    return {
        "l2_weight_decay": 0.0,
        "continues_window": True,
        "window_grad_sq_weight": growth * (1 - beta2),
        "state_draw": state_draw,
    }


MICROBATCH_SHARE_RANGE = (1e-30, 1e30)
"""Shares are summed per parameter in float32 (a host scalar): kept well inside its range."""


def require_microbatch_share(value: object) -> None:
    """A micro-batch's share of its optimizer-accumulation window's gradient (see
    window_terms): None, or a number in MICROBATCH_SHARE_RANGE."""
    low, high = MICROBATCH_SHARE_RANGE
    require(
        value is None or (finite_at_least(value, low) and float(value) <= high),  # type: ignore[arg-type]
        "microbatch_share",
        value,
        f"None, or a number from {low:g} to {high:g}: this micro-batch's share of the "
        "window, such as its number of samples (summed in float32)",
    )


def advance_counters(
    state_steps: Sequence[Tensor],
    window_microbatches: Sequence[Tensor] | None,
    accumulate: bool,
    window_shares: Sequence[Tensor] | None = None,
    microbatch_share: float | None = None,
) -> None:
    """A folded micro-batch counts within its window (and adds its share to the folded
    shares); an update closes the window and counts a step."""
    if accumulate:
        require(
            window_microbatches is not None,
            "window_microbatches",
            None,
            "a list of 0-dim tensors when accumulate=True",
        )
        add_to_host_scalars(window_microbatches, 1.0)
        if window_shares is not None and microbatch_share is not None:
            add_to_host_scalars(window_shares, float(microbatch_share))
        return
    add_to_host_scalars(state_steps, 1.0)
    for counters in (window_microbatches, window_shares):
        for counter in counters or ():
            counter.zero_()


def step_lists(
    tensor_lists: Sequence[Sequence[Any] | None], indices: list[int] | None, step: float
) -> list[Any]:
    """The lists of the parameters at indices for the step numbered `step`: stochastic
    rounding (in the last, rounding list) draws that step's random bits."""
    lists = [subset(values, indices) for values in tensor_lists]
    lists[-1] = rounding_at_step(lists[-1], step)
    return lists


def _sit_at(members: Sequence[Tensor], indices: Sequence[int], params: Sequence[Tensor]) -> bool:
    """Whether each of params is members[index] at its index (a stochastic rounding
    stream rests on it: StepMemo.streams)."""
    return all(
        0 <= i < len(members) and members[i] is p for i, p in zip(indices, params, strict=True)
    )


def rounding_at_step(rounding: Sequence[Any] | None, step: float) -> Sequence[Any] | None:
    """A rounding list whose stochastic roundings draw the bits of step `step`."""
    if rounding is None or StochasticRounding not in set(map(type, rounding)):
        return rounding
    return [r.at_step(int(step)) if type(r) is StochasticRounding else r for r in rounding]


def call_backend(
    step_function: Callable[..., None],
    lists: list[Any],
    coefficients: AdamStepCoefficients | AdoptStepCoefficients,
) -> None:
    """step_function(*lists, coefficients): a functional form's backend call, recorded when
    the optimizer's released step is recording it (see _GroupReplay)."""
    memo = checked_for(lists[0])
    if type(memo) is StepMemo and memo.recorded is not None:
        memo.recorded.append((step_function, lists, coefficients))
    step_function(*lists, coefficients)


def subset(values: Sequence[Any] | None, indices: list[int] | None) -> Any:
    """The items at indices (all of them when indices is None); None stays None."""
    if values is None or indices is None:
        return values
    return [values[i] for i in indices]


def no_kahan(params: Sequence[Tensor]) -> list[None]:
    """The kahan_comps list for a call without compensation."""
    return [None] * len(params)


def hyperparameters(constructor_locals: dict[str, Any]) -> dict[str, Any]:
    """A constructor's arguments as a defaults dict (everything but self and params)."""
    return {k: v for k, v in constructor_locals.items() if k not in ("self", "params", "__class__")}


def unwrapped(optimizer: Optimizer) -> Optimizer:
    """The optimizer itself, also when given a wrapper that poses as its class and delegates
    to it: Lightning's LightningOptimizer (what `self.optimizers()` returns) subclasses the
    optimizer's class, so an attribute set on it stays on the wrapper, where the optimizer
    (which Lightning steps) never reads it."""
    while "param_groups" not in optimizer.__dict__:
        inner = getattr(optimizer, "optimizer", None)  # LightningOptimizer's public handle
        if not isinstance(inner, Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def require_core_optimizer(optimizer: object, allowed: str) -> None:
    """Refuse an optimizer that is not adamkit's, named by its own class (a framework's
    wrapper poses as the optimizer it wraps: Fabric's 'FabricAdamW' read as adamkit's)."""
    if not isinstance(optimizer, AdamFamilyOptimizer):
        inner = unwrapped(optimizer) if isinstance(optimizer, Optimizer) else optimizer
        kind = type(inner)
        raise TypeError(
            f"Invalid optimizer: {kind.__module__}.{kind.__qualname__}. Allowed: an adamkit "
            f"core optimizer (core.Adam, AdamW, RAdam, NAdam, ADOPT{allowed}."
        )


class AdamFamilyOptimizer(Optimizer, metaclass=ABCMeta):
    """The torch.optim.Optimizer every adamkit optimizer derives from.

    Subclasses validate their own hyperparameters in `_validate_algorithm`, list their
    moment buffers in `_tensor_state_keys`, and turn one group into a call of their
    functional form in `_update_group`.
    """

    _torch_group_key_aliases: ClassVar[dict[str, str]] = {"decoupled_weight_decay": "decouple_wd"}
    warns_on_ambiguous_decay: ClassVar[bool] = True
    """Whether loading a group without `decouple_lr` into fully decoupled decay warns
    (composer_adam's classes mean Composer's checkpoints: they do not)."""
    moment_family: ClassVar[str] = "Adam"
    """A key of MOMENT_FAMILIES: state dicts load only within a family."""
    supports_optimizer_accumulation: ClassVar[bool] = True
    update_reads_gradient: ClassVar[bool] = False
    """Whether the update uses the gradient itself besides the moments (NAdam's Nesterov
    term): core.metrics cannot rebuild it once the gradient is gone."""

    @property
    def optimizer_accumulation(self) -> bool:
        """While True, steps fold micro-batch gradients into the moments without touching the
        parameters; the first step after it is set back to False updates them (see
        window_terms). Kept on the optimizer a wrapper delegates to (see `unwrapped`)."""
        return unwrapped(self).__dict__.get("_optimizer_accumulation", False)

    @optimizer_accumulation.setter
    def optimizer_accumulation(self, value: bool) -> None:
        require(isinstance(value, bool), "optimizer_accumulation", value, "True or False")
        unwrapped(self).__dict__["_optimizer_accumulation"] = value

    @property
    def microbatch_share(self) -> float | None:
        """This micro-batch's share of its optimizer-accumulation window's gradient (any
        unit, such as its number of samples), for micro-batches whose losses are scaled by
        their share of the samples (Composer's, of unequal size; composer_adam's
        GradientRelease sets it): each parameter's state sums the shares it folded
        (`window_shares`) and v grows by this one's share (see window_terms). None (the
        default): every micro-batch an equal share, as Lightning's accumulate_grad_batches
        scales each loss by 1/K; windows then forget their shares. Set it before each
        micro-batch's backward, the one that closes the window included."""
        return unwrapped(self).__dict__.get("_microbatch_share")

    @microbatch_share.setter
    def microbatch_share(self, value: float | None) -> None:
        require_microbatch_share(value)
        unwrapped(self).__dict__["_microbatch_share"] = None if value is None else float(value)  # type: ignore[arg-type]

    def open_windows(self) -> dict[Tensor, int]:
        """Each parameter whose optimizer-accumulation window is open, with the number of
        micro-batches folded into it. `load_state_dict` restores them from the state's
        `window_microbatches`, but torch.distributed.checkpoint loads only the state keys a
        fresh optimizer has, which hold no window: carry these beside such a checkpoint
        and give them to `reopen_windows` after loading."""
        return {
            param: int(state["window_microbatches"])
            for param, state in self.state.items()
            if float(state.get("window_microbatches", 0.0)) > 0
        }

    def reopen_windows(self, counts: dict[Tensor, int]) -> None:
        """Reopen the windows `open_windows` returned before a checkpoint whose loader
        dropped them: the next step without optimizer_accumulation closes them, as it
        would have without the checkpoint. Everything is checked before anything is set."""
        name = type(self).__name__
        if not isinstance(counts, dict):
            raise ValueError(
                f"Invalid counts: a {type(counts).__name__}. Allowed: a dict {{parameter: count}}."
            )
        if counts and not self.supports_optimizer_accumulation:
            raise ValueError(
                f"Invalid counts for {name}.reopen_windows: {len(counts)} open windows. "
                f"Allowed: none ({name} has no optimizer accumulation)."
            )
        params = {param for group in self.param_groups for param in group["params"]}
        for param, count in counts.items():
            shown = tuple(param.shape) if isinstance(param, Tensor) else param
            require(
                isinstance(param, Tensor) and param in params,
                "counts key",
                shown,
                f"a parameter of this {name}",
            )
            require(
                isinstance(count, int) and not isinstance(count, bool) and count >= 1,
                "counts value",
                count,
                "an int >= 1 (micro-batches folded into the window)",
                f" of a parameter of shape {shown}",
            )
            state = self.state.get(param)
            require(
                bool(state),
                "counts key",
                shown,
                "a parameter with state: load the checkpoint first (a window folds "
                "micro-batches into moments the state holds)",
            )
            held = state.get("window_microbatches")
            require(
                held is None or float(held) in (0.0, count),
                "counts value",
                count,
                f"{int(held or 0)}, the window the state already holds",
                f" of a parameter of shape {shown}",
            )
        for param, count in counts.items():
            self.state[param]["window_microbatches"] = torch.tensor(float(count), device="cpu")
            # shares of a closed window are no measure of this one: as equal shares
            self.state[param].pop("window_shares", None)
        if counts:
            self._windows_opened = True  # full steps close windows left open
            if isinstance(self.state, StateTable):
                self.state.writes += 1  # step memos were made without these windows

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        # The name the user chose the fused backend by, for errors about it.
        self._fused_argument = "triton" if fold_triton_into_fused(defaults) else "fused"
        host_checks_setting()  # a misspelt ADAMKIT_HOST_CHECKS is refused here, not mid-step
        self._validate_group(defaults, "")
        super().__init__(params, {**defaults, **self._format_marks()})
        self.state = StateTable(dict, self.state)
        self._warn_if_weight_decay_is_high()

    def _format_marks(self) -> dict[str, Any]:
        """What every group (live and saved) says of the state's format: the 8-bit code
        maps' version and the moments' family, checked on load. Marks, not hyperparameters:
        state_dict() writes this optimizer's own and a load restores them. Kept in the live
        groups because torch.distributed.checkpoint's flattened optimizer state dict
        (flatten_optimizer_state_dict=True, torchtitan's default) loads only the keys live
        groups hold: kept only in saved dicts, they were dropped there, and 8-bit state was
        refused as an older format (an Adam group with a bool 'clip' key, as ADOPT's)."""
        return {CODE_FORMAT_KEY: CODE_FORMAT, MOMENT_FAMILY_KEY: self.moment_family}

    def _warn_if_weight_decay_is_high(self) -> None:
        """Warn once, as optimi does, when a fully decoupled group's weight_decay is high."""
        high = [
            float(group["weight_decay"])
            for group in self.param_groups
            if group["decouple_lr"]
            and float(group["weight_decay"]) >= HIGH_FULLY_DECOUPLED_WEIGHT_DECAY
        ]
        if high:
            self._report_high_weight_decay(max(high))

    def _warn_if_decay_mode_is_ambiguous(self, saved_groups: list[dict[str, Any]]) -> None:
        """A loaded group without decouple_lr (torch.optim's, or Composer's DecoupledAdamW)
        takes this optimizer's; fully decoupled, its weight_decay reads as Composer's, which
        a torch.optim checkpoint's (by lr) is not: 1/max_lr times the decay. Say so once."""
        if not self.warns_on_ambiguous_decay:
            return
        ambiguous = [
            index
            for index, (saved, group) in enumerate(
                zip(saved_groups, self.param_groups, strict=True)
            )
            if "decouple_lr" not in saved and group["decouple_lr"] and group["weight_decay"] != 0
        ]
        if ambiguous:
            warnings.warn(
                f"{type(self).__name__}.load_state_dict: param group(s) {ambiguous} come without "
                "decouple_lr (a torch.optim or Composer DecoupledAdamW checkpoint) and take "
                "this optimizer's decouple_lr=True, so their weight_decay is applied fully "
                "decoupled (per step at max_lr, Composer's meaning). From a torch.optim "
                "checkpoint (weight_decay scaled by lr) that is 1/max_lr times its decay: set "
                "each group's decouple_lr to False to continue it as torch would, or its "
                "weight_decay to weight_decay * max_lr. Load Composer checkpoints into "
                "composer_adam's classes, which read them as Composer's without this warning.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _report_high_weight_decay(self, weight_decay: float) -> None:
        """Say that weight_decay is high for fully decoupled decay (an adapter may reword it)."""
        warnings.warn(
            f"{type(self).__name__}: weight_decay={weight_decay} is high for fully decoupled "
            "decay (decouple_lr=True): it is the fraction of each weight removed per step at "
            f"max_lr, not scaled by lr; usual values are 1e-5 to 1e-4, below "
            f"{HIGH_FULLY_DECOUPLED_WEIGHT_DECAY}.",
            UserWarning,
            stacklevel=5,
        )

    # -- hyperparameters -----------------------------------------------------------------

    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        validate_common_hyperparameters(group, where)
        for key, why in _UNSUPPORTED_TORCH_FLAGS.items():
            require(
                not group.get(key, False),
                key,
                group.get(key),
                f"False ({type(self).__name__} {why})",
                where,
            )
        self._validate_algorithm(group, where)

    def _validate_algorithm(self, group: dict[str, Any], where: str) -> None:
        """Check the algorithm's own hyperparameters (override in subclasses)."""

    def _validate_stepped_group(self, group: dict[str, Any], where: str) -> tuple[Any, ...] | None:
        """_validate_group at every step, skipped while the group holds the very objects it
        held when it last passed (same keys, each value identical) and all of them are
        immutable: any write (a scheduler's group["lr"] = x) stores a new object and is
        checked before anything changes, and values that can change in place (a tensor
        lr, a list of betas) are checked every step. Saves ~3 µs a call, which gradient
        release pays per parameter. Returns the record of the group as it passed (the
        same object while its values stay the same), or None if it holds mutable values."""
        passed = self.__dict__.setdefault("_passed_groups", {})
        last = passed.get(id(group))
        values = tuple(group.values())
        if (
            last is not None
            and last[0] is group
            and len(last[2]) == len(values)
            and all(map(operator.is_, values, last[2]))
            and last[1] == tuple(group)
        ):
            if len(passed) > len(self.param_groups):  # a group was removed: let it go
                _forget_removed_groups(passed, self.param_groups)
            return last
        # optimi's name for fused written into a live group (optimi keeps it there): it
        # switches the backend as there, once the group passes; only fused is stored.
        written_triton = "triton" in group
        if written_triton:
            triton = group["triton"]
            require(_is_optional_bool(triton), "triton", triton, _TRITON_ALLOWED, where)
            require(
                not (triton and group.get("foreach")), "triton", triton, _TRITON_WITH_FOREACH, where
            )
        missing = [k for k in self.defaults if k not in group and k not in TORCH_FLAGS]
        if missing:  # a KeyError from deep inside the step, before
            raise ValueError(
                f"Invalid {', '.join(missing)}{where}: missing (its key was deleted). Allowed: "
                "a value for every key of the optimizer's defaults, which add_param_group "
                "fills in; set a value instead of deleting the key."
            )
        _refuse_params_not_a_list(group.get("params"), where)
        self._validate_group(group, where)
        if written_triton:  # None: adamkit chooses, as optimi's triton=None does
            group["fused"] = group.pop("triton")
            values = tuple(group.values())
        if not all(_immutable(v) for k, v in group.items() if k != "params"):
            return None
        if len(passed) >= len(self.param_groups):  # drop groups no longer stepped
            _forget_removed_groups(passed, self.param_groups)
        record = passed[id(group)] = (group, tuple(group), values)  # group held: its id stays
        return record

    def _check_fused_possible(self, group: dict[str, Any], where: str) -> None:
        """fused=True is refused up front (construction and every step) where it cannot run;
        the error names the argument it was chosen by (fused, or optimi's triton)."""
        if group["fused"]:
            reason = fused_unavailable_reason(group["params"])
            name = getattr(self, "_fused_argument", "fused")
            require(reason is None, name, True, f"None or False here: {reason}", where)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its max_lr defaults to its own lr at this moment."""
        if isinstance(param_group, dict):
            if "triton" in param_group:
                param_group = dict(param_group)
                fold_triton_into_fused(param_group)
            merged = {**self.defaults, **param_group}
            self._validate_group(merged, f" in param group {len(self.param_groups)}")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            where = f" in param group {len(self.param_groups) - 1}"
            _check_params(group["params"], where)
            self._check_fused_possible(group, where)
            if group["gradient_release"]:
                # Released training keeps working when a group is added mid-run (refused
                # for a parameter another optimizer releases).
                for registration in self.gradient_release_registrations[:1]:
                    registration.release(list(group["params"]))
        except Exception:  # a refusal, or torch's error from a hook: the group is not added
            self.param_groups.pop()
            raise
        if group["max_lr"] is None and float(group["lr"]) > 0:
            # An lr of 0 at creation names no peak: max_lr stays None (decay ratio 1, as Composer).
            group["max_lr"] = float(group["lr"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Fill groups loaded from torch.optim (or older adamkit) with this optimizer's keys."""
        super().__setstate__(state)
        if type(self.state) is not StateTable:
            self.state = StateTable(dict, self.state)
        for group in self.param_groups:
            self._complete_group(group)

    def _complete_group(self, group: dict[str, Any]) -> None:
        """Give a group from torch.optim (or older adamkit) the keys this optimizer reads."""
        for torch_key, own_key in self._torch_group_key_aliases.items():
            if torch_key in group and own_key not in group:
                group[own_key] = bool(group[torch_key])
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        reference_lr = group.get("initial_lr", group["lr"])
        if group["max_lr"] is None and finite_at_least(reference_lr, 0.0) and reference_lr > 0:
            # A scheduler (torch or Composer) records the lr it started from.
            group["max_lr"] = float(reference_lr)

    # -- state -----------------------------------------------------------------------------

    def _tensor_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The parameter-shaped buffers this algorithm keeps (override to add more)."""
        return ("exp_avg", "exp_avg_sq")

    quantized_state_keys: ClassVar[frozenset[str]] = frozenset(MOMENT_STATE)
    """The moments state_precision='8bit' stores in 8 bits (an algorithm whose math is
    sensitive to one of them keeps it full)."""

    host_state_keys: ClassVar[tuple[str, ...]] = ("step",)
    """The 0-dim host scalars _init_host_state creates (an override adds its own)."""

    def _init_host_state(self, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Create the 0-dim host scalars (override to add more than `step`)."""
        if "step" not in state:  # not setdefault: building a tensor every step costs µs
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device="cpu")

    @staticmethod
    def _uses_kahan(group: dict[str, Any], param: Tensor) -> bool:
        return (
            group["kahan_sum"] is not False
            and not group["stochastic_rounding"]
            and param.dtype in LOW_PRECISION_DTYPES
        )

    def _moments_held_full(self, param: Tensor, group: dict[str, Any]) -> frozenset[str]:
        """The moments param's state holds as tensors of its dtype in this group (the rest
        as 8-bit codes and scales): what _prepared_state stores and _beyond_float16 checks."""
        if group["state_precision"] == "8bit" and quantizable(param) is None:
            return frozenset(MOMENT_STATE) - self.quantized_state_keys
        return frozenset(MOMENT_STATE)

    def _prepared_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """The parameter's state, creating whatever is missing (first step, flag turned on)
        and storing each moment as the group's state_precision asks: a moment saved in the
        other precision (a checkpoint, a changed option) is converted, not reset."""
        state = self.state[param]
        self._init_host_state(state, group)
        kept_full = quantizable(param) if group["state_precision"] == "8bit" else "not asked"
        if kept_full == FSDP1_FULL_PRECISION:
            warnings.warn(
                f"state_precision='8bit' keeps full-precision state for {kept_full}.",
                RuntimeWarning,
                stacklevel=2,
            )
        held_full = self._moments_held_full(param, group)
        used = self._tensor_state_keys(group)
        # Then a moment this algorithm does not read (max_exp_avg_sq from an AMSGrad
        # checkpoint in RAdam): kept as torch keeps it, in the precision asked, so a state
        # dict saved with 'full' holds no codes (torch.optim could not read them).
        for key in (*used, *(k for k in MOMENT_STATE if k not in used)):
            codes, absmax = moment_keys(key)
            if key not in held_full:
                if codes not in state and (key in used or key in state):
                    state[codes], state[absmax] = quantized_state(
                        param, state.pop(key, None), key in SIGNED_KEYS
                    )
            elif key not in state:
                if codes in state:
                    state[key] = full_precision(
                        state.pop(codes), state.pop(absmax), key in SIGNED_KEYS, param
                    )
                elif key in used:
                    state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if self._uses_kahan(group, param):
            if "kahan_comp" not in state:
                state["kahan_comp"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        else:  # Kahan turned off (a resumed run's choice): the buffer would only take memory
            state.pop("kahan_comp", None)
        return state

    def _prepared_states(self, params: list[Tensor], group: dict[str, Any]) -> list[dict[str, Any]]:
        """_prepared_state of each parameter; after the first step nothing is missing, and
        finding that out costs one set comparison per parameter rather than a call."""
        states = [self.state[p] for p in params]
        _follow_parameter_dtypes(
            params, states, group["kahan_sum"] is not False and not group["stochastic_rounding"]
        )
        required = {*self.host_state_keys, *self._tensor_state_keys(group)}
        if group["state_precision"] == "8bit":
            return self._prepared_quantized_states(params, states, group, required)
        low_precision = set(LOW_PRECISION_DTYPES)
        if group["stochastic_rounding"] or not self._any_kahan(group, params):
            complete = all(map(required.issubset, states))
        else:
            with_comp = required | {"kahan_comp"}
            complete = all(
                (with_comp if p.dtype in low_precision else required).issubset(state)
                for p, state in zip(params, states, strict=True)
            )
        if complete:
            return states
        return [self._prepared_state(p, group) for p in params]

    def _prepared_quantized_states(
        self,
        params: list[Tensor],
        states: list[dict[str, Any]],
        group: dict[str, Any],
        required: set[str],
    ) -> list[dict[str, Any]]:
        """_prepared_states for a group with 8-bit state: each parameter's keys depend on
        whether it is quantized (core.quantization.quantizable)."""
        quantized = {
            k
            for key in required
            for k in (moment_keys(key) if key in self.quantized_state_keys else (key,))
        }
        for param, state in zip(params, states, strict=True):
            keys = quantized if quantizable(param) is None else required
            if self._uses_kahan(group, param):
                keys = keys | {"kahan_comp"}
            if not keys.issubset(state):
                self._prepared_state(param, group)
        return states

    def _moments(
        self,
        states: Sequence[dict[str, Any]],
        key: str,
        group: dict[str, Any] | None = None,
        params: Sequence[Tensor] | None = None,
    ) -> Sequence[Tensor | QuantizedMoment]:
        """A moment of each state as backends take it: a tensor, or its 8-bit form (with
        the stream of its stochastic rounding for m and v: pass the group and its
        parameters).
        In a memoized step, the memo's tuple, whose columns (StepMemo) were checked this
        step or are taken now while the memo is being made."""
        memo = self._memo_of(states)
        if memo is None:
            return self._moment_views(states, key, group, params)
        moments = memo.moments.get(key)
        if moments is None:
            moments = memo.moments[key] = tuple(self._moment_views(states, key, group, params))
            if QuantizedMoment not in set(map(type, moments)):
                memo.columns[key] = moments
            else:  # three columns (see StepMemo), None where a row has the other form
                eight_bit = [m if type(m) is QuantizedMoment else None for m in moments]
                codes, absmax = moment_keys(key)
                memo.columns[key] = tuple(
                    None if q is not None else m for q, m in zip(eight_bit, moments, strict=True)
                )
                memo.columns[codes] = tuple(None if q is None else q.codes for q in eight_bit)
                memo.columns[absmax] = tuple(None if q is None else q.absmax for q in eight_bit)
        return moments

    def _moment_views(
        self,
        states: Sequence[dict[str, Any]],
        key: str,
        group: dict[str, Any] | None,
        params: Sequence[Tensor] | None,
    ) -> list[Tensor | QuantizedMoment]:
        """moment_view of each state; an 8-bit m's and v's stream is its parameter's
        position among the optimizer's (as stochastic rounding of parameters), under the
        group's rounding_seed."""
        if (
            group is None
            or params is None
            or key not in STOCHASTIC_KEYS
            or group["state_precision"] != "8bit"
        ):
            return [moment_view(state, key) for state in states]
        positions = self._rounding_streams()
        seed = group["rounding_seed"]
        return [
            moment_view(state, key, stochastic_stream(seed, positions[id(param)]))
            for param, state in zip(params, states, strict=True)
        ]

    def _column(self, states: Sequence[dict[str, Any]], key: str) -> Sequence[Any]:
        """state[key] of each state; in a memoized step, the memo's tuple (checked this
        step, or taken now while the memo is being made)."""
        memo = self._memo_of(states)
        if memo is None:
            return [state[key] for state in states]
        column = memo.columns.get(key)
        if column is None:
            column = memo.columns[key] = tuple(map(operator.itemgetter(key), states))
        return column

    def _memo_of(self, states: Sequence[dict[str, Any]]) -> StepMemo | None:
        """The memo of the step running now, if states are its states."""
        memo: StepMemo | None = self.__dict__.get("_active_memo")
        return memo if memo is not None and memo.states is states else None

    def _any_kahan(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        """Whether any of params may use Kahan compensation."""
        return group["kahan_sum"] is not False and self._any_low_precision(params)

    def _any_low_precision(self, params: list[Tensor]) -> bool:
        """Whether any of params is bfloat16 or float16. _prepared_states and _kahan_comps
        ask about the same list in one step: its dtypes are read once."""
        last = getattr(self, "_last_kahan_answer", None)
        if last is not None and last[0] is params:
            return last[1]
        answer = not _LOW_PRECISION.isdisjoint(map(dtype_of, params))
        self._last_kahan_answer = (params, answer)  # held, so no other list takes its id
        return answer

    def _kahan_comps(
        self, group: dict[str, Any], params: Sequence[Tensor], states: Sequence[dict[str, Any]]
    ) -> Sequence[Tensor | StochasticRounding | None]:
        """How each parameter's update is rounded: with its Kahan buffer, stochastically,
        or to nearest (None)."""
        memo = self._memo_of(states)
        if memo is not None and memo.rounding is not None:
            return memo.rounding
        comps = self._rounding_of(group, params, states)
        if memo is not None:
            memo.rounding = tuple(comps)
        return comps

    def _rounding_of(
        self, group: dict[str, Any], params: Sequence[Tensor], states: Sequence[dict[str, Any]]
    ) -> list[Tensor | StochasticRounding | None]:
        if group["stochastic_rounding"]:
            # kahan_sum=False beside it (a LightningCLI flag turning Kahan off) used to
            # turn stochastic rounding off too: rounded to nearest, silently
            if not self._any_low_precision(params):
                return [None] * len(params)
            streams = self._rounding_streams()
            seed = group["rounding_seed"]
            return [
                StochasticRounding(seed, streams[id(p)]) if p.dtype in _LOW_PRECISION else None
                for p in params
            ]
        if not self._any_kahan(group, params):
            return [None] * len(params)
        return [
            state["kahan_comp"] if self._uses_kahan(group, p) else None
            for p, state in zip(params, states, strict=True)
        ]

    # -- stepping --------------------------------------------------------------------------

    def _common_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments every functional form takes, read from the live group."""
        beta1, beta2 = group["betas"]
        return {
            "lr": float(group["lr"]),
            "beta1": float(beta1),
            "beta2": float(beta2),
            "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"]),
            "decouple_wd": group["decouple_wd"],
            "decouple_lr": group["decouple_lr"],
            "max_lr": group["max_lr"],
            "foreach": group["foreach"],
            "fused": group["fused"],
        }

    @abstractmethod
    def _update_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
    ) -> None:
        """Run the algorithm's functional form on one group."""

    def last_step_coefficients(
        self, param: Tensor, lr: float | None = None
    ) -> AdamStepCoefficients | AdoptStepCoefficients | None:
        """The scalars of the step param last took, at its group's current hyperparameters
        (or at `lr`, the one that step was taken with, where a scheduler has moved it since).

        Optimizer metrics (core.metrics) read the update from these, so the algorithm's
        math stays in its coefficient function. None before param's first step, and for
        a parameter with state that is in no param group (taken out since its last step,
        by hand or module surgery): its hyperparameters are gone with its group.
        """
        if lr is not None:
            require(
                finite_at_least(lr, 0.0) and float(lr) <= FLOAT32_MAX,  # type: ignore[arg-type]
                "lr",
                lr,
                "None, or the finite lr >= 0 the step was taken with",
            )
        state = self.state.get(param)
        found = self._find_group(param)
        if not state or float(state.get("step", 0)) == 0 or found is None:
            return None
        _, group = found
        kwargs = self._common_kwargs(group)
        if lr is not None:
            kwargs["lr"] = lr
        l2_weight_decay, param_decay = weight_decay_terms(
            kwargs["lr"],
            kwargs["weight_decay"],
            kwargs["decouple_wd"],
            kwargs["decouple_lr"],
            kwargs["max_lr"],
        )
        scalars = {key: kwargs[key] for key in ("lr", "beta1", "beta2", "eps")}
        scalars.update(l2_weight_decay=l2_weight_decay, param_decay=param_decay)
        return self._step_coefficients(group, state, float(state["step"]), scalars)

    @abstractmethod
    def _step_coefficients(
        self, group: dict[str, Any], state: dict[str, Any], step: float, scalars: dict[str, Any]
    ) -> AdamStepCoefficients | AdoptStepCoefficients:
        """Call the algorithm's coefficient function for a state at `step` (override)."""

    def _window_kwargs(self, states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Optimizer-accumulation arguments: fold while accumulating, close the window after.
        A memoized step knows its states have no window (memos end while accumulating)."""
        memo = self._memo_of(states)
        if memo is not None and memo.windowless:
            return {}
        arguments = self._window_arguments(states)
        if memo is not None:
            memo.windowless = not arguments
        return arguments

    def _window_arguments(self, states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if self.optimizer_accumulation:
            self._windows_opened = True  # from now on, full steps close windows left open
            for state in states:
                state.setdefault(
                    "window_microbatches", torch.tensor(0.0, dtype=torch.float32, device="cpu")
                )
            return {
                "window_microbatches": [s["window_microbatches"] for s in states],
                "accumulate": True,
                **self._share_arguments(states),
            }
        if any(map(operator.contains, states, repeat("window_microbatches"))):
            for state in states:
                state.setdefault(
                    "window_microbatches", torch.tensor(0.0, dtype=torch.float32, device="cpu")
                )
            return {
                "window_microbatches": [s["window_microbatches"] for s in states],
                **self._share_arguments(states),
            }
        return {}

    def _share_arguments(self, states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Each state's folded shares and this micro-batch's share, when one is set. A
        window opened without shares (or whose shares a loader dropped) counts its earlier
        micro-batches as shares equal to this one; without a share, windows drop theirs."""
        share = self.microbatch_share
        if share is None:
            if any(map(operator.contains, states, repeat("window_shares"))):
                for state in states:
                    state.pop("window_shares", None)
            return {}
        for state in states:
            if "window_shares" not in state:
                earlier = float(state["window_microbatches"]) * share
                state["window_shares"] = torch.tensor(earlier, dtype=torch.float32, device="cpu")
        return {
            "window_shares": [s["window_shares"] for s in states],
            "microbatch_share": share,
        }

    def _check_step_allowed(self, grad_scaler: object) -> None:
        name = type(self).__name__
        # GradScaler passes itself, or (newer torch) sets grad_scale/found_inf on the optimizer.
        if grad_scaler is not None or getattr(self, "grad_scale", None) is not None:
            raise RuntimeError(
                f"{name} with gradient release cannot be used with a GradScaler: parameters "
                "are updated inside backward, before the scaler can unscale gradients or skip "
                "a step with inf/NaN. Train in bf16 (no scaler needed) or turn release off."
            )
        if self.optimizer_accumulation and not self.supports_optimizer_accumulation:
            raise ValueError(
                f"Invalid optimizer_accumulation for {name}: True. Allowed: False ({name}'s "
                "update needs the whole accumulated gradient, which accumulation does not keep); "
                "optimizer accumulation supports Adam, AdamW and RAdam."
            )

    def _checked_gradients(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], where: str
    ) -> list[Tensor]:
        """The gradients to step params with (checked_gradient_list), after refusing a
        parameter given a dtype or memory no step can take since it was added
        (`param.data = ...`, a freed storage). Runs where a step cannot reuse its memo,
        whose checks cover the same (such a gradient never matches one)."""
        if _unsteppable(params) or host_checks().first_unbacked(params) >= 0:
            _refuse_unsteppable_params(params, group["params"], where)

        def grad_name(position: int) -> str:
            param = params[position]
            index = next(i for i, member in enumerate(group["params"]) if member is param)
            return f"grad of params[{index}]{where}"

        return checked_gradient_list(type(self).__name__, params, grads, grad_name)

    def _check_state_tensors(
        self, group: dict[str, Any], params: list[Tensor], where: str
    ) -> Callable[[], None]:
        """Refuse, before anything changes, state tensors no step can take: laid out for
        another shape than their parameter's (a parameter replaced through `.data` by one
        of another shape with as many elements: the loop and foreach backends failed on it
        halfway, and the fused ones would pair elements by memory order and decode 8-bit
        codes with another block's scale), not a tensor, of a dtype that holds no moment
        (set by hand: integer or complex), whose elements share memory (expanded), whose
        memory does not hold their values (lazy_values), or whose storage does not hold
        their elements (storage_shortfall), and moments beyond float16's range headed for a
        float16 parameter's own (_beyond_float16: the only data read, once the rest has
        passed). Runs where a step cannot reuse its memo (a replaced parameter, or state
        set by hand, never can). Returns what keeps the counts set by hand as steps keep
        them, for the caller to run once its other checks have passed."""
        scalars: dict[str, list[tuple[Tensor, Any]]] = {}
        settled: list[tuple[Tensor, str, Tensor]] = []
        for param in params:
            state = self.state.get(param, {})
            _refuse_state_not_dict(group, param, state, where)
            if not state:
                continue
            form = _moment_form_problem(state)
            if form is not None:  # state edited by hand: see _moment_form_problem
                key, problem, allowed = form
                self._refuse_state(group, param, key, (problem, allowed), where)
            missing = missing_progress_keys(state)
            if missing and _made_progress(state, missing):
                held = sorted(k for k in PROGRESS_KEYS if k not in missing)
                problem = f"is missing from a state that holds {held}"
                self._refuse_state(group, param, missing[0], (problem, _PROGRESS_ALLOWED), where)
            facts = _parameter_facts(param)
            shape, (device, moment_dtypes, sharding) = param.shape, facts
            for key, value in state.items():
                if key in HOST_SCALAR_STATE:  # read below, one C call per key
                    scalars.setdefault(key, []).append((param, value))
                    continue
                if (  # what steps make, settled without a call (~0.2 µs a tensor)
                    type(value) is Tensor
                    and sharding is None  # a DTensor's state: its layout is asked below
                    and not value.is_nested  # whose shape torch refuses to give
                    and value.shape == shape
                    and value.device == device
                    and value.is_contiguous()
                    and (value.dtype in moment_dtypes or key not in _DTYPE_FOLLOWING_STATE)
                    and (value.dtype == torch.uint8 or key not in _CODE_KEYS)
                    and key not in _SCALE_KEYS
                ):
                    settled.append((param, key, value))
                    continue
                found = _state_problem(key, value, param, facts)
                if found is not None:
                    self._refuse_state(group, param, key, found, where)
        values = [value for _, _, value in settled]
        if any_lazy_values(values) or host_checks().first_unbacked(values) >= 0:
            for param, key, value in settled:  # ~0.1 µs a tensor to get here
                found = _state_problem(key, value, param)
                if found is not None:
                    self._refuse_state(group, param, key, found, where)
        recast: list[tuple[Tensor, str, Any]] = []
        for key, pairs in scalars.items():
            values = cpu_kernel.read_scalars([value for _, value in pairs])
            for i, (param, value) in enumerate(pairs):
                # Where one call read them all (one-element float32 CPU tensors), only a
                # value out of range needs a closer look.
                if values is None or not (math.isfinite(values[i]) and values[i] >= 0):
                    found = _state_problem(key, value, param)
                    if found is not None:
                        self._refuse_state(group, param, key, found, where)
                if not _is_host_scalar(value):
                    recast.append((param, key, value))
        for param in params:  # reads values, so only once their memory has passed
            state = self.state.get(param)
            if state and param.dtype == torch.float16:
                overflow = _beyond_float16(state, self._moments_held_full(param, group))
                if overflow is not None:
                    self._refuse_state(group, param, overflow[0], overflow[1:], where)

        def keep_counts() -> None:
            # A count set by hand as a number, an integer or a 1-element tensor (as loading
            # accepts it) is kept as steps keep counts, once every check has passed:
            # counting into an integer tensor failed after the parameters were updated.
            # (One tensor in several states: _separate_shared_counters.)
            for param, key, value in recast:
                self.state[param][key] = torch.tensor(
                    float(value), dtype=torch.float32, device="cpu"
                )

        return keep_counts

    def _refuse_shared_state_memory(self, params: list[Tensor] | None = None) -> None:
        """Refuse a state tensor starting in another's memory or a parameter's, across
        every group (every parameter, with a gradient this step or not), or among params
        alone (a released step; see _state_sharing_memory)."""
        if params is None:
            params = [param for group in self.param_groups for param in group["params"]]
        states = list(map(self.state.get, params))  # None: no state yet
        if not {dict, type(None)}.issuperset(map(type, states)):  # set by hand
            for param, state in zip(params, states, strict=True):
                if param in self.state:
                    index, group = self._group_of(param)
                    _refuse_state_not_dict(group, param, state, f" in param group {index}")
        shared = _state_sharing_memory(params, states)
        if shared is None:
            return
        (first, key), (other, other_key) = shared
        (index, group), (other_index, other_group) = map(
            self._group_of, (params[first], params[other])
        )
        position = next(
            i for i, member in enumerate(other_group["params"]) if member is params[other]
        )
        whose = f"params[{position}]" + (f"'s {other_key}" if other_key else "")
        if other_index != index:
            whose += f" in param group {other_index}"
        found = (_SHARING.format(whose), _OWN_MEMORY)
        self._refuse_state(group, params[first], key, found, f" in param group {index}")

    @staticmethod
    def _refuse_state(
        group: dict[str, Any], param: Tensor, key: str, found: tuple[str, str], where: str
    ) -> None:
        problem, allowed = found
        if allowed == _ON_PARAMETER_DEVICE.format(param.device):
            allowed += _MOVED_STATE  # an optimizer's state: how to move it, or start afresh
        index = next(i for i, member in enumerate(group["params"]) if member is param)
        raise ValueError(
            f"Invalid state of params[{index}]{where}: {key} {problem} beside a "
            f"parameter of shape {tuple(param.shape)}. Allowed: {allowed}."
        )

    def _group_of(self, param: Tensor) -> tuple[int, dict[str, Any]]:
        """The live group holding param, or a ValueError naming it."""
        found = self._find_group(param)
        if found is None:
            what = (
                f"a tensor of shape {tuple(param.shape)}"
                if isinstance(param, Tensor)
                else f"{param!r} (not a tensor)"
            )
            raise ValueError(
                f"Invalid param for {type(self).__name__}.step: {what} that is in none of this "
                "optimizer's param groups. Allowed: one of its parameters, or None."
            )
        return found

    def _find_group(self, param: Tensor) -> tuple[int, dict[str, Any]] | None:
        """The live group holding param, None if none does. The index is rebuilt whenever
        param_groups or a group's params list is replaced, grows or shrinks (load_state_dict,
        add_param_group, layer freezing, module surgery), and an entry is trusted only while
        its parameter is still at its position: a schedule that writes group["lr"] always
        reaches per-parameter steps, and a parameter taken out of the groups is never
        stepped with its old group's hyperparameters."""
        key = _group_index_key(self.param_groups)
        fresh = self.__dict__.get("_group_index_key") != key
        for _ in range(2):
            if fresh:
                found_at: dict[Tensor, tuple[int, dict[str, Any], int]] = {}
                for index, group in enumerate(self.param_groups):
                    for position, p in enumerate(group["params"]):
                        if not isinstance(p, Tensor):  # written by hand
                            _refuse_entries_not_tensors(group["params"], f" in param group {index}")
                        earlier = found_at.setdefault(p, (index, group, position))
                        if (earlier[0], earlier[2]) != (index, position) and p.requires_grad:
                            # released, it was stepped once, with one group's values
                            raise _repeated_entry(position, index, earlier[0], earlier[2])
                self._group_index = found_at
                self._group_index_key = key
            found = self._group_index.get(param)
            if found is not None and found[1]["params"][found[2]] is param:
                return found[0], found[1]
            if fresh:
                return None
            fresh = True  # a miss, or a parameter swapped in place: look again afresh
        return None

    def _rounding_streams(self) -> dict[int, int]:
        """Each parameter's position among all of this optimizer's, by id: its stream of
        random bits for stochastic rounding, the same in every run and after a resume.
        Keyed by id, not by the parameter: memoized steps never ask again, and a group
        removed since stayed alive in it. The ids are those of the live groups (the key),
        so one taken over by a new tensor is looked up only once that tensor is there."""
        key = tuple(id(p) for group in self.param_groups for p in group["params"])
        if getattr(self, "_streams_key", None) != key:
            self._streams = {identity: i for i, identity in enumerate(key)}
            self._streams_key = key
        return self._streams

    @property
    def released_params(self) -> set[Tensor]:
        """Parameters stepped inside backward by gradient-release hooks."""
        return unwrapped(self).__dict__.setdefault("_released_params", set())

    @property
    def release_paused(self) -> bool:
        """While True, release hooks leave each gradient in param.grad, as without release
        (optimizer.step() steps it): what a framework's callback sets outside the backward
        passes that should step, such as earlier micro-batches or a backward some other
        callback runs between batches."""
        return unwrapped(self).__dict__.get("_release_paused", False)

    @release_paused.setter
    def release_paused(self, paused: bool) -> None:
        require(isinstance(paused, bool), "release_paused", paused, "True or False")
        unwrapped(self).__dict__["_release_paused"] = paused

    @property
    def gradient_release_registrations(self) -> list[Any]:
        """Active prepare_for_gradient_release registrations (core.gradient_release)."""
        return unwrapped(self).__dict__.setdefault("_release_registrations", [])

    @property
    def release_pre_hooks(self) -> OrderedDict[int, Callable[[Tensor], None]]:
        """The hooks register_release_pre_hook registered, by handle id."""
        return unwrapped(self).__dict__.setdefault("_release_pre_hooks", OrderedDict())

    def register_release_pre_hook(
        self, hook: Callable[[Tensor], None]
    ) -> torch.utils.hooks.RemovableHandle:
        """Call hook(param) inside backward just before a gradient-release step of param
        applies (its checks passed; release then frees the gradient): the one moment left
        to read that gradient (the monitors' gradient norms). It sees every released
        parameter this optimizer steps, also those of groups added later, and only those:
        not a gradient left to the full step (a parameter outside the groups, a part of a
        gradient inside a nested backward). Returns a handle whose remove() undoes it."""
        if not callable(hook):
            raise TypeError(
                f"Invalid hook for register_release_pre_hook: {hook!r}. Allowed: a callable "
                "taking the parameter."
            )
        hooks = self.release_pre_hooks
        handle = torch.utils.hooks.RemovableHandle(hooks)
        hooks[handle.id] = hook
        return handle

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | None = None,
        param: Tensor | None = None,
        grad_scaler: object = None,
    ) -> Any:
        """Update parameters that have a gradient; return what the closure returned.

        The closure (Lightning and Composer pass one) runs once with grad enabled.
        `step(param=p)` updates only p, with its group's live hyperparameters (gradient
        release calls it from backward); a full step skips released parameters, which
        have already been updated. Every group and gradient is checked before any
        parameter or state changes.
        """
        return _eager_step(self, closure, param, grad_scaler)

    @torch.no_grad()
    def _step(
        self, closure: Callable[[], Any] | None, param: Tensor | None, grad_scaler: object
    ) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_step_allowed(grad_scaler)
        if type(self.state) is not StateTable:  # replaced (optimizer.state = defaultdict(dict))
            self.state = StateTable(dict, self.state)
        if param is not None:
            self._step_one(param)
            return loss
        self._last_kahan_answer = None  # good for one step: dtypes may change between steps
        stepped = self.__dict__.get("_hook_stepped", {})
        memos: dict[int, StepMemo] = self.__dict__.setdefault("_step_memos", {})
        work = []
        keep_counts: list[Callable[[], None]] = []
        for index, group in enumerate(self.param_groups):
            where = f" in param group {index}"
            self._validate_stepped_group(group, where)
            try:
                params, grads, late = _with_gradients(group["params"], stepped)
            except AttributeError:  # an entry written by hand that is no tensor
                _refuse_entries_not_tensors(group["params"], where)
                raise
            if late:
                _refuse_gradients_after_release(late, where)
            if self.__dict__.get("_windows_opened") and not self.optimizer_accumulation:
                params, grads = self._with_open_windows(group, params, grads)
            memo = self._checked_memo(memos.get(id(group)), group, params, grads)
            if memo is None:  # else all of this held when the memo was made
                memos.pop(id(group), None)  # nor is it held any longer
                self._check_fused_possible(group, where)
                grads = self._checked_gradients(group, params, grads, where)
                keep_counts.append(self._check_state_tensors(group, params, where))
            work.append((group, params, grads, memo))
        self._drop_stale_memos()  # after the checks: it reads every group's params
        # A group with a memo passed this with its list unchanged; one without a memo and
        # without parameters to step adds none (an empty or frozen group: asked every step).
        memoless = [params for _, params, _, memo in work if memo is None and params]
        if len(set(map(id, self.param_groups))) < len(work) or memoless:
            self._refuse_repeated_params([params for _, params, _, _ in work])
        if memoless:
            self._refuse_shared_state_memory()
        for keep in keep_counts:  # every check has passed
            keep()
        if not self.optimizer_accumulation and any(
            PLAIN_TENSOR_TYPES.issuperset(map(type, params)) for params in memoless
        ):  # not where no step keeps a memo (accumulation, DTensors): it would run every step
            self._separate_shared_counters(work)
        if not self.__dict__.get("_release_seen"):  # after the checks: every lr is a number
            self._warn_if_release_has_no_hooks(self.released_params)
        for group, params, grads, memo in work:
            if memo is not None:
                self._update_memoized(memo, grads)
            elif params:
                self._update_and_memoize(memos, id(group), group, params, grads)
            if params and group["fused"] is not False:
                # The kernels write through raw pointers: tell autograd, as torch's own
                # in-place ops (and its fused kernels) do, so a graph that saved θ refuses.
                torch.autograd.graph.increment_version(params)
        stepped.clear()
        self.__dict__.pop("_hook_folded", None)
        return loss

    def _separate_shared_counters(
        self, work: list[tuple[dict[str, Any], list[Tensor], list[Tensor], StepMemo | None]]
    ) -> None:
        """Give each parameter a counter of its own where one tensor was set by hand into
        several parameters' states, in one group or across groups: shared, it advanced
        once for each of them every step. Runs after every check (a step without a memo
        in some group), before any update; the states of groups stepping from a memo keep
        theirs (the memo holds it), the first holder elsewhere keeps it, the others get
        its value. Under gradient release each parameter steps alone and this does not
        run, nor where no step keeps a memo (optimizer accumulation, tensor subclasses such
        as FSDP2's DTensors): see README "Errors"."""
        held: set[int] = set()
        for group, *_ in sorted(work, key=lambda entry: entry[3] is None):
            for param in group["params"]:
                state = self.state.get(param)
                if not state:
                    continue
                for key in HOST_SCALAR_STATE:
                    value = state.get(key)
                    if not isinstance(value, Tensor):
                        continue
                    if id(value) in held:
                        state[key] = torch.tensor(float(value), dtype=torch.float32, device="cpu")
                    else:
                        held.add(id(value))

    def _refuse_repeated_params(self, stepped: list[list[Tensor]]) -> None:
        """Refuse a parameter a full step would update twice: listed in two entries of
        param_groups (stepped: each group's parameters with a gradient, in group order).
        add_param_group refuses that, but a group's "params" edited in place gets there
        too (Composer's module surgery, when a new module ties its weight to one already
        trained); each backend then stepped it twice in its own order, silently."""
        groups_at: dict[int, int] = {}
        for index, group in enumerate(self.param_groups):  # one dict appended again
            earlier_group = groups_at.setdefault(id(group), index)
            if earlier_group != index and stepped[index]:
                raise ValueError(
                    f"Invalid param group {index}: the same dict as param group "
                    f"{earlier_group}, so this step would update its parameters twice. "
                    "Allowed: each group once in optimizer.param_groups."
                )
        total = sum(map(len, stepped))
        if len({id(p) for params in stepped for p in params}) == total:
            return
        seen: dict[int, tuple[int, int]] = {}
        for group_index, group in enumerate(self.param_groups):
            taken = {id(p) for p in stepped[group_index]}
            for index, param in enumerate(group["params"]):
                if id(param) not in taken:
                    continue
                if id(param) in seen:
                    raise _repeated_entry(index, group_index, *seen[id(param)])
                seen[id(param)] = (group_index, index)

    def _with_open_windows(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """params and grads plus, with a zero gradient, each parameter of the group whose
        optimizer-accumulation window is open but which has no gradient in the window's
        last micro-batch (an expert no token reached, a branch not taken): its window
        closes with the update its folded micro-batches make, as ordinary accumulation
        steps every parameter that had a gradient in any micro-batch. Before, the window
        stayed open and the parameter was never updated."""
        taken = set(params)
        closing = []
        for param in group["params"]:
            if param in taken:
                continue
            count = self.state.get(param, {}).get("window_microbatches")
            if count is not None and float(count) > 0:
                closing.append(param)
        if not closing:
            return params, grads
        return params + closing, grads + [torch.zeros_like(p) for p in closing]

    def _note_hook_step(self, param: Tensor, frees_gradient: bool) -> None:
        """Record that a release hook stepped param, so the full step skips it (and only
        it), and whether the hook frees its gradient (a gradient it holds at the full step
        then came after its step); tell autograd θ changed (the fused kernels write through
        raw pointers), so a graph that saved θ refuses as it does after torch's in-place
        ops; and say once when a hook steps a parameter twice before optimizer.step()
        without optimizer accumulation: each backward then made a step of its own."""
        torch.autograd.graph.increment_version(param)
        if self.optimizer_accumulation:
            # A micro-batch folded into its window: its gradient is gone, no step yet.
            # Where it freed the gradient, a part arriving later in a nested backward is
            # refused; every fold counts for _refuse_after_earlier_hooks.
            self.__dict__.setdefault("_hook_folded", {})[param] = frees_gradient
            return
        stepped: dict[Tensor, bool] = self.__dict__.setdefault("_hook_stepped", {})
        known = len(stepped)
        stepped[param] = frees_gradient  # one hash: a tensor's is a Python call (~0.2 µs)
        if len(stepped) == known:
            self._warn_once(
                "_warned_twice",
                "a release hook stepped a parameter a second "
                "time before optimizer.step(): two backward passes in one training step "
                "each made a step of their own, where ordinary training would sum their "
                "gradients into one. Set optimizer_accumulation=True for all but the "
                "last backward of a step (micro-batches), or call optimizer.step() once "
                "per training step (it steps nothing released and closes the step).",
            )

    def _warn_once(self, flag: str, message: str) -> None:
        """A RuntimeWarning naming this class, the first time only (flag: the attribute
        that records it), at the first caller outside core and torch."""
        if not self.__dict__.get(flag):
            self.__dict__[flag] = True
            warnings.warn(
                f"{type(self).__name__}: {message}",
                RuntimeWarning,
                stacklevel=caller_stacklevel(),
            )

    def _warn_stepped_without_step(self, count: int) -> None:
        """Say once that release hooks stepped parameters in a backward that no
        optimizer.step() followed before zero_grad(): in a GAN loop the generator's loss
        reaching the discriminator's released parameters trained the discriminator on it,
        where ordinary training discards those gradients at zero_grad()."""
        self._warn_once(
            "_warned_without_step",
            f"zero_grad() after release hooks stepped {count} "
            "parameter(s) in a backward that no optimizer.step() followed. Every "
            "backward that reaches a released parameter steps it: a loss meant for "
            "other parameters (a GAN's generator loss reaching the discriminator) "
            "trained these too, where ordinary training would discard those gradients "
            "here. Freeze them for such a backward (requires_grad_(False)) or set "
            "optimizer.release_paused = True around it; after a training backward, call "
            "optimizer.step() before zero_grad() (it closes the step).",
        )

    def _warn_nested_once(self) -> None:
        """Say once that gradients arriving inside a nested backward are left to
        optimizer.step() (see inside_nested_backward)."""
        self._warn_once(
            "_warned_nested",
            "gradient release got a gradient inside a nested "
            "backward (reentrant activation checkpointing: torch.utils.checkpoint with "
            "use_reentrant=True), where a parameter used in several checkpointed "
            "segments gets its gradient in parts. Such parameters keep their gradients "
            "and are stepped by optimizer.step() after backward, exactly, without "
            "release's memory saving; use use_reentrant=False to release them inside "
            "backward.",
        )

    def _warn_if_release_has_no_hooks(self, released: set[Tensor]) -> None:
        """gradient_release=True does nothing by itself: without hooks (prepare_for_gradient_
        release, or a framework's GradientRelease callback) every gradient is kept and the
        step runs after backward. Say so once, at the first step that would train such a
        group (a step at lr 0, as torch.distributed.checkpoint's state creation, trains
        nothing). Once release has been used, later plain steps are deliberate
        (remove_gradient_release)."""
        if released:
            self._release_seen = True
            return
        flagged = [
            index
            for index, group in enumerate(self.param_groups)
            if group["gradient_release"] and float(group["lr"]) != 0.0
        ]
        if flagged:
            self._release_seen = True
            warnings.warn(
                f"{type(self).__name__}: param group(s) {flagged} have gradient_release=True "
                "but no release hooks are registered, so this step ran after backward and "
                "every gradient was kept, as without release. Register them with "
                "core.prepare_for_gradient_release(model, optimizer), or add the "
                "GradientRelease callback (lightning_adam, or composer_adam: "
                "adamkit_gradient_release in an llm-foundry YAML's callbacks).",
                RuntimeWarning,
                stacklevel=caller_stacklevel(),
            )

    def _drop_stale_memos(self) -> None:
        """Forget memos of groups or parameters no longer in param_groups (replaced by
        load_state_dict or a framework): each holds its tensors' storages."""
        group_memos = self.__dict__.get("_step_memos", {})
        replays = self.__dict__.get("_group_replays", {})  # each holds its group's record
        for kept in (group_memos, replays):
            if kept:
                _forget_removed_groups(kept, self.param_groups)
        if "_group_index" in self.__dict__ and self._group_index_key != _group_index_key(
            self.param_groups
        ):  # rebuilt at the next per-parameter step; it held a removed group's parameters
            del self._group_index, self._group_index_key
        param_memos = self.__dict__.get("_param_memos", {})
        if len(param_memos) > sum(len(group["params"]) for group in self.param_groups):
            live = {id(p) for group in self.param_groups for p in group["params"]}
            for key in [key for key in param_memos if key not in live]:
                del param_memos[key]

    def _validate_groups_once_per_backward(self) -> None:
        """Check every group at a backward's first released step, as a full step checks
        them all before it changes anything: a bad lr in one group was refused only when
        its own parameters' hooks ran, after other groups' parameters were stepped. Hooks
        run on no autograd thread (a DDP communication hook's callback) keep the check of
        each parameter's own group."""
        task = torch._C._current_graph_task_id()
        if task < 0 or self.__dict__.get("_groups_checked_in_task") == task:
            return
        released = self.__dict__.get("_released_params")
        for index, group in enumerate(self.param_groups):
            where = f" in param group {index}"
            self._validate_stepped_group(group, where)
            if released and group["gradient_release"] is False:
                _refuse_release_turned_off(released, group, where)
        self._groups_checked_in_task = task

    def _step_one(self, param: Tensor, *, held_only: bool = False) -> bool:
        """step(param=p), as gradient release calls it inside backward: with a memo per
        parameter (see StepMemo), so a released step costs little more than its launch.

        A parameter in no param group is refused by name, or with held_only (a release hook
        of a parameter since taken out of the groups) left alone, its gradient kept as
        for any parameter the optimizer does not hold. Returns whether param is held."""
        self._last_kahan_answer = None
        found = self._find_group(param)
        if found is None:
            if held_only:
                return False
            found = self._group_of(param)  # raises, naming param
        index, group = found
        where = f" in param group {index}"
        passed = self._validate_stepped_group(group, where)
        grad = param.grad
        if grad is None:
            return True
        memos: dict[int, StepMemo] = self.__dict__.setdefault("_param_memos", {})
        memo = self._checked_memo(memos.get(id(param)), group, [param], [grad])
        observers = self.__dict__.get("_release_pre_hooks") if held_only else None
        if memo is not None:
            if observers:
                _observe(observers, param)
            if passed is None or memo.scalar_access is None:
                self._update_memoized(memo, [grad])
            elif not self._replayed(memo, passed, grad):
                self._update_and_record(memo, passed, grad)
            return True
        memos.pop(id(param), None)
        grads = self._checked_gradients(group, [param], [grad], where)
        keep_counts = self._check_state_tensors(group, [param], where)
        self._refuse_shared_state_memory([param])
        keep_counts()
        if observers:
            _observe(observers, param)
        self._update_and_memoize(memos, id(param), group, [param], grads)
        return True

    def _update_and_memoize(
        self,
        memos: dict[int, StepMemo],
        key: int,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
    ) -> None:
        """The full path: prepare every state, update, and keep a memo for the next step
        (memos[key]) where the group's step can have one."""
        host_checks_setting()  # refused before any state is made, not by the memo's checks
        # only fused=True refuses after states are made (RefusedBeforeAnyUpdate)
        fresh = [param for param in params if not self.state.get(param)] if group["fused"] else []
        states = self._prepared_states(params, group)
        try:
            memo = self._new_memo(group, params, states)
            if memo is None:
                token = vouch_lists(params)  # checked above: the functional form need not
                try:
                    self._update_group(group, params, grads, states)
                finally:
                    unvouch_lists(token)
                return
            self._update_memoized(memo, grads)
        except cpu_kernel.RefusedBeforeAnyUpdate:
            for param in fresh:  # made by this step, which changed nothing else
                self.state.pop(param, None)
            raise
        if memo.backend is not None and self._memo_complete(memo):
            memos[key] = memo

    def _replayed(self, memo: StepMemo, passed: tuple[Any, ...], grad: Tensor) -> bool:
        """Step memo's parameter by replaying its group's last released step, if that step
        is this one's twin (see _GroupReplay); False (nothing done) if not."""
        twin: _GroupReplay | None = self.__dict__.get("_group_replays", {}).get(id(passed[0]))
        if (
            twin is None
            or twin.passed is not passed
            or memo.replay is None
            or not memo.windowless  # a window's count would be a host scalar of its own
            or twin.host_keys != memo.host_keys  # also: twin.after has one value per scalar
            or memo.scalar_access.read() != twin.before  # type: ignore[union-attr]
        ):
            return False
        step_function, lists = memo.replay
        lists = lists.copy()
        lists[1] = (grad,)
        # stochastic rounding draws this step's bits: step_lists' step + 1, the twin's too
        lists[-1] = rounding_at_step(lists[-1], twin.before[memo.host_keys.index("step")] + 1)
        token = vouch(memo)
        try:
            step_function(*lists, twin.coefficients)
        finally:
            unvouch(token)
            memo.plan_key = None
        memo.scalar_access.write(twin.after)  # type: ignore[union-attr]
        return True

    def _update_and_record(self, memo: StepMemo, passed: tuple[Any, ...], grad: Tensor) -> None:
        """_update_memoized, recording the step for the group's next parameters to replay
        when it makes a single backend call (one partition, nothing run outside it)."""
        access = memo.scalar_access
        assert access is not None
        before = access.read()
        memo.recorded = []
        try:
            self._update_memoized(memo, [grad])
            recorded = memo.recorded
        finally:
            memo.recorded = None
        if len(recorded) != 1:
            return
        step_function, lists, coefficients = recorded[0]
        lists = list(lists)
        lists[1] = None  # the gradient is not kept: release frees it
        memo.replay = (step_function, lists)
        replays = self.__dict__.setdefault("_group_replays", {})
        if len(replays) > len(self.param_groups):  # groups replaced since: drop theirs
            _forget_removed_groups(replays, self.param_groups)
        replays[id(passed[0])] = _GroupReplay(
            passed, memo.host_keys, before, coefficients, float32_array(access.read())
        )

    def _update_memoized(self, memo: StepMemo, grads: list[Tensor]) -> None:
        """_update_group on a memo's tuples, with the memo vouched for to the backends."""
        assert memo.group is not None
        self._active_memo = memo
        token = vouch(memo)
        try:
            self._update_group(memo.group, memo.params, grads, memo.states)  # type: ignore[arg-type]
        finally:
            unvouch(token)
            self._active_memo = None
            memo.plan_key = None

    def _new_memo(
        self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]]
    ) -> StepMemo | None:
        """A memo to make during this step, where the group's step can have one."""
        if self.optimizer_accumulation:
            return None
        layout = host_checks().parameter_layout(params)
        if layout is None:  # a subclass or a parameter without storage: the full path
            return None
        streams = None
        if group["stochastic_rounding"] or group["state_precision"] == "8bit":
            streams = self._stream_layout(group, params)
            if streams is None:
                return None
        return StepMemo(
            params=tuple(params),
            group=group,
            flags=_memo_flags(group),
            state_table=self.state,
            state_writes=getattr(self.state, "writes", -1),
            states=tuple(states),
            windowless=not any(map(operator.contains, states, repeat("window_microbatches"))),
            param_layout=layout,
            streams=streams,
        )

    def _stream_layout(
        self, group: dict[str, Any], params: Sequence[Tensor]
    ) -> tuple[int, tuple[int, ...], tuple[int, ...]] | None:
        """StepMemo.streams for params of group (None if a parameter is not in it)."""
        index = next((i for i, g in enumerate(self.param_groups) if g is group), None)
        if index is None:
            return None
        lengths = tuple(len(g["params"]) for g in self.param_groups[:index])
        positions = self._rounding_streams()
        start = sum(lengths)
        within = tuple(positions.get(id(p), -1) - start for p in params)
        if not _sit_at(group["params"], within, params):
            return None
        return index, lengths, within

    def _streams_hold(self, memo: StepMemo, group: dict[str, Any]) -> bool:
        """Whether memo's parameters still sit where their streams say (StepMemo.streams):
        O(groups + parameters stepped), where finding every position is O(all parameters)."""
        if memo.streams is None:
            return True
        index, lengths, within = memo.streams
        groups = self.param_groups
        if index >= len(groups) or groups[index] is not group:
            return False
        if any(len(g["params"]) != n for g, n in zip(groups[:index], lengths, strict=True)):
            return False
        return _sit_at(group["params"], within, memo.params)

    def _memo_complete(self, memo: StepMemo) -> bool:
        """Whether the step that made memo left it all a later step needs: every list it
        handed down is a column of the states (the Kahan buffers too), and the storage
        of every state tensor is held."""
        rounding = memo.rounding
        if rounding is None:
            return False
        if any(isinstance(comp, Tensor) for comp in rounding):
            memo.columns["kahan_comp"] = rounding  # checked as a column of the states below
        checks = host_checks()
        for key, column in memo.columns.items():
            addresses = checks.column_addresses(memo.states, key, column)  # type: ignore[arg-type]
            if addresses is None:
                return False
            memo.addresses[key] = addresses
        tensors = [t for column in memo.columns.values() for t in column if t is not None]
        memo.held = [t.untyped_storage() for t in (*memo.params, *tensors)]
        memo.host_keys = tuple(key for key in memo.columns if key in HOST_SCALAR_STATE)
        memo.host_scalars = tuple(memo.columns[key] for key in memo.host_keys)
        if len(memo.params) == 1:  # a released parameter's: its steps may be replayed
            memo.scalar_access = host_scalar_access([t for c in memo.host_scalars for t in c])
        return True

    def _checked_memo(
        self,
        memo: StepMemo | None,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
    ) -> StepMemo | None:
        """memo, if this step over params and grads may reuse it (see StepMemo), with the
        step's plan key set; else None. One pass per list (core.backends.host_checks: in
        C++ where it builds), nothing per tensor in Python."""
        if (
            memo is None
            or memo.group is not group
            or self.optimizer_accumulation
            or memo.state_table is not self.state
            or memo.state_writes != self.state.writes  # type: ignore[attr-defined]
            or memo.flags != _memo_flags(group)
            or len(params) != len(memo.params)
            or not all(map(operator.is_, params, memo.params))
            or not self._streams_hold(memo, group)
        ):
            return None
        checks = host_checks()
        if checks.parameter_layout(params) != memo.param_layout:
            return None
        for key, column in memo.columns.items():
            if checks.column_addresses(memo.states, key, column) != memo.addresses[key]:  # type: ignore[arg-type]
                return None
        grad_addresses = checks.gradient_addresses(grads, params)
        if grad_addresses is None:  # sparse, strided, of another dtype: the full path
            return None
        # Not the memo itself: the plans it keys live on the memo (triton_steps), which
        # would then hold itself, and its states and parameters only a full gc frees.
        memo.plan_key = [grad_addresses]
        return memo

    def zero_grad(self, set_to_none: bool = True, param: Tensor | None = None) -> None:
        """Clear gradients; `zero_grad(param=p)` clears only p's (gradient release frees it)."""
        if param is None:
            try:
                super().zero_grad(set_to_none=set_to_none)
            except (AttributeError, TypeError):  # params written by hand: name the entry
                for index, group in enumerate(self.param_groups):
                    where = f" in param group {index}"
                    _refuse_params_not_a_list(group.get("params"), where)
                    _refuse_entries_not_tensors(group["params"], where)
                raise
            stepped = unwrapped(self).__dict__.get("_hook_stepped")
            if stepped:  # a new training step; hooks stepped a backward no step() closed
                unwrapped(self)._warn_stepped_without_step(len(stepped))
                stepped.clear()
            unwrapped(self).__dict__.pop("_hook_folded", None)
        elif set_to_none:
            param.grad = None
        elif param.grad is not None:
            param.grad.detach_().zero_()

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, each group also holding the keys torch.optim reads
        (`torch_group_keys`), so torch.optim.Adam/AdamW/RAdam/NAdam continue the run.

        State of a parameter taken out of every param group since it was stepped (what
        Composer's LayerFreezing does to the layers it freezes) is left out: the dict
        names parameters by their place in the groups, and torch's state_dict raised a
        KeyError for it, which failed every checkpoint after a freeze (Composer's own
        DecoupledAdamW too). The state stays in `optimizer.state`, as in torch."""
        # torch's order: pre-hooks, the dict, then post-hooks, which must see it whole
        # (they ran before these keys were added: a hook that rewrote the groups to
        # torch's keys failed here, and keys a hook removed came back).
        post_hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = OrderedDict()
        state = self.state
        held = {id(p) for group in self.param_groups for p in group["params"]}
        if any(isinstance(key, Tensor) and id(key) not in held for key in state):
            self.state = defaultdict(dict)  # what torch's state_dict reads: the held ones
            self.state.update(
                (k, v) for k, v in state.items() if not isinstance(k, Tensor) or id(k) in held
            )
        try:
            state_dict = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = post_hooks
            self.state = state
        _leave_out_closed_windows(state_dict["state"])
        for group in state_dict["param_groups"]:
            group.update(torch_group_keys(group))
            group.update(self._format_marks())
        for post_hook in list(post_hooks.values()):
            state_dict = post_hook(self, state_dict) or state_dict
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from this class, its siblings or torch.optim's Adam/AdamW/NAdam/RAdam.

        Adam, AdamW, RAdam, NAdam and torch's load each other's state; ADOPT loads only
        ADOPT's (its first moment averages normalised gradients), and the other way round.

        Hyperparameters come from the checkpoint, as between torch optimizers. The
        execution flags (foreach, fused, gradient_release) stay this optimizer's: they say
        how to compute on this machine, not what was learnt, so a checkpoint written with
        fused=True continues with fused=False (or on a machine without Triton) and back.
        torch casts every floating state tensor to the parameter's dtype and device;
        host scalars (step, mu_product) are restored from the saved values instead, as
        0-dim float32 CPU tensors, so no step ever reads a device tensor.
        """
        # torch's order: pre-hooks (which may upgrade an old checkpoint) first, then the
        # checks and loading, then post-hooks, which see the state as loaded here.
        pre_hooks = self._optimizer_load_state_dict_pre_hooks
        post_hooks = self._optimizer_load_state_dict_post_hooks
        if isinstance(state_dict, dict):
            state_dict = state_dict.copy()
        for pre_hook in list(pre_hooks.values()):
            state_dict = pre_hook(self, state_dict) or state_dict
        state_dict = self._without_merge_leftovers(state_dict)
        state_dict = self._with_empty_groups_completed(state_dict)
        self._check_loadable(state_dict)
        execution = [{key: group[key] for key in EXECUTION_KEYS} for group in self.param_groups]
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        for group, flags in zip(self.param_groups, execution, strict=True):
            group.update(flags)
            group.update(self._format_marks())  # the saved ones were checked above
            # torch's flags (maximize was checked False) and its names for adamkit's keys
            # (folded into them by _complete_group): a resumed group has a fresh one's keys.
            # triton: optimi's, written into a live group and saved unfolded.
            for key in (*TORCH_FLAGS, *self._torch_group_key_aliases, "triton"):
                group.pop(key, None)
        self._warn_if_decay_mode_is_ambiguous(state_dict["param_groups"])
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        for saved_id, (param, group) in zip(saved_ids, params, strict=True):
            saved_state = state_dict["state"].get(saved_id)
            if not saved_state:
                continue
            state = self.state[param]
            for key in HOST_SCALAR_STATE:
                if key in saved_state:
                    value = saved_state[key]
                    # float() first: a Python int beyond int64 (checked finite above) is
                    # no torch.tensor of its own.
                    value = (
                        value.detach()
                        if isinstance(value, Tensor)
                        else torch.tensor(float(value), device="cpu")
                    )
                    state[key] = value.to(device="cpu", dtype=torch.float32).clone().reshape(())
            for key in MOMENT_STATE:
                # torch cast codes and scales to the parameter's dtype: 8-bit state keeps
                # uint8 codes and fp32 scales (what the fused kernels address).
                for name, dtype in zip(moment_keys(key), (torch.uint8, torch.float32), strict=True):
                    if isinstance(saved_state.get(name), Tensor):
                        # Contiguous, as the format makes them: a strided copy from a
                        # checkpoint would send every later step past the fused kernels.
                        state[name] = (
                            saved_state[name]
                            .detach()
                            .to(device=state[name].device, dtype=dtype, copy=True)
                            .contiguous()
                        )
            for key, value in state.items():
                if isinstance(value, Tensor) and lazy_values(value) is not None:
                    # torch keeps such a saved tensor as it is; the kernels need its values
                    state[key] = _materialized(value)
            for key in _DTYPE_FOLLOWING_STATE:
                # torch keeps a saved strided copy's layout (see _laid_out_like)
                if isinstance(state.get(key), Tensor):
                    state[key] = _laid_out_like(param, state[key])
            if float(state.get("window_microbatches", 0.0)) > 0:
                self._windows_opened = True  # closed by the next full step, gradient or not
            # Converted now, not at the next step: a state_dict() taken right after loading
            # holds what this optimizer keeps (an 8-bit checkpoint loaded with "full"
            # saves exp_avg/exp_avg_sq, which torch.optim reads).
            self._prepared_state(param, group)
        for post_hook in list(post_hooks.values()):
            post_hook(self)

    def _without_merge_leftovers(self, state_dict: Any) -> Any:
        """state_dict without what torch's full-state loader leaves of this optimizer's own
        state beside the checkpoint's.

        set_optimizer_state_dict(full_state_dict=True) starts from this optimizer's own
        state (made first, by a step with lr 0 and zero gradients, where it has none) and
        lays the checkpoint's over it key by key. Where the checkpoint holds a moment in
        the other form (8-bit codes and scales against full precision), both forms
        arrive: a change of state_precision across the checkpoint, or a 1-D parameter of
        4096+ elements, which one process or DDP keeps in 8 bits and FSDP2 (a 1-D DTensor
        shard) in full precision. This optimizer's own form there is that leftover: its
        live state tensors themselves, or nothing but zeros (a full moment of zeros; codes
        whose scales are all 0). It is dropped, so the checkpoint's form loads and is
        converted as any checkpoint of the other precision is. Anything else holding both
        forms is refused by the checks after this; a malformed state_dict is left for
        them to name."""
        try:
            saved_states = state_dict["state"]
            pairs = [
                (saved_id, param, group)
                for saved, group in zip(state_dict["param_groups"], self.param_groups, strict=True)
                for saved_id, param in zip(saved["params"], group["params"], strict=True)
            ]
        except (KeyError, TypeError, ValueError, IndexError):
            return state_dict
        if not isinstance(saved_states, dict):
            return state_dict
        replaced: dict[Any, dict[str, Any]] = {}
        several_ranks = in_a_run_of_several_ranks()
        mesh = None  # of the first DTensor parameter: the ranks that load together
        for saved_id, param, group in pairs:
            saved = saved_states.get(saved_id)
            if not isinstance(saved, dict) or not isinstance(param, Tensor):
                continue
            sharded = _is_dtensor(param)
            if sharded and mesh is None:
                mesh = param.device_mesh  # type: ignore[attr-defined]
            if several_ranks and not sharded:
                continue  # each rank may load alone: left to the refusal (see below)
            live = self.state.get(param, {})
            for moment in MOMENT_STATE:
                codes, absmax = moment_keys(moment)
                if moment not in saved or codes not in saved:
                    continue
                # the form this optimizer holds (a switch of state_precision not yet
                # stepped leaves the other), else the one its group makes
                if moment in live or codes in live:
                    held_full = moment in live
                else:
                    held_full = moment in self._moments_held_full(param, group)
                own = (moment,) if held_full else (codes, absmax)
                if not _holds_only_zeros(saved[moment] if held_full else saved.get(absmax)) and (
                    not all(key in live and saved.get(key) is live[key] for key in own)
                ):
                    continue
                if not sharded:
                    kept = replaced.setdefault(saved_id, dict(saved))
                    for key in own:  # the load converts the checkpoint's form, as any
                        kept.pop(key, None)
                    continue
                converted = _checkpoint_form_as_own(saved, moment, held_full)
                if converted is None:
                    continue  # left in both forms: refused by name below
                kept = replaced.setdefault(saved_id, dict(saved))
                for key in (moment, codes, absmax):
                    kept.pop(key, None)
                kept.update(converted)
        if several_ranks and mesh is not None:
            _refuse_unless_every_rank_converted(len(replaced), mesh)
        if not replaced:
            return state_dict
        return {**state_dict, "state": {**saved_states, **replaced}}

    def _with_empty_groups_completed(self, state_dict: Any) -> Any:
        """state_dict with each saved group that holds nothing but an empty 'params' given
        the live group's hyperparameters. torch.distributed.checkpoint's
        set_optimizer_state_dict passes a group without parameters so, every other key
        dropped (Composer's LayerFreezing empties per-layer groups, whose resume was then
        refused as no Adam-family optimizer's); such a group steers no parameter."""
        if not isinstance(state_dict, dict):
            return state_dict
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            return state_dict  # refused by _check_loadable, naming what is wrong
        bare = [
            isinstance(saved, Mapping)
            and list(saved) == ["params"]
            and isinstance(saved["params"], list)
            and not saved["params"]
            for saved in saved_groups
        ]
        if not any(bare):
            return state_dict
        completed = [
            {**{key: value for key, value in live.items() if key != "params"}, "params": []}
            if empty
            else saved
            for saved, live, empty in zip(saved_groups, self.param_groups, bare, strict=True)
        ]
        return {**state_dict, "param_groups": completed}

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        """Refuse, before anything changes, a state dict this optimizer cannot continue from."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError(
                f"Invalid state_dict for {name}: expected a dict with 'state' and 'param_groups' "
                "(what Optimizer.state_dict() returns)."
            )
        saved_groups = state_dict["param_groups"]
        require(
            len(saved_groups) == len(self.param_groups),
            "state_dict['param_groups']",
            f"{len(saved_groups)} groups",
            f"{len(self.param_groups)} groups, as this optimizer has",
        )
        params_by_id = {}
        groups_by_id: dict[Any, dict[str, Any]] = {}
        formats: dict[Any, Any] = {}
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            require(
                len(saved["params"]) == len(group["params"]),
                f"state_dict['param_groups'][{index}]['params']",
                f"{len(saved['params'])} parameters",
                f"{len(group['params'])} parameters, as this optimizer's group {index} has",
            )
            # betas, or optimi's beta1 and beta2 (refused below for its per-group step)
            has_betas = "betas" in saved or {"beta1", "beta2"} <= saved.keys()
            missing = [
                key for key, held in (("betas", has_betas), ("eps", "eps" in saved)) if not held
            ]
            if missing:
                held = sorted(key for key in saved if key != "params")
                raise ValueError(
                    f"Invalid state_dict for {name}: param group {index} has no "
                    f"{' or '.join(map(repr, missing))} (it holds {held}), so it is no "
                    "Adam-family optimizer's. Allowed: a state dict of adamkit's, torch.optim's "
                    "or Composer's Adam, AdamW, RAdam, NAdam (ADOPT's for ADOPT)."
                )
            written = saved.get(MOMENT_FAMILY_KEY, "Adam")
            require(  # the key's fallback (checkpoints before it) is for its absence only
                isinstance(written, str) and written in MOMENT_FAMILIES,
                f"state_dict for {name}: param group {index}'s {MOMENT_FAMILY_KEY}",
                saved.get(MOMENT_FAMILY_KEY),
                f"one of {', '.join(MOMENT_FAMILIES)} (as state_dict() writes it), or absent",
            )
            family = saved_moment_family(saved)
            if family != self.moment_family:
                averaged, _ = MOMENT_FAMILIES[family]
                own_average, allowed = MOMENT_FAMILIES[self.moment_family]
                raise ValueError(
                    f"Invalid state_dict for {name}: param group {index} is from an "
                    f"{family}-type optimizer, whose exp_avg averages {averaged}; {name}'s "
                    f"averages {own_average}, so it cannot continue from it. Allowed: {allowed}."
                )
            loaded = {
                key: value
                for key, value in saved.items()
                # optimi's triton written into a live group and saved before a step
                # folded it: an execution choice, the receiving optimizer's own
                if key not in ("params", "triton", *TORCH_EXECUTION_FLAGS)
            }
            loaded.update({key: group[key] for key in EXECUTION_KEYS if key in group})
            self._complete_group(loaded)
            self._validate_group(loaded, f" in param group {index} of the loaded state dict")
            params_by_id.update(zip(saved["params"], group["params"], strict=True))
            groups_by_id.update(dict.fromkeys(saved["params"], loaded))
            formats.update(dict.fromkeys(saved["params"], saved.get(CODE_FORMAT_KEY)))
        for saved_id, saved_state in state_dict["state"].items():
            if not isinstance(saved_state, Mapping):  # None or [] loaded, then step() failed
                raise ValueError(
                    f"Invalid state_dict for {name}: state[{saved_id!r}] is "
                    f"{type(saved_state).__name__} {saved_state!r:.60}. Allowed: a dict of the "
                    "parameter's state (empty for a parameter not yet stepped)."
                )
            param = params_by_id.get(saved_id)
            if param is None or not saved_state:
                continue
            held = sorted(key for key in saved_state if key in _PARAMETER_SHAPED_STATE)
            if param.is_meta and held:
                raise ValueError(
                    f"Invalid state_dict for {name}: parameter {saved_id} is on meta (not "
                    f"materialized yet), so its {held} would be moved there, keeping no "
                    "values. Allowed: load the optimizer's state once the model is "
                    "materialized (to_empty, then its weights)."
                )
            saved_format = formats.get(saved_id)
            if saved_format != CODE_FORMAT and any(k.endswith("_codes") for k in saved_state):
                raise ValueError(
                    f"Invalid state_dict for {name}: the 8-bit state of parameter {saved_id} "
                    f"has code format {saved_format or 1} (param group key "
                    f"{CODE_FORMAT_KEY!r}; absent before adamkit changed its maps), and this "
                    f"adamkit reads format {CODE_FORMAT} (core.quantization). Allowed: a state "
                    "dict saved by this version, or one with full-precision moments."
                )
            missing = missing_progress_keys(saved_state)
            foreign = len(missing) == len(PROGRESS_KEYS)  # another optimizer's state
            # a first step saved before it made its moments is completed, as live state is
            if missing and (foreign or _made_progress(saved_state, missing)):
                if _moment_form_problem(saved_state) is not None:  # its scales without codes:
                    _check_saved_values(name, saved_id, saved_state, param)  # named there
                raise ValueError(
                    f"Invalid state_dict for {name}: the state of parameter {saved_id} lacks "
                    f"{missing} (it has {sorted(saved_state)}); expected the state of an "
                    "Adam-family optimizer (torch.optim.Adam/AdamW/NAdam/RAdam or adamkit)."
                )
            _check_saved_values(name, saved_id, saved_state, param)
            if param.dtype == torch.float16:
                full = self._moments_held_full(param, groups_by_id[saved_id])
                overflow = _beyond_float16(saved_state, full)
                if overflow is not None:
                    key, problem, allowed = overflow
                    raise ValueError(
                        f"Invalid state_dict for {name}: state[{saved_id}][{key!r}] {problem}. "
                        f"Allowed: {allowed}."
                    )
        # torch keeps a loaded tensor of the parameter's dtype and device as it is
        saved_ids, live = list(params_by_id), list(params_by_id.values())
        saved_states = [state_dict["state"].get(saved_id) or {} for saved_id in saved_ids]
        shared = _state_sharing_memory(live, saved_states)
        if shared is not None:
            (first, key), (other, other_key) = shared
            saved_id, other_id = saved_ids[first], saved_ids[other]
            whose = f"state[{other_id!r}][{other_key!r}]" if other_key else "its parameter"
            if other_key is None and other_id != saved_id:
                whose = f"the parameter of state[{other_id!r}]"
            raise ValueError(
                f"Invalid state_dict for {name}: state[{saved_id!r}][{key!r}] "
                f"{_SHARING.format(whose)}. Allowed: {_OWN_MEMORY}."
            )


def _refuse_state_not_dict(group: dict[str, Any], param: Tensor, state: object, where: str) -> None:
    """Refuse a state entry set by hand to no dict (None failed midway), as loading does."""
    if isinstance(state, dict):
        return
    index = next(i for i, member in enumerate(group["params"]) if member is param)
    raise ValueError(
        f"Invalid state of params[{index}]{where}: {type(state).__name__} {state!r:.60}, "
        "not a dict. Allowed: a dict of the parameter's state (del optimizer.state[param] "
        "starts it afresh)."
    )


def _state_sharing_memory(
    params: Sequence[Tensor], states: Sequence[Mapping[str, object] | None]
) -> tuple[tuple[int, str], tuple[int, str | None]] | None:
    """The first state tensor starting where another state tensor or a parameter does,
    as (its parameter's index, its key), and that other (its parameter's index, its key
    or None for the parameter itself); None where none does. states: each parameter's
    (None where it has none).
    Set by hand (m given v's tensor, a moment given the parameter's memory, a counter
    that is a view of v), each backend wrote the shared memory in its own order:
    different numbers, NaN on some. Compared by first address, as the functional forms
    compare what they write: views overlapping from different first elements are not
    caught. Counters may share with each other (_separate_shared_counters parts them);
    only plain tensors are compared, and only under the keys steps write (a key of the
    user's own is theirs)."""
    tensors = list(params)
    for state in states:
        if state:
            tensors.extend(state.values())
    plain = [tensor for tensor in tensors if type(tensor) in PLAIN_TENSOR_TYPES]
    try:
        every = [start for start in map(Tensor.data_ptr, plain) if start]  # 0: empty, meta
    except RuntimeError:  # one without storage (sparse, under a key of the user's): below
        every = [0, 0]
    if len(set(every)) == len(every):  # the usual case: ~1 µs a parameter with its state
        return None
    starts: dict[int, tuple[int, str | None]] = {}
    for index, (param, state) in enumerate(zip(params, states, strict=True)):
        held = state.items() if state else ()
        written = [(value, key) for key, value in held if key in _STEP_WRITTEN]
        for tensor, name in ((param, None), *written):
            if (
                type(tensor) not in PLAIN_TENSOR_TYPES
                or tensor.layout != torch.strided  # type: ignore[union-attr]
                or tensor.is_meta  # type: ignore[union-attr]
                or not tensor.numel()  # type: ignore[union-attr]
            ):
                continue
            start = tensor.data_ptr()  # type: ignore[union-attr]
            met = (index, name)
            other = starts.setdefault(start, met)
            if other == met:
                continue  # the same entry (a parameter listed twice is refused elsewhere)
            if other[1] is None and name is None:
                continue  # parameters sharing memory: refused as such elsewhere
            if other[1] in HOST_SCALAR_STATE and name in HOST_SCALAR_STATE:
                continue
            return (met, other) if name is not None else (other, met)  # type: ignore[return-value]
    return None


_STEP_WRITTEN = frozenset(
    [
        *HOST_SCALAR_STATE,
        *MOMENT_STATE,
        "kahan_comp",
        *(k for m in MOMENT_STATE for k in moment_keys(m)),
    ]
)
"""The state keys a step writes (or may: 8-bit codes and scales, Kahan compensation)."""
_SHARING = "starts in the memory of {}, which a step also writes in place"
_OWN_MEMORY = "a tensor of its own (.clone() it)"


def _local(tensor: Tensor) -> Tensor:
    """A DTensor's local shard, any other tensor itself."""
    dtensor = dtensor_type()
    return tensor.to_local() if dtensor and isinstance(tensor, dtensor) else tensor


_MADE_FOR_IT = (
    "shape {}, as state is made for this parameter (one replaced by a parameter of another "
    "shape needs its state cleared: del optimizer.state[param])"
)


_REAL_FLOATING_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_COMPLEX_DTYPES = frozenset({torch.complex32, torch.complex64, torch.complex128})


def _state_problem(
    key: str, value: object, param: Tensor, facts: _ParameterFacts | None = None
) -> tuple[str, str] | None:
    """(what is wrong with state[key] beside param, what is allowed), or None if a step can
    take it (_check_state_tensors); reads no tensor's data but a host scalar's. facts:
    _parameter_facts(param), where the caller asks of many states (a DTensor's attributes
    cost ~0.2 µs each)."""
    device, moment_dtypes, sharding = facts or _parameter_facts(param)
    moment_like = key in _SCALE_KEYS or key in _PARAMETER_SHAPED_STATE
    if moment_like and isinstance(value, Tensor) and value.device != device:
        # torch's kernels ran a meta step as nothing (fused Adam: counts advanced, nothing
        # moved), the loop failed midway (other parameters updated)
        return f"on {value.device}", _ON_PARAMETER_DEVICE.format(param.device)
    if moment_like and isinstance(value, Tensor):
        found = _sharding_problem(value, sharding)
        if found is not None:
            return found
    if key in HOST_SCALAR_STATE or key in _SCALE_KEYS or key in _PARAMETER_SHAPED_STATE:
        if isinstance(value, Tensor) and value.is_nested:
            return "that is a nested tensor", "a dense tensor"
        if isinstance(value, Tensor) and value.layout != torch.strided:
            return f"{_described_state(value)} with layout {value.layout}", "a dense tensor"
        found = memory_problem(value) if type(value) in PLAIN_TENSOR_TYPES else None
        if found is not None:  # what the kernels (or the host-scalar helpers) read
            return f"{_described_state(value)} {found[0]},", f"{found[1]}; load_state_dict does"
    if key in HOST_SCALAR_STATE:
        if _is_count(value):
            return None
        shown = repr(value) if not isinstance(value, Tensor) else _described_state(value)
        if isinstance(value, Tensor) and _is_number(value):
            shown += f" holding {value.item()!r}"
        elif isinstance(value, Tensor) and value.is_meta:
            shown += " on meta (no value)"
        return f"is {shown}", _COUNT_ALLOWED
    if key in _SCALE_KEYS:
        expected = absmax_shape(param.shape)
        if not isinstance(value, Tensor) or tuple(value.shape) != expected:
            return _described_state(value), _MADE_FOR_IT.format(expected)
        if value.dtype != torch.float32:  # the steps failed midway on float64 scales
            return f"of dtype {value.dtype}", _EIGHT_BIT_DTYPE.format("torch.float32")
        return _overlap_problem(value)  # scales are written back in place too
    if key not in _PARAMETER_SHAPED_STATE:
        return None
    if key in _CODE_KEYS and isinstance(value, Tensor) and value.dtype != torch.uint8:
        # int8 codes stepped, each backend decoding them its own way
        return f"of dtype {value.dtype}", _EIGHT_BIT_DTYPE.format("torch.uint8")
    if not isinstance(value, Tensor) or value.shape != param.shape:
        return _described_state(value), _MADE_FOR_IT.format(tuple(param.shape))
    if not _holds_a_moment(key, value, moment_dtypes):
        return f"of dtype {value.dtype}", _MOMENT_KIND.format(param.dtype)
    return _overlap_problem(value)


_ON_PARAMETER_DEVICE = "a tensor on the parameter's device ({})"
_SHARDED_LIKE_PARAMETER = (
    "state laid out over the ranks as its parameter is: a DTensor of the parameter's mesh "
    "and placements beside a DTensor parameter, a plain tensor beside a plain one "
    "(torch.distributed.checkpoint.state_dict's get_optimizer_state_dict and "
    "set_optimizer_state_dict with options=StateDictOptions(full_state_dict=True) save "
    "sharded state whole and shard a whole checkpoint as they load it)"
)


def _sharding_problem(value: Tensor, sharding: tuple[Any, Any] | None) -> tuple[str, str] | None:
    """(problem, allowed) for a state tensor laid out over the ranks unlike its parameter:
    a plain tensor beside a DTensor parameter (a whole checkpoint given to load_state_dict
    under FSDP2 holds them, and torch's loader keeps them as they come), a DTensor beside
    a plain parameter, or a DTensor of another mesh or placements. Every backend steps a
    DTensor parameter's shard beside its state's shards: given a whole tensor instead, a
    step failed inside torch after it had updated the parameters before it. sharding:
    the parameter's (_sharding)."""
    held = _sharding(value)
    if held is None and sharding is None:
        return None
    if held is None or sharding is None:
        kinds = ("a plain tensor", "a DTensor") if held is None else ("a DTensor", "a plain tensor")
        return f"that is {kinds[0]} (the parameter is {kinds[1]})", _SHARDED_LIKE_PARAMETER
    (mesh, placements), (param_mesh, param_placements) = held, sharding
    if placements != param_placements or mesh != param_mesh:
        return (
            f"that is a DTensor with placements {placements} on {mesh} (the parameter's: "
            f"{param_placements} on {param_mesh})",
            _SHARDED_LIKE_PARAMETER,
        )
    return None


_MOVED_STATE = (
    ": state made before the model moved (model.to(), to_empty after building on meta) "
    "stays where it was made; optimizer.load_state_dict(optimizer.state_dict()) moves it "
    "to each parameter's device, and state made on meta holds no values: del "
    "optimizer.state[param] to start it afresh"
)


_MOMENT_KIND = (
    "a dtype of the parameter's kind ({}: real floating or complex alike), which it is cast to"
)


class _ParameterFacts(NamedTuple):
    """What _state_problem compares each state tensor with, read once per parameter."""

    device: torch.device
    moment_dtypes: frozenset
    """The dtypes its moments may have (_holds_a_moment)."""
    sharding: tuple[Any, Any] | None
    """(mesh, placements) of a DTensor parameter, None for any other (_sharding)."""


def _parameter_facts(param: Tensor) -> _ParameterFacts:
    moment_dtypes = _COMPLEX_DTYPES if param.is_complex() else _REAL_FLOATING_DTYPES
    return _ParameterFacts(param.device, moment_dtypes, _sharding(param))


def _sharding(tensor: Tensor) -> tuple[Any, Any] | None:
    """A DTensor's (mesh, placements): how it is laid out over the ranks; None for any
    other tensor."""
    if not _is_dtensor(tensor):
        return None
    return tensor.device_mesh, tensor.placements  # type: ignore[attr-defined]


def _holds_a_moment(key: str, value: Tensor, moment_dtypes: frozenset) -> bool:
    """Whether state[key] has a dtype its parameter's moments (or Kahan buffer) can be
    kept in, once cast to the parameter's (moment_dtypes: _parameter_facts): real
    floating beside a real parameter, complex beside a complex one. Cast, a complex one
    beside a real parameter lost its imaginary part, an integer one its fractions; a real
    one beside a complex parameter failed inside the step, after other parameters were
    updated."""
    return key not in _DTYPE_FOLLOWING_STATE or value.dtype in moment_dtypes


def _overlap_problem(value: Tensor) -> tuple[str, str] | None:
    """(problem, allowed) for a state tensor several of whose elements are one memory
    location (expand()ed), which no in-place update can write; None otherwise."""
    if not value.is_contiguous() and 0 in value.stride() and _shares_memory_within(value):
        return (
            f"with strides {value.stride()}, several elements in one place",
            "a tensor whose elements each have their own memory",
        )
    return None


def _described_state(value: object) -> str:
    """A state value as an error names it."""
    if isinstance(value, Tensor) and value.is_nested:
        return "that is a nested tensor"
    if isinstance(value, Tensor):
        return f"of shape {tuple(value.shape)}"
    return f"that is a {type(value).__name__}, not a tensor,"


def _shares_memory_within(tensor: Tensor) -> bool:
    """Whether some elements of tensor are one memory location (an expand()ed tensor):
    an in-place update of it writes each such location several times."""
    return torch._debug_has_internal_overlap(_local(tensor)) == 1


def _materialized(tensor: Tensor) -> Tensor:
    """A copy of a tensor with lazy_values that holds its values, exact."""
    return tensor.clone() if tensor._is_zerotensor() else tensor.resolve_conj().resolve_neg()


STEPPABLE_DTYPES = frozenset(
    {
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex32,
        torch.complex64,
        torch.complex128,
    }
)
"""Parameter dtypes the update math runs in (as torch.optim's Adam: float8 types have no
lerp or sqrt, so a step of one failed midway with torch's NotImplementedError)."""


def _unsteppable(params: Sequence[Tensor]) -> bool:
    """Whether _refuse_unsteppable_params would refuse one of params (a pass per property
    at ~40 ns a tensor, for the steps that run the full checks)."""
    return not STEPPABLE_DTYPES.issuperset(map(_dtype_of, params)) or any_lazy_values(params)


def _refuse_unsteppable_params(
    params: Sequence[Tensor], group_params: Sequence[Tensor], where: str
) -> None:
    """Refuse a parameter of params (members of group_params, which name them) that no
    step can update: of a dtype no step computes in, with lazy_values (the fused kernels
    would write memory that does not hold its values), or whose storage does not hold its
    elements (storage_shortfall: freed or shrunk; the kernels and torch's own ops crashed
    the process on one). A lazy module's parameter is not asked for its memory: it has
    none before its first forward."""
    for param in params:
        found = None
        if param.dtype not in STEPPABLE_DTYPES:
            allowed = ", ".join(sorted(str(dtype) for dtype in STEPPABLE_DTYPES))
            found = (
                f"and dtype {param.dtype}, which no step computes in",
                f"{allowed} (keep a higher-precision master copy of float8 weights)",
            )
        elif not torch.nn.parameter.is_lazy(param):
            found = memory_problem(param)
        if found is not None:
            index = next(i for i, member in enumerate(group_params) if member is param)
            raise ValueError(
                f"Invalid params[{index}]{where}: a tensor of shape {tuple(param.shape)} "
                f"{found[0]}. Allowed: {found[1]}."
            )


def checked_gradient_list(
    optimizer: str,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    grad_name: Callable[[int], str],
) -> list[Tensor]:
    """The gradients to step params with. Refuses, before any parameter or state
    changes, a gradient a backend would fail on halfway or pair wrongly with its
    parameter: sparse, not of its parameter's shape, device and gradient dtype (autograd
    never makes one; `grad.data = ...` can), or with storage that does not hold its
    elements (storage_shortfall). A gradient with lazy_values (autograd gives a complex
    parameter used through .conj() one with the conjugate bit, which torch.optim
    refuses) is stepped from a copy holding its values: exact, and only the kernels,
    which read memory, need it. grad_name(i) names grads[i] in errors."""
    checks = host_checks()
    if checks.gradient_addresses(grads, params) is not None and checks.first_unbacked(grads) < 0:
        return list(grads)  # as autograd makes them (one pass in C++ where it builds)
    if any(map(_is_sparse, grads)):  # the message names the first
        position = list(map(_is_sparse, grads)).index(True)
        raise RuntimeError(
            f"{optimizer} does not support sparse gradients ({grad_name(position)}, beside a "
            f"parameter of shape {tuple(params[position].shape)}); use torch.optim.SparseAdam "
            "for sparse embeddings, or dense gradients (nn.Embedding(sparse=False))."
        )
    layouts = list(map(_layout_of, grads))
    if layouts.count(torch.strided) < len(layouts):  # CSR and its kin, mkldnn: torch's
        position = next(i for i, layout in enumerate(layouts) if layout != torch.strided)
        raise ValueError(  # errors, naming nothing, from the checks below
            f"Invalid {grad_name(position)}: a gradient of layout {layouts[position]} beside "
            f"a parameter of shape {tuple(params[position].shape)}. Allowed: a dense "
            "(torch.strided) gradient, as autograd makes it."
        )
    if not (
        all(map(operator.is_, map(_dtype_of, grads), map(_dtype_of, params)))
        and list(map(_shape_of, grads)) == list(map(_shape_of, params))
        and list(map(_device_of, grads)) == list(map(_device_of, params))
    ):
        for position, (param, grad) in enumerate(zip(params, grads, strict=True)):
            # A parameter may take gradients of another dtype (Tensor.grad_dtype, torch 2.13).
            grad_dtype = getattr(param, "grad_dtype", param.dtype)
            steppable = grad.dtype == param.dtype or {grad.dtype, param.dtype} <= _MIXED_DTYPES
            if (
                (grad.dtype in (param.dtype, grad_dtype) or grad_dtype is None)
                and steppable
                and (grad.shape, grad.device) == (param.shape, param.device)
            ):
                continue
            dtypes = "any dtype" if grad_dtype is None else f"{grad_dtype}"
            raise ValueError(
                f"Invalid {grad_name(position)}: {grad.dtype} of shape {tuple(grad.shape)} "
                f"on {grad.device}. Allowed: a gradient of the parameter's shape and device "
                f"({tuple(param.shape)}, {param.device}) and its grad dtype ({dtypes}), as "
                "autograd makes it, that a step computes with: the parameter's dtype, or "
                "float32, bfloat16 or float16 beside a parameter of one of those."
            )
    if any_lazy_values(grads):
        grads = [g if lazy_values(g) is None else _materialized(g) for g in grads]
    unbacked = checks.first_unbacked(grads)
    if unbacked >= 0:
        grad = grads[unbacked]
        raise ValueError(
            f"Invalid {grad_name(unbacked)}: a tensor of shape {tuple(grad.shape)} "
            f"{shortfall_problem(storage_shortfall(grad))}. Allowed: {BACKED}."  # type: ignore[arg-type]
        )
    for position, (param, grad) in enumerate(zip(params, grads, strict=True)):
        # p.grad = p.detach(): each backend read it in its own order around the update
        # (the fused kernel's pointers are restrict), NAdam's 1e-4 apart in three steps
        if (
            type(grad) in PLAIN_TENSOR_TYPES
            and type(param) in PLAIN_TENSOR_TYPES
            and grad.numel()
            and not grad.is_meta
            and lazy_values(param) is None
            and grad.data_ptr() == param.data_ptr()
        ):
            raise ValueError(
                f"Invalid {grad_name(position)}: its memory is that of its parameter, which "
                "the step writes in place. Allowed: a gradient of its own (.clone() it)."
            )
    return list(grads)


FUNCTIONAL_STATE_LISTS = {
    "exp_avgs": "exp_avg",
    "exp_avg_sqs": "exp_avg_sq",
    "max_exp_avg_sqs": "max_exp_avg_sq",
    "kahan_comps": "kahan_comp",
    "mu_products": "mu_product",
    "state_steps": "step",
    "window_microbatches": "window_microbatches",
    "window_shares": "window_shares",
}
"""A functional form's state lists, by argument name, and the state key of their entries."""
_OPTIONAL_STATE_LISTS = frozenset(
    {"max_exp_avg_sqs", "kahan_comps", "window_microbatches", "window_shares"}
)
_FUNCTIONAL_SWITCHES = ("decouple_wd", "decouple_lr", "amsgrad", "clip", "accumulate")

FunctionalForm = TypeVar("FunctionalForm", bound=Callable[..., None])


def checked_functional_form(function: FunctionalForm) -> FunctionalForm:
    """A functional form (core.adam, ...) that checks what a direct call hands it, as the
    classes check their groups and state, before anything changes, and runs it under
    no_grad as the classes' steps run. Before, a direct call took anything: an lr of NaN
    made every parameter NaN, a freed or shrunk tensor crashed the process or had the
    kernels write past its memory, a list shorter than params stepped a prefix, a
    negated gradient stepped the wrong way on the fused kernels. A call an optimizer
    makes (its lists checked: lists_vouched) goes straight through."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> None:
        if lists_vouched(args[0] if args else kwargs.get("params")):
            return function(*args, **kwargs)
        return _checked_call(function, signature, args, kwargs)

    return cast(FunctionalForm, checked)


@keep_out_of_graphs
def _checked_call(
    function: Callable[..., None],
    signature: inspect.Signature,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """A direct call of a functional form: checked, then run under no_grad. Kept out of
    torch.compile graphs, as the classes' steps are (_eager_step): compiled, a direct
    call failed inside inductor (torch's "mutating a non-functional tensor" assertion)."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    check_functional_arguments(function.__name__, arguments)
    if not arguments["params"]:
        return  # nothing to step (torch's foreach operations refuse empty lists)
    with torch.no_grad():
        function(**arguments)


def check_functional_arguments(name: str, arguments: dict[str, Any]) -> None:
    """Refuse, by argument name, what a functional form's step could not take; replaces
    arguments["grads"] by gradients holding their values (checked_gradient_list)."""
    validate_update_numbers(arguments)
    for key in ("beta1", "beta2"):
        require(_is_beta(arguments[key]), key, arguments[key], _BETA_ALLOWED)
    if "momentum_decay" in arguments:
        value = arguments["momentum_decay"]
        require(finite_at_least(value, 0.0), "momentum_decay", value, "a finite number >= 0")
    for key in _FUNCTIONAL_SWITCHES:
        if key in arguments:
            require(isinstance(arguments[key], bool), key, arguments[key], "True or False")
    for key in ("lr", "beta1", "beta2", "eps", "weight_decay", "max_lr", "momentum_decay"):
        value = arguments.get(key)
        if value is not None and type(value) is not float:
            # checked above to be one finite number: the backends each read numbers their
            # own way (the loop's addcdiv_ refused a 1-element tensor after some moments
            # were written; Triton a 0-dim one; torch's fused Adam a fractions.Fraction)
            arguments[key] = float(value)
    if arguments.get("accumulate"):
        require(
            arguments.get("window_microbatches") is not None,
            "window_microbatches",
            None,
            "a list of 0-dim tensors when accumulate=True (each window's micro-batch count)",
        )
    if "microbatch_share" in arguments:
        require_microbatch_share(arguments["microbatch_share"])
        if arguments["microbatch_share"] is not None:
            for needed in ("window_microbatches", "window_shares"):
                require(
                    arguments[needed] is not None,
                    needed,
                    None,
                    "a list of 0-dim tensors when microbatch_share is given",
                )
        else:  # they would not be advanced: the window's shares would go stale
            require(
                arguments.get("window_shares") is None,
                "window_shares",
                "a list",
                "None when microbatch_share is None",
            )
    for key in ("foreach", "fused"):
        require(_is_optional_bool(arguments[key]), key, arguments[key], "None, True or False")
    require(
        not (arguments["fused"] and arguments["foreach"]),
        "fused",
        arguments["fused"],
        "None or False when foreach=True (pick one backend)",
    )
    params = arguments["params"]
    _require_list("params", params, None)
    if not all(map(_is_dense, params)):
        index = [_is_dense(p) for p in params].index(False)
        raise ValueError(
            f"Invalid params[{index}]: {_described_entry(params[index])}. Allowed: a dense tensor."
        )
    _check_params(params, "", stepped=params)
    _require_list("grads", arguments["grads"], len(params))
    fit = [isinstance(g, Tensor) and not g.is_nested for g in arguments["grads"]]
    if not all(fit):
        index = fit.index(False)
        raise ValueError(
            f"Invalid grads[{index}]: {_described_entry(arguments['grads'][index])}. Allowed: "
            "a tensor (not nested)."
        )
    grads = checked_gradient_list(name, params, arguments["grads"], "grads[{}]".format)
    arguments["grads"] = grads
    written: list[tuple[str, Sequence[Any]]] = [("params[{}]", params)]
    for list_name, key in FUNCTIONAL_STATE_LISTS.items():
        values = arguments.get(list_name)
        if list_name not in arguments or (values is None and list_name in _OPTIONAL_STATE_LISTS):
            continue
        _require_list(list_name, values, len(params))
        if _as_steps_keep(key, values, params):
            written.append((f"{list_name}[{{}}]", values))
            continue
        for index, (param, value) in enumerate(zip(params, values, strict=True)):
            found = _functional_state_problem(key, value, param)
            if found is not None:
                what = f"that {found[0]}" if found[0].startswith("is ") else found[0]
                raise ValueError(
                    f"Invalid {list_name}[{index}]: a value {what} beside a parameter of "
                    f"shape {tuple(param.shape)}. Allowed: {found[1]}."
                )
        quantized = [isinstance(value, QuantizedMoment) for value in values]
        if list_name == "exp_avg_sqs":
            _require_one_stream(arguments["exp_avgs"], values)
        pairs = list(zip(quantized, values, strict=True))
        written.append((f"{list_name}[{{}}]", [None if q else v for q, v in pairs]))
        for part in ("codes", "absmax"):
            parts = [getattr(v, part) if q else None for q, v in pairs]
            written.append((f"{list_name}[{{}}].{part}", parts))
    _refuse_shared_memory(params, written, grads)


def _require_one_stream(exp_avgs: Sequence[Any], exp_avg_sqs: Sequence[Any]) -> None:
    """A parameter's 8-bit m and v draw their rounding bits from one stream (one hash per
    element serves both): given two, the backends each took a different one's."""
    for index, (m, v) in enumerate(zip(exp_avgs, exp_avg_sqs, strict=True)):
        if not (isinstance(m, QuantizedMoment) and isinstance(v, QuantizedMoment)):
            continue
        for name in ("stream", "first_index"):
            require(
                getattr(m, name) == getattr(v, name),
                f"exp_avg_sqs[{index}].{name}",
                getattr(v, name),
                f"exp_avgs[{index}].{name} ({getattr(m, name)}): a parameter's 8-bit m and v "
                "share their random bits",
            )


def _is_dense(value: object) -> bool:
    """A tensor whose elements lie in strides: not sparse, nor nested (whose sizes and
    strides torch refuses to give; reading them from C aborted the process)."""
    return isinstance(value, Tensor) and value.layout == torch.strided and not value.is_nested


def _as_steps_keep(key: str, values: Sequence[Any], params: Sequence[Tensor]) -> bool:
    """Whether a functional form's state list is what the optimizers keep, so that no
    entry needs _functional_state_problem's closer look (one pass per property, at C
    speed where it can): host scalars as 1-element float32 CPU tensors holding finite
    counts >= 0, other state as contiguous plain tensors of their parameter's shape,
    dtype and device holding their own values in their storage."""
    if not PLAIN_TENSOR_TYPES.issuperset(map(type, values)):
        return False
    if key == "kahan_comp" and not _LOW_PRECISION.issuperset(map(_dtype_of, params)):
        return False  # a buffer beside a full-precision parameter: the closer look refuses it
    if key in HOST_SCALAR_STATE:
        if any(value.dim() for value in values):  # a 1-element 1-D counter: the closer look
            return False
        counts = cpu_kernel.read_scalars(values)
        return counts is not None and all(0 <= c <= FLOAT32_MAX for c in counts)  # not NaN
    checks = host_checks()  # asks what it asks of gradients, in one pass
    return (
        checks.gradient_addresses(values, params) is not None and checks.first_unbacked(values) < 0
    )


def _require_list(name: str, values: object, count: int | None) -> None:
    """Refuse a functional form's list argument that is not a list or tuple of count
    entries (one per parameter)."""
    if not isinstance(values, (list, tuple)):
        raise ValueError(
            f"Invalid {name}: {_described_entry(values)}. Allowed: a list or tuple"
            + (" of tensors." if count is None else " with one entry per parameter.")
        )
    if count is not None and len(values) != count:
        raise ValueError(
            f"Invalid {name}: {len(values)} entries for {count} parameter"
            f"{'' if count == 1 else 's'}. Allowed: one "
            f"entry per parameter ({name}[i] belongs to params[i])."
        )


def _described_entry(value: object) -> str:
    if isinstance(value, Tensor) and value.is_nested:
        return "a nested tensor"
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} with layout {value.layout}"
    return f"a {type(value).__name__}"


def _functional_state_problem(key: str, value: object, param: Tensor) -> tuple[str, str] | None:
    """(what is wrong, what is allowed) with a functional form's state entry for param,
    or None: _state_problem's rules, and what a functional form needs besides (counters
    it adds to in place, tensors on the parameter's device, 8-bit moments of the right
    sign)."""
    if value is None and key == "kahan_comp":
        return None  # no compensation for this parameter
    if key == "kahan_comp" and param.dtype not in _LOW_PRECISION:
        # the loop and foreach backends zeroed such a parameter (its fp32 copy is itself)
        return (
            f"that is a compensation buffer for a {param.dtype} parameter",
            "None: only bfloat16 and float16 parameters are compensated",
        )
    if isinstance(value, QuantizedMoment) and key in MOMENT_STATE:
        if param.dtype not in QUANTIZABLE_DTYPES:  # every backend failed inside torch
            return (
                "that is an 8-bit moment",
                f"a full-precision tensor for a {param.dtype} parameter: 8-bit moments are "
                "stepped beside float32, bfloat16 and float16 ones (core.quantization."
                "quantizable)",
            )
        if value.signed != (key in SIGNED_KEYS):
            return (
                f"that is an 8-bit moment with signed={value.signed}",
                f"signed={key in SIGNED_KEYS} for {key} (core.quantization.quantized_state)",
            )
        for name in ("stream", "first_index"):  # the keys of its random bits
            number = getattr(value, name)
            if not (isinstance(number, int) and not isinstance(number, bool)) or not (
                0 <= number < 2**63
            ):
                return (
                    f"that is an 8-bit moment with {name}={number!r}",
                    f"an int in [0, 2**63) for {name} (core.quantization.QuantizedMoment)",
                )
        parts = zip(moment_keys(key), (value.codes, value.absmax), strict=True)
        return next(
            (found for part, tensor in parts if (found := _placed_problem(part, tensor, param))),
            None,
        )
    if key in HOST_SCALAR_STATE and not (
        isinstance(value, Tensor)
        and value.dtype in (torch.float32, torch.float64)
        and not value.is_nested
        and value.dim() == 0  # read together with the others' (one 1-D entry broke that)
    ):
        shown = _described_state(value)
        if isinstance(value, Tensor):
            shown += f" of dtype {value.dtype}"
        return shown, (
            "a 0-dim float32 tensor, as the optimizers keep it (float64 also counts "
            "exactly; the step adds to it in place)"
        )
    return _placed_problem(key, value, param)


def _placed_problem(key: str, value: object, param: Tensor) -> tuple[str, str] | None:
    """_state_problem, then what a functional form needs besides of a state tensor: for
    moments and Kahan buffers its parameter's dtype (the classes cast those before a
    step; a functional form steps what it is handed)."""
    found = _state_problem(key, value, param)
    if found is not None or key in HOST_SCALAR_STATE:
        return found
    dtype = value.dtype  # type: ignore[attr-defined]  (its device: _state_problem)
    if key in _DTYPE_FOLLOWING_STATE and dtype != param.dtype:
        return f"of dtype {dtype}", (
            f"a tensor of the parameter's dtype ({param.dtype}), as the optimizers keep it"
        )
    return None


def _refuse_shared_memory(
    params: Sequence[Tensor],
    written: Sequence[tuple[str, Sequence[Tensor | None]]],
    grads: Sequence[Tensor],
) -> None:
    """Refuse a tensor a functional step writes that starts where another it writes or
    reads does (the same tensor passed twice, as two moments, or a gradient that is its
    parameter): each backend would update it in its own order, none as intended. written:
    (a format naming entry i, the tensors of params' entries). Compared by first address,
    so views that overlap from different first elements are not caught."""

    def starts(values: Sequence[Tensor | None]) -> list[int]:
        found = host_checks().gradient_addresses(values, params)  # the usual case, in C++
        if isinstance(found, bytes):
            return memoryview(found).cast("q").tolist()
        if PLAIN_TENSOR_TYPES.issuperset(map(type, values)):  # step counters: a C-speed pass
            return list(map(Tensor.data_ptr, values))  # type: ignore[arg-type]
        return [t.data_ptr() if isinstance(t, Tensor) and not t.is_meta else 0 for t in values]

    written_starts = [list(starts(values)) for _, values in written]
    every = list(filter(None, itertools.chain.from_iterable(written_starts)))
    grad_starts = starts(grads)
    if len(set(every)) == len(every) and set(every).isdisjoint(grad_starts):
        return
    seen: dict[int, tuple[str, int]] = {}  # a start is shared: find by whom, to name them
    columns = [*zip(written, written_starts, strict=True), (("grads[{}]", grads), grad_starts)]
    for (name, values), column in columns:
        for index, start in enumerate(column):
            if start == 0 or values[index].numel() == 0:  # type: ignore[union-attr]
                continue  # no memory: None (the 8-bit parts of a full moment), or empty
            if start in seen:
                earlier, position = seen[start]
                writes, allowed = (
                    ("which the step writes", "a gradient of its own (.clone() it)")
                    if name == "grads[{}]"
                    else ("and the step writes both", "tensors of their own (.clone() one)")
                )
                raise ValueError(
                    f"Invalid {name.format(index)}: its memory is that of "
                    f"{earlier.format(position)}, {writes} in place. Allowed: {allowed}."
                )
            if name != "grads[{}]":  # gradients are only read: one may serve twice
                seen[start] = (name, index)


def _check_params(
    params: Sequence[Tensor], where: str, stepped: Sequence[Tensor] | None = None
) -> None:
    """Refuse a parameter listed twice (it would be stepped twice per step), one of a
    dtype or memory no step can take (_refuse_unsteppable_params; asked of stepped, by
    default those that require grad) or one whose elements share memory (no in-place
    update can step it), before it is added."""
    seen: set[int] = set()
    for index, param in enumerate(params):
        if param.is_nested:  # whose sizes torch refuses to give: no step reads it
            raise ValueError(
                f"Invalid params[{index}]{where}: a nested tensor. Allowed: a dense tensor."
            )
        if (
            not torch.nn.parameter.is_lazy(param)  # which has no data to ask about yet
            and param.is_inference()
            and not torch.is_inference_mode_enabled()
        ):
            # torch refuses in-place updates of one outside that mode
            raise ValueError(
                f"Invalid params[{index}]{where}: a tensor made under torch.inference_mode(). "
                "Allowed: a tensor made outside it (.clone() it outside inference mode)."
            )
        if id(param) in seen:
            raise ValueError(
                f"Invalid params[{index}]{where}: the same tensor as an earlier entry of the "
                "group, so each step would update it twice. Allowed: each parameter once."
            )
        seen.add(id(param))
    if stepped is None:
        stepped = [p for p in params if p.requires_grad]
    materialized = [p for p in stepped if not torch.nn.parameter.is_lazy(p)]
    if (
        len(materialized) < len(stepped)  # a lazy module's: asked for its dtype alone
        or _unsteppable(materialized)
        or host_checks().first_unbacked(materialized) >= 0
    ):
        _refuse_unsteppable_params(stepped, params, where)
    for index, param in enumerate(params):
        # A lazy module's parameter has no memory before its first forward (which fills
        # it in place); torch.optim takes it, and so does a step after that forward.
        if (
            not torch.nn.parameter.is_lazy(param)
            and not param.is_contiguous()  # a contiguous tensor's elements each have their own
            and _shares_memory_within(param)
        ):
            raise ValueError(
                f"Invalid params[{index}]{where}: shape {tuple(param.shape)} with strides "
                f"{param.stride()}, so several elements are one memory location (an "
                "expand()ed tensor) and no in-place update can step them. Allowed: a tensor "
                "whose elements each have their own memory (.clone() it)."
            )


PROGRESS_KEYS = ("step", "exp_avg", "exp_avg_sq")
"""The state every Adam-family step makes together: a parameter's count and moments."""
_PROGRESS_ALLOWED = (
    "a state holding step, exp_avg and exp_avg_sq together (moments in full precision or "
    "as 8-bit codes and scales), or none of them (del optimizer.state[param] restarts the "
    "parameter's state)"
)


_PROGRESS_FORMS = tuple((key, moment_keys(key)[0]) for key in PROGRESS_KEYS)
"""Each PROGRESS_KEYS entry with the key of its 8-bit codes."""


def missing_progress_keys(state: dict[str, Any]) -> list[str]:
    """The PROGRESS_KEYS a state lacks in either form: the one rule for loaded and live
    state (a moment or count made afresh beside the others would be silently wrong: v
    restarted at 0 with the step kept made the next update ~50x too large)."""
    return [key for key, codes in _PROGRESS_FORMS if key not in state and codes not in state]


def _observe(observers: dict[int, Callable[[Tensor], None]], param: Tensor) -> None:
    """Run register_release_pre_hook's hooks for a released step about to apply."""
    for observe in tuple(observers.values()):
        observe(param)


def _made_progress(state: dict[str, Any], missing: list[str]) -> bool:
    """Whether a state lacking `missing` (missing_progress_keys) was stepped: it has moments
    without a count, or a count (step, or micro-batches folded into an open window) above
    0. A state still at step 0 with no window is a first step that did
    not finish making its moments (an out-of-memory error Composer's automatic
    micro-batching catches and retries): it is completed, not refused."""
    if len(missing) == len(PROGRESS_KEYS):
        return False  # nothing of it: a fresh start
    if "step" in missing:
        return True
    # Micro-batches folded into an open window are progress at step 0 too.
    counts = (state[key] for key in ("step", "window_microbatches") if key in state)
    return not all(finite_at_least(count, 0.0) and float(count) == 0 for count in counts)


def _is_host_scalar(value: object) -> bool:
    """A count as steps keep it: a 0-dim float32 CPU tensor."""
    return (
        isinstance(value, Tensor)
        and value.dim() == 0
        and value.dtype == torch.float32
        and value.device.type == "cpu"
        and type(value) is Tensor
    )


def _refuse_unless_every_rank_converted(converted: int, mesh: Any) -> None:
    """Refuse, on every rank, a full-state load that handed the checkpoint's other form
    to some ranks only. torch's broadcast_from_rank0=True sends each rank only the
    keys its own optimizer holds, so the other ranks' moments were their own leftover
    (zeros, or their live state) under the checkpoint's step: loaded silently, the
    shards disagreed. A DTensor parameter's load is every rank's (torch's loader
    moves its shards by collectives), so the ranks can agree by one more."""
    # among the mesh's ranks (a 1-D mesh's own group, else every rank); all_gather_object
    # takes the device the group's backend needs (NCCL: the current GPU, where an
    # all_reduce of a CPU tensor would fail)
    group = mesh.get_group() if mesh.ndim == 1 else None
    counts: list[Any] = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(counts, converted, group=group)
    most, fewest = max(counts), min(counts)
    require(
        most == fewest,
        "state_dict",
        f"moments in the other form than this optimizer holds for {fewest} to {most} "
        "parameters, depending on the rank",
        "the checkpoint's form on every rank: torch's set_optimizer_state_dict with "
        "broadcast_from_rank0=True hands rank 0 alone the keys this optimizer does not "
        "hold; load with full_state_dict=True without it, or build the optimizer with "
        "the checkpoint's state_precision",
    )


def in_a_run_of_several_ranks() -> bool:
    """Whether a process group of more than one rank is running."""
    distributed = torch.distributed
    return bool(
        distributed.is_available()
        and distributed.is_initialized()
        and distributed.get_world_size() > 1
    )


def _is_dtensor(tensor: Tensor) -> bool:
    dtensor = dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def _checkpoint_form_as_own(
    saved: dict[str, Any], moment: str, held_full: bool
) -> dict[str, Tensor] | None:
    """A DTensor parameter's moment, which torch's full-state loader left in both forms
    (this optimizer's own, as DTensors, beside the checkpoint's, whole and plain): the
    checkpoint's values in the own form and layout (dequantized, or quantized to the
    nearest codes, as a load converts any checkpoint of the other precision, then this
    rank's part), or None where the forms are not laid out so."""
    codes, absmax = moment_keys(moment)
    own, theirs = ((moment,), (codes, absmax)) if held_full else ((codes, absmax), (moment,))
    if not all(_with_data(saved.get(key)) and _is_dtensor(saved[key]) for key in own):
        return None
    if not all(_with_data(saved.get(key)) and not _is_dtensor(saved[key]) for key in theirs):
        return None
    signed = moment in SIGNED_KEYS
    if held_full:
        like = saved[moment]
        if saved[codes].shape != like.shape or saved[absmax].shape != absmax_shape(like.shape):
            return None
        values = dequantize(saved[codes], saved[absmax].float(), signed).to(like.dtype)
        return {moment: laid_out_as(values, like)}
    if saved[moment].shape != saved[codes].shape:
        return None
    whole_codes, whole_absmax = quantize(saved[moment].float(), signed)
    if whole_absmax.shape != saved[absmax].shape:
        return None
    return {
        codes: laid_out_as(whole_codes, saved[codes]),
        absmax: laid_out_as(whole_absmax, saved[absmax]),
    }


def _with_data(value: object) -> bool:
    """A dense tensor (_is_dense) that holds values: not on meta."""
    return _is_dense(value) and not value.is_meta  # type: ignore[union-attr]


def _holds_only_zeros(value: object) -> bool:
    """Whether value is a dense tensor with data, every element of it (this rank's shard
    of a DTensor) zero."""
    return _with_data(value) and not bool(_local(value).detach().any())  # type: ignore[arg-type]


def _moment_form_problem(state: dict[str, Any]) -> tuple[str, str, str] | None:
    """(key, problem, allowed) of the first moment a state holds in no one whole form
    (full precision, or 8-bit codes with their scales), or None: the one rule for loaded
    and live state."""
    for moment in MOMENT_STATE:
        codes, absmax = moment_keys(moment)
        if moment in state and codes in state:
            allowed = "a moment in one form: full precision or 8-bit codes and scales"
            return moment, f"comes with {codes!r} as well", allowed
        if (codes in state) != (absmax in state):
            present, absent = (codes, absmax) if codes in state else (absmax, codes)
            allowed = "an 8-bit moment's codes and scales together"
            return present, f"comes without {absent!r}", allowed
    return None


def _beyond_float16(
    state: Mapping[str, Any], held_full: frozenset[str]
) -> tuple[str, str, str] | None:
    """(key, problem, allowed) for a moment a float16 parameter's state would hold as inf:
    8-bit codes (scaled in fp32) headed for full precision, and any wider full moment
    (loaded, or kept from before the parameter became float16: torch's load and the step
    cast it to the parameter's dtype first, even where it is quantized next), holding
    finite values beyond float16's range, v of |g| > 255 above all. Those became inf,
    silently (and quantized, NaN blocks). Reads only moments not yet float16 (the top of
    an 8-bit block is its scale)."""
    for key in MOMENT_STATE:
        codes, absmax = moment_keys(key)
        if codes in state:
            if key not in held_full:
                continue  # stays 8-bit
            shown, value = absmax, state.get(absmax)
            way_out = ", or keep state_precision='8bit' for a tensor it quantizes"
        else:
            shown, value, way_out = key, state.get(key), ""
        if (
            not isinstance(value, Tensor)
            or value.dtype == torch.float16
            or not value.is_floating_point()
            or value.is_meta
        ):
            continue
        local = _local(value)
        overflows = torch.isfinite(local) & torch.isinf(local.to(torch.float16))
        if bool(overflows.any()):
            largest = float(local[overflows].abs().max())
            return (
                shown,
                f"holds {largest:.4g}, which the float16 {key} of a float16 parameter cannot "
                "(from 65520 up it becomes inf)",
                "float16 parameters' moments within float16's range; train float16 "
                f"parameters as bfloat16 or float32{way_out}",
            )
    return None


def _check_saved_values(name: str, saved_id: Any, saved_state: dict, param: Tensor) -> None:
    """Refuse state values a step could not read, or would read with the wrong meaning:
    step counters that are not one finite number >= 0, moments that are not tensors with
    data of the parameter's shape, an 8-bit moment's codes without its scales (or the
    other way round), codes that are not uint8 and scales below 0. A tensor whose storage
    does not hold its elements is refused first: reading its values (these checks, or
    torch's copy into the parameter's dtype) crashed the process."""

    def refuse(key: str, problem: str, allowed: str) -> None:
        raise ValueError(
            f"Invalid state_dict for {name}: state[{saved_id}][{key!r}] {problem}. "
            f"Allowed: {allowed}."
        )

    for key, value in saved_state.items():
        if isinstance(value, Tensor) and value.is_nested:
            refuse(key, "is a nested tensor", "a dense (strided) tensor")
        if isinstance(value, Tensor) and value.layout != torch.strided:
            # before its storage is read: a sparse tensor has none (torch's internal error)
            refuse(key, f"has layout {value.layout}", "a dense (strided) tensor")
        # A ZeroTensor has no storage but its values (zeros): loading materializes it.
        lazy = not isinstance(value, Tensor) or lazy_values(value) is not None
        shortfall = None if lazy else storage_shortfall(value)
        if shortfall is not None:
            refuse(
                key,
                f"has shape {tuple(value.shape)} {shortfall_problem(shortfall)}",
                "a tensor whose storage holds its elements (save state while it is allocated)",
            )
    for key in HOST_SCALAR_STATE:
        value = saved_state.get(key)
        if key in saved_state and not _is_count(value):
            shown = repr(value)
            if isinstance(value, Tensor):
                shown = f"{type(value).__name__} of shape {tuple(value.shape)}"
                if value.numel() == 1 and not value.is_meta:
                    shown += f" holding {value.item()!r}"
                elif value.is_meta:
                    shown += " on meta (no value)"
            refuse(key, f"is {shown}", _COUNT_ALLOWED)
    form = _moment_form_problem(saved_state)
    if form is not None:
        key, problem, allowed = form
        if key in MOMENT_STATE:  # both forms: what torch's full-state DCP loader makes
            allowed += (
                " (torch's set_optimizer_state_dict(full_state_dict=True) lays a checkpoint "
                "holding the other form over the receiving optimizer's own state, which is "
                "dropped on load, its live tensors or all zeros, in one process or for "
                "DTensor parameters; not for plain ones on one of several ranks, which may "
                "load alone: convert the checkpoint in one process, or build the optimizer "
                "with the checkpoint's state_precision)"
            )
        refuse(key, problem, allowed)
    for key, expected in _expected_state_shapes(param).items():
        if key not in saved_state:
            continue
        value = saved_state[key]
        if not isinstance(value, Tensor) or value.is_meta:
            kind = "a meta tensor (no data)" if isinstance(value, Tensor) else type(value).__name__
            refuse(key, f"is {kind}", f"a tensor of shape {tuple(expected)}")
        if value.shape != expected:
            raise ValueError(
                f"Invalid state_dict for {name}: state[{saved_id}][{key!r}] has shape "
                f"{tuple(value.shape)}, but a parameter of shape {tuple(param.shape)} "
                f"needs {tuple(expected)}."
            )
        sharding = _sharding_problem(value, _sharding(param))
        if sharding is not None:  # before any of its values is read
            refuse(key, sharding[0].removeprefix("that "), sharding[1])
        if _shares_memory_within(value):
            refuse(
                key,
                f"has strides {value.stride()}, so several elements are one memory location",
                "a tensor whose elements each have their own memory",
            )
        if key.endswith("_codes") and value.dtype != torch.uint8:
            refuse(key, f"has dtype {value.dtype}", "torch.uint8 (what state_dict() saves)")
        if not _holds_a_moment(key, value, _parameter_facts(param).moment_dtypes):  # as steps do
            refuse(
                key,
                f"has dtype {value.dtype}",
                _MOMENT_KIND.format(param.dtype),
            )
        if key.endswith("_absmax"):
            if not value.is_floating_point():
                refuse(key, f"has dtype {value.dtype}", "a floating dtype")
            local = _local(value)
            # NaN is a scale the format writes (a block that held a non-finite value); a
            # finite float64 scale beyond float32's range would load as inf.
            wrong = (local < 0) | torch.isinf(local.float())
            if bool(wrong.any()):
                refuse(
                    key,
                    f"holds {float(local[wrong][0])}",
                    "scales >= 0 and finite in float32, the dtype they are kept in (a "
                    "block's largest magnitude, NaN for a block that held a non-finite value)",
                )
        if key in NON_NEGATIVE_MOMENTS and not value.is_complex() and value.dtype != torch.bool:
            local = _local(value)
            if bool((local < 0).any()):
                refuse(
                    key,
                    f"holds {float(local.min())}",
                    "values >= 0 (an average of squared gradients)",
                )


def _expected_state_shapes(param: Tensor) -> dict[str, torch.Size]:
    """The shape each parameter-sized state key must have for param."""
    shapes = {key: param.shape for key in (*MOMENT_STATE, "kahan_comp")}
    for key in MOMENT_STATE:
        codes, absmax = moment_keys(key)
        shapes[codes] = param.shape
        shapes[absmax] = torch.Size(absmax_shape(param.shape))
    return shapes


@keep_out_of_graphs
def step_released_param(
    optimizer: AdamFamilyOptimizer, param: Tensor, frees_gradient: bool = False
) -> bool:
    """Update param alone from its gradient: what a gradient-release hook calls inside
    backward. It is optimizer.step(param=param) without torch's per-call wrapper (step
    hooks and a profiler range, ~12 µs a call): those belong to the training step's
    optimizer.step(), which still runs them once per step. Kept out of torch.compile
    graphs as _eager_step is.

    Returns whether it stepped; if not, the caller keeps the gradient. It does not step a
    parameter the optimizer no longer holds (taken out of its param groups after its hook
    was registered), as torch keeps a gradient no optimizer steps, nor one whose gradient
    arrives inside a nested backward (reentrant activation checkpointing), which may be
    only a part of it: that one is left to the training step's optimizer.step().
    frees_gradient: the caller frees the gradient once this returns True (core's hooks
    do; DDP's communication hook keeps it in its bucket), so a gradient param holds at the
    full step came after its step, and is refused there."""
    optimizer._check_step_allowed(None)
    optimizer._validate_groups_once_per_backward()
    if inside_nested_backward():
        if optimizer._find_group(param) is not None:
            _refuse_a_part_after_release(optimizer, param)
            optimizer._warn_nested_once()
        return False
    has_gradient = param.grad is not None
    grad_enabled = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)  # torch.no_grad() without its object (~1 µs)
    try:
        held = optimizer._step_one(param, held_only=True)
    except cpu_kernel.RefusedBeforeAnyUpdate as error:
        _refuse_after_earlier_hooks(optimizer, error)
        raise
    finally:
        torch._C._set_grad_enabled(grad_enabled)
    if held and has_gradient:
        optimizer._note_hook_step(param, frees_gradient)
    return held


def _refuse_after_earlier_hooks(
    optimizer: AdamFamilyOptimizer, error: cpu_kernel.RefusedBeforeAnyUpdate
) -> None:
    """fused=True refused this parameter's released step (a kernel that could not be
    built) after hooks earlier in the same training step had stepped or folded others with
    kernels that did build: those keep their update (each counted once), so "nothing was
    updated" would be false, and running the batch again would apply theirs twice."""
    own = unwrapped(optimizer).__dict__
    earlier = len({*own.get("_hook_stepped", {}), *own.get("_hook_folded", {})})
    if earlier:
        reason = str(error).removesuffix(" (nothing was updated)")
        raise RuntimeError(
            f"{reason} (this parameter was not updated, but release hooks earlier in this "
            f"training step had already stepped or folded {earlier} parameter(s), which keep "
            "their update: do not run this batch again. "
            "Allowed: fused=None, which falls back to the loop backend where a kernel cannot "
            "be built, or a compiler that builds every kernel the model needs)"
        ) from error


def _refuse_a_part_after_release(optimizer: AdamFamilyOptimizer, param: Tensor) -> None:
    """A part of param's gradient arrives inside a nested backward after a hook stepped or
    folded param from an earlier part and freed it (used inside a reentrant checkpoint
    segment and after it in the forward): left in .grad, it would be dropped by the full
    step, or with optimizer accumulation folded into a later micro-batch's fold or the
    window's closing step, not its own. Refused inside backward, at the first such part."""
    own = unwrapped(optimizer).__dict__
    stepped = own.get("_hook_stepped", {}).get(param)
    if stepped or own.get("_hook_folded", {}).get(param):
        what = "stepped" if stepped else "folded"
        raise RuntimeError(
            f"Invalid gradient for gradient release: a parameter of shape "
            f"{tuple(param.shape)} got part of its gradient inside a nested backward "
            f"(reentrant activation checkpointing) after release had {what} it from "
            "another part and freed that one in this training step: it is used inside a "
            "checkpointed segment and after it in the forward. Allowed: "
            "torch.utils.checkpoint(..., use_reentrant=False), or training without release."
        )


_ENGINE_RUN = getattr(torch.autograd.graph, "_engine_run_backward", None)
_BACKWARD_OF_A_FUNCTION = torch.autograd.function.BackwardCFunction.apply.__code__
_nested_answer: tuple[int, bool] = (-1, False)
"""The last graph task inside_nested_backward answered for, and its answer."""


def inside_nested_backward() -> bool:
    """Whether autograd runs a backward started inside a custom Function's backward, as
    torch.utils.checkpoint(use_reentrant=True) runs each segment's: a parameter used in
    several segments then gets its gradient in parts, one post-accumulate-grad hook call
    per part, and a release hook would step it once per part. Found on the Python stack
    (the engine's frame of the inner backward, and older than it a Function's backward:
    both on the thread that runs the hook, CPU or GPU); one walk per graph task, since
    all of its hooks get the same answer."""
    global _nested_answer
    task = torch._C._current_graph_task_id()
    if task == _nested_answer[0]:
        return _nested_answer[1]
    frame, engine_seen, nested = sys._getframe(1), False, False
    while frame is not None:
        code = frame.f_code
        if _ENGINE_RUN is not None and code is _ENGINE_RUN.__code__:
            engine_seen = True
        elif engine_seen and code is _BACKWARD_OF_A_FUNCTION:
            nested = True
            break
        frame = frame.f_back
    _nested_answer = (task, nested)
    return nested


_PARAMETER_SHAPED_STATE = frozenset(
    [*MOMENT_STATE, "kahan_comp", *(moment_keys(key)[0] for key in MOMENT_STATE)]
)
"""State tensors laid out like their parameter (8-bit codes included)."""
_SCALE_KEYS = frozenset(moment_keys(key)[1] for key in MOMENT_STATE)
_CODE_KEYS = frozenset(moment_keys(key)[0] for key in MOMENT_STATE)
_EIGHT_BIT_DTYPE = "{}, as steps keep it and state_dict() saves it"
"""8-bit scales: (rows, blocks per row) of their parameter (core.quantization)."""


_DTYPE_FOLLOWING_STATE = (*MOMENT_STATE, "kahan_comp")
"""Full-precision state kept in its parameter's dtype (8-bit codes and scales are not)."""


def _follow_parameter_dtypes(
    params: list[Tensor], states: list[dict[str, Any]], kahan_allowed: bool
) -> None:
    """Cast full-precision state to its parameter's dtype (and lay it out as it,
    _laid_out_like) where the parameter changed since (model.to(torch.bfloat16) mid-run):
    what load_state_dict does, as torch's loader does, so the run continues exactly as one
    resumed from a checkpoint of it would; and
    drop a Kahan buffer no step reads any longer (the parameter is fp32 again, or kahan_sum
    or stochastic_rounding was written into the group: kahan_allowed False), as a resumed
    run does, so it neither takes memory nor comes back stale when Kahan is turned on
    again. Runs only where a step cannot reuse its memo, as such a change never can."""
    for param, state in zip(params, states, strict=True):
        if not kahan_allowed or param.dtype not in LOW_PRECISION_DTYPES:
            state.pop("kahan_comp", None)
        contiguous = param.is_contiguous()
        for key in _DTYPE_FOLLOWING_STATE:
            value = state.get(key)
            if not isinstance(value, Tensor):
                continue
            if value.dtype != param.dtype and (
                (value.is_floating_point() and param.is_floating_point())
                or (value.is_complex() and param.is_complex())  # torch's loader keeps these
            ):
                value = state[key] = value.to(param.dtype)
            if (  # model.to(memory_format=...) likewise; asked cheaply (DTensor steps: each)
                type(value) in PLAIN_TENSOR_TYPES and not (value.is_contiguous() and contiguous)
            ):
                state[key] = _laid_out_like(param, value)


def _laid_out_like(param: Tensor, value: Tensor) -> Tensor:
    """value (a full-precision moment or Kahan buffer) laid out as the state a step makes
    for param: in its strides where it is dense (channels-last, transposed), else without
    gaps. In another layout, every later step of the parameter left the fused
    kernels for the loop, which rounds differently: after model.to(memory_format=...)
    mid-run, or a loaded strided copy (torch's loader keeps its layout)."""
    if type(value) not in PLAIN_TENSOR_TYPES or type(param) not in PLAIN_TENSOR_TYPES:
        return value
    if not dense(param):  # the loop steps it, in any layout: only gaps are worth a copy
        return value if dense(value) else value.contiguous()
    if value.stride() == param.stride() or (value.is_contiguous() and param.is_contiguous()):
        return value
    return torch.empty_like(param, dtype=value.dtype).copy_(value)


_PACKAGES = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INTERNAL_FILES = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
    # the adapters, installed beside core (composer_adam's classes call core's __init__)
    os.path.join(_PACKAGES, "composer_adam") + os.sep,
    os.path.join(_PACKAGES, "lightning_adam") + os.sep,
)


def caller_stacklevel() -> int:
    """The stacklevel for a warning raised here that names the first caller outside core
    and torch (torch wraps step() in hooks and no_grad, a different number of frames per
    version)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_FILES):
        frame, level = frame.f_back, level + 1
    return level


@keep_out_of_graphs
def _eager_step(
    optimizer: AdamFamilyOptimizer,
    closure: Callable[[], Any] | None,
    param: Tensor | None,
    grad_scaler: object,
) -> Any:
    """The step, kept out of torch.compile graphs: it reads host scalars, builds per-step
    coefficients in Python floats and calls C kernels through ctypes, which Dynamo cannot
    trace faithfully (traced, Adam, RAdam and NAdam no longer equal eager: see
    tests/core/test_compile.py). A compiled function calling it breaks the graph here and
    gets exactly the eager update. A plain function, not a decorated method: torch 2.7's
    torch.compile(optimizer.step) loses `self` when unwrapping a disabled method."""
    return optimizer._step(closure, param, grad_scaler)
