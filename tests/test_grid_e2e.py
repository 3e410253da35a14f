"""The grid end to end on a real local Ray and a real MLflow SQLite store (no mocks of either)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import new_mlflow_store
from grid.timeline import read_timeline

REPO = Path(__file__).resolve().parents[1]
UPLOAD_DELAY = 10

pytestmark = pytest.mark.slow

# The smoke preset cut down further so that one task × one architecture runs in well under a minute.
TINY = {
    "name": "tiny", "description": "test preset: 240 synthetic faces, one epoch per stage",
    "data": {"source": "synthetic", "num_faces": 240, "image_size": 32, "seed": 1},
    "models": {a: {"input_size": 32, "width_mult": 0.125} for a in ("vggf", "vggface", "resnet50")},
    "fusion": {"Cs": [0.1, 1.0]},
    "stage_defaults": {
        "teacher": {"optimizer": "adam", "batch_size": 32, "epochs": 2, "lr": 3e-3},
        "student": {"optimizer": "adam", "batch_size": 32, "epochs": 1, "lr": 1e-3},
        "standard_kd": {"optimizer": "adam", "batch_size": 32, "epochs": 1, "lr": 1e-3, "lam": 0.5},
        "triplet_kd": {"optimizer": "adam", "batch_size": 32, "epochs": 1, "lr": 1e-3, "lam": 0.5,
                       "margin": [0.1, 0.3], "pool_fraction": 0.3},
    },
    "stages": {t: {a: {} for a in ("vggf", "vggface", "resnet50")} for t in ("fer", "gender", "age")},
    "resources": {a: {"cpus": 1} for a in ("vggf", "vggface", "resnet50", "fusion", "significance")},
}


def run_grid(workdir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "grid" / "run_all.py"), "--tasks", "gender", "--archs", "vggf",
         "--preset", str(workdir / "tiny.yaml"), *extra],
        cwd=workdir, capture_output=True, text=True, timeout=600, env=None if env is None else {**os.environ, **env})


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("grid")
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    new_mlflow_store(workdir / "mlflow.db")
    # Another copy of the code comes first on PYTHONPATH, as an installed older checkout would: the workers
    # must still run this one, the driver's (test_the_workers_ran_the_drivers_code).
    installed = workdir / "installed"
    for package in ("occkd_core", "grid"):
        shutil.copytree(REPO / package, installed / package, ignore=shutil.ignore_patterns("__pycache__"))
    (installed / "occkd_core" / "__init__.py").write_text("raise ImportError('the installed copy was imported')\n")
    # The teacher's MLflow upload takes 10 s: the student must not wait for it (uploads are off the
    # scheduler's path).
    first = run_grid(workdir, env={"OCCKD_FAULT_UPLOAD_DELAY": json.dumps({"node": "gender/vggf/teacher",
                                                                            "seconds": UPLOAD_DELAY}),
                                   "PYTHONPATH": str(installed)})
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return workdir, first


@pytest.fixture
def own_grid(grid_run, tmp_path) -> Path:
    """This test's own copy of the sealed grid (storage, MLflow store and artifacts, preset), for a test that
    damages or reruns it: the others read ``grid_run`` as it was sealed, in any order. The copy's records
    are re-tagged with the copy's storage path, as a user's would be after moving a storage with its store
    (records are per storage). MLflow fixes an experiment's artifact root when it is made, so artifacts the
    copy's reruns log land beside the original's, under new run ids that only the copy's store lists."""
    source, _ = grid_run
    workdir = tmp_path / "grid"
    shutil.copytree(source, workdir, ignore=shutil.ignore_patterns("installed"))
    client, _, runs = finished_runs(workdir)
    old, new = str(source / "occkd_runs"), str(workdir / "occkd_runs")
    for run in runs:
        if run.data.tags.get("occkd.storage") == old:
            client.set_tag(run.info.run_id, "occkd.storage", new)
    return workdir


def finished_runs(workdir: Path):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("occkd-tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return client, [r for r in runs if r.info.status == "FINISHED"], runs


def test_mlflow_holds_a_finished_run_per_node_with_tags_metrics_and_artifacts(grid_run):
    workdir, _ = grid_run
    client, finished, runs = finished_runs(workdir)
    nodes = {r.info.run_name: r for r in finished if "occkd.node" in r.data.tags}
    assert set(nodes) == {"gender/vggf/teacher", "gender/vggf/student", "gender/vggf/student_ablation",
                          "gender/vggf/standard_kd", "gender/vggf/triplet_kd[margin=0.1]",
                          "gender/vggf/triplet_kd[margin=0.3]", "gender/vggf/standard_kd_control",
                          "gender/vggf/triplet_kd_control", "gender/vggf/fusion", "gender/significance"}
    assert all(r.info.status != "RUNNING" for r in runs)
    parents = [r for r in finished if r.data.tags.get("occkd.kind") == "grid"]
    assert len(parents) == 1
    triplet = nodes["gender/vggf/triplet_kd[margin=0.3]"]
    tags = triplet.data.tags
    assert (tags["occkd.task"], tags["occkd.arch"], tags["occkd.strategy"], tags["occkd.train_faces"]) == \
        ("gender", "vggf", "triplet_kd", "full+upper")
    assert tags["mlflow.parentRunId"] == parents[0].info.run_id and len(tags["mlflow.source.git.commit"]) >= 7
    assert triplet.data.params["spec.train.margin"] == "0.3"
    for name in ("test_full_accuracy", "test_lower_accuracy", "test_upper_accuracy", "val_score"):
        assert name in triplet.data.metrics
    assert [m.step for m in client.get_metric_history(triplet.info.run_id, "train_loss")] == [1]
    assert {"predictions.parquet", "test_plot.png", "gradcam.png", "result.json"} <= \
        {a.path for a in client.list_artifacts(triplet.info.run_id)}  # best.pt: the run's logged model
    assert "test_upper_accuracy" in nodes["gender/vggf/fusion"].data.metrics
    significance = nodes["gender/significance"]
    assert any(k.startswith("pvalue_holm.vggf.fusion") for k in significance.data.metrics)
    assert significance.data.tags["verdict.vggf.fusion.test"] in ("better", "worse", "no significant difference")
    assert significance.data.tags["verdict_uncorrected.vggf.fusion.test"] in ("better", "worse",
                                                                             "no significant difference")
    # What the teacher adds, recorded beside: the fusion against the control fusion, under its own name.
    assert significance.data.tags["verdict.vggf.fusion_vs_control.test"] in ("better", "worse",
                                                                             "no significant difference")
    assert "pvalue.vggf.standard_kd_vs_control.test" in significance.data.metrics
    control = nodes["gender/vggf/standard_kd_control"].data.params
    assert control["spec.strategy"] == "standard_kd_control" and control["spec.train.lam"] == "0.5"
    assert nodes["gender/vggf/teacher"].data.params["pretrained.weights"] == "from_scratch"
    # Why each training node has its DDP workers is the driver's record (no GPU here: the preset's one), tagged
    # when its run opens; where it ran is the trial's (result.json's placement), which no longer carries the reason.
    trained = [r for name, r in nodes.items() if name not in ("gender/vggf/fusion", "gender/significance")]
    assert len(trained) == 8 and all(r.data.tags["occkd.workers_choice"] == "1 (the preset's)" for r in trained)
    assert all(r.data.tags["occkd.workers"] == "1" for r in trained)
    assert "occkd.workers_choice" not in nodes["gender/vggf/fusion"].data.tags
    results = [json.loads(p.read_text()) for p in (workdir / "occkd_runs").glob("nodes/*/result.json")]
    placements = [r["placement"] for r in results if r["kind"] == "train"]
    assert len(placements) == 8 and not any({"width", "workers_choice"} & set(p) for p in placements)


def test_mlflow_view_datasets_and_models(grid_run):
    """The experiment opens on its runs table; each node's data are dataset inputs, each checkpoint a logged
    model that loads weights_only, and the test metrics are linked to both."""
    import mlflow

    from occkd_core.checkpoints import load_model

    workdir, first = grid_run
    client, finished, _ = finished_runs(workdir)
    experiment = client.get_experiment_by_name("occkd-tiny")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    link = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    assert f"MLflow runs table: {link}" in first.stdout
    parent = next(r for r in finished if r.data.tags.get("occkd.kind") == "grid")
    assert parent.data.tags["occkd.ui_link"] == link and link in parent.data.tags["mlflow.note.content"]
    fingerprint = next((workdir / "occkd_runs" / "data").glob("synthetic-*.arrow")).stem.split("-")[1]
    triplet = next(r for r in finished if r.info.run_name == "gender/vggf/triplet_kd[margin=0.3]")
    assert triplet.data.tags["mlflow.note.content"].startswith("`gender/vggf/triplet_kd[margin=0.3]`: triplet kd")
    inputs = {i.dataset.name: i for i in triplet.inputs.dataset_inputs}
    assert set(inputs) == {"synthetic/train", "synthetic/val", "synthetic/test"}
    assert {i.dataset.digest for i in inputs.values()} == {fingerprint}
    assert {t.key: t.value for t in inputs["synthetic/train"].tags} == {"mlflow.data.context": "train",
                                                                        "occkd.faces": "full+upper"}
    assert json.loads(inputs["synthetic/test"].dataset.profile) == {"num_rows": 48}
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert len(models) == 8 and all(m.status == "READY" for m in models)  # every training node, controls too
    model = next(m for m in models if m.source_run_id == triplet.info.run_id)
    linked = {m.key: m for m in model.metrics}
    assert linked["test_upper_accuracy"].value == triplet.data.metrics["test_upper_accuracy"]
    assert (linked["test_upper_accuracy"].dataset_name, linked["test_upper_accuracy"].dataset_digest) == \
        ("synthetic/test", fingerprint)
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location,
                                                      dst_path=str(workdir / "model"), tracking_uri=client.tracking_uri))
    network, info = load_model(folder / "best.pt")  # torch.load(weights_only=True)
    assert info["model_spec"]["arch"] == "vggf" and json.loads((folder / "occkd_model.json").read_text())["node"] == \
        "gender/vggf/triplet_kd[margin=0.3]"
    assert not client.list_artifacts(triplet.info.run_id, "train")  # the checkpoint is uploaded once


def test_an_upload_in_flight_does_not_hold_back_the_next_node(grid_run):
    """The teacher's upload took 10 s (injected): the student started while it was still in flight, and the
    teacher's run ended FINISHED once it was done."""
    _, finished, _ = finished_runs(grid_run[0])
    teacher = next(r for r in finished if r.info.run_name == "gender/vggf/teacher")
    student = next(r for r in finished if r.info.run_name == "gender/vggf/student")
    assert student.info.start_time < teacher.info.end_time


def test_outputs_on_storage_and_the_report(grid_run):
    workdir, first = grid_run
    storage = workdir / "occkd_runs"
    predictions = [pq.read_table(p) for p in storage.glob("nodes/*/predictions.parquet")]
    assert len(predictions) == 9  # six training nodes, two teacher-free controls and the fusion node
    teacher = next(t for t in predictions if "teacher" in set(t["model"].to_pylist()))
    assert set(teacher["visible"].to_pylist()) == {"full", "lower", "upper"}
    assert teacher.num_rows == 3 * 48  # 20 % of 240 faces, under three visibilities
    report = (storage / "reports" / "occkd-tiny" / "report.md").read_text()
    assert "| vggf | fusion | full+upper |" in report and "(89.82†)" in report  # the journal's number beside ours
    comparisons = json.loads(next(storage.glob("nodes/*/comparisons.json")).read_text())
    # The papers' family against the student, occkd's against each model's teacher-free control.
    assert {(c["model"], c["baseline"], c["family"]) for c in comparisons} == {
        ("standard_kd", "student", "student"), ("triplet_kd", "student", "student"), ("fusion", "student", "student"),
        ("standard_kd", "standard_kd_control", "control"), ("triplet_kd", "triplet_kd_control", "control"),
        ("fusion", "control_fusion", "control")}
    assert all(0.0 <= c["pvalue_holm"] <= 1.0 and c["test"] == "mcnemar" for c in comparisons)
    assert all(c["pvalue"] <= c["pvalue_holm"] and c["dagger"] == (c["pvalue"] < 0.05 and c["improved"])
               for c in comparisons)
    assert "| papers' rule: p | Holm: p, verdict | vs control: p (Holm) |" in report
    assert "Teachers: from scratch: gender/vggf." in report and "**What the teacher adds (gender" in report
    for model in ("standard_kd_control", "triplet_kd_control", "control_fusion", "student_svm"):
        assert f"| vggf | {model}" in report, model
    assert "teacher 1/1" in first.stdout and "report:" in first.stdout
    # Where the wall time went: every node handed out, started, trained (training nodes) and completed, in order.
    timeline = read_timeline(storage / "reports" / "occkd-tiny" / "timeline.csv")
    assert len(timeline) == 10 and "per-node overhead, median: ready -> first step" in first.stdout
    for row in timeline:
        steps = (row["first_step"], row["last_step"]) if row["kind"] == "train" else ()
        times = [row["ready"], row["started"], *steps, row["finished"], row["completed"]]
        assert None not in times and times == sorted(times), row


def test_second_invocation_trains_nothing(own_grid):
    workdir = own_grid
    _, before, _ = finished_runs(workdir)
    again = run_grid(workdir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "10 nodes: 10 already complete, 0 to run" in again.stdout and "(invocation 2)" in again.stdout
    _, after, runs = finished_runs(workdir)
    node_runs = lambda runs: sorted(r.info.run_id for r in runs if "occkd.node" in r.data.tags)  # noqa: E731
    assert node_runs(after) == node_runs(before)  # no node recorded twice
    parents = [r for r in runs if r.data.tags.get("occkd.kind") == "grid"]
    assert len(parents) == 1 and parents[0].data.tags["occkd.invocations"] == "2"  # one grid, one parent
    assert "0 to run" in parents[0].data.tags["occkd.invocation.2"]


def test_a_node_with_a_corrupted_file_reruns_in_a_ray_train_worker_group(own_grid):
    """A damaged checkpoint fails its checksum: the node (only it) runs again, here through TorchTrainer."""
    workdir = own_grid
    storage = workdir / "occkd_runs"
    teacher_dir = next(d for d in storage.glob("nodes/*") if json.loads((d / "result.json").read_text())
                       .get("strategy") == "teacher")
    best = teacher_dir / "train" / "best.pt"
    best.write_bytes(best.read_bytes()[:100])  # truncated: the checksum in result.json no longer matches
    rerun = run_grid(workdir, "--ray-train", "always")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "9 already complete, 1 to run" in rerun.stdout
    assert (storage / "ray_train").exists()  # the Train run's own storage: it went through a worker group
    result = json.loads((teacher_dir / "result.json").read_text())
    assert result["epochs_run"] == 2  # retrained from scratch, not resumed from damaged files
    client, finished, runs = finished_runs(workdir)
    teachers = [r for r in runs if r.info.run_name == "gender/vggf/teacher"]
    assert sorted(r.info.status for r in teachers) == ["FINISHED", "KILLED"]  # one FINISHED run per node
    old = next(r for r in teachers if r.info.status == "KILLED")
    assert old.data.tags["occkd.superseded_by"] == next(r for r in teachers if r.info.status == "FINISHED").info.run_id


def test_a_damaged_nodes_old_record_stands_until_its_rerun_succeeds(own_grid):
    """The rerun of a damaged node fails (an injected fault, every attempt): the node keeps its FINISHED run;
    the failed attempt is a FAILED run beside it, and nothing is marked superseded."""
    workdir = own_grid
    storage = workdir / "occkd_runs"
    teacher_dir = next(d for d in storage.glob("nodes/*") if json.loads((d / "result.json").read_text())
                       .get("strategy") == "teacher")
    client, _, runs = finished_runs(workdir)
    before = next(r for r in runs if r.info.run_name == "gender/vggf/teacher" and r.info.status == "FINISHED")
    predictions = teacher_dir / "predictions.parquet"
    predictions.write_bytes(predictions.read_bytes()[:50])
    rerun = run_grid(workdir, "--max-failures", "0",
                     env={"OCCKD_FAULT_INJECTION": json.dumps({"node": "gender/vggf/teacher", "times": 99})})
    assert rerun.returncode == 1, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "FAILED  gender/vggf/teacher" in rerun.stderr
    _, _, runs = finished_runs(workdir)
    teachers = {r.info.run_id: r for r in runs if r.info.run_name == "gender/vggf/teacher"}
    assert teachers[before.info.run_id].info.status == "FINISHED"
    assert "occkd.superseded_by" not in teachers[before.info.run_id].data.tags
    assert sum(1 for r in teachers.values() if r.info.status == "FAILED") == 1


def test_the_printed_link_opens_the_mlflow_ui_on_the_runs_table(grid_run, tmp_path):
    """In a real headless Chromium against a real mlflow server on the grid's store: the link the grid
    prints shows the runs table (the grid's parent run), not MLflow 3's GenAI landing view; a node's page
    lists its dataset inputs. Skipped without Chromium (`apt-get install chromium`)."""
    sys.path.insert(0, str(REPO))
    from benchmarks.ui_screenshots import find_browser, pages, rendered_text
    from grid.local_cluster import mlflow_server

    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium: apt-get install chromium")
    workdir, _ = grid_run
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    _, _, runs = finished_runs(workdir)
    parent = next(r for r in runs if r.data.tags.get("occkd.kind") == "grid")
    with mlflow_server(tmp_path, store_uri=uri) as server:
        urls = pages(server, uri, "occkd-tiny")
        table = rendered_text(browser, urls["runs_table"])
        assert parent.info.run_name in table and "matching runs" in table
        page = rendered_text(browser, urls["run_page"])
        assert "triplet_kd" in page and "synthetic/train" in page


def test_the_workers_ran_the_drivers_code(grid_run):
    """With another copy first on PYTHONPATH (one that cannot even be imported), every node ran the driver's
    code, and MLflow records that code's fingerprint."""
    from grid.code import code_fingerprint

    workdir, _ = grid_run
    results = [json.loads(p.read_text()) for p in (workdir / "occkd_runs").glob("nodes/*/result.json")]
    trained = [r for r in results if r["kind"] == "train"]
    assert len(trained) == 8 and {r["placement"]["code_root"] for r in trained} == {str(REPO)}
    _, finished, _ = finished_runs(workdir)
    assert {r.data.tags["occkd.code"] for r in finished} == {code_fingerprint(REPO)}
