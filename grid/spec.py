"""The grid one invocation runs (:class:`GridSpec`), resolved and checked once from the command line by
``grid/run_all.py`` and read by every driver-side module after it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from occkd_core.presets import Preset


@dataclass(frozen=True)
class GridSpec:
    """What one invocation runs, resolved and checked once from the command line."""

    tasks: tuple[str, ...]
    archs: tuple[str, ...]
    preset: Preset
    data_root: Path | None
    storage: Path  # absolute
    tracking_uri: str | None  # None: sqlite:///mlflow.db in the working directory (resolved in main)
    experiment: str
    ray_address: str | None
    cluster_config: Path | None  # the autoscaler's node types (cluster-launcher YAML), when known
    seeds: int
    weights: Mapping[str, str]  # pre-trained weights name -> the file as given
    from_scratch: bool
    max_failures: int
    ray_train: str
    dry_run: bool
    # "auto": the searcher chooses GPU training nodes' DDP workers (grid.ddp_workers); "preset": the preset's
    ddp_workers: str = "auto"
    wait: bool = False  # another grid holds the storage: wait for it rather than stop
