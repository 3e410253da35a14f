"""MLflow records of a grid. Only the driver talks to MLflow (trials logging the same params
concurrently collide, a known problem of per-trial MLflow logging in Ray).

- One experiment per preset, tagged as model development (``mlflow.experimentKind``), whose runs table
  :func:`ui_link` opens directly.
- One parent run per grid: the graph's identity (:attr:`grid.graph.StageGraph.identity`) is its tag, and
  every rerun of the same grid continues it (a tag per invocation says what each one ran).
- One child run per node, named like ``fer/vggface/triplet_kd``, tagged ``occkd.task/arch/strategy/
  train_faces/node`` (``occkd.strategy``: the node's stage, under the tag's first name; ``occkd.node``: its
  content hash) and the git SHA, with the resolved spec as params,
  per-epoch metrics, its data as dataset inputs (one per split: name ``<data set>/<split>``, digest the
  prepared store's fingerprint, source its path), final metrics per test condition linked to the test
  dataset, and its files as artifacts. A training node's ``best.pt`` is an MLflow logged model (a
  ``weights_only`` state dict with its architecture, not a pickled module) to which those metrics are
  linked too.
- Every write after the parent run is opened goes through one background thread
  (:class:`grid.records.Recorder`), so the scheduler never waits on MLflow: a node's run ends FINISHED
  once its files are up, and the driver drains the queue before it exits. A store that stops answering
  holds the records (the nodes go on training and sealing) until it answers again; what is still held at
  the end is counted and the driver exits 1. A driver killed with records pending leaves those runs
  RUNNING; the next invocation closes them as FAILED and records the sealed nodes again.
- Records are per storage: a grid on another ``--storage`` sharing the store neither continues this
  grid's parent run nor supersedes its node runs.

A node already recorded as FINISHED is never recorded again, and runs that a killed invocation left
RUNNING are closed as FAILED on the next start. The store is checked before any of this by
:mod:`grid.tracking_store`; what a run holds (datasets, metric names, logged model files) is
:mod:`grid.mlflow_content`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

# Against a tracking server MLflow prints "View run ... at: URL" for every run it ends: dozens of lines
# through the grid's progress view. The report and the parent run link the runs instead.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

from mlflow.entities import DatasetInput, InputTag, LoggedModelOutput, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from grid.code import CODE_ROOT, code_fingerprint
from grid.faults import hold_upload, upload_delay
from grid.graph import Node
from grid.artifacts import RESULT_FILE, checkpoint_in
from grid.mlflow_content import (
    DataRecord, comparison_record, dataset_inputs, flatten, git_sha, model_name, node_note, placement_tags,
    result_metrics, stage_model,
)
from grid.records import Job, Recorder
from grid.results import NodeResult, SignificanceNodeResult
from grid.storage_lock import driver_alive, driver_identity
from grid.tracking_store import one_line, schema_lock

PARENT_TAG = "mlflow.parentRunId"
#: The driver (host, pid, process start) that created a run, and the storage it ran on.
DRIVER_TAG = "occkd.driver"
STORAGE_TAG = "occkd.storage"
#: Keys Tune adds to every reported result; they are bookkeeping, not the node's metrics.
TUNE_KEYS = {"timestamp", "pid", "time_this_iter_s", "time_total_s", "time_since_restore", "iterations_since_restore",
             "training_iteration", "done", "date", "hostname", "node_ip", "trial_id", "experiment_tag",
             "checkpoint_dir_name", "config", "event", "epoch"}
MAX_PARAM_LENGTH = 6000
#: The experiment's kind for MLflow: model development, not GenAI (the UI's default workspace in 3.x).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
#: The parent run's tag holding the graph's identity: reruns of the same grid continue that run.
GRID_TAG = "occkd.grid"
#: The port ``mlflow ui`` serves on unless told otherwise.
UI_PORT = 5000


def ui_link(tracking_uri: str, experiment_id: str, port: int = UI_PORT) -> str:
    """Where a browser opens the experiment's runs table: on the tracking server itself, or on ``mlflow ui``
    (its port) for a local store. ``workflowType=machine_learning``: MLflow 3's UI otherwise opens its GenAI
    workspace, which shows no runs, until the user finds its switch."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else f"http://127.0.0.1:{port}"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ui_command(tracking_uri: str, port: int = UI_PORT) -> str | None:
    """The command that serves a local store's UI (None for a tracking server, which serves its own)."""
    if tracking_uri.startswith(("http://", "https://")):
        return None
    # Quoted for the shell: a store under a folder with spaces (or quotes) must still paste and run.
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)} --port {port}"


class Tracker:
    """Wraps an MlflowClient for one grid invocation.

    ``grid_id``: the graph's identity; a parent run tagged with it is continued, not duplicated.
    ``data``: per task, its prepared store (:class:`DataRecord`), logged as each node's dataset inputs."""

    def __init__(self, tracking_uri: str, experiment: str, *, run_name: str, params: Mapping[str, Any],
                 storage: str = "", grid_id: str = "", data: Mapping[str, DataRecord] | None = None,
                 say: Callable[[str], None] | None = None) -> None:
        for name in ("mlflow", "alembic"):  # schema set-up chatter on a new store, not the user's business
            logging.getLogger(name).setLevel(logging.WARNING)
        self.tracking_uri = tracking_uri
        try:
            with schema_lock(tracking_uri):  # two drivers creating one new SQLite store race on its tables
                self.client = MlflowClient(tracking_uri=tracking_uri)
                found = self.client.get_experiment_by_name(experiment)
                self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
                if found is None or found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                    self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        except Exception as err:  # unreachable server, unwritable store: say which URI
            raise RuntimeError(f"cannot reach the MLflow tracking store {tracking_uri!r}: {one_line(err)}") from None
        self.sha = git_sha(CODE_ROOT)
        self.storage = storage
        self.data = dict(data or {})
        self._delay = upload_delay()
        # Which driver a run belongs to, so that another invocation closes only runs whose driver is gone.
        # The code that trains: every trial checks it imports exactly this (grid.code), so the commit recorded
        # beside is the code's, and occkd.code tells uncommitted edits apart.
        self.driver_tags = {DRIVER_TAG: json.dumps(driver_identity()), STORAGE_TAG: storage,
                            "occkd.code": code_fingerprint(), "occkd.code_root": str(CODE_ROOT)}
        self.closed_stale = self._close_stale_runs()
        self.parent, self.invocation = self._open_parent(run_name, grid_id, params)
        self.link = ui_link(tracking_uri, self.experiment_id)
        # From here on every write goes through the recorder's thread (grid.records): the scheduler never
        # waits on MLflow, and a store that stops answering holds the records instead of the grid.
        self.recorder = Recorder(tracking_uri, say=say)
        self.started: list[str] = []  # node keys this invocation opened a run for, in order
        self.start_times: dict[str, int] = {}  # node key -> when the driver opened its run (ms)
        self.node_runs: dict[str, str] = {}  # node key -> run id of this invocation (set on the recorder's thread)
        self.models: dict[str, str] = {}  # node key -> logged model id of this invocation
        self.workers_choices: dict[str, str] = {}  # node key -> why it got its DDP workers (grid.ddp_workers)

    def _open_parent(self, run_name: str, grid_id: str, params: Mapping[str, Any]):
        """The grid's parent run and this invocation's number in it: the last run of the same grid on the same
        storage is continued (RUNNING again). The same grid on other storage gets its own parent, which names
        the other's if that one is running."""
        previous = []
        if grid_id:
            previous = self.client.search_runs(
                [self.experiment_id], max_results=20, order_by=["attributes.start_time DESC"],
                filter_string=f"tags.`{GRID_TAG}` = '{grid_id}' and tags.`occkd.kind` = 'grid'")
        # (filtered in Python, not in the filter string: a storage path may hold quotes)
        # A parent is continued only by the same grid on the same storage: another storage's grid sharing this
        # store has its own (issue 28: a second storage's rerun continued the first's and rewrote its tag).
        mine = [run for run in previous if run.data.tags.get(STORAGE_TAG, "") == self.storage]
        idle = next((run for run in mine if run.info.status != "RUNNING"), None)
        if idle is not None:
            run_id = idle.info.run_id
            self.client.update_run(run_id, status="RUNNING")
            invocation = int(idle.data.tags.get("occkd.invocations", "1")) + 1
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in
                                                {"mlflow.source.git.commit": self.sha, **self.driver_tags}.items()])
            return self.client.get_run(run_id), invocation
        tags = {"occkd.kind": "grid", GRID_TAG: grid_id, "mlflow.source.git.commit": self.sha, **self.driver_tags}
        running = [run for run in previous if run.info.status == "RUNNING"]
        if running:  # the same grid is running from another live driver (on other storage)
            tags["occkd.alongside"] = running[0].info.run_id
        parent = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self._log_params(parent.info.run_id, params)
        for record in self.data.values():  # the grid's data, so that the parent's row shows them too
            self.client.log_inputs(parent.info.run_id, datasets=[
                DatasetInput(record.dataset(split)._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", split)])
                for split in record.splits])
        return parent, 1

    def record_invocation(self, *, complete: int, to_run: int) -> None:
        """What this invocation found and ran, as the parent's ``occkd.invocation.N`` tag."""
        identity = json.loads(self.driver_tags[DRIVER_TAG])
        text = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} on {identity.get('host')} (pid {identity.get('pid')}), "
                f"commit {self.sha[:10]}: {complete} node(s) already complete, {to_run} to run")
        tags = [RunTag("occkd.invocations", str(self.invocation)), RunTag(f"occkd.invocation.{self.invocation}", text),
                RunTag("occkd.ui_link", self.link)]
        self.recorder.submit(Job("invocation", "parent", lambda client: client.log_batch(self.parent.info.run_id,
                                                                                           tags=tags)))

    def _close_stale_runs(self) -> int:
        """Runs left RUNNING by a killed invocation end as FAILED (their nodes re-run or resume). Only runs
        whose driver is gone: a driver on this host that no longer runs, or, on another host, one that ran
        on this invocation's storage (whose lock this invocation holds, so that driver has ended). Runs of a
        live grid on other storage sharing the MLflow store are left alone."""
        running = self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                          max_results=5000)
        stale = [run for run in running if self._driver_gone(run.data.tags)]
        for run in stale:
            self.client.set_tag(run.info.run_id, "occkd.closed_reason", "driver stopped before the node finished")
            self.client.set_terminated(run.info.run_id, status="FAILED")
        return len(stale)

    def _driver_gone(self, tags: Mapping[str, str]) -> bool:
        if DRIVER_TAG not in tags:
            return True  # recorded before drivers were named
        try:
            alive = driver_alive(json.loads(tags[DRIVER_TAG]))
        except ValueError:
            return True
        return not alive if alive is not None else tags.get(STORAGE_TAG) == self.storage

    def finished_hashes(self) -> set[str]:
        """The nodes with a FINISHED run recorded from this storage (another storage's record of the same
        node says nothing of the files here)."""
        runs = self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                       max_results=50000)
        return {r.data.tags["occkd.node"] for r in runs
                if "occkd.node" in r.data.tags and r.data.tags.get(STORAGE_TAG, "") == self.storage}

    def _log_params(self, run_id: str, params: Mapping[str, Any], client: MlflowClient | None = None) -> None:
        flat = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten("", params).items()]
        for start in range(0, len(flat), 100):
            (client or self.client).log_batch(run_id, params=flat[start : start + 100])

    def start_node(self, node: Node, workers_choice: str | None = None) -> None:
        """Open the node's run in this invocation (once; Tune's retries of the node reuse it). ``workers_choice``:
        why a training node got its DDP workers, from the searcher that chose them (its ``occkd.workers_choice``
        tag, there from the start, so a node that fails still says it)."""
        if node.key in self.started:
            return
        self.started.append(node.key)
        if workers_choice is not None:
            self.workers_choices[node.key] = workers_choice
        # The run is created on the recorder's thread, maybe after a teacher's upload or an outage: it
        # starts when the node did, not when its record was written.
        self.start_times[node.key] = int(time.time() * 1000)
        self.recorder.submit(Job(f"{node.key}: open", node.key, lambda client: self._node_run(client, node)))

    def _node_run(self, client: MlflowClient, node: Node) -> str:
        """On the recorder's thread: the node's run of this invocation, created on first use."""
        if node.key in self.node_runs:
            return self.node_runs[node.key]
        tags = {PARENT_TAG: self.parent.info.run_id, "occkd.task": node.task, "occkd.arch": node.arch or "-",
                # occkd.strategy holds the node's stage; the tag keeps its first name for users' saved searches
                "occkd.strategy": node.stage, "occkd.train_faces": node.train_faces, "occkd.node": node.hash,
                "occkd.seed": str(node.seed), "mlflow.source.git.commit": self.sha, **self.driver_tags,
                "mlflow.note.content": node_note(node, self.storage)}
        if node.key in self.workers_choices:
            tags["occkd.workers_choice"] = self.workers_choices[node.key]
        run = client.create_run(self.experiment_id, run_name=node.run_name, tags=tags,
                                start_time=self.start_times.get(node.key))
        params = {"spec": node.params, "grid_point": node.grid_point, "resources": node.resources.as_dict(),
                  "parents": ",".join(f"{edge.role}={edge.key}" for edge in node.parents)}
        if node.init:  # a teacher: which weights it started from, the file and its sha256
            params["pretrained"] = dict(node.init)
        self._log_params(run.info.run_id, params, client)
        if node.task in self.data:
            client.log_inputs(run.info.run_id, datasets=dataset_inputs(node, self.data[node.task]))
        self.node_runs[node.key] = run.info.run_id
        return run.info.run_id

    def log_epoch(self, node: Node, metrics: Mapping[str, Any]) -> None:
        step = int(metrics.get("epoch", 0))
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in TUNE_KEYS]
        if batch:
            self.recorder.submit(Job(f"{node.key}: epoch {step}", node.key,
                                     lambda client: client.log_batch(self._node_run(client, node), metrics=batch)))

    def finish_node(self, node: Node, result: NodeResult, directory: Path, artifacts: Iterable[str]) -> None:
        """Record a sealed node, on the recorder's thread: its metrics, tags, logged model and dataset links,
        then its files, after which the run ends FINISHED (and supersedes an older run of the node)."""
        checkpoint = checkpoint_in(directory)
        has_model = node.kind == "train" and checkpoint.exists()
        files = [(directory / name, str(Path(name).parent) if "/" in name else None) for name in artifacts
                 if (directory / name).exists() and not (has_model and directory / name == checkpoint)]
        files.append((directory / RESULT_FILE, None))
        size = sum(path.stat().st_size for path, _ in files) + (checkpoint.stat().st_size if has_model else 0)
        self.recorder.submit(Job(node.key, node.key, final=True, size=size, fn=lambda client: self._record_sealed(
            client, node, result, files, checkpoint if has_model else None)))

    def _record_sealed(self, client: MlflowClient, node: Node, result: NodeResult,
                       files: list[tuple[Path, str | None]], checkpoint: Path | None) -> None:
        run_id = self._node_run(client, node)
        model_id = self._create_model(client, node, run_id) if checkpoint is not None else None
        metrics = result_metrics(result, node.stage, self.data.get(node.task), timestamp=int(time.time() * 1000),
                                 model_id=model_id)
        for start in range(0, len(metrics), 500):
            client.log_batch(run_id, metrics=metrics[start : start + 500])
        for comparison in (result.comparisons if isinstance(result, SignificanceNodeResult) else ()):
            self._log_comparison(run_id, comparison, client)
        tags = placement_tags(result.placement)
        if tags:
            client.log_batch(run_id, tags=tags)
        self._upload(client, node, run_id, model_id, files, checkpoint)

    def _create_model(self, client: MlflowClient, node: Node, run_id: str) -> str:
        """The node's best checkpoint as an MLflow logged model (PENDING until its file is uploaded); once per
        invocation, also when a record held through an outage is written again."""
        if node.key in self.models:
            return self.models[node.key]
        spec = node.params
        model = client.create_logged_model(
            self.experiment_id, name=model_name(node), source_run_id=run_id, model_type=f"occkd/{node.arch}",
            params={"arch": str(node.arch), "task": node.task, "strategy": node.stage,
                    "train_faces": node.train_faces, "input_size": str(spec.get("input_size", ""))},
            tags={"occkd.node": node.hash, "occkd.node_key": node.key, "mlflow.source.git.commit": self.sha})
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        self.models[node.key] = model.model_id
        return model.model_id

    def _upload(self, client: MlflowClient, node: Node, run_id: str, model_id: str | None,
                files: list[tuple[Path, str | None]], checkpoint: Path | None) -> None:
        """On the recorder's thread: the node's files, its model's checkpoint, then the run's end. A failure
        while the store answers ends the run FAILED with the reason; during an outage the recorder holds
        the whole record and writes it again once the store answers."""
        hold_upload(self._delay, node.key)  # tests: an upload that takes this long
        try:
            for path, artifact_path in files:
                client.log_artifact(run_id, str(path), artifact_path=artifact_path)
            if model_id:
                with tempfile.TemporaryDirectory(prefix="occkd-model-") as folder:
                    stage_model(Path(folder), node, checkpoint)
                    client.log_model_artifacts(model_id, folder)
                client.finalize_logged_model(model_id, "READY")
            client.set_terminated(run_id, status="FINISHED")
        except Exception as err:
            with contextlib.suppress(Exception):  # the store may be the one failing: the recorder sorts it out
                client.set_tag(run_id, "occkd.error", f"MLflow upload failed: {err}"[:5000])
                client.set_terminated(run_id, status="FAILED")
                if model_id:
                    client.finalize_logged_model(model_id, "FAILED")
            raise
        self._supersede(client, node, run_id)

    def _supersede(self, client: MlflowClient, node: Node, new_run_id: str) -> None:
        """A node that ran again (its stored outputs were damaged) keeps one FINISHED run: once the new one
        has finished, the older ones end as KILLED, pointing at it. Until then the old record stands (a
        rerun that fails must not leave the node with no finished run while its children have one)."""
        older = client.search_runs([self.experiment_id], max_results=100,
                                   filter_string=f"tags.`occkd.node` = '{node.hash}' and attributes.status = 'FINISHED'")
        # Only this storage's: a grid on other storage sharing the store keeps its own records (issue 28).
        mine = [r for r in older if r.info.run_id != new_run_id and r.data.tags.get(STORAGE_TAG, "") == self.storage]
        for run in mine:
            client.set_tag(run.info.run_id, "occkd.superseded_by", new_run_id)
            client.set_terminated(run.info.run_id, status="KILLED")

    def _log_comparison(self, run_id: str, row: Mapping[str, Any], client: MlflowClient | None = None) -> None:
        metrics, tags = comparison_record(row)
        client = client or self.client
        for name, value in metrics.items():
            client.log_metric(run_id, name, value)
        for name, value in tags.items():
            client.set_tag(run_id, name, value)

    def note_retry(self, node: Node, attempt: int, reason: str) -> None:
        """Tag the node's run with its retries: how many, and why each attempt before failed."""
        tags = [RunTag("occkd.retries", str(attempt)), RunTag(f"occkd.retry.{attempt}", reason[:5000])]
        self.recorder.submit(Job(f"{node.key}: retry {attempt}", node.key,
                                 lambda client: client.log_batch(self._node_run(client, node), tags=tags)))

    def fail_node(self, node: Node, reason: str) -> None:
        ended = int(time.time() * 1000)  # when it failed, not when the record is written

        def record(client: MlflowClient) -> None:
            run_id = self._node_run(client, node)
            client.set_tag(run_id, "occkd.error", reason[:5000])
            client.set_terminated(run_id, status="FAILED", end_time=ended)

        self.recorder.submit(Job(node.key, node.key, record, final=True))

    def kill_node(self, node: Node, reason: str) -> None:
        """An interrupted node's run ends as KILLED (its checkpoint stays; the rerun resumes it)."""
        if node.key not in self.started:
            return

        ended = int(time.time() * 1000)

        def record(client: MlflowClient) -> None:
            run_id = self._node_run(client, node)
            client.set_tag(run_id, "occkd.closed_reason", reason)
            client.set_terminated(run_id, status="KILLED", end_time=ended)

        self.recorder.submit(Job(node.key, node.key, record, final=True))

    def kill_open_runs(self, reason: str) -> int:
        """Now, from the calling thread (a driver leaving: the recorder's queue is abandoned): every run of
        this invocation still RUNNING (nodes training or uploading, and the parent) ends KILLED; the next
        invocation resumes the nodes and records the sealed ones again. The count."""
        self.recorder.abandon()
        closed = 0
        for run_id in [*self.node_runs.values(), self.parent.info.run_id]:
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_tag(run_id, "occkd.closed_reason", reason)
                self.client.set_terminated(run_id, status="KILLED")
                closed += 1
        return closed

    def drain(self, say: Callable[[str], None] | None = None) -> dict[str, str]:
        """Wait for the records in flight (held ones are tried once more); the nodes whose upload failed while
        the store answered (their runs ended FAILED; the next invocation records them again from storage).
        Nodes an outage kept out of the store: :meth:`unrecorded`."""
        return self.recorder.drain(say)

    def unrecorded(self) -> list[str]:
        return self.recorder.unrecorded()

    def finish(self, status: str, artifacts: Iterable[Path] = (), figures: Iterable[Path] = (),
               note: str = "") -> None:
        """End the parent run: the report's files, its figures under ``figures/``, and ``note`` as the run's
        description (what the MLflow UI shows at the top of the run's page). Queued: :meth:`drain` waits."""
        run_id = self.parent.info.run_id
        artifacts, figures = list(artifacts), list(figures)

        def record(client: MlflowClient) -> None:
            for path in artifacts:
                client.log_artifact(run_id, str(path))
            for path in figures:
                client.log_artifact(run_id, str(path), artifact_path="figures")
            if note:
                client.set_tag(run_id, "mlflow.note.content", note)
            client.set_terminated(run_id, status=status)

        self.recorder.submit(Job("parent", "parent", record, final=True))
