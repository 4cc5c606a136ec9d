"""Worker for test_resharding.py: 8-bit state saved by torch.distributed.checkpoint under
FSDP2 on one number of ranks and loaded on another.

Usage: torchrun --nproc-per-node=N resharding_worker.py save|load DIRECTORY

save trains each cell CHECKPOINT_AT steps on N ranks, saves model and optimizer with DCP
under DIRECTORY/<cell> and, from rank 0, every state tensor in full precision (the 8-bit
moments dequantized, gathered from the shards) to DIRECTORY/<cell>/expected.pt. load
builds a fresh sharded model and optimizer on its N ranks for each backend setting
(default flags, fused, foreach, loop), loads the checkpoint, and takes one more step; it
writes whether each state tensor, gathered, equals the saved one (default flags) and each
backend's parameters after that step to DIRECTORY/<cell>/loaded-N.pt, with the same
step taken after switching the loaded optimizer to full-precision state.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
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
from torch.distributed.tensor import DTensor

from core.quantization import moment_keys, stored_moment
from tests.core.configuration_cases import BACKENDS, CHECKPOINT_AT, Cell
from tests.core.configuration_worker import _sharded_model, _train

CELLS = {
    "AdamW-fp32": Cell("AdamW", "default", "fp32-8bit"),  # AMSGrad: v_max 8-bit too
    "ADOPT-bf16": Cell("ADOPT", "default", "bf16-8bit"),  # 8-bit m, full v, Kahan
}
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def _state_in_full(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Every state tensor of every parameter, gathered; 8-bit moments as their codes,
    their scales and their dequantized values."""
    result = {}
    for name, param in model.named_parameters():
        state = optimizer.state[param]
        for key in sorted(state):  # one order on every rank: each gather is a collective
            if isinstance(state[key], torch.Tensor):
                result[(name, key)] = _full(state[key])
        for moment in MOMENTS:
            if moment_keys(moment)[0] in state:
                result[(name, f"{moment} dequantized")] = _full(stored_moment(state, moment, param))
    return result


def _checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer),
    }


def save(directory: Path) -> None:
    for name, cell in CELLS.items():
        model = _sharded_model(cell, mixed_precision=False)
        optimizer = cell.make_optimizer(model.parameters())
        _train(model, optimizer, cell.dtype, True, range(CHECKPOINT_AT))
        dcp.save(_checkpoint(model, optimizer), checkpoint_id=directory / name)
        expected = _state_in_full(model, optimizer)
        if dist.get_rank() == 0:
            torch.save(expected, directory / name / "expected.pt")


def load(directory: Path) -> None:
    for name, cell in CELLS.items():
        outcome: dict[str, Any] = {"stepped": {}}
        for backend, flags in BACKENDS.items():
            model = _sharded_model(cell, mixed_precision=False)
            optimizer = cell.make_optimizer(model.parameters(), **flags)
            state = _checkpoint(model, optimizer)
            dcp.load(state, checkpoint_id=directory / name)
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, optimizer, state["optimizer"])
            if backend == "default":
                loaded = _state_in_full(model, optimizer)
                expected = torch.load(directory / name / "expected.pt")
                outcome["same"] = {
                    key: key in loaded and torch.equal(loaded[key], want)
                    for key, want in expected.items()
                }
            _train(model, optimizer, cell.dtype, True, range(CHECKPOINT_AT, CHECKPOINT_AT + 1))
            outcome["stepped"][backend] = [_full(p).float() for p in model.parameters()]
        outcome["switched"] = _switched_to_full(directory / name, cell)
        if dist.get_rank() == 0:
            torch.save(outcome, directory / name / f"loaded-{dist.get_world_size()}.pt")


def _switched_to_full(checkpoint: Path, cell: Cell) -> dict[str, Any]:
    """The way README gives to change state_precision across a DCP checkpoint (DCP loads
    only the keys the receiving optimizer has): build with the checkpoint's precision,
    load, set each group's state_precision, step. The parameters after that step, and
    the state keys left (gathered in one order on every rank)."""
    model = _sharded_model(cell, mixed_precision=False)
    optimizer = cell.make_optimizer(model.parameters())
    state = _checkpoint(model, optimizer)
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    for group in optimizer.param_groups:
        group["state_precision"] = "full"
    _train(model, optimizer, cell.dtype, True, range(CHECKPOINT_AT, CHECKPOINT_AT + 1))
    return {
        "params": [_full(p).float() for p in model.parameters()],
        "keys": sorted({key for s in optimizer.state.values() for key in s}),
    }


def main(mode: str, directory: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    {"save": save, "load": load}[mode](Path(directory))
    dist.barrier()
    # A pause without the GIL before teardown, as tests.processes.gloo_group takes: gloo's
    # workers free finished collectives' tensors after the waits return (once, in CI, a
    # rank here aborted in teardown with "terminate called without an active exception").
    time.sleep(0.2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
