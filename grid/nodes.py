"""What each kind of grid node does, on whichever Ray worker runs it.

A node reads its parents' sealed outputs from the storage path, calls :mod:`occkd_core` (training,
fusion, the comparison procedure), writes its own outputs and seals them with ``result.json``
(:mod:`grid.artifacts`). Nothing here computes a loss or a test statistic, and nothing talks to MLflow:
a node returns its result and the driver records it.

A result (:mod:`grid.results`) holds its test scores as rows (:class:`grid.results.ScoreRow`,
:func:`score_rows`), and its other figures (best epoch, validation score, chosen C) under ``metrics``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from grid.artifacts import (
    COMPARISONS_FILE, GRADCAM_FILE, PLACEMENT_FILE, PREDICTIONS_FILE, RESULT_FILE, TEST_PLOT_FILE, TRAIN_DIR,
    StorageLayout, atomic_write_bytes, checkpoint_file, checkpoint_in, embeddings_file, node_dir, read_predictions,
    read_result, save_numpy, write_predictions, write_result,
)
from grid.graph import Node
from grid.node_specs import FusionSpec, SignificanceSpec
from grid.results import (
    EpochPoint, FittedModel, FusionNodeResult, ScoreRow, SelectedNode, SignificanceNodeResult, Timing,
    TrainNodeResult, TrainTiming,
)
from occkd_core.checkpoints import checkpoint_input_spec, load_model
from occkd_core.data import FaceData, open_face_store
from occkd_core.evaluation import Predictions, evaluate_conditions, predict, task_metrics
from occkd_core.files import sweep_orphaned_temporaries
from occkd_core.fusion import fit_fusion_variants, fusion_variants
from occkd_core.gradcam import save_split_gradcam
from occkd_core.plots import save_test_plot
from occkd_core.preprocess import InputSpec
from occkd_core.stages import (
    CONTROL_FUSION, CONTROL_SUFFIX, control_stages, distilled_stages, get_stage, stage_starting_from,
)
from occkd_core.stats import compare_to_baseline, judge_comparisons
from occkd_core.tasks import get_task
from occkd_core.stage_state import EpochRecord
from occkd_core.training import StageSpec, train_stage

Report = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class ParentOutput:
    """A parent's sealed outputs as its child sees them: the role it plays (:class:`grid.graph.Edge`)."""

    role: str
    key: str
    arch: str | None
    directory: Path


def fresh_node_dir(storage: Path, node_hash: str) -> Path:
    """The node's directory, emptied first if it holds a sealed result that failed verification (the
    driver only runs a node whose result is missing or corrupt): corrupt outputs are never resumed from."""
    out = node_dir(storage, node_hash)
    if (out / RESULT_FILE).exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    # An attempt killed mid-write (SIGKILL, a lost machine) left its temporary beside the file it was replacing
    # (`.last.tmp-HOST-PID.pt`: a whole checkpoint, hundreds of MB for ResNet-50 at 224 px): gone once its
    # writer has ended; a live writer's, or another host's, is kept.
    for folder in (out, out / TRAIN_DIR):
        sweep_orphaned_temporaries(folder)
    return out


def test_sets(data: FaceData) -> list[str]:
    """"test" first, then any extra test sets (e.g. "test_affectnet")."""
    return ["test"] + sorted(name for name in data.splits if name.startswith("test_"))


def score_rows(model: str, test_set: str, visible: str, metrics: Mapping[str, float]) -> list[ScoreRow]:
    """One row per metric of one model on one test set under one visibility."""
    return [ScoreRow(model=model, test_set=test_set, visible=visible, metric=name, value=float(value))
            for name, value in metrics.items()]


def _one(parents: Sequence[ParentOutput], role: str) -> Path:
    found = [p.directory for p in parents if p.role == role]
    if len(found) != 1:
        raise ValueError(f"expected one parent in the role {role!r}, got {len(found)}")
    return found[0]


# -- training nodes ----------------------------------------------------------------------------------------


def run_train_node(node: Node, storage: Path, data_path: Path, parents: Sequence[ParentOutput],
                   *, device: torch.device, report: Report, pretrained: Path | None = None,
                   is_writer: bool = True, started_at: float | None = None,
                   placement: Mapping[str, Any] | None = None) -> TrainNodeResult | None:
    """Train one stage, evaluate its best checkpoint on every test set × visibility, seal the outputs.

    ``started_at``: wall-clock start of the trial that runs this node (default: now); with the first and
    last training steps it goes into ``result.json``'s "timing", which measures per-node overhead.
    ``placement``: where it ran (Ray node, GPUs, workers), recorded as given. The sealed result; None on
    the DDP workers other than rank 0, which train but do not write."""
    started = time.perf_counter()
    started_at = started_at or time.time()
    spec = StageSpec.from_dict(node.params)
    stage = get_stage(spec.stage)  # where it starts and whether the teacher runs beside it
    data = open_face_store(data_path)
    out = fresh_node_dir(storage, node.hash) if is_writer else node_dir(storage, node.hash)
    if is_writer and placement:  # where the node runs now (rewritten on every restart), before it seals
        atomic_write_bytes(out / PLACEMENT_FILE, json.dumps({"node": node.key, **placement}).encode())
    init = checkpoint_in(_one(parents, stage.starts_from)) if stage.starts_from != "weights" else None
    teacher = checkpoint_in(_one(parents, "teacher")) if stage.needs_teacher else None

    def on_epoch(record: EpochRecord) -> None:
        metrics = {"epoch": record.epoch, "lr": record.lr, "train_loss": record.train_loss,
                   **{f"loss_{k}": v for k, v in record.loss_terms.items()},
                   **{f"train_{k}": v for k, v in record.train_metrics.items()},
                   **{f"val_{k}": v for k, v in record.val_metrics.items()},
                   "val_score": record.val_score, "epoch_seconds": record.seconds,
                   **{k: v for k, v in record.extra.items()}}
        report({"event": "epoch", **metrics})

    result = train_stage(spec, data, out / TRAIN_DIR, init_checkpoint=init, teacher_checkpoint=teacher,
                         pretrained_weights=pretrained, device=device, on_epoch=on_epoch,
                         cache_dir=StorageLayout(Path(storage)).cache)
    if not is_writer:
        return None
    model, checkpoint = load_model(result.best_checkpoint, device)
    input_spec = checkpoint_input_spec(checkpoint, spec.input_size)  # e.g. the mean imagenet-vgg-f.mat names
    files = [checkpoint_file(), PREDICTIONS_FILE, TEST_PLOT_FILE]
    # Fusion (spec §8) reads the embeddings of the faces they see: the distilled students', their controls'
    # (the control fusion) and the main student's (an SVM on the student's own embedding).
    with_embeddings = stage.fused or node.stage == stage_starting_from("teacher")
    rows, scores, embeddings = _evaluate(model, spec, input_spec, node.stage, data, device,
                                         with_embeddings=with_embeddings)
    write_predictions(out / PREDICTIONS_FILE, rows)
    for split_name, array in embeddings.items():
        save_numpy(out / embeddings_file(split_name), array)
        files.append(embeddings_file(split_name))
    if stage.distilled:  # where the distilled student looks on its half of the face (spec §13)
        save_split_gradcam(out / GRADCAM_FILE, model, data.split("test").images[:6], spec.train_visible,
                           input_spec)
        files.append(GRADCAM_FILE)
    main_preds = next(p for (ts, _, p) in rows if ts == "test" and p.visible == spec.train_visible)
    save_test_plot(out / TEST_PLOT_FILE, main_preds, spec.task_info.class_names, title=node.key)
    summary = TrainNodeResult(
        key=node.key, hash=node.hash, stage=node.stage,
        metrics={"best_epoch": result.best_epoch, "val_score": result.best_val_score}, scores=tuple(scores),
        val_score=result.best_val_score, best_epoch=result.best_epoch, epochs_run=len(result.history),
        max_epochs=spec.train.epochs, seconds=time.perf_counter() - started,
        # the learning curve, for the report's figures
        history=tuple(EpochPoint(epoch=r.epoch, train_loss=r.train_loss, val_score=r.val_score,
                                 val_metrics=dict(r.val_metrics)) for r in result.history),
        placement=dict(placement or {}),
        timing=TrainTiming(started_at=started_at, first_step_at=result.first_step_at,
                           last_step_at=result.last_step_at, finished_at=time.time()))
    return write_result(out, summary, files)


def _evaluate(model: torch.nn.Module, spec: StageSpec, input_spec: InputSpec, model_name: str, data: FaceData,
              device: torch.device, *, with_embeddings: bool) -> tuple[list[tuple[str, str, Predictions]],
                                                                       list[ScoreRow], dict[str, np.ndarray]]:
    """Predictions and scores on every test set × visibility, and (``with_embeddings``) the embeddings of
    every split under the faces the model trained on, each split predicted once."""
    task = spec.task_info
    rows, scores, embeddings = [], [], {}
    for split_name in ["train", "val"] if with_embeddings else []:
        preds = predict(model, data.split(split_name), task, spec.train_visible, input_spec, device=device,
                        with_embeddings=True)
        embeddings[split_name] = preds.embeddings.astype(np.float32)
    for test_set in test_sets(data):
        for visible, (preds, values) in evaluate_conditions(model, data.split(test_set), task, input_spec,
                                                           device=device, with_embeddings=with_embeddings).items():
            rows.append((test_set, model_name, preds))
            scores += score_rows(model_name, test_set, visible, values)
            if with_embeddings and visible == spec.train_visible:
                embeddings[test_set] = preds.embeddings.astype(np.float32)
    return rows, scores, embeddings


# -- fusion ------------------------------------------------------------------------------------------------

def run_fusion_node(node: Node, storage: Path, data_path: Path, parents: Sequence[ParentOutput],
                    *, started_at: float | None = None, jobs: int = 1) -> FusionNodeResult:
    """Pick the best node of each distilled stage (and of each control, where the grid has them) by
    validation, then fit the fusion variants on their embeddings and the main student's (spec §8;
    :func:`occkd_core.fusion.fusion_variants`) and predict every test set, ``jobs`` fits at a time."""
    started = time.perf_counter()
    started_at = started_at or time.time()
    spec = FusionSpec.from_dict(node.params)
    task = get_task(node.task)
    data = open_face_store(data_path)
    out = fresh_node_dir(storage, node.hash)
    chosen: dict[str, tuple[ParentOutput, TrainNodeResult]] = {}
    for parent in parents:
        if parent.role not in (*distilled_stages(), *control_stages()):
            continue
        result = read_result(parent.directory, verify=False)
        if not isinstance(result, TrainNodeResult):
            raise RuntimeError(f"parent {parent.key} has no training result in {parent.directory}")
        if parent.role not in chosen or result.val_score > chosen[parent.role][1].val_score:
            chosen[parent.role] = (parent, result)
    # The distilled stages this graph ran (a preset may leave a registered one out); the papers fuse two.
    distilled = [stage for stage in distilled_stages() if stage in chosen]
    if not distilled:
        raise RuntimeError(f"fusion {node.key} has no distilled parent")
    controls = [stage for stage in control_stages() if stage in chosen]
    splits = ["train", "val", *test_sets(data)]
    student, student_dir = stage_starting_from("teacher"), _one(parents, "student")
    embeddings = {stage: {s: np.load(parent.directory / embeddings_file(s)) for s in splits}
                  for stage, (parent, _) in chosen.items()}
    embeddings[student] = {s: np.load(student_dir / embeddings_file(s)) for s in splits}
    labels = {s: data.split(s).labels(task.name) for s in splits}
    visible = spec.visible
    variants = fusion_variants(distilled, spec.kernels, controls=controls, student=student)
    fused = fit_fusion_variants(embeddings, labels, variants, kind=task.kind, num_outputs=task.num_outputs,
                                Cs=spec.Cs, predict_splits=test_sets(data), jobs=jobs)
    rows, scores, fitted = [], [], {}
    for model in fused:
        name = model.variant.name
        fitted[name] = FittedModel(C=model.fit.C, val_score=model.fit.val_score,
                                   kernel=model.variant.kernel or "default", members=tuple(model.variant.members),
                                   val_scores={str(c): v for c, v in model.fit.val_scores.items()},
                                   converged={str(c): v for c, v in model.fit.converged.items()})
        for test_set, outputs in model.outputs.items():
            preds = Predictions(visible=visible, outputs=outputs, targets=labels[test_set])
            rows.append((test_set, name, preds))
            scores += score_rows(name, test_set, visible, task_metrics(task, preds))
    write_predictions(out / PREDICTIONS_FILE, rows)
    save_test_plot(out / TEST_PLOT_FILE, next(p for ts, n, p in rows if ts == "test" and n == "fusion"),
                   task.class_names, title=node.key)
    papers = fitted["fusion"]
    summary = FusionNodeResult(
        key=node.key, hash=node.hash, stage="fusion", metrics={"C": papers.C, "val_score": papers.val_score},
        scores=tuple(scores), val_score=papers.val_score, fitted=fitted,
        selected={stage: SelectedNode(key=parent.key, hash=result.hash, val_score=result.val_score)
                  for stage, (parent, result) in chosen.items()},
        seconds=time.perf_counter() - started, timing=Timing(started_at=started_at, finished_at=time.time()))
    return write_result(out, summary, [PREDICTIONS_FILE, TEST_PLOT_FILE])


# -- significance ------------------------------------------------------------------------------------------

def run_significance_node(node: Node, storage: Path, data_path: Path, parents: Sequence[ParentOutput],
                          *, started_at: float | None = None) -> SignificanceNodeResult:
    """Two families of paired tests per task, on the same test faces (:func:`occkd_core.stats.compare_to_baseline`),
    each judged by the papers' rule and by Holm over its own family (:func:`occkd_core.stats.judge_comparisons`,
    spec §12): the papers' question, each selected distilled student and each fused model against the main
    student of its architecture ("student"); and occkd's, what the teacher adds, each distilled student
    against its teacher-free control and the fusion against the control fusion ("control"), where the grid
    has controls. The families answer different questions, so neither correction counts the other's tests."""
    started_at = started_at or time.time()
    task = get_task(node.task)
    data = open_face_store(data_path)
    spec = SignificanceSpec.from_dict(node.params)
    visible, alpha = spec.visible, spec.alpha
    out = fresh_node_dir(storage, node.hash)
    students = {p.arch: p.directory for p in parents if p.role == "student"}
    fusions = {p.arch: p.directory for p in parents if p.role == "fusion"}
    column = "correct" if task.is_classification else "abs_error"
    families: dict[str, list[dict[str, Any]]] = {"student": [], "control": []}

    def compare(family: str, arch: str, test_set: str, name: str, model: tuple[Path, str], baseline_name: str,
                baseline: tuple[Path, str | None]) -> None:
        preds = read_predictions(model[0], test_set=test_set, visible=visible, model=model[1])
        base = read_predictions(baseline[0], test_set=test_set, visible=visible, model=baseline[1])
        comparison = compare_to_baseline(task.kind, preds[column].to_numpy(), base[column].to_numpy(), alpha=alpha)
        families[family].append({"task": task.name, "arch": arch, "test_set": test_set, "model": name,
                                 "baseline": baseline_name, "family": family, "visible": visible,
                                 **comparison.to_dict(), "improved": comparison.improved})

    for arch, fusion_dir in sorted(fusions.items()):
        fusion = read_result(fusion_dir, verify=False)
        if not isinstance(fusion, FusionNodeResult):
            raise RuntimeError(f"parent {fusion_dir} has no fusion result")
        fused = fusion_dir / PREDICTIONS_FILE
        selected = {stage: (node_dir(storage, pick.hash) / PREDICTIONS_FILE, stage)
                    for stage, pick in fusion.selected.items()}
        candidates = {stage: selected[stage] for stage in distilled_stages() if stage in selected}
        candidates.update({name: (fused, name)  # "fusion" and its kernel variants
                           for name in fusion.fitted if name.startswith("fusion")})
        # Each distilled student against its control, the fusion against the control fusion.
        against_control = {stage: selected[stage + CONTROL_SUFFIX] for stage in distilled_stages()
                           if stage + CONTROL_SUFFIX in selected}
        if CONTROL_FUSION in fusion.fitted:
            against_control["fusion"] = (fused, CONTROL_FUSION)
        for test_set in test_sets(data):
            for name, model in candidates.items():
                compare("student", arch, test_set, name, model, "student", (students[arch] / PREDICTIONS_FILE, None))
            for name, control in against_control.items():
                compare("control", arch, test_set, name, candidates[name], control[1], control)
    comparisons = []
    for rows in families.values():
        if rows:  # both readings: the papers' († where p < α, uncorrected) and Holm's over this family
            for row, verdict in zip(rows, judge_comparisons([c["pvalue"] for c in rows],
                                                            [c["improved"] for c in rows], alpha=alpha)):
                row.update(significant_paper=verdict.significant, dagger=verdict.dagger,
                           verdict_paper=verdict.verdict, pvalue_holm=verdict.pvalue_holm,
                           significant=verdict.significant_holm, verdict=verdict.verdict_holm)
        comparisons += rows
    atomic_write_bytes(out / COMPARISONS_FILE, json.dumps(comparisons, indent=1, default=float).encode())
    summary = SignificanceNodeResult(key=node.key, hash=node.hash, stage="significance",
                                     comparisons=tuple(comparisons), metrics={}, scores=(),
                                     timing=Timing(started_at=started_at, finished_at=time.time()))
    return write_result(out, summary, [COMPARISONS_FILE])
