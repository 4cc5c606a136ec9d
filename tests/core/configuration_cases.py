"""The configuration matrix: what every distributed configuration trains, and how.

Every optimizer is built as users build it (default flags) and with each explicit
backend, in fp32 and in bf16 (Kahan on, by default for bf16 parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

import core

LR = 1e-2
OPTIMIZERS: dict[str, Callable[..., core.AdamFamilyOptimizer]] = {
    "Adam": lambda p, **kw: core.Adam(p, lr=LR, weight_decay=0.1, **kw),
    "AdamW": lambda p, **kw: core.AdamW(p, lr=LR, amsgrad=True, **kw),
    "RAdam": lambda p, **kw: core.RAdam(p, lr=LR, decouple_lr=True, weight_decay=1e-4, **kw),
    "NAdam": lambda p, **kw: core.NAdam(p, lr=LR, decouple_wd=True, weight_decay=0.1, **kw),
    "ADOPT": lambda p, **kw: core.ADOPT(p, lr=LR, **kw),
}
BACKENDS: dict[str, dict[str, Any]] = {
    "default": {},
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "loop": {"foreach": False, "fused": False},
}
"""The optimizer as users build it (no flag) and each explicit backend. On these CPU
processes triton=True is the fused flag (the Triton kernels run where tensors are on a
GPU; their interpreter is tested against the loop backend in test_*_triton.py), so the
matrices have no Triton column."""
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp32-8bit": torch.float32,
    "bf16-8bit": torch.bfloat16,
}
"""The parameters' dtype per kind of cell; "-8bit" cells keep 8-bit optimizer state."""


ROUNDING_CONFIGURATIONS = ("fsdp2_whole_batch", "fsdp2_release_whole_batch", "dtensor_shard")
"""Where bf16 parameters rounded stochastically are stepped as shards of whole rows: FSDP2
with both ranks on the whole batch (exact gradients), without and with gradient release,
and DTensor Shard(0) parameters."""
ROUNDING_DTYPES = ("bf16", "bf16-8bit")
"""Their cells: full-precision state and 8-bit state (the leanest configuration)."""


def state_options(dtype_name: str) -> dict[str, Any]:
    """The optimizer option a kind of cell adds: state_precision for "-8bit" cells."""
    return {"state_precision": "8bit"} if dtype_name.endswith("-8bit") else {}


STEPS = 8
CHECKPOINT_AT = 4
"""DCP cells save after this many steps and finish in a fresh model and optimizer."""


@dataclass(frozen=True)
class Cell:
    optimizer: str
    backend: str
    dtype_name: str
    full_state: bool = False
    """Full-precision state even in a "-8bit" cell (its wider model kept): what FSDP1's
    parameters get (core.quantization.FSDP1_FULL_PRECISION), for their references."""
    stochastic: bool = False
    """bf16 parameters rounded stochastically (stochastic_rounding=True) instead of Kahan:
    the ROUNDING_CONFIGURATIONS cells."""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.optimizer, self.backend, self.dtype_name)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def hidden(self) -> int:
        return HIDDEN_8BIT if self.dtype_name.endswith("-8bit") else HIDDEN

    def make_model(self) -> nn.Module:
        """The matrix's model in the cell's dtype (wider for 8-bit cells)."""
        return make_model(self.hidden).to(self.dtype)

    def make_optimizer(self, params: Any, **flags: Any) -> core.AdamFamilyOptimizer:
        """The cell's optimizer, as users build it: its backend flags unless flags are
        given (references pass the loop backend's), and its state precision."""
        chosen = flags or BACKENDS[self.backend]
        state = {} if self.full_state else state_options(self.dtype_name)
        rounding = {"stochastic_rounding": True} if self.stochastic else {}
        return OPTIMIZERS[self.optimizer](params, **chosen, **state, **rounding)


def warmup(optimizer: torch.optim.Optimizer, step_index: int) -> None:
    """Step 0 runs at lr = 0, as a warmup from 0 does (such a step once sent DTensor
    addresses to the C kernel); later steps at LR."""
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if step_index == 0 else LR


HIDDEN = 16
HIDDEN_8BIT = 1100
"""8-bit cells widen the hidden layer so both weights (1100 x 8, 4 x 1100) are large
enough for 8-bit state (4096 elements): the second's rows hold four whole blocks of 256
and a partial one, the first's rows one short block each; the biases stay full."""


def make_model(hidden: int = HIDDEN) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 4))


def _batches(count: int = STEPS, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [
        (torch.randn(size, 8, generator=generator), torch.randn(size, 4, generator=generator))
        for _ in range(count)
    ]


GLOBAL_BATCHES = _batches()


def direct_gradients(model: nn.Module) -> list[list[torch.Tensor]]:
    """Fixed gradients for stepping parameters without a model (DTensor cells)."""
    generator = torch.Generator().manual_seed(5)
    shapes = [p.shape for p in model.parameters()]
    return [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(STEPS)]


LOOP_FLAGS = {"foreach": False, "fused": False}


Outcome = tuple[list[torch.Tensor], list[torch.Tensor] | None]
"""A cell's whole parameters in float32, and for bf16 parameters their compensated values
(parameter + Kahan compensation, the fp32 trajectory Kahan keeps; the parameter alone
where the state lost its compensation): bf16 ulps are too coarse to see Kahan dropped."""


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().float()


def whole_values(
    params: list[torch.Tensor], optimizer: torch.optim.Optimizer | None = None
) -> Outcome:
    """Every parameter whole (a collective for DTensors: all ranks call it), and with the
    optimizer, bf16 parameters' compensated values."""
    whole = [_whole(p).clone() for p in params]
    if optimizer is None or not any(p.dtype == torch.bfloat16 for p in params):
        return whole, None
    compensations = [optimizer.state.get(p, {}).get("kahan_comp") for p in params]
    compensated = [
        value if comp is None else value + _whole(comp)
        for value, comp in zip(whole, compensations, strict=True)
    ]
    return whole, compensated


def _chosen(outcome: Outcome, compensated: bool) -> list[torch.Tensor]:
    values, with_compensation = outcome
    if not compensated:
        return values
    assert with_compensation is not None, "compensated values are for bf16 parameters"
    return with_compensation


def train_one_process(
    cell: Cell,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    own_backend: bool = False,
    compensated: bool = False,
) -> list:
    """The reference: the whole global batch on one process, loop backend (own_backend:
    the cell's, as users build it; compensated: the values with Kahan compensation)."""
    model = cell.make_model()
    optimizer = cell.make_optimizer(model.parameters(), **({} if own_backend else LOOP_FLAGS))
    for index, (x, y) in enumerate(batches):
        warmup(optimizer, index)
        nn.functional.mse_loss(model(x.to(cell.dtype)).float(), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return _chosen(whole_values(list(model.parameters()), optimizer), compensated)


def step_one_process(
    cell: Cell, own_backend: bool = False, compensated: bool = False
) -> list[torch.Tensor]:
    """The reference for DTensor cells: the same fixed gradients, loop backend (own_backend:
    the cell's; compensated: the values with Kahan compensation)."""
    model = cell.make_model()
    params = list(model.parameters())
    optimizer = cell.make_optimizer(params, **({} if own_backend else LOOP_FLAGS))
    for index, grads in enumerate(direct_gradients(model)):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(cell.dtype)
        warmup(optimizer, index)
        optimizer.step()
        optimizer.zero_grad()
    return _chosen(whole_values(params, optimizer), compensated)


def torch_older_than(major: int, minor: int) -> bool:
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return version < (major, minor)


FSDP2_SUMS_OVER_GLOO = torch_older_than(2, 8)
"""torch 2.7's FSDP2 asks gloo for ReduceOp.AVG and gets a sum (measured: 2.0x the
one-process gradient); later releases average."""


def average_fsdp2_gradients(model: nn.Module) -> None:
    """Divide each FSDP2 reduce-scatter output by the world size (for torch 2.7 on gloo).

    `FSDPModule.set_all_reduce_hook` runs on the reduce-scatter output (1-D FSDP) before
    the gradient is set and before post-accumulate-grad hooks, so the division there
    makes the gradient the average, for gradient release too."""
    from torch.distributed.fsdp import FSDPModule

    world = torch.distributed.get_world_size()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_all_reduce_hook(lambda output: output.div_(world))
