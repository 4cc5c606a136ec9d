"""The configuration matrix (tests/core/configuration_cases.py) trained through Lightning:
a Trainer or Fabric with each strategy, 2 CPU processes (gloo).

Each rank trains on its half of every global batch of configuration_cases.GLOBAL_BATCHES
(use_distributed_sampler=False), so a 2-rank run must equal configuration_cases'
one-process loop-backend reference. The batch the Trainer sees is only the step index:
precision plugins cast floating-point batches (bf16-true would round the targets too),
while the reference casts the inputs alone.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.fabric.strategies import ModelParallelStrategy as FabricModelParallelStrategy
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils.data import DataLoader

from lightning_adam import GradientRelease
from tests.core.configuration_cases import (
    BACKENDS,
    DTYPES,
    GLOBAL_BATCHES,
    OPTIMIZERS,
    STEPS,
    Cell,
    make_model,
    warmup,
    whole_values,
)

PRECISIONS = {
    "fp32": "32-true",
    "bf16": "bf16-true",
    "fp32-8bit": "32-true",
    "bf16-8bit": "bf16-true",
}
CELLS = [Cell(o, b, d) for o in OPTIMIZERS for b in BACKENDS for d in DTYPES]
RELEASE_CELLS = CELLS
"""GradientRelease under ModelParallelStrategy: every cell of the matrix."""
ACCUMULATE = 2
RELEASE_ACCUMULATE_CELLS = [
    Cell(o, b, "fp32") for o in ("Adam", "AdamW", "RAdam") for b in BACKENDS
]
"""Release with accumulate_grad_batches=ACCUMULATE under ModelParallelStrategy: the
optimizers whose optimizer accumulation folds micro-batches into the moments."""
TENSOR_PARALLEL_CELLS = [Cell("AdamW", b, d) for b in BACKENDS for d in DTYPES]
"""Tensor parallelism (ModelParallelStrategy(1, 2)), with and without release: AdamW, every
backend and dtype."""


def rank_batch(index: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous share of global batch `index`."""
    x, y = GLOBAL_BATCHES[index]
    share = len(x) // world
    return x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]


def shard(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """FSDP2 as configuration_worker shards: each Linear, then the root."""
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full_parameters(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter whole, in float32 (a collective for DTensors: all ranks call it)."""
    return whole_values(list(model.parameters()))[0]


class MatrixModule(L.LightningModule):
    """configuration_cases' model and optimizer for one cell, as a LightningModule.

    layout: "replicated" (one process, DDP), "fsdp2" (fully_shard over the data-parallel
    mesh) or "tensor_parallel" (Colwise then Rowwise, as configuration_worker; every rank
    sees the whole batch).
    """

    def __init__(self, cell: Cell, layout: str = "replicated") -> None:
        super().__init__()
        self.cell, self.layout = cell, layout
        self.net = make_model(cell.hidden)
        self.gradient_bytes_after_backward: list[int] = []

    def configure_model(self) -> None:
        if self.layout == "fsdp2":
            shard(self.net, self.device_mesh["data_parallel"])
        elif self.layout == "tensor_parallel":
            plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
            parallelize_module(self.net, self.device_mesh["tensor_parallel"], plan)

    def _data_parallel(self) -> tuple[int, int]:
        """This rank's index among the ranks that split the batch, and their count."""
        if self.layout == "replicated":
            return self.global_rank, self.trainer.world_size
        mesh = self.device_mesh["data_parallel"]
        return mesh.get_local_rank(), mesh.size()

    def training_step(self, index: torch.Tensor, batch_index: int) -> torch.Tensor:
        x, y = rank_batch(int(index), *self._data_parallel())
        warmup(self.trainer.optimizers[0], int(index))  # before backward: release steps in it
        return nn.functional.mse_loss(self.net(x.to(self.cell.dtype)).float(), y)

    def on_after_backward(self) -> None:
        """The memory probe: bytes of gradient this rank still holds when backward ends."""
        self.gradient_bytes_after_backward.append(local_gradient_bytes(self.net))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.cell.make_optimizer(self.parameters())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.arange(STEPS), batch_size=None)


def local_gradient_bytes(model: nn.Module) -> int:
    """Gradient bytes this rank holds (a DTensor gradient counts its local shard)."""
    total = 0
    for param in model.parameters():
        grad = param.grad
        if grad is not None:
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            total += local.numel() * local.element_size()
    return total


def trainer_for(strategy: Any, dtype_name: str, **overrides: Any) -> L.Trainer:
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 2,
        "strategy": strategy,
        "precision": PRECISIONS[dtype_name],
        "max_steps": STEPS,
        "use_distributed_sampler": False,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }
    return L.Trainer(**{**settings, **overrides})


def model_parallel(data: int, tensor: int, whole_checkpoint: bool = False) -> ModelParallelStrategy:
    """Lightning's FSDP2/TP strategy; whole_checkpoint: checkpoints saved as one file of
    whole tensors (save_distributed_checkpoint=False), which torch's full-state loader
    shards again on resume."""
    return ModelParallelStrategy(
        data_parallel_size=data,
        tensor_parallel_size=tensor,
        save_distributed_checkpoint=not whole_checkpoint,
    )


STRATEGIES: dict[str, tuple[Any, str]] = {
    # name: (the Trainer's strategy, the module's layout)
    "single": ("auto", "replicated"),
    "ddp": ("ddp", "replicated"),
    "ddp_spawn": ("ddp_spawn", "replicated"),
    "model_parallel": (lambda: model_parallel(data=2, tensor=1), "fsdp2"),
    "tensor_parallel": (lambda: model_parallel(data=1, tensor=2), "tensor_parallel"),
}


def fit_cell(
    cell: Cell,
    strategy: str,
    release: bool = False,
    accumulate: int = 1,
    extra_callbacks: tuple[L.Callback, ...] = (),
) -> dict[str, Any]:
    """One Trainer.fit of cell under a strategy of STRATEGIES: one pass over the batches."""
    chosen, layout = STRATEGIES[strategy]
    module = MatrixModule(cell, layout)
    trainer = trainer_for(
        chosen() if callable(chosen) else chosen,
        cell.dtype_name,
        devices=1 if strategy == "single" else 2,
        max_steps=STEPS // accumulate,
        accumulate_grad_batches=accumulate,
        callbacks=[*([GradientRelease()] if release else []), *extra_callbacks],
    )
    trainer.fit(module)
    # ddp_spawn's launching process gets the weights back, not the optimizer
    optimizer = trainer.optimizers[0] if trainer.optimizers else None
    params, compensated = whole_values(list(module.net.parameters()), optimizer)
    return {
        "params": params,
        "compensated": compensated,
        "steps": trainer.global_step,
        "gradient_bytes": module.gradient_bytes_after_backward,
    }


def _parallelize(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    return shard(model, mesh["data_parallel"])


def make_fabric(strategy: str, dtype_name: str) -> L.Fabric:
    chosen: Any = strategy
    if strategy == "model_parallel":
        chosen = FabricModelParallelStrategy(
            _parallelize, data_parallel_size=2, tensor_parallel_size=1
        )
    fabric = L.Fabric(
        accelerator="cpu", devices=2, strategy=chosen, precision=PRECISIONS[dtype_name]
    )
    fabric.launch()
    return fabric


def fabric_cell(cell: Cell, fabric: L.Fabric, sharded: bool) -> dict[str, Any]:
    """The reference loop under Fabric. FSDP2 replaces the module's parameters with
    sharded ones, so there the optimizer is built after setup_module (Lightning's
    documented order); DDP takes both in one setup call."""
    model = make_model(cell.hidden)
    if sharded:
        model = fabric.setup_module(model)
        optimizer = fabric.setup_optimizers(cell.make_optimizer(model.parameters()))
    else:
        model, optimizer = fabric.setup(model, cell.make_optimizer(model.parameters()))
    for index in range(STEPS):
        x, y = rank_batch(index, fabric.global_rank, fabric.world_size)
        warmup(optimizer, index)
        fabric.backward(nn.functional.mse_loss(model(x.to(cell.dtype)).float(), y))
        optimizer.step()
        optimizer.zero_grad()
    params, compensated = whole_values(list(model.parameters()), optimizer)
    return {"params": params, "compensated": compensated, "steps": STEPS}


def all_cells() -> dict[tuple[str, ...], dict[str, Any]]:
    """Every (configuration, optimizer, backend, dtype) this launch trains."""
    results: dict[tuple[str, ...], dict[str, Any]] = {}
    for strategy in ("ddp", "model_parallel"):
        for cell in CELLS:
            results[(f"trainer_{strategy}", *cell.key)] = fit_cell(cell, strategy)
    for cell in RELEASE_CELLS:
        results[("trainer_model_parallel_release", *cell.key)] = fit_cell(
            cell, "model_parallel", release=True
        )
    for cell in RELEASE_ACCUMULATE_CELLS:
        results[("trainer_model_parallel_release_accumulate", *cell.key)] = fit_cell(
            cell, "model_parallel", release=True, accumulate=ACCUMULATE
        )
    for cell in TENSOR_PARALLEL_CELLS:
        for release in (False, True):
            name = "trainer_tensor_parallel" + ("_release" if release else "")
            results[(name, *cell.key)] = fit_cell(cell, "tensor_parallel", release=release)
    for strategy in ("ddp", "model_parallel"):
        for dtype_name in DTYPES:  # one Fabric per precision; the process group is shared
            fabric = make_fabric(strategy, dtype_name)
            for cell in CELLS:
                if cell.dtype_name == dtype_name:
                    key = (f"fabric_{strategy}", *cell.key)
                    results[key] = fabric_cell(cell, fabric, strategy == "model_parallel")
    return results


def joint_setup_under_model_parallel_fabric() -> bool:
    """Whether Fabric's ModelParallelStrategy trains a model set up together with an
    optimizer built before sharding (fabric.setup(model, optimizer)); the README says
    what it does."""
    fabric = make_fabric("model_parallel", "fp32")
    model = make_model()
    optimizer = Cell("AdamW", "default", "fp32").make_optimizer(model.parameters())
    model, optimizer = fabric.setup(model, optimizer)
    before = full_parameters(model)
    x, y = rank_batch(1, fabric.global_rank, fabric.world_size)
    fabric.backward(nn.functional.mse_loss(model(x), y))
    optimizer.step()
    return any(not torch.equal(a, b) for a, b in zip(before, full_parameters(model), strict=True))
