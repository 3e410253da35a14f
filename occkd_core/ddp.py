"""What training on several workers (DDP ranks) needs besides torch's own: distinct dropout masks per rank,
synchronised BatchNorm where torch offers it, and loss terms summed over the ranks."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def dropout_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of torch's global generator (dropout masks) for one rank's epoch of a stage seeded ``seed``."""
    # SeedSequence mixes its inputs, so (seed, rank 1) and (seed + 1, rank 0) do not share masks.
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def with_sync_batchnorm(model: torch.nn.Module, world: int, device: torch.device) -> torch.nn.Module:
    """BatchNorm layers as SyncBatchNorm when a node trains on several GPUs, so their statistics come from
    the global batch, as with one worker. PyTorch's SyncBatchNorm works with GPU modules only: on CPU workers
    (gloo; tests, logical-GPU clusters) BatchNorm keeps per-worker statistics."""
    if world > 1 and torch.device(device).type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def sum_over_ranks(sums: dict[str, float], world: int) -> dict[str, float]:
    """Each loss term's per-rank sum (already weighted by the ranks' shares of each batch) summed over the ranks."""
    if world == 1 or not sums:
        return sums
    names = sorted(sums)
    values = torch.tensor([sums[name] for name in names], dtype=torch.float64)
    dist.all_reduce(values)
    return {name: float(v) for name, v in zip(names, values)}
