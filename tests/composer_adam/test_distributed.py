"""Composer on 2 gloo processes: every composer_adam optimizer x backend {default, fused,
foreach, loop} x dtype {fp32, bf16 parameters + Kahan} in a real `composer.Trainer`
(warmup from lr = 0, 2 microbatches per rank) under DDP, FSDP2Config, and FSDP2Config
with GradientRelease, each cell equal to one process running the loop backend.

One launch trains every cell (distributed_worker.py); each test checks one cell.
fp32 cells (full and 8-bit state) agree within 1e-6 in parameters and 1e-5 (relative)
in every OptimizerMonitor metric; bf16 cells within one bf16 ulp per step of the same
configuration's loop-backend run, and that run near one process's (ulps taken at no less
than lr: 2 ranks reduce gradients in bf16).

torch 2.7's FSDP2 over gloo sums gradients instead of averaging them (measured here:
every gradient norm 2.0x one process's); the FSDP2 cells divide the reduce-scatter output
by the world size through `FSDPModule.set_all_reduce_hook`
(distributed_worker.average_fsdp2_gradients), which makes them equal one process.
Parameters alone would not show the sum (Adam is nearly scale-invariant), so the
gradient-norm metrics are checked too.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.composer_adam.distributed_worker import (
    EVERY_BACKEND,
    FP32_CELLS,
    MATRIX,
    MICROBATCH,
    OPTIMIZERS,
    PROBES,
    Cell,
    Result,
    cells,
    train_cell,
)
from tests.composer_adam.harness import make_model
from tests.core.configuration_cases import BACKENDS, DTYPES, STEPS
from tests.core.test_configurations import (
    COMPENSATED_DTYPES,
    COMPOSER_COMPENSATED_ATOL,
    assert_cell_matches,
    assert_compensation_kept,
)
from tests.processes import run_worker, two_rank_command

CONFIGURATIONS = (*MATRIX, *PROBES)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every cell of every configuration, trained by one 2-process gloo group."""
    output = tmp_path_factory.mktemp("composer_distributed") / "cells.pt"
    command = two_rank_command(
        "tests/composer_adam/distributed_worker.py", str(output), *CONFIGURATIONS
    )
    run_worker(command, timeout=900)
    saved = torch.load(output)
    return {key: v if isinstance(v, str) else Result(**v) for key, v in saved.items()}


@functools.cache
def one_process(optimizer: str, dtype_name: str) -> Result:
    """The reference: the same Trainer on one process, loop backend."""
    return train_cell(Cell(optimizer, "loop", dtype_name))


def assert_same_metrics(result: Result, reference: Result, rel: float, skip: str = "") -> None:
    """The same metrics, but for keys starting with skip, which result must not have."""
    expected = [key for key in reference.metrics if not (skip and key.startswith(skip))]
    assert list(result.metrics) == expected
    # 4 metrics x 4 parameters + the global grad norm, less the 4 skipped update norms
    assert len(reference.metrics) == 17 and len(expected) == (13 if skip else 17)
    for key in expected:
        series = reference.metrics[key]
        assert result.metrics[key] == pytest.approx(series, rel=rel, abs=1e-7), key


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("configuration", MATRIX)
def test_cell_equals_one_process_loop(
    trained: dict, configuration: str, optimizer: str, backend: str, dtype_name: str
) -> None:
    result: Result = trained[(configuration, optimizer, backend, dtype_name)]
    reference = one_process(optimizer, dtype_name)
    # NAdam's update metric needs the gradient, which release has freed by batch end.
    skip = "l2_norm/update" if configuration.endswith("release") and "NAdam" in optimizer else ""
    own_loop: Result = trained[(configuration, optimizer, "loop", dtype_name)]
    assert_cell_matches(result.params, own_loop.params, reference.params, dtype_name)
    if dtype_name in FP32_CELLS:
        assert_same_metrics(result, reference, rel=1e-5, skip=skip)


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", COMPENSATED_DTYPES)
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("configuration", MATRIX)
def test_bf16_cells_keep_their_kahan_compensation(
    trained: dict, configuration: str, optimizer: str, backend: str, dtype_name: str
) -> None:
    """Held to bf16 ulps, parameters alone pass with Kahan compensation lost (a Composer
    wrapper or state path dropping it); their compensated values do not."""
    result: Result = trained[(configuration, optimizer, backend, dtype_name)]
    own_loop: Result = trained[(configuration, optimizer, "loop", dtype_name)]
    assert_compensation_kept(
        result.compensated,
        result.params,
        own_loop.compensated,
        one_process(optimizer, dtype_name).compensated,
        dtype_name,
        own_loop_atol=COMPOSER_COMPENSATED_ATOL,
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_release_under_fsdp2_equals_fsdp2_and_frees_gradients(
    trained: dict, optimizer: str, backend: str, dtype_name: str
) -> None:
    """Bit for bit the FSDP2 run without release; after each batch's last backward the
    rank holds no gradient, where FSDP2 alone holds all its sharded gradients."""
    released: Result = trained[("fsdp2_release", optimizer, backend, dtype_name)]
    ordinary: Result = trained[("fsdp2", optimizer, backend, dtype_name)]
    for got, want in zip(released.params, ordinary.params, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    sharded_bytes = ordinary.grad_bytes_after_backward[0]
    full_bytes = sum(p.numel() for p in ordinary.params) * DTYPES[dtype_name].itemsize
    assert sharded_bytes == full_bytes // 2  # this rank's shard of every gradient
    assert ordinary.grad_bytes_after_backward == [sharded_bytes] * len(
        ordinary.grad_bytes_after_backward
    )
    # Two microbatches per rank: the first accumulates (release is armed for the last).
    assert released.grad_bytes_after_backward == [sharded_bytes, 0] * (
        len(released.grad_bytes_after_backward) // 2
    )


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_release_with_optimizer_accumulation_under_fsdp2_equals_one_process(
    trained: dict, backend: str
) -> None:
    """Each rank's k-th microbatch of 4, reduce-scattered, is the gradient of one
    process's k-th microbatch of 8 (the same samples), so folding microbatches into the
    moments on 2 ranks equals folding them on one process; no gradient outlives any
    microbatch's backward."""
    cell = Cell("DecoupledAdamW", backend, "fp32")
    result: Result = trained[("fsdp2_release_accumulation", *cell.key)]
    reference = _one_process_folding(cell.optimizer)
    for got, want in zip(result.params, reference.params, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert_same_metrics(result, reference, rel=1e-5)
    assert result.grad_bytes_after_backward == [0] * 2 * STEPS


@functools.cache
def _one_process_folding(optimizer: str) -> Result:
    """One process folding microbatches of twice the size, loop backend."""
    return train_cell(Cell(optimizer, "loop", "fp32"), "release_accumulation", 2 * MICROBATCH)


def _travelled_and_gap(cell: Cell, ordinary: Result, released: Result) -> tuple[float, float]:
    """How far the ordinary run moved the parameters from their start, and how far the
    released run ended from it (L2 norms over all parameters)."""
    start = make_model(dtype=cell.dtype, hidden=cell.hidden).parameters()
    moved = [(p - q.detach()).flatten() for p, q in zip(ordinary.params, start, strict=True)]
    apart = [(p - q).flatten() for p, q in zip(released.params, ordinary.params, strict=True)]
    return float(torch.cat(moved).norm()), float(torch.cat(apart).norm())


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_release_with_optimizer_accumulation_under_fsdp2_is_exact_for_unequal_ranks(
    trained: dict, backend: str
) -> None:
    """Rank 0's microbatches hold 4 and 4 samples, rank 1's 4 and 2, every per-sample
    gradient agreeing: Composer scales each rank's loss by its samples over all ranks', and
    FSDP2 sums the ranks' gradients, so each fold's share is its microbatch's samples on
    every rank (8, then 6). Then folding equals FSDP2's ordinary accumulation; with each
    rank's own counts as shares it did not (8.6% of the distance travelled off)."""
    cell = Cell("DecoupledAdamW", backend, "fp32")
    released: Result = trained[("fsdp2_uneven_release_accumulation", *cell.key)]
    ordinary: Result = trained[("fsdp2_uneven", *cell.key)]
    travelled, gap = _travelled_and_gap(cell, ordinary, released)
    assert travelled > 0.1
    assert gap / travelled < 1e-5
    assert released.grad_bytes_after_backward == [0] * 2 * STEPS


@pytest.mark.parametrize("backend", EVERY_BACKEND)
@pytest.mark.parametrize("mode", ["release", "release_accumulation"])
def test_release_under_fsdp2_steps_once_where_one_rank_has_a_masked_microbatch(
    trained: dict, mode: str, backend: str
) -> None:
    """Token counts, rank 1's last microbatch all masked (count 0): that rank alone
    refused it while rank 0 waited in the next collective. Which microbatch steps is now
    decided from counts summed over the ranks, so both step at the last microbatch
    holding tokens on any rank: release equals FSDP2 alone bit for bit, optimizer
    accumulation within 1e-5 of the distance travelled."""
    cell = Cell("DecoupledAdamW", backend, "fp32")
    ordinary: Result = trained[("fsdp2_masked", *cell.key)]
    released: Result = trained[(f"fsdp2_masked_{mode}", *cell.key)]
    travelled, gap = _travelled_and_gap(cell, ordinary, released)
    assert travelled > 0.1
    assert gap <= (1e-5 * travelled if "accumulation" in mode else 0)
    assert released.grad_bytes_after_backward[-1] == 0


def test_release_under_fsdp2_logs_global_grad_norms_without_optimizer_metrics(
    trained: dict,
) -> None:
    """OptimizerMonitor(log_optimizer_metrics=False): no reduction over ranks follows, so
    the callback logs each DTensor gradient norm as the global norm, not a rank's part."""
    (cell,) = PROBES["fsdp2_release_grad_norms_only"]
    result: Result = trained[("fsdp2_release_grad_norms_only", *cell.key)]
    reference = one_process(cell.optimizer, cell.dtype_name)
    grads = {k: v for k, v in reference.metrics.items() if k.startswith("l2_norm/grad/")}
    assert result.metrics.keys() == grads.keys() and len(grads) == 5
    for key, series in grads.items():
        assert result.metrics[key] == pytest.approx(series, rel=1e-5), key


def test_fsdp2_over_gloo_sums_gradients_without_the_divide_hook(trained: dict) -> None:
    """What average_fsdp2_gradients corrects (torch 2.7): when this fails, torch averages
    on gloo by itself and the hook would halve gradients; remove it."""
    (cell,) = PROBES["fsdp2_unaveraged"]
    result: Result = trained[("fsdp2_unaveraged", *cell.key)]
    reference = one_process(cell.optimizer, cell.dtype_name)
    grads = [key for key in reference.metrics if key.startswith("l2_norm/grad/")]
    assert len(grads) == 5
    for key in grads:
        doubled = [2 * value for value in reference.metrics[key]]
        assert result.metrics[key] == pytest.approx(doubled, rel=1e-5), key


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_release_under_fsdp2_resumes_from_a_sharded_checkpoint(trained: dict, backend: str) -> None:
    """Halfway, a sharded checkpoint; a new Trainer resumes from it (load_path). With
    release the run equals the resumed run without it, bit for bit, and both equal the
    run never interrupted and Composer's own DecoupledAdamW resumed the same way.
    Composer loads the checkpoint when the Trainer is built, before GradientRelease
    switches release on at fit start (under
    Lightning, release was on when torch.distributed.checkpoint created the state to load
    into, which released parameters skipped until core stepped them: see
    tests/core/test_gradient_release.py)."""
    cell = Cell("DecoupledAdamW", backend, "fp32")
    released: Result = trained[("fsdp2_release_resumed", *cell.key)]
    ordinary: Result = trained[("fsdp2_resumed", *cell.key)]
    (composer_cell,) = PROBES["fsdp2_composer_resumed"]
    composers: Result = trained[("fsdp2_composer_resumed", *composer_cell.key)]
    uninterrupted: Result = trained[("fsdp2", *cell.key)]
    for got, want, whole, theirs in zip(
        released.params, ordinary.params, uninterrupted.params, composers.params, strict=True
    ):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        torch.testing.assert_close(got, whole, atol=1e-6, rtol=0)
        torch.testing.assert_close(got, theirs, atol=1e-6, rtol=0)


@pytest.mark.bad_input
def test_gradient_release_under_ddp_is_refused(trained: dict) -> None:
    (cell,) = PROBES["ddp_release"]
    message = trained[("ddp_release", *cell.key)]
    assert isinstance(message, str), "DDP with GradientRelease must be refused"
    assert message.startswith(
        "Invalid parallelism for GradientRelease on 2 ranks: DistributedDataParallel"
    )
    assert "parallelism_config={'fsdp': FSDP2Config()}" in message


def test_worker_covers_every_cell(trained: dict) -> None:
    """A cell missing from the worker's output would otherwise surface as a KeyError only."""
    expected = {(c, *cell.key) for c in CONFIGURATIONS for cell in cells(c)}
    assert set(trained) == expected
