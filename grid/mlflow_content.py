"""What the grid's MLflow runs hold besides the Tracker's bookkeeping: the commit, params flattened, a node's
data as MLflow datasets (one per split of the prepared store), its description, the names of its metrics,
the metrics and tags a sealed result gives its run, and its best checkpoint's files as a logged model. Driver
only (imports MLflow)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import DatasetInput, InputTag, Metric, RunTag

from grid.artifacts import StorageLayout
from grid.graph import Node
from grid.results import NodeResult, ScoreRow


def git_sha(repo: Path | None = None) -> str:
    """The commit checked out at ``repo``, for the runs' ``mlflow.source.git.commit`` tag ("unknown" outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo or Path(__file__).parent, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """Nested params as MLflow's flat keys: ``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return out
    return {prefix: value}


@dataclass(frozen=True)
class DataRecord:
    """A task's prepared store as MLflow sees it: one dataset per split, named ``<data set>/<split>``, with
    the store's fingerprint as digest and its path as source."""

    name: str  # e.g. "ferplus", "utkface", "synthetic"
    fingerprint: str
    path: str
    splits: Mapping[str, int]  # split -> rows

    def dataset(self, split: str) -> "StoreSplit":
        return StoreSplit(self, split)

    def dataset_name(self, split: str) -> str:
        return f"{self.name}/{split}"


class StoreSplit(MetaDataset):
    """One split of a prepared store: MLflow's metadata-only dataset plus its row count as the profile
    (MetaDataset has none, and the UI shows the profile beside the digest)."""

    def __init__(self, record: DataRecord, split: str) -> None:
        super().__init__(LocalArtifactDatasetSource(record.path), name=record.dataset_name(split),
                         digest=record.fingerprint[:36])
        self.rows = int(record.splits[split])

    @property
    def profile(self) -> dict[str, int]:
        return {"num_rows": self.rows}

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self.profile)}


def dataset_inputs(node: Node, record: DataRecord) -> list[DatasetInput]:
    """The splits a node reads, each with its split as context and the faces it sees: training and
    validation under the node's training faces, test sets under every visibility it is scored on."""
    inputs = []
    for split in record.splits:
        is_test = split.startswith("test")
        if node.kind == "significance" and not is_test:
            continue
        faces = "full,lower,upper" if is_test and node.kind == "train" else node.train_faces
        tags = [InputTag("mlflow.data.context", split), InputTag("occkd.faces", faces)]
        inputs.append(DatasetInput(record.dataset(split)._to_mlflow_entity(), tags=tags))
    return inputs


def dataset_link(record: DataRecord | None, split: str) -> dict[str, str]:
    """How a metric names the split it was measured on (none where the task's data is not recorded)."""
    if record is None or split not in record.splits:
        return {}
    return {"dataset_name": record.dataset_name(split), "dataset_digest": record.fingerprint[:36]}


def model_name(node: Node) -> str:
    """A node key as an MLflow logged-model name, which may not hold / : . % or quotes."""
    return re.sub(r"[/:.%\"']", "-", node.key)


def node_note(node: Node, storage: str) -> str:
    """A node run's description in the MLflow UI: what it is, what it starts from, where its files are."""
    parents = ", ".join(f"{edge.role} `{edge.key}`" for edge in node.parents) or "none"
    faces = f", trained on {node.train_faces} faces" if node.kind == "train" else ""
    return (f"`{node.key}`: {node.stage.replace('_', ' ')} ({node.kind} node){faces}. Parents: {parents}. "
            f"Content hash `{node.hash}`; its sealed outputs are in `{StorageLayout(Path(storage or '.')).node(node.hash)}`.")


def metric_name(row: ScoreRow, node_stage: str) -> str:
    """A score row's MLflow name: ``test_lower_accuracy`` for the node's own model,
    ``standard_kd_svm_test_affectnet_lower_accuracy`` for another model of the node (fusion's variants)."""
    prefix = "" if row.model == node_stage else f"{row.model}_"
    return f"{prefix}{row.test_set}_{row.visible}_{row.metric}"


def result_metrics(result: NodeResult, node_stage: str, record: DataRecord | None, *, timestamp: int,
                   model_id: str | None = None) -> list[Metric]:
    """A sealed node's numbers as MLflow metrics: its own figures (best epoch, validation score, chosen C)
    linked to the validation split, each test score to its test set; all linked to its logged model, if any."""
    metrics = [Metric(name, float(value), timestamp, 0, model_id=model_id, **dataset_link(record, "val"))
               for name, value in result.metrics.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return metrics + [Metric(metric_name(row, node_stage), float(row.value), timestamp, 0, model_id=model_id,
                             **dataset_link(record, row.test_set)) for row in result.scores]


def placement_tags(placement: Mapping[str, Any] | None) -> list[RunTag]:
    """Where a training node ran, as run tags: which Ray node, GPUs and workers, through Ray Train or not, and
    the epoch Ray Train resumed it from after restarting its workers (none for the other kinds). Why it got
    those workers is tagged when its run opens (``occkd.workers_choice``): the driver chose them."""
    if not placement:
        return []
    tags = [RunTag(f"occkd.{key}", str(placement.get(key)))
            for key in ("ray_node", "device", "workers", "ray_train") if key in placement]
    tags.append(RunTag("occkd.gpu_ids", ",".join(placement.get("gpu_ids", [])) or "-"))
    if placement.get("resumed_from_epoch") is not None:
        tags.append(RunTag("occkd.resumed_from_epoch", str(placement["resumed_from_epoch"])))
    return tags


def comparison_record(row: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """One significance comparison as the metrics and tags of the significance node's run, named
    ``<arch>.<model>.<test set>`` (``<model>_vs_control`` for occkd's family against the teacher-free control:
    the same model is tested in both)."""
    against = "" if row.get("family", "student") == "student" else "_vs_control"
    name = f"{row['arch']}.{row['model']}{against}.{row['test_set']}"
    metrics = {f"pvalue.{name}": float(row["pvalue"]), f"pvalue_holm.{name}": float(row["pvalue_holm"])}
    tags = {f"verdict.{name}": row["verdict"]}  # Holm-corrected
    if "verdict_paper" in row:  # the papers' rule: uncorrected p < α (a dagger where the model is better)
        metrics[f"dagger.{name}"] = float(bool(row["dagger"]))
        tags[f"verdict_uncorrected.{name}"] = row["verdict_paper"]
    return metrics, tags


def stage_model(folder: Path, node: Node, checkpoint: Path) -> None:
    """A logged model's files: the checkpoint (linked, not copied) and how to read it without unpickling
    code (``torch.load(weights_only=True)``; the architecture travels as a dict inside)."""
    target = folder / "best.pt"
    try:
        target.symlink_to(checkpoint.resolve())
    except OSError:
        shutil.copyfile(checkpoint, target)
    (folder / "occkd_model.json").write_text(json.dumps({
        "node": node.key, "node_hash": node.hash, "task": node.task, "arch": node.arch, "strategy": node.stage,
        "train_faces": node.train_faces, "checkpoint": "best.pt",
        "load": "from occkd_core.checkpoints import load_model; model, info = load_model('best.pt')  "
                "# torch.load(weights_only=True): a state dict and the model spec, no pickled code; "
                "info['input_spec'] is the normalisation it expects (checkpoint_input_spec)",
    }, indent=1))
