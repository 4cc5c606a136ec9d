"""FSDP2 (fully_shard, DTensor parameters) on CPU with 2 gloo processes equals one process."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.core.distributed_cases import GLOBAL_BATCHES, OPTIMIZERS, make_model
from tests.processes import ROOT, run_worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_run(name: str) -> list[torch.Tensor]:
    model = make_model()
    optimizer = OPTIMIZERS[name](model.parameters())
    for x, y in GLOBAL_BATCHES:
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach() for p in model.parameters()]


def _has_fully_shard() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_older_than(major: int, minor: int) -> bool:
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return version < (major, minor)


@pytest.mark.skipif(not _has_fully_shard(), reason="this torch build has no FSDP2 fully_shard")
@pytest.mark.skipif(
    _torch_older_than(2, 8),
    reason="torch 2.7's FSDP2 sums gradients over gloo instead of averaging them (checked: "
    "2.0x the single-process gradient), so no optimizer can match a single process there",
)
@pytest.mark.parametrize("backend", ["loop", "foreach"])
def test_fsdp2_sharded_training_equals_single_process(backend: str, tmp_path: Path) -> None:
    output = tmp_path / "fsdp.pt"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--master-port={_free_port()}",
        str(ROOT / "tests/core/fsdp_worker.py"),
        str(output),
        backend,
    ]
    run_worker(command, timeout=600)
    sharded = torch.load(output)
    for name in OPTIMIZERS:
        for full, reference in zip(sharded[name], single_process_run(name), strict=True):
            torch.testing.assert_close(full, reference, atol=1e-6, rtol=0, msg=name)
