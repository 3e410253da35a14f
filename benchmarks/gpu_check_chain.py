"""Part 2 of ``benchmarks/gpu_check.py``: one task's curriculum chain on one or more architectures, with
:mod:`occkd_core` alone (no grid, Ray or MLflow), timed stage by stage.

The stages come from the core's registry (:data:`occkd_core.stages.STAGES`, in curriculum order, then each
distilled stage's teacher-free control unless the preset turns them off) and their settings from the
preset, so a stage registered later runs here too with no change: each stage starts from the best checkpoint of the stage its registry entry names, with the frozen
teacher beside it when the entry says so, and every point of its hyperparameter grid is trained (or the
first ``grid_points``); validation picks the stage's point, as the grid does. Then the fusion of the
distilled students' embeddings (:mod:`occkd_core.fusion`, with the control fusion and the SVM on the
student's embedding), and every stage trained after the student and every fused model against the student
on the same test faces (McNemar for classification, :func:`occkd_core.stats.compare_to_baseline`, Holm over
the family), then each distilled model against its control (a family of its own).

What the grid does and this chain does not: the ablation student on the other half, the test on every
visibility of every node, Grad-CAM figures. Nothing here imports ``grid/``, whose modules import Ray.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from occkd_core.checkpoints import load_model
from occkd_core.data import FaceData
from occkd_core.evaluation import Predictions, predict, task_metrics
from occkd_core.fusion import fit_fusion_variants, fusion_variants
from occkd_core.preprocess import input_spec_for
from occkd_core.presets import GRID_FIELDS, Preset
from occkd_core.specs import TrainSpec
from occkd_core.stages import (
    CONTROL_FUSION, CONTROL_SUFFIX, STAGES, StageInfo, control_stages, distilled_stages, get_stage, stage_starting_from,
)
from occkd_core.stats import compare_to_baseline, judge_comparisons
from occkd_core.tasks import TaskInfo, get_task
from occkd_core.stage_state import EpochRecord  # noqa: E402
from occkd_core.training import StageSpec, train_stage

Log = Callable[[str], None]


class OutOfTime(Exception):
    """The check's time budget ran out during a stage: it stops after the epoch in progress."""


@dataclass(frozen=True)
class ChainSettings:
    preset: Preset
    task: str
    archs: tuple[str, ...]
    device: torch.device
    work: Path  # checkpoints and the teacher-embedding cache; emptied per architecture
    deadline: float  # time.monotonic() after which no epoch, stage or fusion starts
    max_epochs: int | None = None  # cap on every stage's epochs (None: the preset's)
    grid_points: int | None = None  # first N points of each stage's grid (None: all)


@dataclass
class PointRun:
    """One trained point of a stage's grid."""

    stage: str
    point: str  # its grid values, e.g. "margin=0.1"; "" when the stage is no grid
    epochs_planned: int
    records: list[EpochRecord] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str = ""  # why it ended before its planned epochs ("time budget"), else ""
    checkpoint: Path | None = None

    @property
    def best(self) -> EpochRecord:
        best = self.records[0]
        for record in self.records[1:]:
            if record.val_score > best.val_score:  # strict, as train_stage keeps the first best epoch
                best = record
        return best


def chain_stages(preset: Preset) -> list[tuple[str, StageInfo]]:
    """The registry's stages in curriculum order, then the teacher-free controls (unless the preset has none)."""
    names = [*STAGES, *(control_stages() if preset.controls else ())]
    return [(name, get_stage(name)) for name in names]


def run_chain(data: FaceData, settings: ChainSettings, log: Log, result: dict[str, Any] | None = None,
              progress: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Every architecture's chain in turn, as plain rows for the report (JSON-ready) added to ``result`` as
    they come; ``progress`` is called after each stage, so a run stopped from outside keeps what it measured."""
    task = get_task(settings.task)
    result = {} if result is None else result
    for key in ("stages", "fusion", "comparisons", "timing", "notes"):
        result.setdefault(key, [])
    if not settings.preset.controls:
        note = f"preset {settings.preset.name!r} turns the teacher-free controls off: none run"
        log(note)
        result["notes"].append(note)
    for arch in settings.archs:
        if time.monotonic() > settings.deadline:
            note = f"{arch}: not run, the time budget was spent"
            log(note)
            result["notes"].append(note)
            result["timing"].append({"arch": arch, "status": "not run (time budget)"})
            continue
        _run_arch(arch, task, data, settings, log, result, progress)
        progress()
    return result


def _grid_label(preset: Preset, task: str, arch: str, stage: str, train: TrainSpec) -> str:
    entry = preset.stages[(task, arch, get_stage(stage).control_of or stage)]
    keys = [key for key in GRID_FIELDS if isinstance(entry.get(key), list)]
    return ", ".join(f"{key}={getattr(train, key)}" for key in keys)


def _train_point(run: PointRun, spec: StageSpec, data: FaceData, out: Path, settings: ChainSettings,
                 init: Path | None, teacher: Path | None, log: Log) -> None:
    def on_epoch(record: EpochRecord) -> None:
        run.records.append(record)
        log(f"    epoch {record.epoch}/{spec.train.epochs}: loss {record.train_loss:.4f}, val {record.val_score:.2f}, "
            f"{record.seconds:.1f} s")
        if time.monotonic() > settings.deadline and record.epoch < spec.train.epochs:
            raise OutOfTime

    started = time.perf_counter()
    try:
        train_stage(spec, data, out, init_checkpoint=init, teacher_checkpoint=teacher, device=settings.device,
                    on_epoch=on_epoch, cache_dir=settings.work / "cache")
    except OutOfTime:
        run.stopped = "time budget"
    run.seconds = time.perf_counter() - started
    run.checkpoint = out / "best.pt"


def _named(stage: str, point: str) -> str:
    return f"{stage} [{point}]" if point else stage


def _per_sample(task: TaskInfo, preds: Predictions) -> np.ndarray:
    """What the paired test compares: correctness (classification) or absolute error (regression)."""
    return preds.correct if task.is_classification else preds.abs_error


def _main_metric(task: TaskInfo, metrics: dict[str, float]) -> float:
    return metrics["accuracy"] if task.is_classification else metrics["mae"]


def _run_arch(arch: str, task: TaskInfo, data: FaceData, settings: ChainSettings, log: Log,
              result: dict[str, Any], progress: Callable[[], None]) -> None:
    preset, device = settings.preset, settings.device
    arch_settings = preset.arch(arch)
    input_spec = input_spec_for(arch, arch_settings.input_size)
    main = task.main_visible
    out_root = settings.work / arch
    shutil.rmtree(out_root, ignore_errors=True)  # a left-over last.pt would "resume" and time nothing
    teacher_stage, student_stage = stage_starting_from("weights"), stage_starting_from("teacher")
    num_train = len(data.split("train"))
    chosen: dict[str, PointRun] = {}
    per_sample: dict[str, np.ndarray] = {}  # model -> per-sample values on the main half's test faces
    scores: dict[str, float] = {}
    embeddings: dict[str, dict[str, np.ndarray]] = {}
    image_passes = 0.0
    started = time.perf_counter()
    log(f"-- chain {settings.task} / {arch} ({arch_settings.input_size} px, width {arch_settings.width_mult:g}, "
        f"{num_train} training faces, device {device})")
    for name, stage in chain_stages(preset):
        # starts_from names the stage whose best checkpoint this one starts from ("weights": none).
        parent = stage.starts_from if stage.starts_from != "weights" else None
        missing = [p for p in ([parent] if parent else []) + ([teacher_stage] if stage.needs_teacher else [])
                   if p not in chosen]
        if missing:
            result["stages"].append({"arch": arch, "stage": name, "status": f"not run: {', '.join(missing)} did not finish"})
            log(f"  {name}: not run, {', '.join(missing)} did not finish")
            continue
        runs: list[PointRun] = []
        points = preset.grid(settings.task, arch, name)
        for index, train in enumerate(points[: settings.grid_points or None]):
            if time.monotonic() > settings.deadline:
                result["stages"].append({"arch": arch, "stage": name, "status": "not run: time budget",
                                         "point": _grid_label(preset, settings.task, arch, name, train)})
                continue
            if settings.max_epochs is not None:
                train = replace(train, epochs=min(train.epochs, settings.max_epochs))
            spec = StageSpec(task=settings.task, arch=arch, stage=name,
                             train_visible="full" if name == teacher_stage else main,
                             input_size=arch_settings.input_size, width_mult=arch_settings.width_mult, train=train,
                             dropout=arch_settings.dropout)  # seed 0: the grid's first seed
            run = PointRun(stage=name, point=_grid_label(preset, settings.task, arch, name, train),
                           epochs_planned=train.epochs)
            log(f"  {_named(name, run.point)} ({train.epochs} epochs, batch {train.batch_size}, {train.optimizer} "
                f"lr {train.lr:g})")
            _train_point(run, spec, data, out_root / f"{name}-{index}", settings,
                         chosen[parent].checkpoint if parent else None,
                         chosen[teacher_stage].checkpoint if stage.needs_teacher else None, log)
            image_passes += len(run.records) * num_train * stage.cost
            if run.records:
                runs.append(run)
        if not runs:
            continue
        best = max(runs, key=lambda r: r.best.val_score)  # validation picks the point, never the test set
        chosen[name] = best
        model, _ = load_model(best.checkpoint, device)
        tested: dict[str, float] = {}
        for visible in dict.fromkeys(("full", main)):
            # fusion reads the embeddings of the distilled students, their controls and the student
            fused = stage.fused or name == student_stage
            preds = predict(model, data.split("test"), task, visible, input_spec, device=device,
                            with_embeddings=fused and visible == main)
            tested[visible] = _main_metric(task, task_metrics(task, preds))
            if visible == main:
                per_sample[name], scores[name] = _per_sample(task, preds), tested[visible]
                if fused:  # of the faces they see
                    embeddings[name] = {"test": preds.embeddings}
        if fused:
            for split in ("train", "val"):
                embeddings[name][split] = predict(model, data.split(split), task, main, input_spec, device=device,
                                                  with_embeddings=True).embeddings
        del model
        for run in runs:
            row = {"arch": arch, "stage": name, "point": run.point, "status": "ran" + (
                   f", stopped by the {run.stopped}" if run.stopped else ""), "chosen": run is best,
                   "epochs_run": len(run.records), "epochs_planned": run.epochs_planned,
                   "best_epoch": run.best.epoch, "train_seconds": run.seconds,
                   "seconds_per_epoch": run.seconds / len(run.records), "val_score": run.best.val_score}
            if run is best:
                row.update({f"test_{visible}": value for visible, value in tested.items()})
            result["stages"].append(row)
            shown = ", ".join(f"{visible} {value:.2f}" for visible, value in tested.items())
            log(f"  {_named(name, run.point)}: {len(run.records)}/{run.epochs_planned} epochs, {run.seconds:.1f} s, "
                f"val {run.best.val_score:.2f}" + (f", chosen, test {shown}" if run is best else ""))
        progress()

    fusion_seconds = _fuse(arch, task, data, settings, embeddings, per_sample, scores, log, result)
    _compare(arch, task, student_stage, per_sample, result, log)
    total = time.perf_counter() - started
    train_seconds = sum(row.get("train_seconds", 0.0) for row in result["stages"] if row["arch"] == arch)
    student = next((r for r in result["stages"] if r["arch"] == arch and r["stage"] == student_stage
                    and r.get("chosen")), None)
    complete = all(r["status"] == "ran" for r in result["stages"] + result["fusion"] if r["arch"] == arch)
    result["timing"].append({"arch": arch, "status": "ran" if complete else "ran in part", "seconds": total,
                             "train_seconds": train_seconds,
                             "fusion_seconds": fusion_seconds, "image_passes": image_passes,
                             "num_train": num_train, "student_train_seconds": student["train_seconds"] if student else None})
    log(f"-- chain {arch}: {total:.1f} s ({train_seconds:.1f} s training, {image_passes:,.0f} weighted image passes)")


def _fuse(arch: str, task: TaskInfo, data: FaceData, settings: ChainSettings, embeddings: dict[str, dict[str, np.ndarray]],
          per_sample: dict[str, np.ndarray], scores: dict[str, float], log: Log, result: dict[str, Any]) -> float | None:
    distilled = distilled_stages()
    missing = [name for name in distilled if name not in embeddings]
    if missing or time.monotonic() > settings.deadline:
        why = f"{', '.join(missing)} did not finish" if missing else "time budget"
        result["fusion"].append({"arch": arch, "model": "fusion", "status": f"not run: {why}"})
        log(f"  fusion: not run, {why}")
        return None
    started = time.perf_counter()
    labels = {split: data.split(split).labels(task.name) for split in ("train", "val", "test")}
    kernels = list(settings.preset.svr_kernels) if task.kind == "regression" else [None]
    variants = fusion_variants(distilled, kernels, controls=[c for c in control_stages() if c in embeddings],
                               student=next((s for s in [stage_starting_from("teacher")] if s in embeddings), None))
    fused = fit_fusion_variants(embeddings, labels, variants, kind=task.kind,
                                num_outputs=task.num_outputs, Cs=settings.preset.fusion_Cs, predict_splits=("test",))
    seconds = time.perf_counter() - started
    for model in fused:
        preds = Predictions(visible=task.main_visible, outputs=model.outputs["test"], targets=labels["test"])
        name = model.variant.name
        per_sample[name], scores[name] = _per_sample(task, preds), _main_metric(task, task_metrics(task, preds))
        # fit_fusion scores accuracy as a fraction; the stages' validation scores are in %
        val = 100 * model.fit.val_score if task.is_classification else model.fit.val_score
        result["fusion"].append({"arch": arch, "model": name, "status": "ran", "members": list(model.variant.members),
                                 "C": model.fit.C, "val_score": val, f"test_{task.main_visible}": scores[name]})
        log(f"  {name}: C {model.fit.C:g}, val {val:.4g}, test {scores[name]:.2f}")
    log(f"  fusion: {len(fused)} models in {seconds:.1f} s")
    return seconds


def _compare(arch: str, task: TaskInfo, student_stage: str, per_sample: dict[str, np.ndarray],
             result: dict[str, Any], log: Log) -> None:
    """Every stage trained after the student and every fused model against the student (spec §12); then each
    distilled student against its teacher-free control and the fusion against the control fusion, a Holm
    family of its own (as the grid's significance node)."""
    if student_stage not in per_sample:
        return
    after_student = [name for name in [*STAGES, *control_stages()] if name in per_sample
                     and get_stage(name).starts_from == "student"]
    fused = [name for name in per_sample if name not in STAGES and not name.endswith(CONTROL_SUFFIX)]
    families = {student_stage: {name: (name, student_stage) for name in after_student + fused},
                "control": {name: (name, name + CONTROL_SUFFIX) for name in distilled_stages()
                            if name in per_sample and name + CONTROL_SUFFIX in per_sample}}
    if "fusion" in per_sample and CONTROL_FUSION in per_sample:
        families["control"]["fusion"] = ("fusion", CONTROL_FUSION)
    for pairs in families.values():
        if not pairs:
            continue
        comparisons = {name: compare_to_baseline(task.kind, per_sample[model], per_sample[baseline])
                       for name, (model, baseline) in pairs.items()}
        rows = [{"arch": arch, "model": name, "baseline": pairs[name][1], "visible": task.main_visible, **c.to_dict()}
                for name, c in comparisons.items()]
        verdicts = judge_comparisons([c.pvalue for c in comparisons.values()],
                                     [c.improved for c in comparisons.values()])
        for row, verdict in zip(rows, verdicts):
            row.update(pvalue_holm=verdict.pvalue_holm, verdict_paper=verdict.verdict,
                       verdict_holm=verdict.verdict_holm)
            log(f"  {row['model']} vs {row['baseline']}: {row['test']} p {row['pvalue']:.3g} "
                f"(Holm {row['pvalue_holm']:.3g}), {row['verdict_holm']}")
        result["comparisons"].extend(rows)
