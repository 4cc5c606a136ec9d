"""Composer tests train tiny models: one thread avoids contention on a shared 2-core machine."""

import torch

torch.set_num_threads(1)
