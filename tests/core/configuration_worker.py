"""Worker for test_configurations.py: one 2-process gloo group trains every cell of the
configuration matrix (optimizer x backend x dtype under FSDP2, FSDP2 with a bf16
MixedPrecisionPolicy, FSDP1 with and without use_orig_params and its full optimizer state
dict, DTensor parameters, tensor parallelism, DCP checkpoints and DDP), then the
stochastic-rounding cells of ROUNDING_CONFIGURATIONS, and saves each cell's full
parameters, so the test process can compare every cell with one process. Under FSDP2
(with bf16 compute, gradient release and DCP checkpoints too) and DDP the cells of one
dtype train side by side in one module (_SideBySide), which gives every cell the same
shards, gradients and steps as training alone (checked bit for bit when each was
introduced) for a twentieth of the collectives; each release cell's optimizer is
prepared on its own model, and each DCP cell saves and loads its own checkpoint. Every
other configuration trains each cell alone.

Usage: torchrun --nproc-per-node=2 configuration_worker.py OUTPUT CONFIG [CONFIG ...]
"""

from __future__ import annotations

import functools
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    FullStateDictConfig,
    MixedPrecisionPolicy,
    ShardedOptimStateDictConfig,
    ShardedStateDictConfig,
    StateDictType,
    fully_shard,
)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

import core
from tests.core.configuration_cases import (
    BACKENDS,
    CHECKPOINT_AT,
    DTYPES,
    FSDP2_SUMS_OVER_GLOO,
    GLOBAL_BATCHES,
    OPTIMIZERS,
    ROUNDING_CONFIGURATIONS,
    ROUNDING_DTYPES,
    STEPS,
    Cell,
    Outcome,
    average_fsdp2_gradients,
    direct_gradients,
    make_model,
    warmup,
    whole_values,
)


def _local_batch(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return x[rank * len(x) // world : (rank + 1) * len(x) // world]


def _train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
    dtype: torch.dtype,
    shard_batch: bool,
    steps: range = range(STEPS),
) -> None:
    """Train model (or a _SideBySide of several cells' models, one optimizer each: the
    sum of their losses gives each model exactly its own loss's gradients)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    optimizers = optimizer if isinstance(optimizer, list) else [optimizer]
    for index in steps:
        x, y = GLOBAL_BATCHES[index]
        if shard_batch:
            x, y = _local_batch(x, rank, world), _local_batch(y, rank, world)
        for each in optimizers:
            warmup(each, index)  # before backward: released parameters step inside it
        outputs = model(x.to(dtype))
        outputs = outputs if isinstance(outputs, list) else [outputs]
        loss = sum(nn.functional.mse_loss(output.float(), y) for output in outputs)
        loss.backward()
        for each in optimizers:
            each.step()
            each.zero_grad()


class _SideBySide(nn.Module):
    """Several cells' models as one module, each given the same input: FSDP2 and DDP
    communicate for all of them at once (each parameter is still sharded, reduced and
    handed to its own cell's optimizer exactly as when its model trains alone, which
    the test of this worker's cells checks against one process), so the matrix costs
    one cell's collectives per step instead of twenty."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [model(x) for model in self.models]


def _shard(
    model: nn.Module, units: list[nn.Module] | list[list[nn.Module]], mixed_precision: bool
) -> None:
    """fully_shard each unit (a layer, or a list of layers sharing one FSDP2 parameter
    group), then the root."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if mixed_precision else None
    kwargs = {"mp_policy": policy} if policy is not None else {}
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    if FSDP2_SUMS_OVER_GLOO:
        average_fsdp2_gradients(model)


def _sharded_model(cell: Cell, mixed_precision: bool) -> nn.Module:
    """The cell's model with each Linear its own FSDP2 group, as users wrap layers."""
    model = cell.make_model()
    _shard(model, [layer for layer in model if isinstance(layer, nn.Linear)], mixed_precision)
    return model


def _side_by_side(
    cells: list[Cell], wrap: Callable[[_SideBySide], nn.Module], **flags: Any
) -> tuple[nn.Module, list[nn.Module], list[core.AdamFamilyOptimizer]]:
    """The cells' models as one _SideBySide wrapped by wrap, and each cell's optimizer on
    its own model's parameters (taken after wrapping: FSDP2 replaces them by shards;
    flags: added to the cell's backend flags)."""
    models = [cell.make_model() for cell in cells]
    wrapped = wrap(_SideBySide(models))
    optimizers = [
        cell.make_optimizer(m.parameters(), **flags, **BACKENDS[cell.backend])
        for cell, m in zip(cells, models, strict=True)
    ]
    return wrapped, models, optimizers


def _fsdp2_side_by_side(
    cells: list[Cell], mixed_precision: bool = False, **flags: Any
) -> tuple[nn.Module, list[nn.Module], list[core.AdamFamilyOptimizer]]:
    """_side_by_side under FSDP2: the i-th Linear of every cell's model in one FSDP2 group."""

    def wrap(side_by_side: _SideBySide) -> nn.Module:
        layers = [[model[index] for model in side_by_side.models] for index in (0, 2)]
        _shard(side_by_side, layers, mixed_precision)
        return side_by_side

    return _side_by_side(cells, wrap, **flags)


def _outcomes(models: list[nn.Module], optimizers: list[Any]) -> list[Outcome]:
    return [whole_values(list(m.parameters()), o) for m, o in zip(models, optimizers, strict=True)]


def fsdp2(
    cells: list[Cell], mixed_precision: bool = False, shard_batch: bool = True
) -> list[Outcome]:
    """FSDP2 over cells of one dtype side by side."""
    model, models, optimizers = _fsdp2_side_by_side(cells, mixed_precision)
    _train(model, optimizers, cells[0].dtype, shard_batch=shard_batch)
    return _outcomes(models, optimizers)


def fsdp2_release(cells: list[Cell], shard_batch: bool = True) -> list[Outcome]:
    """FSDP2 with gradient release over cells side by side, each cell's optimizer prepared
    on its own model (several optimizers on one model, each releasing its own
    parameters): each sharded parameter steps inside backward, after the reduce-scatter,
    and its gradient is freed there."""
    model, models, optimizers = _fsdp2_side_by_side(cells, gradient_release=True)
    for part, optimizer in zip(models, optimizers, strict=True):
        core.prepare_for_gradient_release(part, optimizer)
    _train(model, optimizers, cells[0].dtype, shard_batch=shard_batch)
    assert all(p.grad is None for p in model.parameters()), "release frees every gradient"
    for part in models:
        core.remove_gradient_release(part)
    return _outcomes(models, optimizers)


def fsdp2_checkpoint(cells: list[Cell]) -> list[Outcome]:
    """Train cells side by side to CHECKPOINT_AT; save each cell's model and optimizer
    with DCP (its own checkpoint, as one user's run writes it), load each into a fresh
    side-by-side model and optimizer, and finish there."""
    model, models, optimizers = _fsdp2_side_by_side(cells)
    _train(model, optimizers, cells[0].dtype, True, range(CHECKPOINT_AT))
    # rank 0 owns the checkpoints' directory and removes it once both ranks have loaded
    owned = tempfile.TemporaryDirectory(prefix="adamkit-dcp-") if dist.get_rank() == 0 else None
    directory = [owned.name if owned is not None else None]
    dist.broadcast_object_list(directory)
    folders = [f"{directory[0]}/{index}" for index in range(len(cells))]
    for part, optimizer, folder in zip(models, optimizers, folders, strict=True):
        state = {
            "model": get_model_state_dict(part),
            "optimizer": get_optimizer_state_dict(part, optimizer),
        }
        dcp.save(state, checkpoint_id=folder)
    del model, models, optimizers, state

    resumed, parts, resumed_optimizers = _fsdp2_side_by_side(cells)
    for part, optimizer, folder in zip(parts, resumed_optimizers, folders, strict=True):
        state = {
            "model": get_model_state_dict(part),
            "optimizer": get_optimizer_state_dict(part, optimizer),
        }
        dcp.load(state, checkpoint_id=folder)
        set_model_state_dict(part, state["model"])
        set_optimizer_state_dict(part, optimizer, state["optimizer"])
    dist.barrier()  # both ranks have read their shards
    if owned is not None:
        owned.cleanup()
    _train(resumed, resumed_optimizers, cells[0].dtype, True, range(CHECKPOINT_AT, STEPS))
    return _outcomes(parts, resumed_optimizers)


def _fsdp1_model(cell: Cell, use_orig_params: bool) -> nn.Module:
    """FSDP1 (what Lightning's FSDPStrategy and Composer's FSDPConfig wrap with): each
    Linear its own flat parameter, sharded over both ranks."""
    return FSDP1(
        cell.make_model(),
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
        device_id=torch.device("cpu"),
        use_orig_params=use_orig_params,
    )


def _fsdp1_full(model: nn.Module) -> list[torch.Tensor]:
    """The unsharded parameters, in the unwrapped model's order, on every rank."""
    with FSDP1.state_dict_type(
        model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)
    ):
        state = model.state_dict()
    return [value.detach().float().clone() for value in state.values()]


def fsdp1(cell: Cell, use_orig_params: bool) -> Outcome:
    """The optimizer holds FSDP1's flat shards (use_orig_params=False), or the pieces of
    them FSDP1 hands out as the original parameters (True: some empty on a rank)."""
    model = _fsdp1_model(cell, use_orig_params)
    optimizer = cell.make_optimizer(model.parameters())
    _train(model, optimizer, cell.dtype, shard_batch=True)
    return _fsdp1_full(model), None  # FSDP1's state is flat: no per-parameter compensation


def fsdp1_checkpoint(cell: Cell) -> Outcome:
    """Train to CHECKPOINT_AT, take FSDP1's sharded model and optimizer state dicts
    (FSDP1.optim_state_dict: each state tensor unflattened per original parameter, as
    Lightning's FSDPStrategy(state_dict_type="sharded") saves them), load both into a
    fresh FSDP1 model and optimizer (FSDP1.optim_state_dict_to_load), and finish there.

    Not the full (gathered) state dicts: on CPU, gloo, torch's own FSDP1 returns exp_avg
    equal to exp_avg_sq for torch.optim.Adam as well (rank0_only=False), or crashes the
    process (rank0_only=True), measured on torch 2.13."""
    model = _fsdp1_model(cell, use_orig_params=True)
    optimizer = cell.make_optimizer(model.parameters())
    _train(model, optimizer, cell.dtype, True, range(CHECKPOINT_AT))
    settings = (
        StateDictType.SHARDED_STATE_DICT,
        ShardedStateDictConfig(),
        ShardedOptimStateDictConfig(),
    )
    with FSDP1.state_dict_type(model, *settings):
        model_state = model.state_dict()
        optimizer_state = FSDP1.optim_state_dict(model, optimizer)
    del model, optimizer

    resumed = _fsdp1_model(cell, use_orig_params=True)
    resumed_optimizer = cell.make_optimizer(resumed.parameters())
    with FSDP1.state_dict_type(resumed, *settings):
        resumed.load_state_dict(model_state)
        loadable = FSDP1.optim_state_dict_to_load(resumed, resumed_optimizer, optimizer_state)
    resumed_optimizer.load_state_dict(loadable)
    _train(resumed, resumed_optimizer, cell.dtype, True, range(CHECKPOINT_AT, STEPS))
    return _fsdp1_full(resumed), None


def dtensor(cell: Cell, placement: Any) -> Outcome:
    """DTensor parameters and gradients without FSDP, stepped with known gradients."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = cell.make_model()
    params = [
        nn.Parameter(distribute_tensor(p.detach(), mesh, [placement])) for p in model.parameters()
    ]
    optimizer = cell.make_optimizer(params)
    for index, grads in enumerate(direct_gradients(model)):
        for p, g in zip(params, grads, strict=True):
            p.grad = distribute_tensor(g.to(cell.dtype), mesh, [placement])
        warmup(optimizer, index)
        optimizer.step()
        optimizer.zero_grad()
    return whole_values(params, optimizer)


def fsdp2_whole_batch(cells: list[Cell]) -> list[Outcome]:
    """FSDP2 with every rank on the whole batch: the reduce-scatter averages two equal
    gradients, which is exact, so the run is one process's bit for bit wherever the
    optimizer treats a shard as the whole tensor (its random bits included)."""
    return fsdp2(cells, shard_batch=False)


def tensor_parallel(cell: Cell) -> Outcome:
    """Colwise then Rowwise linear layers over both ranks; every rank sees the whole batch."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = cell.make_model()
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    optimizer = cell.make_optimizer(model.parameters())
    _train(model, optimizer, cell.dtype, shard_batch=False)
    return whole_values(list(model.parameters()), optimizer)


def ddp(cells: list[Cell]) -> list[Outcome]:
    """DDP over cells of one dtype side by side (their gradients in shared buckets)."""
    model, models, optimizers = _side_by_side(cells, nn.parallel.DistributedDataParallel)
    _train(model, optimizers, cells[0].dtype, shard_batch=True)
    return [whole_values(list(m.parameters()), o) for m, o in zip(models, optimizers, strict=True)]


def _release_refusal() -> str:
    """What gradient release says to plain parameters on 2 ranks (their hooks would see
    local gradients): the message, or "" if it was not refused."""
    model = make_model()
    optimizer = OPTIMIZERS["AdamW"](model.parameters(), gradient_release=True)
    try:
        core.prepare_for_gradient_release(model, optimizer)
    except RuntimeError as error:
        return str(error)
    core.remove_gradient_release(model)
    return ""


def _prepared_before_the_group() -> tuple[nn.Module, core.AdamFamilyOptimizer]:
    """Release prepared on plain parameters while no process group exists yet (what
    fabric.launch() after preparing does): prepare has nothing to refuse then."""
    model = make_model()
    optimizer = OPTIMIZERS["AdamW"](model.parameters(), gradient_release=True)
    core.prepare_for_gradient_release(model, optimizer)
    return model, optimizer


def _release_after_the_group_started(prepared: tuple[nn.Module, Any]) -> str:
    """The first backward on 2 ranks: each hook would step on its rank's local gradient
    (replicas drifting apart, silently). The message, "" if not refused, and "changed" if
    a parameter or its state moved first."""
    model, optimizer = prepared
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(4, 8), torch.randn(4, 4)
    try:
        torch.nn.functional.mse_loss(model(x), y).backward()
    except RuntimeError as error:
        message = str(error)
    else:
        message = ""
    core.remove_gradient_release(model)
    moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    return message + (" changed" if moved or optimizer.state else "")


def _late_gradient_outcomes() -> dict[str, list[str]]:
    """FSDP2 with release, gradients written after release stepped every shard: zeros
    everywhere (a loop filling in gradients) pass; a nonzero only in rank 1's shard is
    refused on both ranks (one rank refusing alone would leave the other in the next
    collective). Each case's outcome on each rank: "stepped" or the error's start."""
    outcomes: dict[str, list[str]] = {}
    for case, nonzero_rank in (("zeros", None), ("nonzero on rank 1", 1)):
        model = _sharded_model(Cell("AdamW", "default", "fp32"), mixed_precision=False)
        optimizer = OPTIMIZERS["AdamW"](model.parameters(), gradient_release=True)
        core.prepare_for_gradient_release(model, optimizer)
        x, y = torch.randn(4, 8), torch.randn(4, 4)
        torch.nn.functional.mse_loss(model(x), y).backward()
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
            if dist.get_rank() == nonzero_rank:
                param.grad.to_local().add_(1.0)
        try:
            optimizer.step()
            outcome = "stepped"
        except RuntimeError as error:
            outcome = str(error)[:60]
        core.remove_gradient_release(model)
        gathered: list[Any] = [None, None]
        dist.all_gather_object(gathered, outcome)
        outcomes[case] = gathered
    return outcomes


def _one_by_one(run: Callable[[Cell], Outcome]) -> Callable[[list[Cell]], list[Outcome]]:
    """A configuration whose cells each train alone: their own model, optimizer, and (for
    FSDP1's flat parameters and checkpoints, tensor parallelism) their own wrapping and
    state dicts, as one user's run has."""
    return lambda cells: [run(cell) for cell in cells]


CONFIGURATIONS: dict[str, Callable[[list[Cell]], list[Outcome]]] = {
    "fsdp2": fsdp2,
    "fsdp2_bf16_compute": functools.partial(fsdp2, mixed_precision=True),
    "fsdp2_dcp": fsdp2_checkpoint,
    "fsdp2_release": fsdp2_release,
    "fsdp1": _one_by_one(functools.partial(fsdp1, use_orig_params=False)),
    "fsdp1_orig_params": _one_by_one(functools.partial(fsdp1, use_orig_params=True)),
    "fsdp1_checkpoint": _one_by_one(fsdp1_checkpoint),
    "dtensor_shard": _one_by_one(functools.partial(dtensor, placement=Shard(0))),
    "dtensor_replicate": _one_by_one(functools.partial(dtensor, placement=Replicate())),
    "tensor_parallel": _one_by_one(tensor_parallel),
    "ddp": ddp,
}
"""Each configuration trains a list of cells of one dtype (every optimizer and backend)."""
ROUNDING_RUNS: dict[str, Callable[[list[Cell]], list[Outcome]]] = {
    "fsdp2_whole_batch": fsdp2_whole_batch,
    "fsdp2_release_whole_batch": functools.partial(fsdp2_release, shard_batch=False),
    "dtensor_shard": CONFIGURATIONS["dtensor_shard"],
}
"""Stochastic rounding of bf16 parameters sharded by rows (ROUNDING_CONFIGURATIONS)."""


def _train_every_cell(
    results: dict,
    runs: dict[str, Callable[[list[Cell]], list[Outcome]]],
    configuration: str,
    dtype_names: tuple[str, ...],
    stochastic: bool = False,
) -> None:
    """Every optimizer x backend cell of configuration in each of dtype_names, into results
    under (configuration, optimizer, backend, dtype[, "stochastic" | "compensated"])."""
    for dtype_name in dtype_names:
        cells = [
            Cell(optimizer_name, backend, dtype_name, stochastic=stochastic)
            for optimizer_name in OPTIMIZERS
            for backend in BACKENDS
        ]
        for cell, (params, compensated) in zip(cells, runs[configuration](cells), strict=True):
            if stochastic:
                results[(configuration, *cell.key, "stochastic")] = params
                continue
            results[(configuration, *cell.key)] = params
            if compensated is not None:  # bf16 parameters, full or 8-bit state
                results[(configuration, *cell.key, "compensated")] = compensated


def main(output: str, *configurations: str) -> None:
    early = _prepared_before_the_group()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results: dict[tuple[str, ...], Any] = {}
    for configuration in configurations:
        _train_every_cell(results, CONFIGURATIONS, configuration, tuple(DTYPES))
    for configuration in ROUNDING_CONFIGURATIONS:
        _train_every_cell(results, ROUNDING_RUNS, configuration, ROUNDING_DTYPES, stochastic=True)
    results[("refused", "plain parameters on 2 ranks")] = _release_refusal()
    results[("refused", "prepared before the process group")] = _release_after_the_group_started(
        early
    )
    results[("refused", "late gradients under FSDP2")] = _late_gradient_outcomes()
    if dist.get_rank() == 0:
        torch.save(results, output)
    dist.barrier()  # neither rank tears gloo down while the other still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
