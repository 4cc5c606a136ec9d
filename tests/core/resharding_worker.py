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

import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import core
from core.quantization import moment_keys, quantize, stored_moment
from tests.core.configuration_cases import (
    BACKENDS,
    CHECKPOINT_AT,
    FSDP2_SUMS_OVER_GLOO,
    Cell,
    average_fsdp2_gradients,
)
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
    moves = full_state_moves()
    if dist.get_rank() == 0:
        torch.save(moves, directory / "full_state_moves.pt")


def _wide_model() -> nn.Module:
    """A 1-D parameter of 4096 elements (the first bias, as a wide norm's weight):
    quantized by one process or DDP, kept full by FSDP2 (a 1-D DTensor shard)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 4096), nn.Tanh(), nn.Linear(4096, 4))


def _wide_sharded(model: nn.Module) -> nn.Module:
    """model under FSDP2, its gradients averaged over the ranks in every torch version."""
    fully_shard(model)
    if FSDP2_SUMS_OVER_GLOO:
        average_fsdp2_gradients(model)
    return model


def _wide_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))  # alike on every rank
    ((model(x) - 1) ** 2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def full_state_moves() -> dict[str, Any]:
    """torch's full-state route (set_optimizer_state_dict(full_state_dict=True)) between
    one process and FSDP2 and across state_precision, each receiver fresh: whether the
    loaded moments are the checkpoint's (converted as a load converts) and the next step
    is the one a one-process optimizer loaded with the same state takes."""
    options = StateDictOptions(full_state_dict=True)
    results: dict[str, Any] = {}
    for backend, flags in BACKENDS.items():
        plain = _wide_model()
        trained = core.AdamW(plain.parameters(), lr=1e-2, state_precision="8bit", **flags)
        for _ in range(3):
            _wide_step(plain, trained)
        checkpoint = get_optimizer_state_dict(plain, trained, options=options)
        bias_m = stored_moment(trained.state[plain[0].bias], "exp_avg", plain[0].bias)
        twin = copy.deepcopy(plain)  # the one-process reference: the same state, loaded
        twin_optimizer = core.AdamW(twin.parameters(), lr=1e-2, state_precision="8bit", **flags)
        twin_optimizer.load_state_dict(copy.deepcopy(trained.state_dict()))
        # one process (8-bit bias) -> FSDP2 (full bias), both state_precision="8bit"
        sharded = _wide_sharded(copy.deepcopy(plain))
        receiver = core.AdamW(sharded.parameters(), lr=1e-2, state_precision="8bit", **flags)
        set_optimizer_state_dict(sharded, receiver, copy.deepcopy(checkpoint), options=options)
        loaded = receiver.state[sharded[0].bias]
        results[f"{backend}: bias m dequantized"] = "exp_avg" in loaded and torch.equal(
            _full(loaded["exp_avg"]), bias_m
        )
        _wide_step(sharded, receiver)
        _wide_step(twin, twin_optimizer)
        results[f"{backend}: next step gap"] = max(
            float((_full(a) - b.detach()).abs().max())
            for a, b in zip(sharded.parameters(), twin.parameters(), strict=True)
        )
        # FSDP2 (full-precision state) -> FSDP2 with 8-bit state: the weights quantized
        source = _wide_sharded(_wide_model())
        full = core.AdamW(source.parameters(), lr=1e-2, **flags)
        for _ in range(3):
            _wide_step(source, full)
        whole = get_optimizer_state_dict(source, full, options=options)
        target = _wide_sharded(_wide_model())  # its parameters play no part here
        eight_bit = core.AdamW(target.parameters(), lr=1e-2, state_precision="8bit", **flags)
        set_optimizer_state_dict(target, eight_bit, copy.deepcopy(whole), options=options)
        weight = eight_bit.state[target[0].weight]
        want_codes, want_scales = quantize(_full(full.state[source[0].weight]["exp_avg"]), True)
        results[f"{backend}: weight m quantized"] = torch.equal(
            _full(weight["exp_avg_codes"]), want_codes
        ) and torch.equal(_full(weight["exp_avg_absmax"]), want_scales)
        # FSDP2 -> plain parameters on these ranks: refused (a rank may load alone, so
        # they cannot agree; one process takes it, tests/core/test_state_dict.py)
        back = _wide_model()
        back_optimizer = core.AdamW(back.parameters(), lr=1e-2, state_precision="8bit", **flags)
        sharded_checkpoint = get_optimizer_state_dict(sharded, receiver, options=options)
        try:
            set_optimizer_state_dict(back, back_optimizer, sharded_checkpoint, options=options)
            results[f"{backend}: plain receiver of several ranks refused"] = False
        except ValueError as error:
            results[f"{backend}: plain receiver of several ranks refused"] = (
                "convert the checkpoint in one process" in str(error)
            )
    # broadcast_from_rank0=True hands rank 0 alone the keys of the other form: refused on
    # every rank (before, rank 0 was refused and rank 1 loaded its own zeros)
    fresh = _wide_sharded(_wide_model())
    unloaded = core.AdamW(fresh.parameters(), lr=1e-2)  # full precision: the bias and all
    broadcast = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    given = copy.deepcopy(checkpoint) if dist.get_rank() == 0 else {}
    try:
        set_optimizer_state_dict(fresh, unloaded, given, options=broadcast)
        results["broadcast refused on every rank"] = False
    except ValueError as error:
        results["broadcast refused on every rank"] = "broadcast_from_rank0=True" in str(error)
    return results


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
