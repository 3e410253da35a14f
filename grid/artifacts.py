"""Where a node's outputs live, and how a node is known to be complete.

Layout under the storage path (a shared filesystem on a multi-node cluster: every node reads its
parents' files from here):

    <storage>/data/<fingerprint>.arrow      prepared data sets (memory-mapped by the workers)
    <storage>/data/<fingerprint>.arrow.sha256.json  its size and sha256, checked before reuse
    <storage>/nodes/<hash>/train/           best.pt, last.pt (an interrupted node resumes from last.pt)
    <storage>/nodes/<hash>/predictions.parquet  per-sample predictions (every model the node scores)
    <storage>/nodes/<hash>/embeddings_<split>.npy  the embeddings fusion reads (students that are fused)
    <storage>/nodes/<hash>/test_plot.png, gradcam.png, comparisons.json, placement.json
    <storage>/nodes/<hash>/result.json      written last, atomically: metrics + SHA-256 of every file
    <storage>/cache/                        the teachers' embeddings, cached for triplet mining
    <storage>/pretrained/<sha256>/<file>    --weights files, staged where every node reads them
    <storage>/reports/<experiment>/         the report, its CSV, figures, timeline
    <storage>/ray_results/                  Tune's experiment state
    <storage>/ray_train/                    Ray Train's runs (a training node's worker group)
    <storage>/fault_injection/              tests only: the attempts of a node told to fail

:class:`StorageLayout` spells each of these paths under the storage, and the constants below the names
inside a node's folder; nothing else does.

A node is complete when its result.json exists and every file it lists still has its checksum; a
partial or corrupted file makes the node incomplete, so the next invocation runs it again.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from grid.results import NodeResult, result_from_dict
from occkd_core.files import atomic_write, atomic_write_bytes, file_sha256
from occkd_core.evaluation import Predictions

# -- inside a node's folder --------------------------------------------------------------------------------
RESULT_FILE = "result.json"  # grid.results: what it holds
#: A training node's checkpoints folder (occkd_core.training.train_stage names best.pt and last.pt in it).
TRAIN_DIR = "train"
PREDICTIONS_FILE = "predictions.parquet"
TEST_PLOT_FILE = "test_plot.png"
GRADCAM_FILE = "gradcam.png"  # distilled students: where they look on their half of the face
COMPARISONS_FILE = "comparisons.json"  # significance nodes
#: Where a training node runs while it runs: its Ray node, GPUs, workers (the sealed result keeps the last).
PLACEMENT_FILE = "placement.json"


def checkpoint_file(which: str = "best") -> str:
    """A training node's ``best.pt`` (its best validation epoch) or ``last.pt`` (what a resume needs),
    relative to its folder."""
    if which not in ("best", "last"):
        raise ValueError(f"checkpoint {which!r}: 'best' or 'last'")
    return f"{TRAIN_DIR}/{which}.pt"


def embeddings_file(split: str) -> str:
    """The embeddings of one split (train, val, test, test_affectnet ...) that fusion reads."""
    return f"embeddings_{split}.npy"


#: Files of a sealed node that MLflow receives as artifacts, per node kind.
ARTIFACTS = {"train": [checkpoint_file(), PREDICTIONS_FILE, TEST_PLOT_FILE, GRADCAM_FILE],
             "fusion": [PREDICTIONS_FILE, TEST_PLOT_FILE], "significance": [COMPARISONS_FILE]}


@dataclass(frozen=True)
class StorageLayout:
    """Every path under a grid's storage, spelled once (the module docstring draws the tree)."""

    root: Path

    def node(self, node_hash: str) -> Path:
        return Path(self.root) / "nodes" / node_hash

    def checkpoint(self, node_hash: str, which: str = "best") -> Path:
        """A training node's ``best.pt`` or ``last.pt`` (:func:`checkpoint_file`)."""
        return self.node(node_hash) / checkpoint_file(which)

    @property
    def data(self) -> Path:  # prepared data stores
        return Path(self.root) / "data"

    @property
    def cache(self) -> Path:  # the teachers' cached embeddings
        return Path(self.root) / "cache"

    def report(self, experiment: str) -> Path:
        return Path(self.root) / "reports" / experiment

    def pretrained(self, sha256: str, name: str) -> Path:
        """A staged copy of a pre-trained weights file, under its sha256."""
        return Path(self.root) / "pretrained" / sha256 / name

    @property
    def ray_results(self) -> Path:  # Tune's experiment state
        return Path(self.root) / "ray_results"

    @property
    def ray_train(self) -> Path:  # Ray Train's runs, one per training node that ran as a worker group
        return Path(self.root) / "ray_train"

    @property
    def fault_injection(self) -> Path:  # tests only: grid.faults counts a node's attempts here
        return Path(self.root) / "fault_injection"


def node_dir(storage: Path, node_hash: str) -> Path:
    return StorageLayout(Path(storage)).node(node_hash)


def checkpoint_in(directory: Path, which: str = "best") -> Path:
    """The checkpoint inside a node's folder (when the folder, not the storage, is at hand)."""
    return Path(directory) / checkpoint_file(which)


R = TypeVar("R", bound=NodeResult)


def write_result(directory: Path, result: R, files: list[str]) -> R:
    """Seal a node: its result with the checksums of ``files`` (relative paths), written atomically. The sealed
    result (``files`` filled in)."""
    sealed = dataclasses.replace(result, files={name: file_sha256(directory / name) for name in files})
    atomic_write_bytes(directory / RESULT_FILE, json.dumps(sealed.to_dict(), indent=1, default=float).encode())
    return sealed


def read_result(directory: Path, verify: bool = True) -> NodeResult | None:
    """The node's result if it is complete (and, with ``verify``, every file matches), else None. A file that
    parses but is no node result (a key missing) raises :class:`grid.results.ResultFormatError` naming it."""
    path = Path(directory) / RESULT_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or cut short: the node runs again
        return None
    result = result_from_dict(raw, source=path)
    if verify:
        for name, digest in result.files.items():
            file = Path(directory) / name
            if not file.exists() or file_sha256(file) != digest:
                return None
    return result


def save_numpy(path: Path, array: np.ndarray) -> Path:
    with atomic_write(path) as tmp:
        np.save(tmp, array)
    return path


def write_predictions(path: Path, rows: list[tuple[str, str, Predictions]]) -> Path:
    """Per-sample predictions as Parquet: one row per (test set, visibility, sample).

    Columns: test_set, visible, row, target, prediction, correct (classification) or abs_error (age),
    outputs (the logits, for re-analysis)."""
    tables = []
    for test_set, model_name, preds in rows:
        n = len(preds.targets)
        columns: dict[str, Any] = {
            "test_set": pa.array([test_set] * n, pa.string()),
            "model": pa.array([model_name] * n, pa.string()),
            "visible": pa.array([preds.visible] * n, pa.string()),
            "row": pa.array(np.arange(n, dtype=np.int32)),
            "target": pa.array(preds.targets.astype(np.float64)),
            "prediction": pa.array(np.asarray(preds.predicted, dtype=np.float64)),
        }
        if preds.outputs.shape[1] > 1:
            columns["correct"] = pa.array(preds.correct)
            columns["abs_error"] = pa.nulls(n, pa.float64())
        else:
            columns["correct"] = pa.nulls(n, pa.bool_())
            columns["abs_error"] = pa.array(preds.abs_error.astype(np.float64))
        columns["outputs"] = pa.FixedSizeListArray.from_arrays(
            pa.array(preds.outputs.astype(np.float32).ravel()), preds.outputs.shape[1])
        tables.append(pa.table(columns))
    table = pa.concat_tables(tables) if tables else pa.table({})
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_predictions(path: Path, *, test_set: str, visible: str, model: str | None = None) -> pa.Table:
    """The rows of one test set and visibility (and model, for files holding several), in sample order."""
    table = pq.read_table(path)
    mask = np.asarray(table["test_set"].to_numpy(zero_copy_only=False) == test_set) & np.asarray(
        table["visible"].to_numpy(zero_copy_only=False) == visible)
    if model is not None:
        mask &= np.asarray(table["model"].to_numpy(zero_copy_only=False) == model)
    selected = table.filter(pa.array(mask))
    if selected.num_rows == 0:
        raise ValueError(f"{path}: no predictions for test_set={test_set!r}, visible={visible!r}, model={model!r}")
    return selected.sort_by("row")
