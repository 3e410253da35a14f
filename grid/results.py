"""A sealed node's result, typed: what ``<storage>/nodes/<hash>/result.json`` holds.

A node builds one of :class:`TrainNodeResult`, :class:`FusionNodeResult` or :class:`SignificanceNodeResult`
("Node" in the names: occkd_core's TrainResult and FusionResult are what the core's training loop and SVM
fit return, from which a node builds these); :func:`grid.artifacts.write_result` seals it (adding the
checksums of its files) and :func:`grid.artifacts.read_result` reads it back; the driver, the report, the
figures, the timeline and the MLflow records read its attributes. ``to_dict`` writes exactly the JSON the
grid has always written (same keys, same omissions), so result.json files already sealed on storage read
as they are: the file format is the contract, these classes only name it. :func:`result_from_dict` picks
the class from the file's "kind".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence


class ResultFormatError(ValueError):
    """A result.json that is not a sealed node result of this grid (a key missing, an unknown kind)."""


def _require(raw: Any, keys: Sequence[str], what: str, source: str | Path) -> None:
    """One error naming the file and every missing key, with what to do about it."""
    if not isinstance(raw, Mapping):
        raise ResultFormatError(f"{source}: {what} should be a JSON object, got {type(raw).__name__}; delete the "
                                "node's folder to run the node again")
    missing = [key for key in keys if key not in raw]
    if missing:
        raise ResultFormatError(f"{source}: {what} lacks {', '.join(map(repr, missing))} (it was written by another "
                                "version of occkd's grid, or edited); delete the node's folder to run the node again")


# -- parts of a result -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScoreRow:
    """One metric of one model on one test set under one visibility (a node scores several models: fusion's
    variants)."""

    model: str
    test_set: str
    visible: str
    metric: str
    value: float

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "test_set": self.test_set, "visible": self.visible, "metric": self.metric,
                "value": self.value}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str | Path = "result") -> "ScoreRow":
        _require(raw, ("model", "test_set", "visible", "metric", "value"), "a score row", source)
        return cls(model=raw["model"], test_set=raw["test_set"], visible=raw["visible"], metric=raw["metric"],
                   value=raw["value"])


@dataclass(frozen=True)
class EpochPoint:
    """One epoch of a training node's learning curve (the report's figures)."""

    epoch: int
    train_loss: float
    val_score: float
    val_metrics: Mapping[str, float]  # the task's metrics on validation, by name ("accuracy"), "val_" dropped

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "train_loss": self.train_loss, "val_score": self.val_score,
                **{f"val_{name}": value for name, value in self.val_metrics.items()}}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str | Path = "result") -> "EpochPoint":
        _require(raw, ("epoch", "train_loss", "val_score"), "a history entry", source)
        return cls(epoch=raw["epoch"], train_loss=raw["train_loss"], val_score=raw["val_score"],
                   val_metrics={key[len("val_"):]: value for key, value in raw.items()
                                if key.startswith("val_") and key != "val_score"})


@dataclass(frozen=True)
class Timing:
    """Wall-clock times (``time.time()``) of a node: its trial's start and its sealing (the timeline's
    overheads, grid.timeline)."""

    started_at: float
    finished_at: float

    @property
    def steps(self) -> tuple[float | None, float | None]:
        """The first and last training steps: none outside training."""
        return None, None

    def to_dict(self) -> dict[str, Any]:
        return {"started_at": self.started_at, "finished_at": self.finished_at}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str | Path = "result") -> "Timing":
        _require(raw, ("started_at", "finished_at"), "its timing", source)
        return cls(started_at=raw["started_at"], finished_at=raw["finished_at"])


@dataclass(frozen=True)
class TrainTiming(Timing):
    """A training node's times, with its first and last training steps (None where no step ran: a node
    resumed after its last epoch)."""

    first_step_at: float | None
    last_step_at: float | None

    @property
    def steps(self) -> tuple[float | None, float | None]:
        return self.first_step_at, self.last_step_at

    def to_dict(self) -> dict[str, Any]:
        return {"started_at": self.started_at, "first_step_at": self.first_step_at,
                "last_step_at": self.last_step_at, "finished_at": self.finished_at}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str | Path = "result") -> "TrainTiming":
        _require(raw, ("started_at", "first_step_at", "last_step_at", "finished_at"), "its timing", source)
        return cls(started_at=raw["started_at"], finished_at=raw["finished_at"],
                   first_step_at=raw["first_step_at"], last_step_at=raw["last_step_at"])


@dataclass(frozen=True)
class SelectedNode:
    """The grid point a fusion node chose for one distilled stage (or control), by validation."""

    key: str
    hash: str
    val_score: float

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "hash": self.hash, "val_score": self.val_score}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str | Path = "result") -> "SelectedNode":
        _require(raw, ("key", "hash", "val_score"), "a selected entry", source)
        return cls(key=raw["key"], hash=raw["hash"], val_score=raw["val_score"])


@dataclass(frozen=True)
class FittedModel:
    """One fusion variant as fitted: the C chosen on validation and what it fused (spec §8)."""

    C: float
    val_score: float
    kernel: str  # the ε-SVR's kernel, "default" for the classifiers
    members: tuple[str, ...]  # the stages whose embeddings it concatenates
    val_scores: Mapping[str, float]  # str(C) -> validation score
    # str(C) -> whether the solver converged: absent from results sealed before it was recorded
    converged: Mapping[str, bool] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"C": self.C, "val_score": self.val_score, "kernel": self.kernel, "members": list(self.members),
                "val_scores": dict(self.val_scores),
                **({"converged": dict(self.converged)} if self.converged is not None else {})}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str | Path = "result") -> "FittedModel":
        _require(raw, ("C", "val_score", "kernel", "members", "val_scores"), "a fitted entry", source)
        return cls(C=raw["C"], val_score=raw["val_score"], kernel=raw["kernel"], members=tuple(raw["members"]),
                   val_scores=dict(raw["val_scores"]),
                   converged=dict(raw["converged"]) if "converged" in raw else None)


# -- the results -------------------------------------------------------------------------------------------

#: Every key a result.json holds whatever its kind.
_COMMON_KEYS = ("key", "hash", "kind", "strategy", "metrics", "scores", "timing", "files")


@dataclass(frozen=True, kw_only=True)
class NodeResult:
    """What every sealed node holds. ``metrics``: the node's own figures by name (best epoch, validation
    score, chosen C), logged to MLflow as they are; ``files``: relative path -> SHA-256, filled in when
    :func:`grid.artifacts.write_result` seals the node (empty before)."""

    KIND: ClassVar[str] = ""
    _KEYS: ClassVar[tuple[str, ...]] = ()  # the keys of this kind beyond the common ones

    key: str
    hash: str
    stage: str  # the node's stage (grid.graph.Node.stage); the file keeps the key "strategy", as sealed results have it
    metrics: Mapping[str, float]
    scores: tuple[ScoreRow, ...]
    timing: Timing
    files: Mapping[str, str] = field(default_factory=dict)
    # Where a training node ran (Ray node, GPUs, workers; grid.trials): a plain mapping, written as
    # given. None for the other kinds, which record none.
    placement: Mapping[str, Any] | None = None

    @property
    def kind(self) -> str:
        return self.KIND

    def _head(self) -> dict[str, Any]:
        return {"key": self.key, "hash": self.hash, "kind": self.kind, "strategy": self.stage}

    def _scored(self) -> dict[str, Any]:
        return {"metrics": dict(self.metrics), "scores": [row.to_dict() for row in self.scores]}

    def _tail(self) -> dict[str, Any]:
        placement = {"placement": dict(self.placement)} if self.placement is not None else {}
        return {**placement, "timing": self.timing.to_dict(), "files": dict(self.files)}

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def _common(raw: Mapping[str, Any], source: str | Path, timing: type[Timing] = Timing) -> dict[str, Any]:
        return {"key": raw["key"], "hash": raw["hash"], "stage": raw["strategy"], "metrics": dict(raw["metrics"]),
                "scores": tuple(ScoreRow.from_dict(row, source) for row in raw["scores"]),
                "timing": timing.from_dict(raw["timing"], source), "files": dict(raw["files"]),
                "placement": dict(raw["placement"]) if raw.get("placement") is not None else None}


@dataclass(frozen=True, kw_only=True)
class TrainNodeResult(NodeResult):
    """A training node: its best epoch on validation and the scores of that checkpoint."""

    KIND: ClassVar[str] = "train"
    _KEYS: ClassVar[tuple[str, ...]] = ("val_score", "best_epoch", "epochs_run", "max_epochs", "seconds", "history")

    val_score: float
    best_epoch: int
    epochs_run: int
    max_epochs: int
    seconds: float
    history: tuple[EpochPoint, ...]
    timing: TrainTiming

    def to_dict(self) -> dict[str, Any]:
        return {**self._head(), **self._scored(), "val_score": self.val_score, "best_epoch": self.best_epoch,
                "epochs_run": self.epochs_run, "max_epochs": self.max_epochs, "seconds": self.seconds,
                "history": [point.to_dict() for point in self.history], **self._tail()}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str | Path = "result") -> "TrainNodeResult":
        _require(raw, (*_COMMON_KEYS, *cls._KEYS), "a train node's result", source)
        return cls(**cls._common(raw, source, TrainTiming), val_score=raw["val_score"], best_epoch=raw["best_epoch"],
                   epochs_run=raw["epochs_run"], max_epochs=raw["max_epochs"], seconds=raw["seconds"],
                   history=tuple(EpochPoint.from_dict(point, source) for point in raw["history"]))

    @property
    def best_epoch_is_last(self) -> bool:
        """Its best validation epoch was the last it ran: it may not have converged."""
        return self.best_epoch == self.epochs_run


@dataclass(frozen=True, kw_only=True)
class FusionNodeResult(NodeResult):
    """A fusion node: the grid point chosen per distilled stage (and control), and each variant as fitted."""

    KIND: ClassVar[str] = "fusion"
    _KEYS: ClassVar[tuple[str, ...]] = ("val_score", "fitted", "selected", "seconds")

    val_score: float
    fitted: Mapping[str, FittedModel]  # variant name ("fusion", "standard_kd_svm", ...) -> its fit
    selected: Mapping[str, SelectedNode]  # stage -> the node chosen for it
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**self._head(), **self._scored(), "val_score": self.val_score,
                "fitted": {name: model.to_dict() for name, model in self.fitted.items()},
                "selected": {stage: node.to_dict() for stage, node in self.selected.items()},
                "seconds": self.seconds, **self._tail()}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str | Path = "result") -> "FusionNodeResult":
        _require(raw, (*_COMMON_KEYS, *cls._KEYS), "a fusion node's result", source)
        return cls(**cls._common(raw, source), val_score=raw["val_score"], seconds=raw["seconds"],
                   fitted={name: FittedModel.from_dict(fit, source) for name, fit in raw["fitted"].items()},
                   selected={stage: SelectedNode.from_dict(node, source) for stage, node in raw["selected"].items()})


@dataclass(frozen=True, kw_only=True)
class SignificanceNodeResult(NodeResult):
    """A significance node: every paired test of the task, judged by the papers' rule and by Holm."""

    KIND: ClassVar[str] = "significance"
    _KEYS: ClassVar[tuple[str, ...]] = ("comparisons",)

    # Rows kept as plain mappings, as comparisons.json holds them: each is the row's identity (task, arch,
    # test_set, model, baseline, family, visible), occkd_core.stats.Comparison.to_dict() (whose keys depend on
    # the test: McNemar's b, c, exact; Wilcoxon's hodges_lehmann) and the verdicts of judge_comparisons. A
    # class here would copy Comparison field by field and drift from it.
    comparisons: tuple[Mapping[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        return {**self._head(), "comparisons": [dict(row) for row in self.comparisons], **self._scored(),
                **self._tail()}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str | Path = "result") -> "SignificanceNodeResult":
        _require(raw, (*_COMMON_KEYS, *cls._KEYS), "a significance node's result", source)
        return cls(**cls._common(raw, source), comparisons=tuple(dict(row) for row in raw["comparisons"]))


#: Node kind (grid.graph.Node.kind) -> its result class.
RESULT_TYPES: dict[str, type[NodeResult]] = {cls.KIND: cls for cls in (TrainNodeResult, FusionNodeResult,
                                                                       SignificanceNodeResult)}


def result_from_dict(raw: Mapping[str, Any], source: str | Path = "result") -> NodeResult:
    """The typed result of a parsed result.json; ``source`` (its path) names it in a
    :class:`ResultFormatError`."""
    _require(raw, ("kind",), "a node result", source)
    if raw["kind"] not in RESULT_TYPES:
        raise ResultFormatError(f"{source}: unknown node kind {raw['kind']!r} (expected one of "
                                f"{', '.join(RESULT_TYPES)}); delete the node's folder to run the node again")
    return RESULT_TYPES[raw["kind"]].from_dict(raw, source)
