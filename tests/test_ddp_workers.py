"""How the grid chooses a GPU node's number of DDP workers, without starting Ray."""

import math

import pytest
import yaml

from grid.graph import Resources, default_resources, expand_graph
from grid.searcher import DependencySearcher, RunSettings
from grid.bundles import HEAD, node_bundles, worker_placement
from grid.capacity import ClusterCapacity
from grid.ddp_workers import (
    EFFICIENCY_AT_8, WorkersPolicy, choose_workers, describe_choice, scaling_efficiency, speedup,
    worker_counts_for_batch,
)
from occkd_core.models import ARCHITECTURES
from occkd_core.presets import PRESET_DIR, load_preset
from occkd_core.tasks import TASKS


def test_scaling_efficiency_interpolates_geometrically_between_one_and_eight_gpus():
    assert scaling_efficiency(0.64, 1) == 1.0
    assert scaling_efficiency(0.64, 8) == pytest.approx(0.64)
    # Each doubling costs the same factor: 0.64 ** (1/3) = 0.8618...
    assert scaling_efficiency(0.64, 2) == pytest.approx(0.64 ** (1 / 3))
    assert scaling_efficiency(0.64, 4) == pytest.approx(0.64 ** (2 / 3))
    assert speedup(0.64, 8) == pytest.approx(5.12)
    assert all(0 < e <= 1 for e in EFFICIENCY_AT_8.values())


@pytest.mark.parametrize("batch, counts", [(16, [1, 2, 4]), (64, [1, 2, 4, 8, 16]), (512, [1, 2, 4, 8, 16, 32, 64, 128]),
                                           (6, [1]), (24, [1, 2, 4]), (3, [1])])
def test_worker_counts_split_the_global_batch_evenly_into_at_least_four_images(batch, counts):
    assert worker_counts_for_batch(batch) == counts


def test_the_rule_gives_a_long_chain_the_fewest_workers_that_bring_it_within_the_target():
    # Efficiency 0.64 at 8: speed-ups 1, 1.72, 2.95, 5.12.
    common = dict(efficiency_at_8=0.64, batch_size=64)
    assert choose_workers(chain=40, target=49, **common).workers == 1  # within the target already
    assert choose_workers(chain=80, target=49, **common).workers == 2  # 80 / 1.72 = 46.4
    assert choose_workers(chain=140, target=49, **common).workers == 4  # 140 / 2.95 = 47.5
    assert choose_workers(chain=240, target=49, **common).workers == 8  # 240 / 5.12 = 46.9
    assert choose_workers(chain=900, target=49, **common).workers == 8  # no count is enough: the most
    # Never more than is free on one machine, nor than the preset or the batch allow.
    assert choose_workers(chain=240, target=49, free_workers=5, **common).workers == 4
    assert choose_workers(chain=240, target=49, max_ddp_workers=2, **common).workers == 2
    assert choose_workers(chain=240, target=49, efficiency_at_8=0.8, batch_size=16).workers == 4  # ResNet-50's batch
    assert choose_workers(chain=240, target=49, free_workers=0, **common) is None  # wait for a GPU
    # A preset that fixes the worker count gets it, and waits for it.
    assert choose_workers(chain=1, target=49, min_ddp_workers=2, max_ddp_workers=2, **common).workers == 2
    assert choose_workers(chain=1, target=49, min_ddp_workers=2, max_ddp_workers=2, free_workers=1, **common) is None
    choice = choose_workers(chain=240, target=49, **common)
    assert choice.allowed == (1, 2, 4, 8) and choice.chain == 240 and choice.target == 49


def test_preset_resources_fix_or_cap_the_workers(tmp_path):
    policy = WorkersPolicy(machine_gpus=8)
    assert policy.bounds(workers=1, max_ddp_workers=0) == (1, 8)  # neither key: up to one machine
    assert policy.bounds(workers=1, max_ddp_workers=4) == (1, 4)  # max_ddp_workers caps
    assert policy.bounds(workers=1, max_ddp_workers=16) == (1, 8)  # never across machines by choice
    assert policy.bounds(workers=2, max_ddp_workers=2) == (2, 2)  # workers alone fixes it
    assert policy.bounds(workers=16, max_ddp_workers=16) == (16, 16)  # a preset may ask for cross-machine DDP
    preset_file = tmp_path / "p.yaml"
    raw = yaml.safe_load((PRESET_DIR / "smoke.yaml").read_text())
    raw["resources"] = {"vggf": {"cpus": 1, "gpus": 1, "max_ddp_workers": 4}, "vggface": {"cpus": 1, "gpus": 1, "workers": 2},
                        "resnet50": {"cpus": 1, "gpus": 1}}
    preset_file.write_text(yaml.safe_dump(raw))
    res = default_resources(load_preset(preset_file), ARCHITECTURES)
    assert res["vggf"] == Resources(cpus=1, gpus=1, workers=1, max_ddp_workers=4)
    assert res["vggface"] == Resources(cpus=1, gpus=1, workers=2, max_ddp_workers=2)
    assert res["resnet50"] == Resources(cpus=1, gpus=1, workers=1, max_ddp_workers=0)
    raw["resources"] = {"vggf": {"workers": 4, "max_ddp_workers": 2}}
    preset_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="max_ddp_workers .2. is below workers .4."):
        load_preset(preset_file)


def test_gpu_workers_that_fit_one_machine_are_packed_on_it():
    wide = {"kind": "train", "resources": {"cpus": 8, "gpus": 1, "workers": 4}}
    assert worker_placement(wide["resources"], machine_gpus=8) == "STRICT_PACK"
    assert node_bundles(wide, "always", machine_gpus=8) == [{"node:__internal_head__": 0.001}, {"CPU": 32.0, "GPU": 4.0}]
    assert worker_placement(wide["resources"], machine_gpus=2) == "PACK"  # more than a machine: spread
    assert len(node_bundles(wide, "always", machine_gpus=2)) == 5
    cpu_only = {"cpus": 1, "gpus": 0, "workers": 2}
    assert worker_placement(cpu_only, machine_gpus=8) == "PACK"


def paper_searcher(machines: int, live: list | None = None):
    preset = load_preset("paper")
    graph = expand_graph(preset, TASKS, ARCHITECTURES, train_sizes={"fer": 113066, "gender": 14213, "age": 14213},
                         data_fingerprints={t: "d" for t in TASKS}, resources=default_resources(preset, ARCHITECTURES),
                         from_scratch=True)
    nodes = live if live is not None else [{"CPU": 64.0, "GPU": 8.0} for _ in range(machines)]
    nodes[0][HEAD] = 1.0  # where Train nodes' trial drivers go
    capacity = ClusterCapacity(read_nodes=lambda: nodes, refresh_s=0.0)
    settings = RunSettings(storage="/s", data_paths={}, ray_train="always", machine_gpus=8.0)
    return graph, DependencySearcher(graph, list(graph.nodes), set(), settings, capacity=capacity,
                                     workers_policy=WorkersPolicy(machine_gpus=8))


def test_the_searcher_gives_the_critical_chain_more_workers_and_the_rest_one_gpu():
    graph, searcher = paper_searcher(machines=4)
    handed = {}
    for i in range(9):  # the nine teachers, longest chain first
        config = searcher.suggest(f"t{i}")
        handed[config["node"]["key"]] = config
    first = handed["fer/vggface/teacher"]
    assert list(handed)[0] == "fer/vggface/teacher"
    assert first["node"]["resources"]["workers"] == 8 and first["node"]["resources"]["gpus"] == 1.0
    choice = searcher.workers_choices["fer/vggface/teacher"]
    assert choice.workers == 8 and choice.chain > choice.target
    # The driver keeps why; the trial's config carries only the node (its resources say how many workers).
    assert set(first) == {"node", "parents", "settings"}
    assert searcher.workers_note("fer/vggface/teacher") == describe_choice(choice)
    assert searcher.workers_note("fer/vggface/teacher").startswith("8 (its chain ")
    # Same experiment at any worker count: the hash is the graph's.
    assert first["node"]["hash"] == graph.nodes["fer/vggface/teacher"].hash
    # ResNet-50's batch of 16 allows 4 at most.
    assert handed["fer/resnet50/teacher"]["node"]["resources"]["workers"] <= 4
    counts = {k: c["node"]["resources"]["workers"] for k, c in handed.items()}
    assert sum(1 for w in counts.values() if w > 1) >= 2 and 1 in counts.values(), counts
    # Short chains keep the preset's own request (half a GPU for VGG-f).
    narrow = [c for c in handed.values() if c["node"]["resources"]["workers"] == 1]
    assert all(c["node"]["resources"] == graph.nodes[c["node"]["key"]].resources.as_dict() for c in narrow)
    # Everything handed out fits the 32 GPUs, each wide node on one machine.
    assert sum(c["node"]["resources"]["gpus"] * c["node"]["resources"]["workers"] for c in handed.values()) <= 32


def test_the_workers_never_exceed_the_gpus_free_on_one_machine():
    # 33 GPUs in all, so the longest chain wants 8 (as on 4 x 8), but no machine has more than 3.
    _, searcher = paper_searcher(machines=0, live=[{"CPU": 64.0, "GPU": 3.0} for _ in range(11)])
    config = searcher.suggest("t0")
    assert config["node"]["key"] == "fer/vggface/teacher"
    assert config["node"]["resources"]["workers"] == 2  # 3 free on one machine: the power of two below
    assert searcher.workers_choices["fer/vggface/teacher"].allowed == (1, 2, 4, 8)


def test_a_cpu_only_cluster_keeps_the_presets_workers():
    preset = load_preset("smoke")
    graph = expand_graph(preset, ["gender"], ["vggf"], train_sizes={"gender": 100}, data_fingerprints={"gender": "d"},
                         from_scratch=True)
    capacity = ClusterCapacity(read_nodes=lambda: [{"CPU": 8.0}], refresh_s=0.0)
    searcher = DependencySearcher(graph, list(graph.nodes), set(), RunSettings(storage="/s", data_paths={}),
                                  capacity=capacity, workers_policy=WorkersPolicy(machine_gpus=8))
    config = searcher.suggest("t0")
    assert config["node"]["resources"]["workers"] == 1 and not searcher.workers_choices
    assert searcher.workers_note(config["node"]["key"]) == "1 (the preset's)"
    assert math.isclose(config["node"]["resources"]["gpus"], 0.0)


def test_the_capacity_model_places_like_ray_and_never_moves_a_placed_node():
    """Ray spreads one-GPU placement groups over machines (ten on four empty 8-GPU machines land 3, 3, 2, 2,
    measured with Ray 2.60), so after them no machine has 8 GPUs free; the model must agree, and must not
    re-pack running nodes when one ends (that promised 8-GPU machines Ray did not have)."""
    machines = [{"CPU": 64.0, "GPU": 8.0, "NodeID": f"n{i}"} for i in range(4)]
    capacity = ClusterCapacity(read_nodes=lambda: machines, refresh_s=0.0)
    one_gpu = [{"CPU": 8.0, "GPU": 1.0}]
    assert all(capacity.place(f"small{i}", one_gpu) for i in range(10))
    assert sorted(8 - m["GPU"] for m in capacity.free()) == [2, 2, 3, 3]
    assert not capacity.place("wide", [{"CPU": 64.0, "GPU": 8.0}])
    before = [dict(m) for m in capacity.free()]
    capacity.release("small0")
    after = capacity.free()
    assert sum(a["GPU"] - b["GPU"] for a, b in zip(after, before)) == 1  # one machine got its GPU back ...
    assert sum(1 for a, b in zip(after, before) if a != b) == 1  # ... and nothing else moved
    # A machine that is lost takes its nodes' bundles elsewhere where there is room (Train restarts them there).
    machines.pop(0)
    assert sum(8 - m["GPU"] for m in capacity.free()) == 9
