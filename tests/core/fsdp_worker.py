"""Worker for test_distributed.py: trains FSDP2-sharded (DTensor) models with every core
optimizer on this rank's half of each global batch and saves the full parameters."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from tests.core.distributed_cases import GLOBAL_BATCHES, OPTIMIZERS, make_model


def main(output: str, backend_flags: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    foreach = backend_flags == "foreach"
    results = {}
    for name, make_optimizer in OPTIMIZERS.items():
        model = make_model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        optimizer = make_optimizer(model.parameters(), foreach=foreach)
        for x, y in GLOBAL_BATCHES:
            local = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
            nn.functional.mse_loss(model(x[local]), y[local]).backward()
            optimizer.step()
            optimizer.zero_grad()
        results[name] = [p.full_tensor().detach().clone() for p in model.parameters()]
    if rank == 0:
        torch.save(results, output)
    dist.barrier()  # neither rank tears gloo down while the other still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
