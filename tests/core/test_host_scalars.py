"""The optimizer's 0-dim host scalars (step counts, NAdam's Π) are read, counted and
scaled by one C call for all parameters; the results must be torch's, bit for bit."""

from __future__ import annotations

import pytest
import torch

from core.backends import cpu_kernel
from core.optimizer import add_to_host_scalars, multiply_host_scalars, read_host_scalars


def _scalars(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(count, generator=generator) * 1e3
    return [value.clone() for value in values]  # separate 0-dim tensors, as in state


@pytest.mark.parametrize("count", [1, cpu_kernel.MIN_SCALARS - 1, cpu_kernel.MIN_SCALARS, 300])
def test_host_scalar_updates_equal_torchs_foreach_bit_for_bit(count: int) -> None:
    ours, torchs = _scalars(count), _scalars(count)
    assert read_host_scalars(ours) == torch.stack(torchs).tolist()
    add_to_host_scalars(ours, 1.0)
    torch._foreach_add_(torchs, 1.0)
    multiply_host_scalars(ours, 0.9123456789)  # not a float32: rounded as torch rounds it
    torch._foreach_mul_(torchs, 0.9123456789)
    assert torch.equal(torch.stack(ours), torch.stack(torchs))
    assert read_host_scalars(ours) == torch.stack(torchs).tolist()


def test_the_c_path_is_taken_for_many_float32_cpu_scalars_only() -> None:
    many = _scalars(cpu_kernel.MIN_SCALARS)
    assert cpu_kernel.read_scalars(many) == torch.stack(many).tolist()
    assert cpu_kernel.add_to_scalars(many, 1.0)
    assert cpu_kernel.read_scalars(many[:-1]) is None  # too few to be worth a call
    mixed = [*many[:-1], torch.tensor(1.0, dtype=torch.float64)]
    assert cpu_kernel.read_scalars(mixed) is None
    assert not cpu_kernel.add_to_scalars(mixed, 1.0)
    assert not cpu_kernel.multiply_scalars([*many[:-1], torch.ones(2)], 2.0)


def test_without_a_compiler_torch_updates_the_scalars(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("ADAMKIT_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_loaded", {})
    monkeypatch.setattr(cpu_kernel, "_scalars_unavailable", False)
    monkeypatch.setattr(cpu_kernel, "compiler", lambda: None)
    ours, torchs = _scalars(40), _scalars(40)
    add_to_host_scalars(ours, 1.0)
    torch._foreach_add_(torchs, 1.0)
    assert torch.equal(torch.stack(ours), torch.stack(torchs))
    assert cpu_kernel._scalars_unavailable  # tried once, not on every step


def _freed_scalar() -> torch.Tensor:
    scalar = torch.tensor(1.0)
    scalar.untyped_storage().resize_(0)
    return scalar


ODD_SCALARS = {
    "meta": lambda: torch.tensor(1.0, device="meta"),
    "zero tensor": lambda: torch._efficientzerotensor(()),
    "freed": _freed_scalar,
    "negated view": lambda: torch.tensor(2.0)._neg_view(),
    "nested view": lambda: torch._nested_view_from_buffer(
        torch.tensor([10.0, 20.0, 30.0, 40.0]),
        torch.tensor([[1]]),
        torch.tensor([[1]]),
        torch.tensor([3]),
    ),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", list(ODD_SCALARS))
def test_a_scalar_whose_memory_is_not_its_value_is_left_to_torch(kind: str) -> None:
    """The helpers read and write raw memory: a scalar on meta, without memory (a
    ZeroTensor, a freed storage), holding its value negated, or a nested view into
    another's buffer would crash the process or read the wrong number. Each is left to
    torch (None / False), among enough plain scalars to take the C path otherwise."""
    scalars = [*_scalars(cpu_kernel.MIN_SCALARS + 3), ODD_SCALARS[kind]()]
    assert cpu_kernel.read_scalars(scalars) is None
    assert not cpu_kernel.add_to_scalars(scalars, 1.0)
    assert not cpu_kernel.multiply_scalars(scalars, 2.0)


def test_a_remembered_list_with_a_scalar_replaced_is_checked_again() -> None:
    """Addresses are remembered per list; the same list with its last tensor replaced by
    a negated view of it (same address, value negated) must be checked again, not read
    from memory as the value it was."""
    scalars = _scalars(cpu_kernel.MIN_SCALARS + 4)
    assert cpu_kernel.read_scalars(scalars) == torch.stack(scalars).tolist()
    replaced = [*scalars[:-1], scalars[-1]._neg_view()]
    assert cpu_kernel.read_scalars(replaced) is None
    assert read_host_scalars(replaced)[-1] == -float(scalars[-1])
