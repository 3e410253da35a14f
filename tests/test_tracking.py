"""What the MLflow records say of a teacher's starting weights and of both significance rules, on a
real SQLite tracking store."""

from pathlib import Path

from mlflow.tracking import MlflowClient

from grid.graph import expand_graph
from grid.tracking import Tracker
from occkd_core.presets import load_preset
from occkd_core.pretrained import WeightsFile


def test_teacher_runs_record_weights_name_file_and_checksum(tmp_path: Path):
    weights_path = tmp_path / "imagenet-vgg-f.mat"
    weights_path.write_bytes(b"abc")
    weights = WeightsFile.locate("vggf_imagenet", weights_path)
    preset = load_preset("paper")
    graph = expand_graph(preset, ["gender"], ["vggf", "resnet50"], train_sizes={"gender": 100},
                         data_fingerprints={"gender": "d"}, weights={"vggf_imagenet": weights})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "occkd-test", run_name="grid", params={"preset": "paper"})
    client = MlflowClient(uri)
    teacher = client.get_run(tracker.start_node(graph.nodes["gender/vggf/teacher"])).data.params
    assert teacher["pretrained.weights"] == "vggf_imagenet"
    assert teacher["pretrained.sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert teacher["pretrained.file"] == str(weights_path.resolve())
    scratch = client.get_run(tracker.start_node(graph.nodes["gender/resnet50/teacher"])).data.params
    assert scratch["pretrained.weights"] == "from_scratch" and "pretrained.sha256" not in scratch
    student = client.get_run(tracker.start_node(graph.nodes["gender/vggf/student"])).data.params
    assert not any(key.startswith("pretrained.") for key in student)

    significance = graph.nodes["gender/significance"]
    run_id = tracker.start_node(significance)
    row = {"arch": "vggf", "model": "fusion", "test_set": "test", "pvalue": 0.0414, "pvalue_holm": 0.124,
           "verdict": "no significant difference", "verdict_paper": "better", "dagger": True}
    tracker._log_comparison(run_id, row)
    run = client.get_run(run_id).data
    assert run.metrics["pvalue.vggf.fusion.test"] == 0.0414 and run.metrics["dagger.vggf.fusion.test"] == 1.0
    assert run.tags["verdict.vggf.fusion.test"] == "no significant difference"  # Holm
    assert run.tags["verdict_uncorrected.vggf.fusion.test"] == "better"  # the papers' rule


def test_two_drivers_opening_a_new_sqlite_store_at_once_both_get_their_runs(tmp_path: Path):
    """MLflow creates a SQLite store's tables on first use; two grids doing so together crashed with
    "table ... already exists" before the store was opened under a lock. Real processes, released together."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Both import MLflow, say so with a file, and open the store once both files exist: at the same moment.
    script = ("import sys, time, pathlib; from grid.tracking import Tracker; "
              "folder = pathlib.Path(sys.argv[2]); (folder / sys.argv[3]).touch(); "
              "[time.sleep(0.01) for _ in iter(lambda: len(list(folder.glob('ready*'))) < 2, False)]; "
              "Tracker(sys.argv[1], 'occkd-race', run_name='grid', params={}, storage=sys.argv[3])")
    drivers = [subprocess.Popen([sys.executable, "-c", script, uri, str(tmp_path), f"ready{i}"],
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
    for driver in drivers:
        assert driver.wait(timeout=120) == 0, driver.stderr.read()[-2000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("occkd-race")
    assert len(client.search_runs([experiment.experiment_id])) == 2
