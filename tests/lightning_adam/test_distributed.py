"""Lightning on 2 CPU processes (gloo): the configuration matrix (every optimizer x backend
{default, fused, foreach, loop} x {fp32, bf16-true + Kahan}) under the Trainer with "ddp"
and ModelParallelStrategy (FSDP2) and under Fabric with "ddp" and ModelParallelStrategy,
each cell equal to one process running the loop backend; GradientRelease under FSDP2
(also with accumulation) and tensor parallelism, equal to training without it and
holding no gradient after backward; "ddp_spawn"; DDP with a sampler, schedule,
accumulation and release; and the refusals.

One Lightning launch trains every run and cell (distributed_worker.py); "ddp_spawn" has
its own, since every fit spawns its processes. fp32 cells agree within 1e-6; bf16 cells
within one bf16 ulp per step of the same configuration's loop-backend run, and that run
within one ulp per step (at no less than lr) of one process (tests/core/test_configurations).
"""

from __future__ import annotations

import csv
import functools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.fabric.strategies import FSDPStrategy as FabricFSDPStrategy
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler

from tests.core.configuration_cases import BACKENDS, DTYPES, GLOBAL_BATCHES, LR, OPTIMIZERS, Cell
from tests.core.test_configurations import (
    COMPENSATED_DTYPES,
    assert_cell_matches,
    assert_compensation_kept,
    assert_within_bf16_ulps,
    reference,
)
from tests.lightning_adam.distributed_worker import (
    BATCH_PER_RANK,
    EPOCHS,
    MONITORED_STATES,
    RUNS,
    SAMPLES,
    SCHEDULE,
    SPAWN_CELLS,
    optimizer_steps,
    run_name,
)
from tests.lightning_adam.models import (
    Regression,
    make_trainer,
    parameters_of,
    regression_data,
)
from tests.lightning_adam.strategy_cases import (
    ACCUMULATE,
    CELLS,
    RELEASE_ACCUMULATE_CELLS,
    RELEASE_CELLS,
    TENSOR_PARALLEL_CELLS,
    fit_cell,
)
from tests.processes import run_worker

STEPS = optimizer_steps(1)  # 2 ranks: 4 steps per epoch
STEPS_PER_CELL = len(GLOBAL_BATCHES)


def _run_script(*args: str) -> subprocess.CompletedProcess:
    """tests/lightning_adam/distributed_worker.py in a fresh process: no distributed state
    leaks."""
    return run_worker([sys.executable, "-m", "tests.lightning_adam.distributed_worker", *args])


@pytest.fixture(scope="module")
def lightning_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the one launch of every run and cell wrote to."""
    out = tmp_path_factory.mktemp("lightning_distributed")
    _run_script(str(out))
    return out


@pytest.fixture(scope="module")
def ranks(lightning_out: Path) -> list[dict]:
    """What each of the 2 ranks saved after every run and cell."""
    return [torch.load(lightning_out / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_every_run_keeps_the_replicas_identical(ranks: list[dict], backend: str) -> None:
    initial = parameters_of(Regression())
    for name, (_, _, accumulate, _) in RUNS.items():
        run = run_name(name, backend)
        steps = optimizer_steps(accumulate)
        assert ranks[0][f"{run}-steps"] == ranks[1][f"{run}-steps"] == steps, run
        for a, b in zip(ranks[0][run], ranks[1][run], strict=True):
            assert torch.equal(a, b), f"{run}: replicas differ"
        assert all(not torch.equal(a, b) for a, b in zip(initial, ranks[0][run], strict=True))


def _global_batches(epoch: int) -> list[list[int]]:
    """Each DDP step's samples in an epoch, both ranks' together, in order.

    Lightning gives each rank a DistributedSampler (shuffled, seed 0, set_epoch(epoch)
    every epoch); the same samplers, built here for ranks 0 and 1, say which samples the
    two replicas' batches of 32 held.
    """
    dataset, batches, per_rank = regression_data(SAMPLES), [], []
    for rank in (0, 1):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    for start in range(0, SAMPLES // 2, BATCH_PER_RANK):
        end = start + BATCH_PER_RANK
        batches.append(per_rank[0][start:end] + per_rank[1][start:end])
    return batches


class GlobalOrder(Sampler[int]):
    """Both ranks' samples of an epoch in _global_batches' order: batched by 64, one process
    sees at each batch what the two ranks saw together. Lightning calls set_epoch at every
    epoch start, so epoch-keyed settings (a GradientAccumulationScheduler) line up."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter([index for batch in _global_batches(self.epoch) for index in batch])

    def __len__(self) -> int:
        return SAMPLES


def _one_process_loader() -> DataLoader:
    return DataLoader(
        regression_data(SAMPLES),
        batch_sampler=BatchSampler(GlobalOrder(), 2 * BATCH_PER_RANK, drop_last=False),
    )


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name", ["AdamW", "AdamW-model-parallel"])
def test_ddp_and_fsdp2_equal_one_process_with_the_same_global_batch(
    name: str, backend: str, ranks: list[dict]
) -> None:
    """One process takes each step on the 64 samples the two ranks shared (DDP and FSDP2
    average their gradients, a mean over 32 each): the same parameters to float32
    rounding, with configure_optimizers' groups and schedule and Lightning's sampler."""
    for a, b in zip(ranks[0][run_name(name, backend)], _one_process_run(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@functools.cache
def _one_process_run() -> list[torch.Tensor]:
    """RUNS["AdamW"] on one process over the global batches, loop backend."""
    model = Regression(scheduler=SCHEDULE, **RUNS["AdamW"][0], **BACKENDS["loop"])
    trainer = make_trainer(max_epochs=EPOCHS)
    trainer.fit(model, _one_process_loader())
    assert trainer.global_step == STEPS
    return parameters_of(model)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_release_equals_training_without_release(ranks: list[dict], backend: str) -> None:
    for ordinary, released in (
        ("AdamW", "AdamW-release"),
        ("ADOPT-accumulate", "ADOPT-accumulate-release"),
        ("AdamW-scheduled-accumulate", "AdamW-scheduled-accumulate-release"),
        ("AdamW-model-parallel", "AdamW-model-parallel-release"),
    ):
        pairs = zip(
            ranks[0][run_name(ordinary, backend)],
            ranks[0][run_name(released, backend)],
            strict=True,
        )
        for a, b in pairs:
            assert torch.equal(a, b), f"{released} differs from {ordinary} ({backend})"


def _folded_by_hand(schedule: dict[int, int]) -> list[torch.Tensor]:
    """What Lightning's accumulation with release computes, written out without the
    callback: the global batches of each epoch, the loss divided by the epoch's window,
    core's optimizer accumulation on every batch but a window's (or the epoch's) last,
    and configure_optimizers' per-step schedule after every real step (loop backend)."""
    model = Regression(scheduler=SCHEDULE, **RUNS["AdamW"][0], **BACKENDS["loop"])
    configured = model.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    data, sampler = regression_data(SAMPLES), GlobalOrder()
    for epoch in range(EPOCHS):
        window = schedule[max(start for start in schedule if start <= epoch)]
        sampler.set_epoch(epoch)
        batches = list(BatchSampler(sampler, 2 * BATCH_PER_RANK, drop_last=False))
        for index, batch in enumerate(batches):
            x, y = data[batch]
            (nn.functional.mse_loss(model(x), y) / window).backward()
            closes = (index + 1) % window == 0 or index + 1 == len(batches)
            optimizer.optimizer_accumulation = not closes
            optimizer.step()
            optimizer.zero_grad()
            if closes:
                scheduler.step()
    return parameters_of(model)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_release_follows_an_accumulation_schedule_under_model_parallel(
    ranks: list[dict], backend: str
) -> None:
    """A GradientAccumulationScheduler (a step per batch, then per two batches) under FSDP2
    with release: each rank folds every reduce-scattered micro-batch into the moments in
    the windows Lightning steps by, as core's optimizer accumulation does on one process
    over the same global batches (configure_optimizers' groups and cosine schedule).
    Release read the window once at fit start before it was read per batch: the first
    epoch's 1 for all three."""
    name = "AdamW-model-parallel-scheduled-accumulate-release"
    _, _, schedule, _ = RUNS[name]
    run = run_name(name, backend)
    assert ranks[0][f"{run}-steps"] == optimizer_steps(schedule) == 8
    for got, want in zip(ranks[0][run], _folded_by_hand(schedule), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_release_under_model_parallel_resumes_from_a_checkpoint_exactly(
    ranks: list[dict], backend: str
) -> None:
    """One epoch, a distributed checkpoint, the rest resumed from it: the same parameters
    as the uninterrupted run. Released parameters used to miss the lr-0 step that creates
    the state the checkpoint loads into, so the resumed run restarted its moments."""
    run = run_name("AdamW-model-parallel-release", backend)
    for a, b in zip(ranks[0][run], ranks[0][f"{run}-resumed"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_model_parallel_resumes_from_a_checkpoint_of_whole_tensors_exactly(
    ranks: list[dict], backend: str
) -> None:
    """ModelParallelStrategy(save_distributed_checkpoint=False) saves one file of whole
    tensors, which torch's full-state loader shards again over the resumed run's fresh
    state: the same parameters as the uninterrupted run, bit for bit."""
    run = run_name("AdamW-model-parallel", backend)
    for a, b in zip(ranks[0][run], ranks[0][f"{run}-resumed-whole"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_release_under_model_parallel_resumes_inside_a_window_exactly(
    ranks: list[dict], backend: str
) -> None:
    """A fit stopped inside an accumulation window, resumed from its distributed
    checkpoint: the same parameters as the uninterrupted fit. DCP loads only the state
    keys a fresh optimizer has, so the window's count was dropped and the resumed fit
    folded the window's last micro-batch into a new one (4e-3 apart). Its schedule's
    length is counted by the trainer after the restore: counted before Lightning restores
    its loops (in configure_optimizers, or at the optimizer step
    torch.distributed.checkpoint takes while loading: 8e-3 apart there), the loader got
    no place in the epoch."""
    runs = ranks[0][run_name("inside-window", backend)]
    assert runs["stopped-steps"] == 2 and runs["whole-steps"] == runs["resumed-steps"] == 6
    assert runs["whole-total-steps"] == runs["resumed-total-steps"] == 6
    for a, b in zip(runs["whole"], runs["resumed"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.bad_input
def test_settings_the_callbacks_cannot_follow_are_refused() -> None:
    """DDP settings, and ModelParallelStrategy settings (on a one-rank mesh), refused before
    the optimizer's groups are switched to release."""
    refused = [line for line in _run_script("--refusals").stdout.splitlines() if "refused" in line]
    assert len(refused) == 3, refused
    assert "Invalid find_unused_parameters for GradientRelease under DDP: True." in refused[0]
    assert (
        "Invalid DDP setup for GradientRelease: the model already has a communication"
        in (refused[1])
    )
    assert (
        "Invalid model for GradientRelease under ModelParallelStrategy: 2 parameter(s) not "
        "sharded (net.2.weight, net.2.bias). Allowed: every trainable parameter a DTensor, "
        "by fully_shard or parallelize_module in configure_model" in refused[2]
    )
    assert refused[2].endswith("groups switched to release: False")


MATRIX = ("trainer_ddp", "trainer_model_parallel", "fabric_ddp", "fabric_model_parallel")


def assert_cell_near_one_process(
    result: list[torch.Tensor], own_loop: list[torch.Tensor], optimizer: str, dtype_name: str
) -> None:
    """The core matrix's check against one process training GLOBAL_BATCHES."""
    one_process = reference("lightning", optimizer, dtype_name)
    assert_cell_matches(result, own_loop, one_process, dtype_name)


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("configuration", MATRIX)
def test_cell_equals_one_process_loop(
    ranks: list[dict], configuration: str, optimizer: str, backend: str, dtype_name: str
) -> None:
    key = (configuration, optimizer, backend, dtype_name)
    result, other_rank = (rank["matrix"][key] for rank in ranks)
    assert result["steps"] == STEPS_PER_CELL
    for a, b in zip(result["params"], other_rank["params"], strict=True):
        assert torch.equal(a, b), "the ranks' (gathered) parameters differ"
    own_loop = ranks[0]["matrix"][(configuration, optimizer, "loop", dtype_name)]["params"]
    assert_cell_near_one_process(result["params"], own_loop, optimizer, dtype_name)


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", COMPENSATED_DTYPES)
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("configuration", MATRIX)
def test_bf16_cells_keep_their_kahan_compensation(
    ranks: list[dict], configuration: str, optimizer: str, backend: str, dtype_name: str
) -> None:
    """Held to bf16 ulps, parameters alone pass with Kahan compensation lost (a strategy's
    or Fabric's wrapper dropping it); their compensated values do not."""
    cells = ranks[0]["matrix"]
    result = cells[(configuration, optimizer, backend, dtype_name)]
    own_loop = cells[(configuration, optimizer, "loop", dtype_name)]
    assert_compensation_kept(
        result["compensated"],
        result["params"],
        own_loop["compensated"],
        reference("lightning", optimizer, dtype_name, compensated=True),
        dtype_name,
    )


def test_launch_trained_every_cell(ranks: list[dict]) -> None:
    """A cell missing from the worker's output would otherwise surface as a KeyError only."""
    expected = {(c, *cell.key) for c in MATRIX for cell in CELLS}
    expected |= {("trainer_model_parallel_release", *cell.key) for cell in RELEASE_CELLS}
    expected |= {
        ("trainer_model_parallel_release_accumulate", *cell.key)
        for cell in RELEASE_ACCUMULATE_CELLS
    }
    expected |= {
        (name, *cell.key)
        for name in ("trainer_tensor_parallel", "trainer_tensor_parallel_release")
        for cell in TENSOR_PARALLEL_CELLS
    }
    assert set(ranks[0]["matrix"]) == expected


@pytest.mark.parametrize("cell", RELEASE_CELLS, ids=lambda cell: "-".join(cell.key))
def test_release_under_model_parallel_equals_training_without_it(
    ranks: list[dict], cell: Cell
) -> None:
    """FSDP2 reduce-scatters, then runs the sharded parameter's hooks: release steps each
    shard with the averaged gradient, exactly as the optimizer step after backward does,
    and frees it, so no rank holds a gradient when backward ends (the memory probe:
    on_after_backward sums the bytes of this rank's gradient shards)."""
    cells = ranks[0]["matrix"]
    released = cells[("trainer_model_parallel_release", *cell.key)]
    ordinary = cells[("trainer_model_parallel", *cell.key)]
    for a, b in zip(released["params"], ordinary["params"], strict=True):
        assert torch.equal(a, b)
    parameters = sum(p.numel() for p in ordinary["params"])
    shard_bytes = parameters * DTYPES[cell.dtype_name].itemsize // 2
    assert ordinary["gradient_bytes"] == [shard_bytes] * STEPS_PER_CELL
    assert released["gradient_bytes"] == [0] * STEPS_PER_CELL


@pytest.mark.parametrize("cell", TENSOR_PARALLEL_CELLS, ids=lambda cell: "-".join(cell.key[1:]))
def test_release_under_tensor_parallelism_equals_training_without_it(
    ranks: list[dict], cell: Cell
) -> None:
    """ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2), Colwise then
    Rowwise: autograd hands each DTensor parameter its global gradient, so release equals
    training without it, which equals one process."""
    cells = ranks[0]["matrix"]
    released = cells[("trainer_tensor_parallel_release", *cell.key)]
    ordinary = cells[("trainer_tensor_parallel", *cell.key)]
    for a, b in zip(released["params"], ordinary["params"], strict=True):
        assert torch.equal(a, b)
    assert released["gradient_bytes"] == [0] * STEPS_PER_CELL
    assert all(count > 0 for count in ordinary["gradient_bytes"])
    if cell.dtype_name.endswith("-8bit"):
        # The row-wise weight is sharded by columns and keeps full-precision state where
        # one process quantizes it (tests/core/test_configurations.py): no twin to hold to.
        return
    one_process = reference("lightning", cell.optimizer, cell.dtype_name)
    if cell.dtype_name == "fp32":
        for got, want in zip(released["params"], one_process, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    else:  # held to one process, ulps at no less than lr
        assert_within_bf16_ulps(released["params"], one_process, LR)


@functools.cache
def _one_process_releasing(optimizer: str, dtype_name: str) -> dict[str, Any]:
    """One process releasing with accumulation, loop backend."""
    cell = Cell(optimizer, "loop", dtype_name)
    return fit_cell(cell, "single", release=True, accumulate=ACCUMULATE)


@pytest.mark.parametrize("cell", RELEASE_ACCUMULATE_CELLS, ids=lambda cell: "-".join(cell.key[:2]))
def test_release_with_accumulation_under_model_parallel_equals_one_process(
    ranks: list[dict], cell: Cell
) -> None:
    """FSDP2 reduce-scatters every micro-batch, so release folds each averaged micro-batch
    into the moments (core's optimizer accumulation): the same as one process releasing
    with the same global micro-batches and the loop backend."""
    released = ranks[0]["matrix"][("trainer_model_parallel_release_accumulate", *cell.key)]
    one_process = _one_process_releasing(cell.optimizer, cell.dtype_name)
    assert released["steps"] == one_process["steps"] == STEPS_PER_CELL // ACCUMULATE
    assert released["gradient_bytes"] == [0] * STEPS_PER_CELL
    for got, want in zip(released["params"], one_process["params"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_fabric_model_parallel_needs_the_optimizer_built_after_setup_module(
    ranks: list[dict],
) -> None:
    """Documents Lightning's behaviour the README warns about: fabric.setup(model, optimizer)
    under Fabric's ModelParallelStrategy shards the model into new parameters and keeps the
    optimizer on the old ones, so a step changes nothing (no error). The matrix's Fabric
    FSDP2 cells build the optimizer after fabric.setup_module, and train."""
    assert ranks[0]["fabric_joint_setup_trains"] is False


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The ddp_spawn fits' weights, as they came back into the launching process."""
    out = tmp_path_factory.mktemp("ddp_spawn")
    _run_script("--spawn", str(out))
    return torch.load(out / "spawn.pt")


@pytest.mark.slow
@pytest.mark.parametrize("cell", SPAWN_CELLS, ids=lambda cell: "-".join(cell.key))
def test_ddp_spawn_with_release_equals_ddp_and_one_process(
    spawned: dict, ranks: list[dict], cell: Cell
) -> None:
    """A spawned fit pickles the module and GradientRelease into its processes and returns
    rank 0's weights: equal to the "ddp" cell trained without release, and to one process."""
    ddp = ranks[0]["matrix"][("trainer_ddp", *cell.key)]["params"]
    for a, b in zip(spawned[cell.key], ddp, strict=True):
        assert torch.equal(a, b)
    own_loop = ranks[0]["matrix"][("trainer_ddp", cell.optimizer, "loop", cell.dtype_name)]
    assert_cell_near_one_process(
        spawned[cell.key], own_loop["params"], cell.optimizer, cell.dtype_name
    )


@pytest.mark.bad_input
def test_fsdp_strategy_on_cpu_is_refused_by_lightning() -> None:
    """Lightning's FSDPStrategy (FSDP1) needs CUDA, in the Trainer and in Fabric; on CPU,
    FSDP is ModelParallelStrategy (FSDP2), which the matrix trains."""
    for strategy in ("fsdp", FSDPStrategy()):
        with pytest.raises(ValueError, match="The strategy `fsdp` requires a GPU accelerator"):
            L.Trainer(accelerator="cpu", devices=2, strategy=strategy)
    for strategy in ("fsdp", FabricFSDPStrategy()):
        with pytest.raises(ValueError, match="FSDP is only available on GPU"):
            L.Fabric(accelerator="cpu", devices=2, strategy=strategy)


def _monitor_rows(out: Path, run: str) -> list[dict[str, float]]:
    (path,) = out.glob(f"monitor-{run}/**/metrics.csv")
    with path.open() as handle:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(handle)]


@pytest.mark.parametrize("state_precision", list(MONITORED_STATES))
def test_optimizer_monitor_logs_global_norms_under_fsdp2(
    ranks: list[dict], lightning_out: Path, state_precision: str
) -> None:
    """Under ModelParallelStrategy every rank takes the DTensor norms together and rank
    zero logs the global values: those DDP logs for the same run (which equals FSDP2's
    to 1e-6), every metric and step; with 8-bit state too, whose moments each rank
    dequantizes from its own rows' blocks."""
    ddp, sharded = (
        _monitor_rows(lightning_out, f"{s}-{state_precision}") for s in ("ddp", "model_parallel")
    )
    assert len(ddp) == len(sharded) == SAMPLES // (2 * BATCH_PER_RANK)
    for expected, got in zip(ddp, sharded, strict=True):
        assert got.keys() == expected.keys() and len(got) > 10
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
