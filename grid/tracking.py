"""MLflow records of a grid invocation. Only the driver talks to MLflow (trials logging the same params
concurrently collide, a known problem of per-trial MLflow logging in Ray).

One experiment per grid; one parent run per invocation; one child run per node, named like
``fer/vggface/triplet_kd``, tagged ``occkd.task/arch/strategy/train_faces/node`` (the node's content
hash) and the git SHA, with the resolved spec as params, per-epoch metrics, final metrics per test
condition and the node's files as artifacts. A node already recorded as FINISHED is never recorded
again, and runs that a killed invocation left RUNNING are closed as FAILED on the next start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import urllib.error
import urllib.request
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

# Against a tracking server MLflow prints "View run ... at: URL" for every run it ends: dozens of lines
# through the grid's progress view. The report and the parent run link the runs instead.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from grid.graph import Node
from grid.storage_lock import driver_alive, driver_identity

PARENT_TAG = "mlflow.parentRunId"
#: The driver (host, pid, process start) that created a run, and the storage it ran on.
DRIVER_TAG = "occkd.driver"
STORAGE_TAG = "occkd.storage"
#: Keys Tune adds to every reported result; they are bookkeeping, not the node's metrics.
TUNE_KEYS = {"timestamp", "pid", "time_this_iter_s", "time_total_s", "time_since_restore", "iterations_since_restore",
             "training_iteration", "done", "date", "hostname", "node_ip", "trial_id", "experiment_tag",
             "checkpoint_dir_name", "config", "event", "epoch"}
MAX_PARAM_LENGTH = 6000


def git_sha(repo: Path | None = None) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo or Path(__file__).parent, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return out
    return {prefix: value}


class Tracker:
    """Wraps an MlflowClient for one grid invocation."""

    def __init__(self, tracking_uri: str, experiment: str, *, run_name: str, params: Mapping[str, Any],
                 storage: str = "") -> None:
        for name in ("mlflow", "alembic"):  # schema set-up chatter on a new store, not the user's business
            logging.getLogger(name).setLevel(logging.WARNING)
        self.tracking_uri = tracking_uri
        try:
            with _schema_lock(tracking_uri):  # two drivers creating one new SQLite store race on its tables
                self.client = MlflowClient(tracking_uri=tracking_uri)
                found = self.client.get_experiment_by_name(experiment)
                self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        except Exception as err:  # unreachable server, unwritable store: say which URI
            raise RuntimeError(f"cannot reach the MLflow tracking store {tracking_uri!r}: {err}") from None
        self.sha = git_sha()
        self.storage = storage
        # Which driver a run belongs to, so that another invocation closes only runs whose driver is gone.
        self.driver_tags = {DRIVER_TAG: json.dumps(driver_identity()), STORAGE_TAG: storage}
        self.closed_stale = self._close_stale_runs()
        self.parent = self.client.create_run(self.experiment_id, run_name=run_name,
                                             tags={"occkd.kind": "grid", "mlflow.source.git.commit": self.sha,
                                                   **self.driver_tags})
        self._log_params(self.parent.info.run_id, params)
        self.node_runs: dict[str, str] = {}  # node key -> run id of this invocation

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
        runs = self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                       max_results=50000)
        return {r.data.tags["occkd.node"] for r in runs if "occkd.node" in r.data.tags}

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        flat = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten("", params).items()]
        for start in range(0, len(flat), 100):
            self.client.log_batch(run_id, params=flat[start : start + 100])

    def start_node(self, node: Node) -> str:
        """The node's run in this invocation: created once, reused when Tune retries the node."""
        if node.key in self.node_runs:
            return self.node_runs[node.key]
        tags = {PARENT_TAG: self.parent.info.run_id, "occkd.task": node.task, "occkd.arch": node.arch or "-",
                "occkd.strategy": node.strategy, "occkd.train_faces": node.train_faces, "occkd.node": node.hash,
                "occkd.seed": str(node.seed), "mlflow.source.git.commit": self.sha, **self.driver_tags}
        run = self.client.create_run(self.experiment_id, run_name=node.run_name, tags=tags)
        params = {"spec": node.params, "grid_point": node.grid_point, "resources": node.resources.as_dict(),
                  "parents": ",".join(f"{edge.role}={edge.key}" for edge in node.parents)}
        if node.init:  # a teacher: which weights it started from, the file and its sha256
            params["pretrained"] = dict(node.init)
        self._log_params(run.info.run_id, params)
        self.node_runs[node.key] = run.info.run_id
        return run.info.run_id

    def _supersede(self, node: Node, new_run_id: str) -> None:
        """A node that ran again (its stored outputs were damaged) keeps one FINISHED run: once the new one
        has finished, the older ones end as KILLED, pointing at it. Until then the old record stands (a
        rerun that fails must not leave the node with no finished run while its children have one)."""
        older = self.client.search_runs([self.experiment_id], max_results=100,
                                        filter_string=f"tags.`occkd.node` = '{node.hash}' and attributes.status = 'FINISHED'")
        for run in (r for r in older if r.info.run_id != new_run_id):
            self.client.set_tag(run.info.run_id, "occkd.superseded_by", new_run_id)
            self.client.set_terminated(run.info.run_id, status="KILLED")

    def log_epoch(self, node: Node, metrics: Mapping[str, Any]) -> None:
        run_id = self.node_runs.get(node.key)
        if run_id is None:
            return
        step = int(metrics.get("epoch", 0))
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in TUNE_KEYS]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def finish_node(self, node: Node, result: Mapping[str, Any], directory: Path, artifacts: Iterable[str]) -> None:
        run_id = self.node_runs.get(node.key) or self.start_node(node)
        now = int(time.time() * 1000)
        flat = {**result.get("metrics", {}), **{metric_name(row, node.strategy): row["value"]
                                                for row in result.get("scores", [])}}
        metrics = [Metric(k, float(v), now, 0) for k, v in flat.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for start in range(0, len(metrics), 500):
            self.client.log_batch(run_id, metrics=metrics[start : start + 500])
        for comparison in result.get("comparisons", []):
            self._log_comparison(run_id, comparison)
        placement = result.get("placement") or {}
        if placement:  # where a training node ran: which Ray node, GPUs and workers, through Ray Train or not
            tags = [RunTag(f"occkd.{key}", str(placement.get(key)))
                    for key in ("ray_node", "device", "workers", "ray_train", "width") if key in placement]
            tags.append(RunTag("occkd.gpu_ids", ",".join(placement.get("gpu_ids", [])) or "-"))
            if placement.get("resumed_from_epoch") is not None:  # Ray Train restarted its workers mid-node
                tags.append(RunTag("occkd.resumed_from_epoch", str(placement["resumed_from_epoch"])))
            self.client.log_batch(run_id, tags=tags)
        for name in artifacts:
            path = directory / name
            if path.exists():
                self.client.log_artifact(run_id, str(path), artifact_path=str(Path(name).parent) if "/" in name else None)
        self.client.log_artifact(run_id, str(directory / "result.json"))
        self.client.set_terminated(run_id, status="FINISHED")
        self._supersede(node, run_id)

    def _log_comparison(self, run_id: str, row: Mapping[str, Any]) -> None:
        name = f"{row['arch']}.{row['model']}.{row['test_set']}"
        self.client.log_metric(run_id, f"pvalue.{name}", float(row["pvalue"]))
        self.client.log_metric(run_id, f"pvalue_holm.{name}", float(row["pvalue_holm"]))
        self.client.set_tag(run_id, f"verdict.{name}", row["verdict"])  # Holm-corrected
        if "verdict_paper" in row:  # the papers' rule: uncorrected p < α (a dagger where the model is better)
            self.client.log_metric(run_id, f"dagger.{name}", float(bool(row["dagger"])))
            self.client.set_tag(run_id, f"verdict_uncorrected.{name}", row["verdict_paper"])

    def fail_node(self, node: Node, reason: str) -> None:
        run_id = self.node_runs.get(node.key) or self.start_node(node)
        self.client.set_tag(run_id, "occkd.error", reason[:5000])
        self.client.set_terminated(run_id, status="FAILED")

    def kill_node(self, node: Node, reason: str) -> None:
        """An interrupted node's run ends as KILLED (its checkpoint stays; the rerun resumes it)."""
        run_id = self.node_runs.get(node.key)
        if run_id is None:
            return
        self.client.set_tag(run_id, "occkd.closed_reason", reason)
        self.client.set_terminated(run_id, status="KILLED")

    def finish(self, status: str, artifacts: Iterable[Path] = ()) -> None:
        for path in artifacts:
            self.client.log_artifact(self.parent.info.run_id, str(path))
        self.client.set_terminated(self.parent.info.run_id, status=status)


@contextlib.contextmanager
def _schema_lock(uri: str) -> Iterator[None]:
    """Hold an OS lock beside a SQLite store while MLflow first opens it: MLflow creates the schema on first
    use, and two processes doing so at once crash with "table ... already exists" (seen with two grids
    started together on a new mlflow.db). Other stores serialise this themselves."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    with open(f"{uri[len('sqlite:///'):]}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def metric_name(row: Mapping[str, Any], node_strategy: str) -> str:
    """A score row's MLflow name: ``test_lower_accuracy`` for the node's own model,
    ``standard_kd_svm_test_affectnet_lower_accuracy`` for another model of the node (fusion's variants)."""
    prefix = "" if row["model"] == node_strategy else f"{row['model']}_"
    return f"{prefix}{row['test_set']}_{row['visible']}_{row['metric']}"


#: Tracking-store schemes MLflow 3 serves runs from (its SQLAlchemy databases, a server, Databricks).
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def check_tracking_uri(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, before anything is written, when the tracking store cannot be reached (MLflow's own
    client retries a dead server for minutes)."""
    scheme = uri.partition("://")[0].split("+")[0].lower() if "://" in uri else ""
    if scheme in ("", "file"):
        raise RuntimeError(f"--tracking-uri {uri!r}: MLflow 3 keeps its file store ('mlruns' folders) in maintenance "
                           f"mode; use a database, e.g. sqlite:///{Path.cwd() / 'mlflow.db'}, or an MLflow server "
                           f"(http://HOST:PORT)")
    if scheme not in TRACKING_SCHEMES:
        raise RuntimeError(f"--tracking-uri {uri!r}: unknown scheme {scheme!r}; use sqlite:///PATH/mlflow.db, "
                           f"http(s)://HOST:PORT (an MLflow server) or {', '.join(s for s in TRACKING_SCHEMES if s not in ('sqlite', 'http', 'https'))}")
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                response.read()
        except (OSError, urllib.error.URLError) as err:
            raise RuntimeError(f"cannot reach the MLflow tracking server {uri!r} ({err}); start it, or check "
                               f"the port-forward, or pass another --tracking-uri") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise RuntimeError(f"cannot create the MLflow store {uri!r}: {folder} is not a writable directory")


def default_tracking_uri(workdir: Path) -> str:
    """A SQLite store in the working directory, so ``mlflow ui`` opens it (MLflow's default store since 3.7)."""
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"

