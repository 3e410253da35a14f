"""The driver's plan for the cluster: the preset's resource requests fitted to what the cluster (or this
machine) has and its autoscaler may add, whether training nodes run as Ray Train workers there, and the
lines the grid prints about it first. The model of the cluster itself is :mod:`grid.capacity`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from grid.graph import StageGraph, default_resources
from grid.spec import GridSpec


@dataclass(frozen=True)
class ClusterPlan:
    """The graph with its requests fitted to the cluster, and how training nodes will run there."""

    graph: StageGraph
    shape: Any  # grid.capacity.ClusterShape
    node_types: Mapping[str, Any] | None
    ray_train: str  # resolved: "always" or "multi-worker-only"
    lines: tuple[str, ...]  # what the grid says about the cluster in its first lines


def cluster_now(spec: GridSpec, *, connect: bool) -> tuple[dict[str, float], Any, Mapping[str, Any] | None]:
    """The cluster's resources now, its shape (grid.capacity.ClusterShape) and the autoscaler's node types from
    --cluster-config: the Ray cluster the driver is connected to, or this machine as a local Ray would see it."""
    from grid.capacity import cluster_shape, live_nodes, read_node_types

    node_types = read_node_types(spec.cluster_config) if spec.cluster_config else None
    if connect:
        import ray

        now, live = ray.cluster_resources(), live_nodes()
    else:
        import torch

        now = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
        live = [now]
    return now, cluster_shape(now, live, node_types), node_types


def fit_preset_resources(spec: GridSpec, shape: Any) -> dict[str, Any]:
    """Each ``resources:`` entry of the preset (an architecture of this run, fusion, significance) fitted to
    ``shape``; ValueError naming the entry and its values for a request no node or node type can ever hold."""
    from grid.capacity import fit_resources

    fits = {}
    for owner, request in default_resources(spec.preset, spec.archs).items():
        try:
            fits[owner] = fit_resources(request, shape)
        except ValueError as err:
            raise ValueError(f"preset {spec.preset.name!r}: resources.{owner} (cpus: {request.cpus:g}, gpus: "
                             f"{request.gpus:g}) cannot run here: {err}") from None
    return fits


def plan_cluster(spec: GridSpec, graph: StageGraph, *, connect: bool) -> ClusterPlan:
    """Fit every node's request to the cluster (``connect``: the Ray cluster the driver is connected to;
    else this machine as a local Ray would see it) and the autoscaler's node types from --cluster-config.
    ValueError for a request no node or node type can ever hold."""
    from grid.capacity import resolve_ray_train

    now, shape, node_types = cluster_now(spec, connect=connect)
    wanted = default_resources(spec.preset, spec.archs)
    fits = fit_preset_resources(spec, shape)
    fitted = graph.with_resources({k: fits[n.arch if n.kind == "train" else n.kind] for k, n in graph.nodes.items()})
    ray_train = resolve_ray_train(spec.ray_train, shape)
    can_add = (f" (the autoscaler may grow it to {shape.potential['CPU']:g} CPUs, {shape.potential['GPU']:g} GPUs)"
               if node_types else "")
    where = {"always": "as Ray Train workers",
             "multi-worker-only": "inside their trials (multi-worker nodes: Ray Train)"}
    lines = [f"{'running on Ray' if connect else 'planned for this machine'}: {now.get('CPU', 0):g} CPUs, "
             f"{now.get('GPU', 0):g} GPUs{can_add}; training nodes run {where[ray_train]}"]
    if any(r.gpus for r in wanted.values()) and not shape.can_have_gpus:
        lines.append("no GPU in the cluster and no autoscaler node type with GPUs"
                     + (f" in {spec.cluster_config}" if spec.cluster_config else " known (see --cluster-config)")
                     + ": GPU requests dropped, training on CPUs")
    # CPU requests are capped rather than refused: a preset written for a cluster's nodes (paper, mid: 4-8 CPUs)
    # still runs on a smaller machine; this says so, naming the preset's value, instead of ignoring it.
    for owner, request in wanted.items():
        if fits[owner].cpus < request.cpus and owner in spec.preset.resources:
            lines.append(f"resources.{owner}.cpus: {request.cpus:g} is more than any node has: its nodes ask for "
                         f"{fits[owner].cpus:g} CPUs (the largest node's)")
    machine_gpus = max((n.get("GPU", 0.0) for n in shape.nodes), default=0.0)
    if spec.ddp_workers == "auto" and machine_gpus >= 2 and any(n.resources.gpus for n in fitted.nodes.values()):
        lines.append(f"DDP workers: each GPU training node gets 1 to {machine_gpus:g} (one GPU each) as it starts, "
                     "more for the chains that bound the makespan (--ddp-workers preset: the preset's workers)")
    return ClusterPlan(graph=fitted, shape=shape, node_types=node_types, ray_train=ray_train, lines=tuple(lines))
