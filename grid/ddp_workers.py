"""How many DDP workers (one GPU each) a GPU training node gets, chosen when the searcher hands it out.

(Not the networks' channel width multiplier, ``width_mult``, which is part of a node's identity.)

A grid's makespan is at least max(GPU work ÷ GPUs, critical path). On the paper grid with one GPU per node
the critical path wins by far (RESULTS.md §3: FER VGG-face teacher → student → KD is ~5× the work
bound on 4 × 8 GPUs), so most GPUs idle while that chain trains. Giving the chain's nodes several workers
shortens it; giving every node several would only waste GPUs on DDP's overhead. The rule:

- ``target`` = the GPU work still to do ÷ the cluster's GPUs: the makespan the rest of the grid cannot beat.
- A node whose remaining chain (its cost plus the costliest chain below it, at one worker) is longer than
  ``target`` gets the fewest workers whose speed-up brings the chain within it, so chains stop being the
  bound; every other node gets one. As the grid drains, ``target`` falls and the chains still left get
  more workers: GPUs that would idle go to the work that decides the makespan.
- Worker counts are powers of two, at most the GPUs one machine has free (DDP stays inside a machine, where
  NVLink makes all-reduce cheap; a preset that fixes ``workers`` above that asks for cross-machine DDP),
  at most the preset's ``max_ddp_workers`` for the architecture, and they must split the stage's batch into
  per-worker batches of at least :data:`MIN_BATCH_PER_WORKER` images (the global batch is the papers').

The worker count never changes what a node computes (the global batch, its rows and flips, SyncBatchNorm:
``occkd_core.training``), only how long it takes, so it is not part of a node's hash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Scaling efficiency at 8 GPUs in one machine (speed-up ÷ 8) assumed per architecture; between 1 and 8
#: GPUs it is interpolated geometrically (efficiency(w) = e8 ** (log2(w) / 3)), so each doubling costs the
#: same factor. Why these values: published data-parallel scaling of these families, on 8 GPUs with
#: NVLink, is near-linear for ResNet-50 (~90 %, weak scaling) and clearly worse for VGG-16 (~70 %), whose
#: 138 M parameters, 90 % of them in the fully connected layers, make every step's all-reduce large
#: (Sergeev & Del Balso 2018, Horovod, fig. 6; Li et al. 2020, PyTorch DDP). VGG-f is AlexNet-shaped
#: (61 M parameters, little compute per image): the worst ratio of communication to compute
#: (Krizhevsky 2014, "One weird trick"). Those figures are weak scaling (a fixed batch per GPU); the grid
#: keeps the papers' global batch, so each GPU's batch shrinks with the workers and efficiency is lower
#: still. The values are therefore set below the published ones; ``benchmarks/bench_scheduling.py``
#: also reports the schedule with them halved at 8 GPUs. Measure them on your GPUs and pass your own
#: (``WorkersPolicy(efficiency_at_8=...)``) when they differ.
#: The values live on each architecture's registry entry (``ArchInfo.ddp_efficiency_at_8``), so that a new network
#: brings its own; this reads them.
def efficiency_table() -> dict[str, float]:
    from occkd_core.models import ARCHITECTURES

    return {name: arch.ddp_efficiency_at_8 for name, arch in ARCHITECTURES.items()}


EFFICIENCY_AT_8 = efficiency_table()  # the built-in networks' (at import: before any plugin registers)
#: Fewest images a worker's batch may hold: below it a GPU step is mostly all-reduce and launch overhead,
#: and BatchNorm statistics (synchronised, but computed per worker first) come from very few images.
MIN_BATCH_PER_WORKER = 4


def scaling_efficiency(efficiency_at_8: float, workers: int) -> float:
    """Speed-up ÷ workers at ``workers`` DDP workers, from the efficiency at 8 (1.0 at one worker)."""
    return efficiency_at_8 ** (math.log2(workers) / 3) if workers > 1 else 1.0


def speedup(efficiency_at_8: float, workers: int) -> float:
    """How many times faster a node trains with ``workers`` DDP workers than with one."""
    return workers * scaling_efficiency(efficiency_at_8, workers)


def worker_counts_for_batch(batch_size: int, min_per_worker: int = MIN_BATCH_PER_WORKER) -> list[int]:
    """Powers of two that split ``batch_size`` into equal per-worker batches of ``min_per_worker`` or more."""
    counts, workers = [], 1
    while batch_size % workers == 0 and batch_size // workers >= min(min_per_worker, batch_size):
        counts.append(workers)
        workers *= 2
    return counts


@dataclass(frozen=True)
class WorkersChoice:
    """The inputs the rule sees for one node, and so the record of why it got its worker count."""

    chain: float  # the node's remaining chain at one worker, in cost units
    target: float  # GPU work left ÷ GPUs, in cost units
    allowed: tuple[int, ...]  # worker counts within the batch, preset and machine bounds
    workers: int


def choose_workers(*, chain: float, target: float, efficiency_at_8: float, batch_size: int,
                   min_ddp_workers: int = 1, max_ddp_workers: int = 8, free_workers: int = 8) -> WorkersChoice | None:
    """The DDP worker count of one node, or None when even ``min_ddp_workers`` does not fit ``free_workers``
    (wait for GPUs).

    ``min_ddp_workers`` / ``max_ddp_workers``: the preset's bounds (equal when it fixes ``workers``);
    ``max_ddp_workers`` already includes one machine's GPUs. ``free_workers``: the most workers (a GPU each)
    one machine has room for now.
    """
    allowed = tuple(w for w in worker_counts_for_batch(batch_size) if min_ddp_workers <= w <= max_ddp_workers)
    if min_ddp_workers > 1 and min_ddp_workers not in allowed:
        allowed = (min_ddp_workers,)  # a count fixed outside the rule: the preset's word (training checks the batch)
    if not allowed:
        allowed = (1,)
    fitting = [w for w in allowed if w <= free_workers]
    if not fitting:
        return None
    # Fewest workers whose speed-up brings the chain within the target; else the most that fit now.
    enough = [w for w in fitting if chain / speedup(efficiency_at_8, w) <= target * (1 + 1e-9)]
    workers = enough[0] if enough else fitting[-1]
    return WorkersChoice(chain=chain, target=target, allowed=allowed, workers=workers)


@dataclass(frozen=True)
class WorkersPolicy:
    """The grid's DDP worker rule with its settings: per-architecture scaling efficiency at 8 GPUs and the
    GPUs of the largest machine (a node never gets more workers than that unless a preset fixes ``workers``
    above it)."""

    machine_gpus: int = 8
    efficiency_at_8: tuple[tuple[str, float], ...] = ()  # () = each architecture's registry entry

    def efficiency(self, arch: str) -> float:
        table = dict(self.efficiency_at_8) or efficiency_table()
        return table.get(arch, min(table.values()))

    def bounds(self, workers: int, max_ddp_workers: int) -> tuple[int, int]:
        """(min, max) DDP workers from a node's resources: ``max_ddp_workers`` 0 = up to one machine's GPUs."""
        if max_ddp_workers == 0:
            return workers, max(workers, self.machine_gpus)
        if max_ddp_workers <= workers:
            return workers, workers  # fixed by the preset
        return workers, min(max_ddp_workers, self.machine_gpus)

    def choose(self, *, arch: str, workers: int, max_ddp_workers: int, batch_size: int, chain: float,
               target: float, free_workers: int) -> WorkersChoice | None:
        low, high = self.bounds(workers, max_ddp_workers)
        return choose_workers(chain=chain, target=target, efficiency_at_8=self.efficiency(arch),
                              batch_size=batch_size, min_ddp_workers=low, max_ddp_workers=high,
                              free_workers=free_workers)


def describe_choice(choice: WorkersChoice) -> str:
    """One line saying why a node got its DDP worker count (an MLflow tag)."""
    allowed = ",".join(str(w) for w in choice.allowed)
    ratio = choice.chain / choice.target if choice.target > 0 else float("inf")
    return f"{choice.workers} (its chain {ratio:.2g}x the GPU work left per GPU; worker counts allowed {allowed})"
