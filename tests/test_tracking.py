"""What the MLflow records say of a teacher's starting weights and of both significance rules, on a
real SQLite tracking store."""

import dataclasses
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from grid.graph import expand_graph
from grid.artifacts import write_result
from grid.results import ScoreRow, TrainNodeResult, TrainTiming
from grid.tracking import Tracker
from occkd_core.presets import load_preset
from occkd_core.pretrained import WeightsFile


@pytest.mark.slow
def test_teacher_runs_record_weights_name_file_and_checksum(tmp_path: Path):
    weights_path = tmp_path / "vggf-imagenet.pt"
    weights_path.write_bytes(b"abc")
    # as read from imagenet-vgg-f.mat's averageImage (tests/test_pretrained.py reads real .mat layouts)
    weights = dataclasses.replace(WeightsFile.locate("vggf_imagenet", weights_path),
                                  input_mean=(122.5, 114.25, 101.75))
    preset = load_preset("paper")
    graph = expand_graph(preset, ["gender"], ["vggf", "resnet50"], train_sizes={"gender": 100},
                         data_fingerprints={"gender": "d"}, weights={"vggf_imagenet": weights})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "occkd-test", run_name="grid", params={"preset": "paper"})
    client = MlflowClient(uri)

    def start(key: str) -> str:  # runs are opened on the recorder's thread
        tracker.start_node(graph.nodes[key])
        tracker.drain()
        return tracker.node_runs[key]

    teacher = client.get_run(start("gender/vggf/teacher")).data.params
    assert teacher["pretrained.weights"] == "vggf_imagenet"
    assert teacher["pretrained.sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert teacher["pretrained.file"] == str(weights_path.resolve())
    assert teacher["pretrained.input_mean"] == "[122.5, 114.25, 101.75]"  # beside the checksum
    scratch = client.get_run(start("gender/resnet50/teacher")).data.params
    assert scratch["pretrained.weights"] == "from_scratch" and "pretrained.sha256" not in scratch
    student = client.get_run(start("gender/vggf/student")).data.params
    assert not any(key.startswith("pretrained.") for key in student)

    run_id = start("gender/significance")
    row = {"arch": "vggf", "model": "fusion", "test_set": "test", "pvalue": 0.0414, "pvalue_holm": 0.124,
           "verdict": "no significant difference", "verdict_paper": "better", "dagger": True}
    tracker._log_comparison(run_id, row)
    run = client.get_run(run_id).data
    assert run.metrics["pvalue.vggf.fusion.test"] == 0.0414 and run.metrics["dagger.vggf.fusion.test"] == 1.0
    assert run.tags["verdict.vggf.fusion.test"] == "no significant difference"  # Holm
    assert run.tags["verdict_uncorrected.vggf.fusion.test"] == "better"  # the papers' rule


@pytest.mark.slow
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


def _sealed_teacher(tmp_path: Path):
    from grid.mlflow_content import DataRecord

    graph = expand_graph(load_preset("smoke"), ["gender"], ["vggf"], train_sizes={"gender": 100},
                         data_fingerprints={"gender": "0123456789abcdef"})
    folder = tmp_path / "node"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "best.pt").write_bytes(b"weights")
    (folder / "result.json").write_text("{}")
    (folder / "predictions.parquet").write_bytes(b"rows")
    record = DataRecord("synthetic", "0123456789abcdef", str(tmp_path / "synthetic.arrow"),
                        {"train": 60, "val": 20, "test": 20})
    teacher = graph.nodes["gender/vggf/teacher"]
    result = TrainNodeResult(key=teacher.key, hash=teacher.hash, stage="teacher",
                             metrics={"best_epoch": 1, "val_score": 71.0},
                             scores=(ScoreRow(model="teacher", test_set="test", visible="upper", metric="accuracy",
                                              value=70.0),),
                             val_score=71.0, best_epoch=1, epochs_run=1, max_epochs=1, seconds=1.0, history=(),
                             placement={}, timing=TrainTiming(started_at=0.0, first_step_at=0.1, last_step_at=0.9,
                                                              finished_at=1.0))
    return graph, folder, {"gender": record}, result


@pytest.mark.slow
def test_a_failed_upload_ends_the_run_failed_and_the_next_invocation_records_the_node_again(tmp_path: Path,
                                                                                           monkeypatch):
    """The upload thread finds a file gone: the node's run ends FAILED with the reason, its model FAILED, the
    driver learns it from drain(), and the node is not counted as recorded (the next invocation records it
    from storage)."""
    import json

    graph, folder, data, result = _sealed_teacher(tmp_path)
    teacher = graph.nodes["gender/vggf/teacher"]
    monkeypatch.setenv("OCCKD_FAULT_UPLOAD_DELAY", json.dumps({"node": teacher.key, "seconds": 1}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "occkd-test", run_name="grid", params={}, grid_id=graph.identity, data=data)
    tracker.finish_node(teacher, result, folder, ["train/best.pt", "predictions.parquet"])
    (folder / "predictions.parquet").unlink()  # while the upload waits
    errors = tracker.drain()
    assert list(errors) == [teacher.key] and "predictions.parquet" in errors[teacher.key]
    client = MlflowClient(uri)
    run = client.get_run(tracker.node_runs[teacher.key])
    assert run.info.status == "FAILED" and run.data.tags["occkd.error"].startswith("MLflow upload failed")
    assert client.get_logged_model(tracker.models[teacher.key]).status == "FAILED"
    assert teacher.hash not in Tracker(uri, "occkd-test", run_name="grid", params={}).finished_hashes()


@pytest.mark.slow
def test_one_parent_per_grid_unless_its_driver_is_alive(tmp_path: Path):
    """A second invocation of the same graph continues the parent; the same graph while that parent's driver
    still runs (another storage) gets its own parent naming the other; another graph gets its own."""
    graph, _, data, _ = _sealed_teacher(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker(uri, "occkd-test", run_name="grid", params={"a": 1}, grid_id=graph.identity, data=data)
    alongside = Tracker(uri, "occkd-test", run_name="grid", params={"a": 1}, grid_id=graph.identity,
                        storage="/elsewhere")  # this process is alive: the first parent is held
    assert alongside.parent.info.run_id != first.parent.info.run_id
    assert alongside.parent.data.tags["occkd.alongside"] == first.parent.info.run_id
    first.finish("FINISHED")
    first.drain()
    again = Tracker(uri, "occkd-test", run_name="grid", params={"a": 1}, grid_id=graph.identity, data=data)
    assert (again.parent.info.run_id, again.invocation) == (first.parent.info.run_id, 2)
    assert again.parent.info.status == "RUNNING"
    other = Tracker(uri, "occkd-test", run_name="grid", params={}, grid_id="another-graph")
    assert other.parent.info.run_id not in (first.parent.info.run_id, alongside.parent.info.run_id)


@pytest.mark.slow
def test_kill_open_runs_ends_every_running_run_of_the_invocation(tmp_path: Path):
    """What a driver that cannot stop in time does before it exits (grid.interrupts): every run it left
    RUNNING, the parent's too, ends KILLED with the reason; finished ones keep their status."""
    graph = expand_graph(load_preset("smoke"), ["gender"], ["vggf"], train_sizes={"gender": 100},
                         data_fingerprints={"gender": "d"})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "occkd-test", run_name="grid", params={})
    client = MlflowClient(uri)
    for key in ("gender/vggf/teacher", "gender/vggf/student"):
        tracker.start_node(graph.nodes[key])
    tracker.drain()
    training, done = tracker.node_runs["gender/vggf/teacher"], tracker.node_runs["gender/vggf/student"]
    client.set_terminated(done, status="FINISHED")
    assert tracker.kill_open_runs("interrupted by SIGTERM; the driver did not stop in time") == 2
    assert client.get_run(training).info.status == "KILLED"
    assert client.get_run(training).data.tags["occkd.closed_reason"].startswith("interrupted by SIGTERM")
    assert client.get_run(tracker.parent.info.run_id).info.status == "KILLED"
    assert client.get_run(done).info.status == "FINISHED"


@pytest.mark.slow
def test_the_workers_choice_tag_is_the_drivers_record_of_the_searchers_choice(tmp_path: Path):
    """Why a node got its DDP workers comes from the driver, where the searcher chose them: the Tune callback
    opens the node's run with it, and the trial neither receives nor returns it (its config holds the node,
    its result's placement what only the trial knows). Real searcher, Tune trial object, callback and SQLite
    store; no Ray cluster is needed to hand out nodes."""
    import io

    from ray.tune.experiment import Trial

    from grid.callbacks import GridCallback
    from grid.ddp_workers import describe_choice
    from grid.progress import Progress
    from test_ddp_workers import paper_searcher

    graph, searcher = paper_searcher(machines=4)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "occkd-test", run_name="grid", params={})
    callback = GridCallback(graph, tracker, Progress(graph, skipped=set(), stream=io.StringIO()), tmp_path, {}, {},
                            workers_note=searcher.workers_note)
    handed = {}
    for i in range(9):  # the nine teachers; the longest chains get several workers, the rest one
        config = searcher.suggest(f"t{i}")
        assert "workers_choice" not in config  # the trial is not told why
        trial = Trial("run_node_trial", config=config, stub=True)
        callback.on_trial_start(iteration=0, trials=[trial], trial=trial)
        handed[config["node"]["key"]] = config["node"]["resources"]["workers"]
    tracker.drain()
    client = MlflowClient(uri)
    tags = {key: client.get_run(tracker.node_runs[key]).data.tags for key in handed}
    wide = [key for key, workers in handed.items() if workers > 1]
    assert wide and "fer/vggface/teacher" in wide
    for key in handed:
        choice = searcher.workers_choices[key]  # every GPU training node's count was chosen by the rule
        assert tags[key]["occkd.workers_choice"] == describe_choice(choice)
        assert tags[key]["occkd.workers_choice"].startswith(f"{handed[key]} (its chain ")
    # The sealed result's placement (the trial's own record) has no say in it.
    key, sealed = wide[0], tmp_path / "node"
    node = graph.nodes[key]
    result = TrainNodeResult(key=key, hash=node.hash, stage=node.stage, metrics={}, scores=(), val_score=0.0,
                             best_epoch=1, epochs_run=1, max_epochs=1, seconds=1.0, history=(),
                             placement={"workers": handed[key], "ray_train": True, "gpu_ids": [], "device": "cpu"},
                             timing=TrainTiming(started_at=0.0, first_step_at=0.1, last_step_at=0.9, finished_at=1.0))
    sealed.mkdir()
    result = write_result(sealed, result, [])
    tracker.finish_node(graph.nodes[key], result, sealed, [])
    tracker.drain()
    after = client.get_run(tracker.node_runs[key]).data.tags
    assert after["occkd.workers_choice"] == tags[key]["occkd.workers_choice"]
    assert after["occkd.workers"] == str(handed[key])


def test_the_printed_mlflow_ui_command_pastes_into_a_shell_with_spaces_in_the_path():
    import shlex

    from grid.tracking import ui_command

    uri = "sqlite:////tmp/my runs/it's/mlflow.db"
    words = shlex.split(ui_command(uri))
    assert words == ["mlflow", "ui", "--backend-store-uri", uri, "--port", "5000"]
    assert ui_command("http://127.0.0.1:5000") is None  # a server serves its own UI


@pytest.mark.slow
def test_two_storages_sharing_one_store_keep_their_own_records(tmp_path: Path):
    """Issue 28: two grids of the same graph on different --storage, one MLflow store. The second's sealed
    nodes used to end the first's runs as KILLED (superseded), and its rerun continued the first's parent
    and rewrote its storage tag. Each storage now keeps its own parent and node runs."""
    graph, folder, data, result = _sealed_teacher(tmp_path)
    teacher = graph.nodes["gender/vggf/teacher"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)

    def grid(storage: str) -> Tracker:  # one invocation: the teacher sealed, the parent ended
        tracker = Tracker(uri, "occkd-test", run_name="grid", params={}, storage=storage, grid_id=graph.identity,
                          data=data)
        tracker.start_node(teacher)
        tracker.finish_node(teacher, result, folder, ["train/best.pt", "predictions.parquet"])
        tracker.finish("FINISHED")
        assert tracker.drain() == {} and tracker.unrecorded() == []
        return tracker

    first, second = grid("/runs/a"), grid("/runs/b")
    assert second.parent.info.run_id != first.parent.info.run_id
    for tracker, storage in ((first, "/runs/a"), (second, "/runs/b")):
        run = client.get_run(tracker.node_runs[teacher.key])
        assert (run.info.status, run.data.tags["occkd.storage"]) == ("FINISHED", storage)
        assert "occkd.superseded_by" not in run.data.tags
    again = grid("/runs/b")  # the second grid's rerun (its node ran again, e.g. a damaged file)
    assert (again.parent.info.run_id, again.invocation) == (second.parent.info.run_id, 2)
    assert client.get_run(first.parent.info.run_id).data.tags["occkd.storage"] == "/runs/a"
    assert client.get_run(first.node_runs[teacher.key]).info.status == "FINISHED"  # not superseded by b's
    older_b = client.get_run(second.node_runs[teacher.key])
    assert (older_b.info.status, older_b.data.tags["occkd.superseded_by"]) == ("KILLED", again.node_runs[teacher.key])
    # What each storage counts as recorded is its own: a third storage has nothing recorded yet.
    assert teacher.hash in again.finished_hashes()
    assert teacher.hash not in Tracker(uri, "occkd-test", run_name="grid", params={}, storage="/runs/c").finished_hashes()


def test_a_dead_writer_thread_never_holds_the_driver(tmp_path: Path):
    """If the recorder's thread dies (here its line-printer fails as the store goes away), drain returns and
    the record it never wrote is counted unrecorded, instead of the driver waiting for ever."""
    from grid.records import Job, Recorder

    def broken_say(text: str) -> None:
        raise OSError("stderr closed")

    def unreachable(client) -> None:
        raise ConnectionError("[Errno 111] Connection refused")

    recorder = Recorder("http://127.0.0.1:1", say=broken_say)  # nothing listens on port 1: the probe fails
    recorder.submit(Job("gender/vggf/teacher", "gender/vggf/teacher", unreachable, final=True))
    import threading

    drained = threading.Thread(target=recorder.drain, daemon=True)  # a hang fails the test, not the suite
    drained.start()
    drained.join(timeout=60)
    assert not drained.is_alive(), "drain waited on a dead writer thread"
    assert recorder.unrecorded() == ["gender/vggf/teacher"]
