"""Worker for test_distributed.py: one 2-process gloo group trains every cell of the
Composer matrix (optimizer x backend x dtype) in a real `composer.Trainer` under DDP,
FSDP2Config and FSDP2Config with GradientRelease, and saves each cell's full parameters
and probes, so the test process can compare every cell with one process.

Usage: python -m torch.distributed.run --nproc-per-node=2 tests/composer_adam/distributed_worker.py
OUTPUT CONFIGURATION [CONFIGURATION ...]

`train_cell` is also the one-process reference (run in the test process).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import composer.trainer.trainer
import torch
from composer import Trainer
from composer.callbacks import OptimizerMonitor
from composer.core import Callback, DataSpec, State
from composer.loggers import InMemoryLogger, Logger
from composer.optim import DecoupledAdamW, LinearWithWarmupScheduler
from composer.utils import FSDP2Config, dist
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset, default_collate

import composer_adam
from tests.composer_adam.harness import BATCH, LR, MICROBATCH, make_loader, make_model
from tests.core.configuration_cases import (
    BACKENDS,
    DTYPES,
    STEPS,
    Cell,
    average_fsdp2_gradients,
    state_options,
    whole_values,
)

# Every Trainer reads Composer's installed package metadata for the version and commit
# hash it logs (47 ms per Trainer here; a launch builds 244 and the references 80 more),
# and they cannot change within a process: read once.
composer.trainer.trainer.get_composer_env_dict = functools.cache(
    composer.trainer.trainer.get_composer_env_dict
)

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "DecoupledAdamW": lambda p, **kw: composer_adam.DecoupledAdamW(
        p, lr=LR, weight_decay=1e-4, **kw
    ),
    "DecoupledAdamW_amsgrad": lambda p, **kw: composer_adam.DecoupledAdamW(
        p, lr=LR, weight_decay=1e-4, amsgrad=True, **kw
    ),
    "DecoupledRAdam": lambda p, **kw: composer_adam.DecoupledRAdam(
        p, lr=LR, weight_decay=1e-4, **kw
    ),
    "DecoupledNAdam": lambda p, **kw: composer_adam.DecoupledNAdam(
        p, lr=LR, weight_decay=1e-4, **kw
    ),
    "DecoupledADOPT": lambda p, **kw: composer_adam.DecoupledADOPT(
        p, lr=LR, weight_decay=1e-4, **kw
    ),
}


@dataclass
class Result:
    """What a cell leaves behind: full parameters (fp32) and the probes' readings."""

    params: list[torch.Tensor]
    grad_bytes_after_backward: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    compensated: list[torch.Tensor] | None = None
    """bf16 parameters + their Kahan compensation (configuration_cases.whole_values)."""


class GradientBytes(Callback):
    """Bytes of gradient this rank holds at the end of each microbatch's backward: what
    the optimizer step (or the next microbatch) has to keep alive besides parameters and
    state. Gradient release frees sharded gradients inside backward, so this is the
    memory it saves."""

    def __init__(self) -> None:
        self.readings: list[int] = []

    def after_backward(self, state: State, logger: Logger) -> None:
        self.readings.append(
            sum(
                _local(p.grad).numel() * p.grad.element_size()
                for p in state.model.parameters()
                if p.grad is not None
            )
        )


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _loader(dtype: torch.dtype) -> DataLoader:
    """harness's data, each global batch of 16 split over the ranks (8 samples per rank
    on 2 ranks: 2 microbatches of MICROBATCH)."""
    dataset = make_loader(STEPS, dtype).dataset
    world = dist.get_world_size()
    # Interleaved shards: rank r takes samples r, r + world, ... of every global batch.
    sampler = DistributedSampler(dataset, shuffle=False) if world > 1 else None
    return DataLoader(dataset, batch_size=BATCH // world, sampler=sampler, shuffle=False)


def _uneven_loader() -> DataLoader:
    """One sample per global batch, repeated (every per-sample gradient agrees), each
    rank's batch cut to 2 * MICROBATCH - 2 * rank samples: microbatches of 4 and 4 on rank
    0, of 4 and 2 on rank 1 (as a collate that drops padding, or unequal shards, make)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, 1, 10, generator=generator)
    y = torch.randint(0, 4, (STEPS, 1), generator=generator)
    per_rank = 2 * MICROBATCH
    shape = (STEPS, per_rank * dist.get_world_size())
    samples = TensorDataset(x.expand(*shape, 10).reshape(-1, 10), y.expand(shape).reshape(-1))
    kept = per_rank - 2 * dist.get_global_rank()
    return DataLoader(
        samples,
        batch_size=per_rank,
        sampler=DistributedSampler(samples, shuffle=False),
        collate_fn=lambda batch: default_collate(batch[:kept]),
    )


def _masked_tokens(batch: Any) -> int:
    """Loss-generating tokens of a (micro)batch of the uneven loader: 3 per sample, but
    on rank 1 only its first microbatch's samples have any, its short last microbatch is
    all masked. Composer scales that microbatch's loss by 0, so on that rank the last
    microbatch holding tokens comes before its last microbatch."""
    samples = len(batch[0])
    if dist.get_global_rank() == 1:
        return 3 * MICROBATCH if samples >= MICROBATCH else 0
    return 3 * samples


FP32_CELLS = ("fp32", "fp32-8bit")
"""Cells with fp32 parameters, whose OptimizerMonitor metrics are compared."""
MATRIX = ("ddp", "fsdp2", "fsdp2_release")
"""Configurations that train every cell."""


def _probe(*backends: str) -> list[Cell]:
    return [Cell("DecoupledAdamW", backend, "fp32") for backend in backends]


EVERY_BACKEND = tuple(BACKENDS)
PROBES: dict[str, list[Cell]] = {
    "fsdp2_unaveraged": _probe("default"),
    "fsdp2_release_accumulation": _probe(*EVERY_BACKEND),
    "fsdp2_uneven": _probe(*EVERY_BACKEND),
    "fsdp2_uneven_release_accumulation": _probe(*EVERY_BACKEND),
    "fsdp2_masked": _probe(*EVERY_BACKEND),
    "fsdp2_masked_release": _probe(*EVERY_BACKEND),
    "fsdp2_masked_release_accumulation": _probe(*EVERY_BACKEND),
    "fsdp2_release_grad_norms_only": _probe("default"),
    "ddp_release": _probe("default"),
    "fsdp2_resumed": _probe(*EVERY_BACKEND),
    "fsdp2_release_resumed": _probe(*EVERY_BACKEND),
    "fsdp2_composer_resumed": _probe("default"),
}
"""Configurations that run DecoupledAdamW in fp32: FSDP2 without `average_fsdp2_gradients`
(shows what it corrects), FSDP2 with GradientRelease(optimizer_accumulation=True), the
same and FSDP2 alone over ranks whose microbatches differ in size (`_uneven_loader`), the
same loader counting tokens with rank 1's short microbatch masked (`_masked_tokens`; FSDP2
alone, with release, with optimizer accumulation), FSDP2 with GradientRelease and
OptimizerMonitor(log_optimizer_metrics=False), DDP with GradientRelease (must be
refused), and FSDP2 runs checkpointed halfway and resumed from the sharded checkpoint
(`resumed_cell`): without release, with it, and with Composer's own DecoupledAdamW. Those
that step run default flags and each explicit backend; default flags only: the gradient
sum without the divide hook and the gradient norms (both read before any step), the DDP
refusal (before any step) and Composer's own class (no backend flags)."""
RESUMED_AT = STEPS // 2


def cells(configuration: str) -> list[Cell]:
    if configuration in PROBES:
        return PROBES[configuration]
    return [
        Cell(optimizer, backend, dtype_name)
        for optimizer in OPTIMIZERS
        for backend in BACKENDS
        for dtype_name in DTYPES
    ]


def train_cell(
    cell: Cell,
    configuration: str = "one_process",
    microbatch: int = MICROBATCH,
    **checkpointing: Any,
) -> Result:
    """Train one cell: warmup from lr = 0 over 2 batches, then linear decay; 8 batches of
    16 samples in microbatches, under `configuration`: one process (or DDP on more
    ranks), FSDP2Config ("fsdp2..."), with GradientRelease ("...release"), with optimizer
    accumulation ("...release_accumulation"), with Composer's own class ("..._composer...").
    `checkpointing` goes to the Trainer (save_folder, load_path)."""
    model = make_model(dtype=cell.dtype, hidden=cell.hidden, train_accuracy=False)
    release = "release" in configuration
    masked = "_masked" in configuration
    accumulation = configuration.endswith("accumulation")
    if "_composer" in configuration:
        optimizer: torch.optim.Optimizer = DecoupledAdamW(
            model.parameters(), lr=LR, weight_decay=1e-4
        )
    else:
        optimizer = OPTIMIZERS[cell.optimizer](
            model.parameters(),
            gradient_release=release,
            **BACKENDS[cell.backend],
            **state_options(cell.dtype_name),
        )
    probe = GradientBytes()
    logger = InMemoryLogger()
    callbacks: list[Callback] = [probe]
    # Metrics are compared with fp32 parameters (each costs collectives), full and 8-bit
    # state; Composer's own class reduces them on torch.cuda.current_device() under FSDP,
    # so it runs without the monitor here.
    if cell.dtype_name in FP32_CELLS and "_composer" not in configuration:
        optimizer_metrics = not configuration.endswith("grad_norms_only")
        callbacks.append(
            OptimizerMonitor(batch_log_interval=1, log_optimizer_metrics=optimizer_metrics)
        )
    if release:
        counter = _masked_tokens if masked else None
        callbacks.append(
            composer_adam.GradientRelease(
                optimizer_accumulation=accumulation, get_num_samples_in_batch=counter
            )
        )
    fsdp2 = configuration.startswith("fsdp2")
    loader: DataLoader | DataSpec = _loader(cell.dtype)
    if "_uneven" in configuration or masked:
        loader = _uneven_loader()
    if masked:
        loader = DataSpec(loader, get_num_tokens_in_batch=_masked_tokens)
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        accumulate_train_batch_on_tokens=masked,
        optimizers=optimizer,
        schedulers=LinearWithWarmupScheduler(t_warmup="2ba", alpha_f=0.5),
        max_duration=f"{STEPS}ba",
        device="cpu",
        device_train_microbatch_size=microbatch,
        parallelism_config={"fsdp": FSDP2Config()} if fsdp2 else None,
        loggers=[logger],
        callbacks=callbacks,
        progress_bar=False,
        log_to_console=False,
        seed=17,
        **checkpointing,
    )
    if fsdp2 and configuration != "fsdp2_unaveraged":
        average_fsdp2_gradients(trainer.state.model)
    trainer.fit()
    params, compensated = whole_values(
        list(trainer.state.model.parameters()), trainer.state.optimizers[0]
    )
    metrics = {
        key.replace("module.module.", "module."): [float(v) for _, v in series]  # DDP's prefix
        for key, series in logger.data.items()
        if key.startswith("l2_norm/")
    }
    trainer.close()
    return Result(params, probe.readings, metrics, compensated)


def resumed_cell(cell: Cell, configuration: str, folder: str) -> Result:
    """A whole run saving a sharded checkpoint (torch.distributed.checkpoint) after
    RESUMED_AT batches, as a preempted job would have, then a new Trainer resumed from it
    (load_path) for the rest. A first run ended there instead (max_duration RESUMED_AT)
    would have scheduled its lr over RESUMED_AT batches, so its checkpoint held another
    lr for the next batch and the resumed run could not equal the uninterrupted one."""
    trained = configuration.removesuffix("_resumed")
    train_cell(cell, trained, save_folder=folder, save_interval=f"{RESUMED_AT}ba")
    return train_cell(cell, trained, load_path=f"{folder}/ep0-ba{RESUMED_AT}")


def main(output: str, *configurations: str) -> None:
    torch.set_num_threads(1)
    dist.initialize_dist("cpu")  # gloo, from the launcher's environment
    results: dict[tuple[str, str, str, str], dict[str, Any] | str] = {}
    for configuration in configurations:
        for cell in cells(configuration):
            try:
                if configuration.endswith("_resumed"):
                    folder = f"{output}.{configuration}.{cell.backend}"
                    result = resumed_cell(cell, configuration, folder)
                else:
                    result = train_cell(cell, configuration)
                results[(configuration, *cell.key)] = dataclasses.asdict(result)
            except ValueError as error:  # a refusal: the test checks its message
                if configuration not in PROBES:
                    raise
                results[(configuration, *cell.key)] = str(error)
    if dist.get_global_rank() == 0:
        torch.save(results, output)
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
