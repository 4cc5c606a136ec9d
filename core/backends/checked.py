"""A step whose tensors the optimizer has already checked, so backends skip their checks.

An optimizer steps the same parameters and state tensors step after step; only the
gradients are new. Resolving the backend and bucketing and planning a Triton launch cost
a pass per tensor and list each (~300 µs for 300 tensors). The optimizer checks once per
step what those depend on (core.optimizer's step memo) and, while its memo holds, runs
the step inside `checking(memo)`; backend_and_lists and the Triton backend then reuse
what they worked out for these tensors instead of checking them again.

Trust is keyed on identity: a backend uses a `CheckedStep` only for a list whose
parameters are the very tuple the optimizer made (`checked_for`), so no other caller's
lists (a direct call of a functional form) ever take its shortcut.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass(eq=False, repr=False)
class CheckedStep:
    """What an optimizer vouches for while a step runs inside `checking(self)`."""

    params: tuple[Tensor, ...]
    """The parameters, as the tuple the optimizer passes down: the identity backends test."""
    backend: Any = None
    """backend_and_lists' choice for these tensors, kept by the first step that resolves
    it when every list was plain and real (the lists themselves go down unchanged)."""
    plan_key: list[Any] | None = None
    """This step's key for the Triton plan cache, kept on the memo: the gradients'
    addresses (everything else a plan depends on is the memo's to check); None: compute
    the key."""
    held: list[Any] = field(default_factory=list)
    """The storages of the parameters and state tensors the memo was made with, held so
    that no other tensor takes one of their addresses while the memo compares them."""
    host_scalars: tuple[tuple[Tensor, ...], ...] = ()
    """Lists of 0-dim host scalars (step counters) the memo checks every step, tensors
    and addresses: the C helpers gather their addresses once (`scalar_arrays`: the id of
    the tuple, which the memo holds -> the helpers' library and the address array)
    instead of reading them again each call."""
    scalar_arrays: dict[int, Any] = field(default_factory=dict)
    triton_steps: Any = None
    """The Triton backend's buckets and plans of the last step (valid while plan_key is
    the key they were made under)."""
    cpu_buckets: Any = None
    """The fused CPU backend's buckets of the memo's first checked step, with their
    checked kernel calls (valid while the memo is)."""
    triton_split: Any = None
    """The Triton backend's split of the last step into full-precision and 8-bit
    parameters, with the 8-bit part's plans (valid likewise)."""


_CURRENT: ContextVar[CheckedStep | None] = ContextVar("adamkit_checked_step", default=None)
_CHECKED_LISTS: ContextVar[object] = ContextVar("adamkit_checked_lists", default=None)
"""The parameter list of a functional-form call whose lists the optimizer has checked
(a step that keeps no memo), so the functional form does not check them again."""


def vouch(step: CheckedStep | None) -> Token[CheckedStep | None]:
    """Vouch for `step` (None: for nothing) until `unvouch(token)`: the contextvar
    itself, without a context manager's cost (~1 µs, paid per released parameter)."""
    return _CURRENT.set(step)


def unvouch(token: Token[CheckedStep | None]) -> None:
    _CURRENT.reset(token)


@contextmanager
def checking(step: CheckedStep | None) -> Iterator[None]:
    """Run a block with `step` vouched for (None: nothing is)."""
    token = vouch(step)
    try:
        yield
    finally:
        unvouch(token)


def current_checked_step() -> CheckedStep | None:
    """The step vouched for now, if any (benchmarks replay a backend call inside it)."""
    return _CURRENT.get()


def checked_for(params: object) -> CheckedStep | None:
    """The step vouched for, if `params` is its very tuple of parameters."""
    step = _CURRENT.get()
    return step if step is not None and step.params is params else None


def checked_scalars(scalars: object) -> CheckedStep | None:
    """The step vouched for, if `scalars` is one of its host-scalar tuples."""
    step = _CURRENT.get()
    if step is not None and any(scalars is values for values in step.host_scalars):
        return step
    return None


def vouch_lists(params: object) -> Token[object]:
    """Vouch for the lists of the functional-form call made with `params` (the very
    object) until `unvouch_lists(token)`: the optimizer checked every entry."""
    return _CHECKED_LISTS.set(params)


def unvouch_lists(token: Token[object]) -> None:
    _CHECKED_LISTS.reset(token)


def lists_vouched(params: object) -> bool:
    """Whether an optimizer has checked the lists of a functional-form call made with
    `params`: a memoized step's, or one it vouched for with vouch_lists. A direct call of
    a functional form never is, and checks what it is handed."""
    if _CHECKED_LISTS.get() is params:
        return True
    step = _CURRENT.get()
    return step is not None and step.params is params
