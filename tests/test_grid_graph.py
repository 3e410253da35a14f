"""The stage graph, resource sizing, --dry-run and cluster.yaml, without starting Ray."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from grid.graph import Edge, Node, Resources, expand_graph
from grid.bundles import node_bundles
from grid.capacity import (
    ClusterCapacity, cluster_shape, fit_resources, max_concurrency, read_node_types, resolve_ray_train,
)
from grid.searcher import DependencySearcher, RunSettings
from occkd_core.presets import load_preset
from occkd_core.models import ARCHITECTURES
from occkd_core.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]


def full_graph(preset_name: str):
    preset = load_preset(preset_name)
    return expand_graph(preset, TASKS, ARCHITECTURES, train_sizes={t: 1000 for t in TASKS},
                        data_fingerprints={t: "data" for t in TASKS}, from_scratch=True)


@pytest.mark.parametrize("preset_name, margins", [("smoke", 2), ("paper", 6)])
def test_node_counts_for_all_tasks_and_architectures(preset_name, margins):
    graph = full_graph(preset_name)
    counts = {}
    for node in graph.nodes.values():
        counts[node.stage] = counts.get(node.stage, 0) + 1
    cells = len(TASKS) * len(ARCHITECTURES)  # 9 task × architecture cells
    assert counts == {"teacher": cells, "student": cells, "student_ablation": cells, "standard_kd": cells,
                      "triplet_kd": cells * margins, "fusion": cells, "significance": len(TASKS),
                      # one teacher-free control per distilled stage: the margins are teacher settings
                      "standard_kd_control": cells, "triplet_kd_control": cells}


def test_mid_preset_expands_every_stage_with_its_kd_grids():
    """mid: 64 px networks at full channel width from scratch; standard KD with and without τ² where it is
    Hinton's (FER+: the gender/age hint reads no τ², so there it is one node), two triplet margins, a control
    for each."""
    preset = load_preset("mid")
    assert all(preset.arch(a).input_size == 64 and preset.arch(a).width_mult == 1.0 for a in ARCHITECTURES)
    assert preset.required_weights(list(TASKS), list(ARCHITECTURES)) == {}
    graph = full_graph("mid")
    counts = {}
    for node in graph.nodes.values():
        counts[node.stage] = counts.get(node.stage, 0) + 1
    cells = len(TASKS) * len(ARCHITECTURES)
    fer_cells = len(ARCHITECTURES)
    assert counts == {"teacher": cells, "student": cells, "student_ablation": cells,
                      "standard_kd": cells + fer_cells, "triplet_kd": cells * 2, "fusion": cells,
                      "significance": len(TASKS), "standard_kd_control": cells, "triplet_kd_control": cells}
    n = graph.nodes
    assert n["fer/vggf/standard_kd[tau_squared=True]"].params["train"]["tau_squared"] is True
    assert n["fer/vggf/standard_kd[tau_squared=False]"].params["train"]["temperature"] == 20.0
    assert n["fer/vggf/triplet_kd[margin=0.3]"].params["train"]["pool_fraction"] == 0.1
    assert n["gender/vggf/triplet_kd[margin=0.3]"].params["train"]["pool_fraction"] == 0.2
    # Fusion chooses among every KD point on validation, so it depends on all four.
    assert {e.key for e in n["fer/vggf/fusion"].parents} == {
        "fer/vggf/student", "fer/vggf/standard_kd[tau_squared=False]", "fer/vggf/standard_kd[tau_squared=True]",
        "fer/vggf/triplet_kd[margin=0.1]", "fer/vggf/triplet_kd[margin=0.3]", "fer/vggf/standard_kd_control",
        "fer/vggf/triplet_kd_control"}


def test_paper_variants_graph_is_papers_plus_the_tau_squared_and_raw_embedding_nodes():
    """Every training node of `paper` (same hash: reused on the same storage), plus one node per τ² FER+
    standard-KD point and per raw-embedding triplet point, each a paper node with that one setting flipped."""
    paper, variants = full_graph("paper"), full_graph("paper-variants")
    trained = lambda graph: {n.hash: n for n in graph.nodes.values() if n.kind == "train"}  # noqa: E731
    paper_train, variants_train = trained(paper), trained(variants)
    assert set(paper_train) <= set(variants_train)
    by_params = {json.dumps(n.params, sort_keys=True): n for n in paper_train.values()}
    added: dict[tuple[str, str], int] = {}
    for node in variants_train.values():
        if node.hash in paper_train:
            continue
        train = dict(node.params["train"])
        flipped = "tau_squared" if train["tau_squared"] else "triplet_normalize"
        assert (flipped, train[flipped]) in (("tau_squared", True), ("triplet_normalize", False)), node.key
        train[flipped] = not train[flipped]
        twin = by_params[json.dumps({**node.params, "train": train}, sort_keys=True)]
        same = ("task", "arch", "stage", "parents")
        assert [getattr(twin, f) for f in same] == [getattr(node, f) for f in same], node.key
        added[(node.task, node.stage, flipped)] = added.get((node.task, node.stage, flipped), 0) + 1
    archs = len(ARCHITECTURES)
    assert added == {("fer", "standard_kd", "tau_squared"): archs,
                     **{(task, "triplet_kd", "triplet_normalize"): archs * 6 for task in TASKS}}
    # Fusion chooses among the new points too.
    assert {e.key for e in variants.nodes["fer/vggf/fusion"].parents} >= {
        "fer/vggf/standard_kd[tau_squared=True]", "fer/vggf/triplet_kd[margin=0.3,triplet_normalize=False]"}


def test_edges_follow_the_curriculum():
    graph = full_graph("paper")
    n = graph.nodes
    assert n["fer/vggf/teacher"].parents == ()
    assert n["fer/vggf/student"].parents == (Edge("teacher", "fer/vggf/teacher"),)
    assert n["fer/vggf/student"].train_faces == "lower" and n["gender/vggf/student"].train_faces == "upper"
    assert n["fer/vggf/student_ablation"].train_faces == "upper"
    assert n["fer/vggf/standard_kd"].parents == (Edge("teacher", "fer/vggf/teacher"), Edge("student", "fer/vggf/student"))
    assert n["fer/vggf/triplet_kd[margin=0.3]"].params["train"]["margin"] == 0.3
    fusion = n["age/resnet50/fusion"]
    assert set(fusion.parents) == {Edge("student", "age/resnet50/student"), Edge("standard_kd", "age/resnet50/standard_kd"),
                                   *(Edge("triplet_kd", f"age/resnet50/triplet_kd[margin={m}]")
                                     for m in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)),
                                   Edge("standard_kd_control", "age/resnet50/standard_kd_control"),
                                   Edge("triplet_kd_control", "age/resnet50/triplet_kd_control")}
    # A control starts from the student and never sees the teacher.
    assert n["fer/vggf/triplet_kd_control"].parents == (Edge("student", "fer/vggf/student"),)
    assert set(n["gender/significance"].parents) == {Edge(s, f"gender/{a}/{s}") for a in ARCHITECTURES
                                                     for s in ("student", "fusion")}
    # A node crosses into its Ray trial as plain data and comes back the same.
    assert all(Node.from_dict(json.loads(json.dumps(node.to_dict()))) == node for node in n.values())
    # Topological order: every parent comes before its child.
    order = list(n)
    assert all(order.index(p) < order.index(k) for k, node in n.items() for p in node.parent_keys)


def test_hashes_change_with_a_parent_and_not_otherwise():
    a, b = full_graph("smoke"), full_graph("smoke")
    assert {k: v.hash for k, v in a.nodes.items()} == {k: v.hash for k, v in b.nodes.items()}
    preset = load_preset("smoke")
    changed = expand_graph(_teacher_epochs(preset, 9),
                           ["fer"], ["vggf"], train_sizes={"fer": 1000}, data_fingerprints={"fer": "data"})
    base = expand_graph(preset, ["fer"], ["vggf"], train_sizes={"fer": 1000}, data_fingerprints={"fer": "data"})
    for key in base.nodes:  # the teacher changed: so does everything below it
        assert changed.nodes[key].hash != base.nodes[key].hash
    other_data = expand_graph(preset, ["fer"], ["vggf"], train_sizes={"fer": 1000}, data_fingerprints={"fer": "x"})
    assert other_data.nodes["fer/vggf/teacher"].hash != base.nodes["fer/vggf/teacher"].hash


def test_a_nodes_stage_is_hashed_under_its_first_name_strategy():
    """Node.stage and StageSpec.stage were called ``strategy``; the dicts a node's hash is computed from keep
    that key (renaming it would re-run every sealed node on users' storage), and read back as ``stage``."""
    from occkd_core.training import StageSpec

    graph = expand_graph(load_preset("smoke"), ["gender"], ["vggf"], train_sizes={"gender": 100},
                         data_fingerprints={"gender": "d"})
    node = graph.nodes["gender/vggf/student_ablation"]
    assert node.stage == "student_ablation" and node.params["strategy"] == "student" and "stage" not in node.params
    spec = StageSpec.from_dict(node.params)
    assert spec.stage == "student" and spec.to_dict() == dict(node.params)


def _teacher_epochs(preset, epochs):
    from dataclasses import replace

    stages = dict(preset.stages)
    for key in [k for k in stages if k[2] == "teacher"]:
        stages[key] = {**stages[key], "epochs": epochs}
    return replace(preset, stages=stages)


def test_resources_fit_the_cluster_and_size_concurrency():
    paper = load_preset("paper")
    assert paper.resources["resnet50"] == {"cpus": 8, "gpus": 1}
    # A CPU-only 2-core machine: GPU requests dropped, CPUs clamped to the largest node.
    cpu_only = cluster_shape({"CPU": 2.0}, [{"CPU": 2.0}])
    assert fit_resources(Resources(cpus=8, gpus=1), cpu_only) == Resources(cpus=2.0, gpus=0.0)
    assert max_concurrency([Resources(cpus=1)] * 10, {"CPU": 2.0}) == 2
    assert max_concurrency([Resources(cpus=2)] * 10, {"CPU": 2.0}) == 1
    # 4 nodes × 8 GPUs: half-GPU VGG-f nodes pack 64 at once, plus CPU-only nodes beside them.
    cluster = {"CPU": 4 * 96.0, "GPU": 32.0}
    assert max_concurrency([Resources(cpus=4, gpus=0.5)] * 200, cluster) == 96 + 64


def test_gpu_requests_are_kept_when_the_autoscaler_can_add_gpus(tmp_path: Path):
    """A head with 1 CPU and no GPU, whose autoscaler may add up to two 2-GPU workers (the local fake
    cluster of NOTES.md): the GPU requests stay, so they are what makes the autoscaler launch workers."""
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({
        "max_workers": 4, "head_node_type": "head",
        "available_node_types": {"head": {"resources": {"CPU": 1}, "max_workers": 0},
                                 "gpu_worker": {"resources": {"CPU": 1, "GPU": 2}, "min_workers": 0,
                                                "max_workers": 2}}}))
    types = read_node_types(config)
    assert types == {"head": ({"CPU": 1.0}, 0), "gpu_worker": ({"CPU": 1.0, "GPU": 2.0}, 2)}
    shape = cluster_shape({"CPU": 1.0}, [{"CPU": 1.0}], types)
    assert shape.can_have_gpus and shape.potential == {"CPU": 3.0, "GPU": 4.0}
    assert fit_resources(Resources(cpus=1, gpus=1), shape) == Resources(cpus=1, gpus=1)
    assert fit_resources(Resources(cpus=1), shape) == Resources(cpus=1)  # fusion, statistics: the head
    assert max_concurrency([Resources(cpus=1, gpus=1)] * 10, shape.potential) == 3 + 4
    with pytest.raises(ValueError, match=r"no node can hold a request of 1 CPUs and 4 GPUs.*gpu_worker"):
        fit_resources(Resources(cpus=1, gpus=4), shape)
    # Without node types a GPU-less cluster trains on CPUs, as before.
    assert fit_resources(Resources(cpus=1, gpus=1), cluster_shape({"CPU": 1.0}, [{"CPU": 1.0}])).gpus == 0.0
    # cluster.yaml states its workers' resources, so the head's bootstrap copy tells the grid about GPUs.
    assert read_node_types(REPO / "cluster.yaml")["gpu_worker"] == ({"CPU": 48.0, "GPU": 4.0}, 4)


def test_ray_train_by_default_where_the_cluster_has_or_can_add_gpus():
    types = {"head": ({"CPU": 1.0}, 0), "gpu_worker": ({"CPU": 1.0, "GPU": 2.0}, 2)}
    assert resolve_ray_train("auto", cluster_shape({"CPU": 1.0}, [{"CPU": 1.0}], types)) == "always"
    assert resolve_ray_train("auto", cluster_shape({"CPU": 8.0, "GPU": 1.0}, [{"CPU": 8.0, "GPU": 1.0}])) == "always"
    assert resolve_ray_train("auto", cluster_shape({"CPU": 2.0}, [{"CPU": 2.0}])) == "multi-worker-only"
    assert resolve_ray_train("always", cluster_shape({"CPU": 2.0}, [{"CPU": 2.0}])) == "always"
    # A node run through Train holds a sliver of CPU in its trial and a bundle per worker.
    train = {"kind": "train", "resources": {"cpus": 1, "gpus": 1, "workers": 2}}
    driver = {"node:__internal_head__": 0.001}  # on the head, holding no CPU: workers get them all
    assert node_bundles(train, "multi-worker-only") == [driver, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
    one = {"kind": "train", "resources": {"cpus": 2, "gpus": 0, "workers": 1}}
    assert node_bundles(one, "multi-worker-only") == [{"CPU": 2.0}] and node_bundles(one, "always") == [driver, {"CPU": 2.0}]
    fusion = {"kind": "fusion", "resources": {"cpus": 1, "gpus": 0, "workers": 1}}
    assert node_bundles(fusion, "always") == [{"CPU": 1.0}]


def test_capacity_counts_launchable_nodes_and_follows_nodes_that_join_and_leave():
    """The fake cluster of the autoscaling test: a 1-CPU head and up to two workers of 1 CPU, 2 GPUs.
    Train nodes of 1 CPU + 1 GPU: each worker node holds one (its single CPU), so two run at once while
    the autoscaler may still add both workers, and a third waits."""
    head = {"CPU": 1.0, "node:__internal_head__": 1.0}
    live = [[head]]
    capacity = ClusterCapacity({"head": ({"CPU": 1.0}, 0), "gpu_worker": ({"CPU": 1.0, "GPU": 2.0}, 2)},
                               read_nodes=lambda: live[0], refresh_s=0.0)
    train = node_bundles({"kind": "train", "resources": {"cpus": 1, "gpus": 1, "workers": 1}}, "always")
    assert capacity.room() == [head, {"CPU": 1.0, "GPU": 2.0}, {"CPU": 1.0, "GPU": 2.0}]
    assert capacity.admits([], train) and capacity.admits([train], train)
    assert not capacity.admits([train, train], train)
    # The Train nodes' trial drivers hold no CPU on the head: a 1-CPU node fits beside them, once.
    fusion = [{"CPU": 1.0}]
    assert capacity.admits([train, train], fusion) and not capacity.admits([train, train, fusion], fusion)
    # One worker launched: it replaces one launchable node, the room is the same.
    live[0] = [head, {"CPU": 1.0, "GPU": 2.0}]
    assert len(capacity.room()) == 3 and capacity.admits([train], train)
    # Without an autoscaler, a node that joins makes room and one that leaves takes it away.
    fixed = ClusterCapacity(read_nodes=lambda: live[0], refresh_s=0.0)
    assert fixed.admits([], train) and not fixed.admits([train], train)
    live[0] = [head, {"CPU": 1.0, "GPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}]
    assert fixed.admits([train], train)
    live[0] = [head]
    assert not fixed.admits([], train)


def test_the_searcher_backfills_a_smaller_ready_node_and_waits_rather_than_finishes():
    preset = load_preset("smoke")
    graph = expand_graph(preset, ["gender"], ["vggf", "resnet50"], train_sizes={"gender": 100},
                         data_fingerprints={"gender": "d"}, from_scratch=True)
    graph = graph.with_resources({k: Resources(cpus=2 if n.arch == "resnet50" else 1) for k, n in graph.nodes.items()})
    teachers = [k for k, n in graph.nodes.items() if n.stage == "teacher"]
    live = [[{"CPU": 2.0}]]
    capacity = ClusterCapacity(read_nodes=lambda: live[0], refresh_s=0.0)
    searcher = DependencySearcher(graph, list(graph.nodes), set(), RunSettings(storage="/s", data_paths={}),
                                  capacity=capacity)
    first = searcher.suggest("t1")["node"]["key"]
    assert graph.nodes[first].arch == "resnet50"  # the longer chain first; it fills the node's 2 CPUs
    assert searcher.suggest("t2") is None  # the VGG-f teacher is ready but does not fit: wait, not FINISHED
    searcher.on_trial_complete("t1")
    live[0] = [{"CPU": 1.0}]  # the cluster shrank; the VGG-f teacher still fits
    assert searcher.suggest("t3")["node"]["key"] in teachers
    live[0] = []  # every node lost: with nothing running a ready node still goes (Ray or the autoscaler places it)
    searcher.on_trial_complete("t3")
    assert searcher.suggest("t4") is not None


def test_a_cpu_only_train_node_fits_a_one_cpu_head_beside_its_driver():
    """The trial driver holds no CPU, so a 1-CPU head takes one CPU-only Train node (the smoke preset on
    the local autoscaling cluster, whose autoscaler launches no GPU node for CPU-only work); worker node
    types the autoscaler may add count too."""
    head = {"CPU": 1.0, "node:__internal_head__": 1.0}
    train = node_bundles({"kind": "train", "resources": {"cpus": 1, "gpus": 0, "workers": 1}}, "always")
    head_only = ClusterCapacity(read_nodes=lambda: [head], refresh_s=0.0)
    assert head_only.admits([], train) and not head_only.admits([train], train)
    live = [[head]]
    with_workers = ClusterCapacity({"gpu_worker": ({"CPU": 48.0, "GPU": 4.0}, 2)}, read_nodes=lambda: live[0],
                                   refresh_s=0.0)
    # Ray's autoscaler launches no GPU node for CPU-only work: only the head's CPU counts for it ...
    assert with_workers.admits([], train) and not with_workers.admits([train], train)
    gpu_train = node_bundles({"kind": "train", "resources": {"cpus": 1, "gpus": 1, "workers": 1}}, "always")
    assert with_workers.admits([train] + [gpu_train] * 7, gpu_train)  # ... while GPU work launches them
    # ... but a GPU node that runs takes CPU-only work too.
    live[0] = [head, {"CPU": 48.0, "GPU": 4.0}]
    assert with_workers.admits([train] * 48, train) and not with_workers.admits([train] * 49, train)


@pytest.mark.slow
def test_dry_run_prints_the_graph_and_starts_nothing(tmp_path: Path):
    out = subprocess.run([sys.executable, str(REPO / "grid" / "run_all.py"), "--tasks", "fer,gender,age",
                          "--dry-run"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "84 nodes: 9 teacher, 9 student, 9 student_ablation, 9 standard_kd, 18 triplet_kd, " \
           "9 standard_kd_control, 9 triplet_kd_control, 9 fusion, 3 significance" in out.stdout
    assert "fer/vggface/triplet_kd[margin=0.3]" in out.stdout and "cpu=1" in out.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "occkd_runs").exists()


@pytest.mark.parametrize("args, message", [
    (["--tasks", "fer,emotion"], "unknown task 'emotion'; valid names: age, fer, gender"),
    (["--tasks", "fer", "--archs", "vgg19"], "unknown architecture 'vgg19'"),
    (["--tasks", "fer", "--preset", "huge"], "unknown preset 'huge'"),
    (["--tasks", "fer", "--preset", "paper", "--from-scratch"], "trains on real data: pass --data-root"),
    (["--tasks", "fer", "--preset", "paper"], "pass --weights vggf_imagenet=PATH --weights vggface=PATH "
                                              "--weights resnet50_imagenet=PATH, or --from-scratch"),
    (["--tasks", "fer", "--weights", "vgg16=/x"], "unknown pre-trained weights 'vgg16'; valid names: "),
    (["--tasks", "fer", "--weights", "vggface"], "expected NAME=PATH"),
    (["--tasks", "fer", "--data-root", "/nonexistent/dir"], "is not a readable directory"),
])
def test_bad_command_lines_fail_with_one_clear_line(tmp_path: Path, monkeypatch, capsys, args, message):
    from grid.run_all import main

    monkeypatch.chdir(tmp_path)
    try:
        code = main([*args, "--dry-run"])
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "occkd_runs").exists()


def test_cluster_yaml_validates_against_rays_own_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "mlflow server --host 127.0.0.1" in start
    assert config["available_node_types"]["gpu_worker"]["max_workers"] >= 1
    assert "pip install -e ~/occkd" in " ".join(config["setup_commands"])
    # Ray's own image at the Ray this project pins (not the launcher's Ubuntu 18.04 / CUDA 11.2 default).
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert all("ImageId" in t["node_config"] for t in config["available_node_types"].values())
    # The shared file system is mounted on each host and into the containers; MLflow's runs stay off NFS.
    assert "/mnt/occkd" in " ".join(config["initialization_commands"])
    assert "-v /mnt/occkd:/mnt/occkd" in config["docker"]["run_options"]
    mlflow = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c and "nohup" in c)
    assert "--backend-store-uri sqlite:///$HOME/" in mlflow and "--artifacts-destination /mnt/occkd/" in mlflow
    text = (REPO / "cluster.yaml").read_text().lower()
    assert "aws_secret" not in text and "password" not in text
    assert "tcp 2049" in text  # the security-group rule NFS needs is written where the user fills in the id


def test_cluster_yaml_starts_every_ray_in_token_mode_with_one_token_on_every_node():
    """Ray 2.60's `ray start` makes no token, and without RAY_AUTH_MODE=token it starts a cluster anyone on
    the network may run code on: every `ray start` line runs in token mode, every container is in token mode
    (the driver and `ray` commands on the head too), and the user's one token reaches every node type."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]
              if "ray start" in c]
    assert len(starts) == 2
    for line in starts:
        command = line.split(";")[-1].split()
        assert command[:3] == ["RAY_AUTH_MODE=token", "ray", "start"], line
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    # file_mounts and setup_commands apply to every node, head and workers; no node type overrides them.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "chmod 600 ~/.ray/auth_token" in " ".join(config["setup_commands"])
    for name, node_type in config["available_node_types"].items():
        assert not {"file_mounts", "setup_commands", "docker"} & set(node_type), name
    assert not config.get("worker_setup_commands") and "rsync_filter" not in config
    assert not any("auth_token" in pattern for pattern in config.get("rsync_exclude", []))


@pytest.mark.slow
def test_a_dry_run_against_cluster_yaml_keeps_the_papers_gpu_requests_and_trains_through_ray_train(tmp_path: Path):
    """The paper preset's requests on cluster.yaml's node types (a CPU head, autoscaled 4-GPU workers): every
    request fits a worker, the GPU requests stay though no worker runs, and every training node goes through
    Train. (The smoke preset's data with the paper's resources: the paper's data is not needed for this.)"""
    presets = REPO / "occkd_core" / "presets"
    preset = {**yaml.safe_load((presets / "smoke.yaml").read_text()), "name": "smoke-paper-resources",
              "resources": yaml.safe_load((presets / "paper.yaml").read_text())["resources"]}
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(preset))
    out = subprocess.run([sys.executable, str(REPO / "grid" / "run_all.py"), "--tasks", "gender", "--archs",
                          "resnet50,vggf", "--preset", str(tmp_path / "preset.yaml"), "--cluster-config",
                          str(REPO / "cluster.yaml"), "--dry-run"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if "/teacher" in line or "/student " in line]
    assert any("gender/resnet50/teacher" in line and "cpu=8 gpu=1 via=ray-train" in line for line in lines), lines
    assert any("gender/vggf/teacher" in line and "gpu=0.5 via=ray-train" in line for line in lines), lines
    assert "the autoscaler may grow it to" in out.stdout and "training nodes run as Ray Train workers" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preset.yaml"]  # nothing prepared or written


@pytest.mark.parametrize("uri, message", [
    ("http://127.0.0.1:9", "cannot reach the MLflow tracking server 'http://127.0.0.1:9'"),
    ("sqlite:////nonexistent/dir/mlflow.db", "is not a writable directory"),
])
def test_unreachable_tracking_store_fails_fast_and_writes_nothing(tmp_path: Path, monkeypatch, capsys, uri, message):
    from grid.run_all import main

    monkeypatch.chdir(tmp_path)
    assert main(["--tasks", "gender", "--archs", "vggf", "--tracking-uri", uri]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no data prepared, no store, no storage folder


def paper_style_preset(tmp_path: Path) -> Path:
    """The smoke preset, but its VGG-f teachers start from ImageNet weights, as under `paper`."""
    raw = yaml.safe_load((REPO / "occkd_core" / "presets" / "smoke.yaml").read_text())
    raw["name"] = "pretrained-smoke"
    raw["pretrained"] = {task: {"vggf": "vggf_imagenet", "vggface": "from_scratch", "resnet50": "from_scratch"}
                         for task in TASKS}
    path = tmp_path / "pretrained-smoke.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def vggf_weights(path: Path, seed: int) -> Path:
    import torch

    from occkd_core.models import ModelSpec, build_model

    torch.manual_seed(seed)
    torch.save(build_model(ModelSpec("vggf", 8, 0.125)).state_dict(), path)
    return path


def test_teacher_identity_follows_the_weights_files_content(tmp_path: Path):
    from occkd_core.pretrained import WeightsFile

    preset = load_preset(paper_style_preset(tmp_path))
    first = WeightsFile.locate("vggf_imagenet", vggf_weights(tmp_path / "a.pt", seed=0))
    other = WeightsFile.locate("vggf_imagenet", vggf_weights(tmp_path / "b.pt", seed=1))
    copy = tmp_path / "copy" / "a.pt"
    copy.parent.mkdir()
    copy.write_bytes((tmp_path / "a.pt").read_bytes())
    same = WeightsFile.locate("vggf_imagenet", copy)

    def graph(**kwargs):
        return expand_graph(preset, ["fer", "age"], ["vggf", "vggface"], train_sizes={"fer": 1000, "age": 1000},
                            data_fingerprints={"fer": "data", "age": "data"}, **kwargs)

    base = graph(weights={"vggf_imagenet": first})
    for name, changed in (("other bytes", graph(weights={"vggf_imagenet": other})),
                          ("from scratch", graph(from_scratch=True))):
        for key, node in base.nodes.items():
            below_vggf = key.startswith(("fer/vggf/", "age/vggf/")) or key.endswith("significance")
            assert (changed.nodes[key].hash != node.hash) == below_vggf, (name, key)
    # The same bytes under another path are the same experiment.
    assert {k: n.hash for k, n in graph(weights={"vggf_imagenet": same}).nodes.items()} == \
        {k: n.hash for k, n in base.nodes.items()}
    teacher = base.nodes["fer/vggf/teacher"]
    assert teacher.init == {"weights": "vggf_imagenet", "sha256": first.sha256, "file": str((tmp_path / "a.pt").resolve())}
    # The mean a .mat names is recorded beside the checksum; the checksummed bytes already fix it, so the
    # hashes stay those of the same file without the record.
    with_mean = dataclasses.replace(first, input_mean=(122.5, 114.25, 101.75))
    recorded = graph(weights={"vggf_imagenet": with_mean})
    assert recorded.nodes["fer/vggf/teacher"].init["input_mean"] == [122.5, 114.25, 101.75]
    assert {k: n.hash for k, n in recorded.nodes.items()} == {k: n.hash for k, n in base.nodes.items()}
    assert base.nodes["fer/vggface/teacher"].init == {"weights": "from_scratch"}
    assert base.nodes["fer/vggf/student"].init == {}
    with pytest.raises(ValueError, match="starts the fer/vggf teacher from vggf_imagenet weights: pass "
                                         "--weights vggf_imagenet=PATH, or --from-scratch"):
        graph()


def test_a_preset_without_its_weights_fails_fast_with_one_line(tmp_path: Path, monkeypatch, capsys):
    from grid.run_all import main

    preset = paper_style_preset(tmp_path)
    monkeypatch.chdir(tmp_path)
    base = ["--tasks", "fer,gender", "--archs", "vggf,vggface", "--preset", str(preset)]
    assert main(base) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: preset 'pretrained-smoke' starts teachers from pre-trained weights that were not given: "
        "vggf_imagenet (e.g. imagenet-vgg-f.mat) for fer/vggf, gender/vggf; pass --weights vggf_imagenet=PATH, "
        "or --from-scratch to train them from random initialisation"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretrained-smoke.yaml"]  # nothing written
    # With the file, or explicitly from scratch, the graph expands; the teacher's line names its start.
    weights = vggf_weights(tmp_path / "imagenet-vgg-f.pt", seed=0)
    from occkd_core.files import file_sha256

    for extra, start in ((["--weights", f"vggf_imagenet={weights}"], f"vggf_imagenet sha256 {file_sha256(weights)[:12]}"),
                         (["--from-scratch"], "from_scratch")):
        assert main(base + extra + ["--dry-run"]) == 0
        teacher = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("fer/vggf/teacher"))
        assert teacher.endswith(f"<- {start}")
    assert main(base + ["--from-scratch", "--weights", f"vggf_imagenet={weights}", "--dry-run"]) == 2
    assert "drop --weights vggf_imagenet or --from-scratch" in capsys.readouterr().err


def test_weights_of_another_architecture_are_refused_before_anything_runs(tmp_path: Path, monkeypatch, capsys):
    import torch

    from grid.run_all import main
    from occkd_core.models import ModelSpec, build_model

    preset = paper_style_preset(tmp_path)
    weights = tmp_path / "resnet.pt"
    torch.save(build_model(ModelSpec("resnet50", 2, 0.125)).state_dict(), weights)
    monkeypatch.chdir(tmp_path)
    assert main(["--tasks", "gender", "--archs", "vggf", "--preset", str(preset),
                 "--weights", f"vggf_imagenet={weights}"]) == 2
    assert "looks like resnet50" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretrained-smoke.yaml", "resnet.pt"]
    # weights the preset never uses are refused too, rather than silently ignored
    assert main(["--tasks", "gender", "--archs", "vggf", "--weights", f"vggf_imagenet={weights}"]) == 2
    assert "preset 'smoke' starts none of the selected teachers from vggf_imagenet" in capsys.readouterr().err


def test_a_dry_run_on_real_data_converts_and_writes_nothing(tmp_path: Path, monkeypatch, capsys):
    from grid.run_all import main
    from test_bad_input import fer_rows
    from test_loaders import write_fer_pair

    write_fer_pair(tmp_path / "data" / "ferplus", fer_rows(train=130, val=4, test=4))  # enough to run the method
    monkeypatch.chdir(tmp_path)
    assert main(["--tasks", "fer", "--archs", "vggf", "--preset", "mini", "--data-root", "data", "--dry-run"]) == 0
    assert "fer/vggf/teacher" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no store, no storage folder, no MLflow


def test_weights_are_staged_on_the_storage_every_node_mounts_without_changing_the_teachers_identity(tmp_path: Path):
    """--weights paths are read on the driver's machine; teachers open the copy on --storage, made once."""
    from grid.weights import stage_weights
    from occkd_core.pretrained import WeightsFile

    from published_files import mean_image, vgg_f_layers, write_simplenn

    original = tmp_path / "home" / "imagenet-vgg-f.mat"
    original.parent.mkdir()
    write_simplenn(original, vgg_f_layers(width=0.125), mean_image((122.5, 114.25, 101.75)))
    found = {"vggf_imagenet": WeightsFile.locate("vggf_imagenet", original)}
    staged = stage_weights(found, tmp_path / "storage")
    copy = Path(staged["vggf_imagenet"].path)
    assert copy == tmp_path / "storage" / "pretrained" / found["vggf_imagenet"].sha256 / "imagenet-vgg-f.mat"
    assert copy.read_bytes() == original.read_bytes() and staged["vggf_imagenet"] == \
        dataclasses.replace(found["vggf_imagenet"], path=str(copy))  # same sha256 and input mean
    before = copy.stat().st_mtime_ns
    assert stage_weights(found, tmp_path / "storage") == staged and copy.stat().st_mtime_ns == before  # once
    preset = load_preset("paper")

    def teacher_hash(weights):
        graph = expand_graph(preset, ["gender"], ["vggf"], train_sizes={"gender": 100},
                             data_fingerprints={"gender": "d"}, weights=weights)
        return next(n for n in graph.nodes.values() if n.stage == "teacher").hash

    assert teacher_hash(staged) == teacher_hash(found)


def test_the_local_cluster_script_asks_for_gpus_so_the_autoscaler_launches_workers(tmp_path: Path):
    """Ray's autoscaler launches GPU nodes only for work that asks for GPUs: the script's copy of the preset
    asks for them (a whole cluster.yaml worker by default), and is a valid preset."""
    from grid.local_cluster import gpu_preset

    preset = load_preset(gpu_preset("smoke", 4, tmp_path))
    assert preset.name == "smoke-local-gpu"
    assert all(preset.resources[a] == {"cpus": 1, "gpus": 4} for a in ("vggf", "vggface", "resnet50"))
    assert preset.resources["fusion"] == load_preset("smoke").resources["fusion"]
    assert gpu_preset("smoke", 0, tmp_path).name == "smoke.yaml"


def test_the_local_clusters_gpu_copy_of_an_extending_preset_stands_alone(tmp_path: Path):
    """local_cluster.py writes a changed copy of the preset elsewhere: a base named by a relative path
    must not be lost on the way."""
    from grid.local_cluster import gpu_preset

    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "base.yaml").write_text((REPO / "occkd_core" / "presets" / "smoke.yaml").read_text())
    child = tmp_path / "presets" / "child.yaml"
    child.write_text(yaml.safe_dump({"extends": "base.yaml", "name": "child",
                                     "stages": {"fer": {"vggf": {"triplet_kd": {"margin": [0.2, 0.4]}}}}}))
    (tmp_path / "work").mkdir()
    copy = load_preset(gpu_preset(str(child), 1, tmp_path / "work"))
    assert copy.name == "child-local-gpu" and copy.resources["vggf"] == {"cpus": 1, "gpus": 1}
    assert copy.stages == load_preset(child).stages
