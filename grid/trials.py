"""What runs inside a Ray trial: the Tune trainable that runs one node, and the Ray Train worker loop.

:func:`run_node_trial` is the Tune trainable. On a cluster that has or can add GPUs every training node
runs its loop as a Ray Train ``TorchTrainer`` worker group (DDP, Train's checkpoints and worker-group
restarts); on a CPU-only cluster a one-worker node trains inside its trial process, which already holds
the node's CPUs (a Train worker group costs 18-30 s to start on a small machine, more than a smoke node
trains). :func:`grid.capacity.resolve_ray_train` states the rule.

Imported by Ray workers: it must not import what only the driver needs (MLflow, the searcher).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ray import tune

from grid.artifacts import StorageLayout
from grid.bundles import uses_train, worker_placement
from grid.code import CODE_ROOT, check_same_code
from occkd_core.plugins import load_plugins
from grid.ddp_backend import DeviceTorchConfig
from grid.faults import maybe_inject_fault
from grid.graph import Node

if TYPE_CHECKING:
    from grid.nodes import ParentOutput


def run_node_trial(config: dict[str, Any]) -> None:
    """Tune trainable: run one node and report its epochs; the sealed result stays on storage."""
    started_at = time.time()
    import torch

    from grid import nodes

    node, settings = Node.from_dict(config["node"]), config["settings"]
    check_same_code(settings.get("code", ""), f"the trial of {node.key}")
    load_plugins(settings.get("plugins", ()))
    storage = Path(settings["storage"])
    parents = _parent_outputs(config)
    data_path = Path(settings["data_paths"][node.task])
    maybe_inject_fault(node, settings, storage)
    if node.kind == "train" and uses_train(config):
        _run_with_torch_trainer({**config, "trial_started_at": started_at})
    elif node.kind == "train":
        torch.set_num_threads(max(1, int(node.resources.cpus)))
        import ray

        device = torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
        nodes.run_train_node(node, storage, data_path, parents, device=device, report=tune.report,
                             pretrained=_pretrained_file(node), started_at=started_at,
                             placement=_placement(device, workers=1, ray_train=False))
    elif node.kind == "fusion":  # one SVM fit per CPU the node holds (each fit is single-threaded)
        nodes.run_fusion_node(node, storage, data_path, parents, started_at=started_at,
                              jobs=max(1, int(node.resources.cpus)))
    else:
        nodes.run_significance_node(node, storage, data_path, parents, started_at=started_at)
    tune.report({"event": "done"})


def _train_worker_loop(config: dict[str, Any]) -> None:
    """Body of each Ray Train worker: the same node code, DDP set up by TorchTrainer."""
    import ray.train
    import ray.train.torch
    import torch

    from grid import nodes

    node, settings = Node.from_dict(config["node"]), config["settings"]
    check_same_code(settings.get("code", ""), f"a Ray Train worker of {node.key}")
    load_plugins(settings.get("plugins", ()))
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(max(1, int(node.resources.cpus)))
    storage = Path(settings["storage"])
    # Train's checkpoint of a node is a pointer to its last.pt on the shared storage, where the training
    # loop keeps it (copying hundreds of MB into Train's own storage every epoch would buy nothing). After a
    # lost worker, Train restarts the group, get_checkpoint() says from which epoch, and train_stage
    # resumes from that last.pt.
    restored = ray.train.get_checkpoint()
    resumed_from = None
    if restored is not None:
        with restored.as_directory() as folder:
            resumed_from = json.loads((Path(folder) / "progress.json").read_text())["epoch"]

    def report(metrics: dict[str, Any]) -> None:
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "progress.json").write_text(json.dumps(
                {"node": node.key, "epoch": metrics.get("epoch"),
                 "last_checkpoint": str(StorageLayout(storage).checkpoint(node.hash, "last"))}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    # Train hands out cuda:N for every GPU Ray assigned, even where CUDA is absent (logical GPUs).
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    placement = _placement(device, workers=context.get_world_size(), ray_train=True)
    nodes.run_train_node(node, storage, Path(settings["data_paths"][node.task]), _parent_outputs(config),
                         device=device, report=report, pretrained=_pretrained_file(node),
                         is_writer=rank == 0, started_at=config.get("trial_started_at"),
                         placement={**placement, "resumed_from_epoch": resumed_from})


def _placement(device: Any, *, workers: int, ray_train: bool) -> dict[str, Any]:
    """Where a training node ran, as only the trial knows it, for its record: the Ray node, the GPUs Ray gave
    it (logical ids: a fake or CPU-only cluster hands out GPU ids without CUDA), the torch device, the workers
    actually started, whether Ray Train ran it and the code it imported. Why it got that many workers is the
    driver's to record (grid.searcher.DependencySearcher.workers_note), where the choice was made."""
    import ray

    return {"ray_node": ray.get_runtime_context().get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "device": str(device), "workers": workers, "ray_train": ray_train, "code_root": str(CODE_ROOT)}


def _pretrained_file(node: Node) -> Path | None:
    """A teacher's starting weights file, or None (from scratch, or not a teacher)."""
    path = node.init.get("file")
    return Path(path) if path else None


def _parent_outputs(config: Mapping[str, Any]) -> list[ParentOutput]:
    from grid.nodes import ParentOutput  # noqa: F811 (imported here: the driver never needs grid.nodes)

    return [ParentOutput(role=p["role"], key=p["key"], arch=p["arch"], directory=Path(p["directory"]))
            for p in config["parents"]]


def _run_with_torch_trainer(config: dict[str, Any]) -> None:
    """The node's training loop as a Ray Train worker group: DDP (NCCL with GPUs, gloo without), Train's
    checkpoints, and a group that Train restarts (up to ``train_max_failures`` times) when a worker dies."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res, settings = config["node"]["resources"], config["settings"]
    per_worker = {"CPU": float(res["cpus"])}
    if res["gpus"]:
        per_worker["GPU"] = float(res["gpus"])
    trainer = TorchTrainer(
        _train_worker_loop,
        train_loop_config=config,
        torch_config=DeviceTorchConfig(),
        scaling_config=ScalingConfig(num_workers=int(res["workers"]), use_gpu=bool(res["gpus"]),
                                     resources_per_worker=per_worker,
                                     placement_strategy=worker_placement(res, float(settings.get("machine_gpus", 0)))),
        run_config=RunConfig(name=f"train-{config['node']['hash']}",
                             storage_path=str(StorageLayout(Path(settings["storage"])).ray_train),
                             failure_config=FailureConfig(max_failures=int(settings.get("train_max_failures", 2))),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()
