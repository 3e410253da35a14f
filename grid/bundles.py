"""What a node holds while it runs, as Ray resource bundles: its Tune trial's, and its Ray Train workers'
if it trains through Train. Read on the driver (the searcher's packing, Tune's trial resources) and in the
trial (where its workers are placed), so it imports nothing that only the driver has (no MLflow).
"""

from __future__ import annotations

from typing import Any, Mapping

from ray import tune

#: Ray's marker resource of the head node.
HEAD = "node:__internal_head__"
#: What the trial of a node run through Ray Train holds itself: no CPU, only a sliver of the head node's
#: marker resource, so it runs on the head and every CPU and GPU stays for Train's workers. With trial
#: drivers holding 0.5 CPU each, Train worker groups on a 2-core machine could not be placed; with 0.01 CPU
#: on a GPU worker the node was left short of a whole CPU for its worker group, and with 0.01 CPU on a
#: 1-CPU head a CPU-only worker group could never go there (both seen on the local autoscaling cluster).
TRAIN_DRIVER = {HEAD: 0.001}


def trial_resources(config: dict[str, Any]) -> tune.PlacementGroupFactory:
    """A node run in its trial holds its CPUs/GPU in the trial itself; a Train node's trial holds only
    ``TRAIN_DRIVER`` (on the head, no CPU) and its TorchTrainer asks for the workers."""
    if uses_train(config):
        return tune.PlacementGroupFactory([dict(TRAIN_DRIVER)])
    return tune.PlacementGroupFactory(node_bundles(config["node"], config["settings"]["ray_train"]))


def node_bundles(node: Mapping[str, Any], ray_train: str, machine_gpus: float = 0.0) -> list[dict[str, float]]:
    """Every resource bundle a node holds while it runs: its trial's, and its Train workers' if any. GPU
    workers that fit one machine (``machine_gpus``) are placed together there (:func:`worker_placement`),
    so they count as one bundle of their sum."""
    res = node["resources"]
    bundle = {"CPU": float(res["cpus"]), **({"GPU": float(res["gpus"])} if res["gpus"] else {})}
    if uses_ray_train(node, ray_train):
        workers = int(res["workers"])
        if worker_placement(res, machine_gpus) == "STRICT_PACK":
            return [dict(TRAIN_DRIVER), {k: v * workers for k, v in bundle.items()}]
        return [dict(TRAIN_DRIVER)] + [dict(bundle) for _ in range(workers)]
    return [bundle]


def worker_placement(resources: Mapping[str, Any], machine_gpus: float) -> str:
    """Ray's placement strategy for a node's Train workers: several GPU workers that fit one machine stay on
    it (``STRICT_PACK``: DDP's all-reduce over NVLink, not the network); otherwise ``PACK`` (as few machines
    as Ray can, e.g. a preset that fixes more workers than a machine has GPUs)."""
    total = float(resources["gpus"]) * int(resources["workers"])
    return "STRICT_PACK" if int(resources["workers"]) > 1 and 0 < total <= machine_gpus else "PACK"


def uses_ray_train(node: Mapping[str, Any], ray_train: str) -> bool:
    """Whether a node (as a dict) runs its loop as Ray Train workers under a resolved ``ray_train`` mode."""
    return node["kind"] == "train" and (node["resources"]["workers"] > 1 or ray_train == "always")


def uses_train(config: dict[str, Any]) -> bool:
    """Whether a trial's config (its node and the run settings) runs the node as Ray Train workers."""
    return uses_ray_train(config["node"], config["settings"]["ray_train"])

