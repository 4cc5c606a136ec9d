"""8-bit state saved with torch.distributed.checkpoint under FSDP2 on 2 ranks resumes on 1
and on 3 (a job restarted on another number of GPUs): every state tensor, gathered, is
the saved one (codes, scales, dequantized moments, Kahan compensation, step), and the
next step runs. On 3 ranks one rank's shard of the (4, 1100) weight has no rows; its
scales once had shape (0, 0) instead of (0, 5), and gathering them hung."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.core.configuration_cases import BACKENDS
from tests.core.resharding_worker import CELLS
from tests.processes import ranks_command, run_worker

WORKER = "tests/core/resharding_worker.py"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("resharding")
    run_worker(ranks_command(2, WORKER, "save", str(directory)), timeout=300)
    return directory


@pytest.mark.parametrize("ranks", [1, 3])
def test_8bit_fsdp2_checkpoint_resumes_on_another_number_of_ranks(saved: Path, ranks: int) -> None:
    """Then each backend setting takes the next step from the loaded state (on 3 ranks the
    reference quantizer of foreach and loop once failed on the shard with no rows), equal
    to the loop backend's: fp32 within 1e-6, bf16 within one bf16 ulp."""
    run_worker(ranks_command(ranks, WORKER, "load", str(saved)), timeout=300)
    for name, cell in CELLS.items():
        outcome = torch.load(saved / name / f"loaded-{ranks}.pt")
        same = outcome["same"]
        assert any(key.endswith("_codes") for _, key in same), "the cell has 8-bit state"
        assert all(same.values()), [key for key, equal in same.items() if not equal]
        stepped = outcome["stepped"]
        assert set(stepped) == set(BACKENDS)
        relative = 2.0**-8 if cell.dtype == torch.bfloat16 else 0.0
        for backend, params in stepped.items():
            for got, want in zip(params, stepped["loop"], strict=True):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=relative, msg=backend)
        # Switched to full precision after loading (DCP cannot load 8-bit state into an
        # optimizer built "full"): the moments are dequantized, exactly, and no codes are
        # left; the step is the 8-bit one's but for its rounding: fp32 within 1e-6
        # (measured 3e-8), bf16 + Kahan within one bf16 ulp or 1e-5 (measured: 7.6e-6 at
        # most, on elements near 1e-3).
        switched = outcome["switched"]
        assert not [key for key in switched["keys"] if key.endswith(("_codes", "_absmax"))]
        assert "exp_avg" in switched["keys"]
        bf16 = cell.dtype == torch.bfloat16
        for got, want in zip(switched["params"], stepped["default"], strict=True):
            torch.testing.assert_close(
                got, want, atol=1e-5 if bf16 else 1e-6, rtol=2.0**-7 if bf16 else 0.0
            )


def test_full_state_loads_move_8bit_checkpoints_between_one_process_and_fsdp2(
    saved: Path,
) -> None:
    """torch's full-state route (set_optimizer_state_dict(full_state_dict=True)) lays the
    checkpoint's state over the fresh receiver's, key by key. A moment held in the other
    form arrived in both and was refused: an 8-bit checkpoint of a model with a 1-D
    parameter of 4096+ elements (a wide norm or bias: 8-bit in one process or DDP, full in
    FSDP2) could not move between the two, nor any checkpoint across state_precision.
    Saved on 2 ranks, each backend setting: one process -> FSDP2 loads the bias's m as
    its codes dequantized, bit for bit, and steps as a one-process optimizer loaded with
    the same state (within 1e-6); FSDP2 full -> FSDP2 8-bit quantizes the weight's m to
    the nearest codes; FSDP2 -> plain parameters on 2 ranks is refused by name (one
    process takes it: test_state_dict). With
    broadcast_from_rank0=True only rank 0 receives the other form: refused on every rank
    (rank 1 loaded its own zeros under the checkpoint's step)."""
    moves = torch.load(saved / "full_state_moves.pt")
    assert len(moves) == 4 * len(BACKENDS) + 1
    gaps = {key: gap for key, gap in moves.items() if key.endswith("gap")}
    assert all(gap <= 1e-6 for gap in gaps.values()), gaps
    failed = [key for key, held in moves.items() if not key.endswith("gap") and not held]
    assert not failed, failed
