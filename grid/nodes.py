"""What each kind of grid node does, on whichever Ray worker runs it.

A node reads its parents' sealed outputs from the storage path, calls :mod:`occkd_core`, writes its
own outputs and seals them with ``result.json`` (:mod:`grid.artifacts`). Nothing here talks to
MLflow: a node returns its result and the driver records it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from grid.artifacts import (
    RESULT_FILE, atomic_write_bytes, node_dir, read_predictions, read_result, save_numpy, write_predictions, write_result,
)
from occkd_core.checkpoints import load_model
from occkd_core.data import FaceData, open_face_store
from occkd_core.evaluation import Predictions, evaluate_conditions, predict, task_metrics
from occkd_core.fusion import concat_embeddings, fit_fusion
from occkd_core.gradcam import save_split_gradcam
from occkd_core.preprocess import input_spec_for
from occkd_core.stages import distilled_stages, get_stage
from occkd_core.stats import judge_comparisons, mcnemar_test, wilcoxon_test
from occkd_core.tasks import get_task
from occkd_core.training import EpochRecord, StageSpec, train_stage

Report = Callable[[dict[str, Any]], None]


def fresh_node_dir(storage: Path, node_hash: str) -> Path:
    """The node's directory, emptied first if it holds a sealed result that failed verification (the
    driver only runs a node whose result is missing or corrupt): corrupt outputs are never resumed from."""
    out = node_dir(storage, node_hash)
    if (out / RESULT_FILE).exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_sets(data: FaceData) -> list[str]:
    """"test" first, then any extra test sets (e.g. "test_affectnet")."""
    return ["test"] + sorted(name for name in data.splits if name.startswith("test_"))


def metric_prefix(test_set: str, visible: str) -> str:
    """``test_lower_`` for the main test set, ``test_affectnet_lower_`` for an extra one."""
    return f"{test_set}_{visible}_"


def flat_metrics(test_set: str, visible: str, metrics: Mapping[str, float]) -> dict[str, float]:
    return {metric_prefix(test_set, visible) + name: value for name, value in metrics.items()}


def run_train_node(node: Mapping[str, Any], storage: Path, data_path: Path, parent_dirs: Mapping[str, Path],
                   *, device: torch.device, report: Report, pretrained: Path | None = None,
                   is_writer: bool = True, started_at: float | None = None) -> dict[str, Any]:
    """Train one stage, evaluate its best checkpoint on every test set × visibility, seal the outputs.

    ``started_at``: wall-clock start of the trial that runs this node (default: now); with the first and
    last training steps it goes into ``result.json``'s "timing", which measures per-node overhead."""
    started = time.perf_counter()
    started_at = started_at or time.time()
    spec = StageSpec.from_dict(node["params"])
    task = spec.task_info
    data = open_face_store(data_path)
    out = fresh_node_dir(storage, node["hash"]) if is_writer else node_dir(storage, node["hash"])
    parents = {parent_strategy(key): Path(d) for key, d in parent_dirs.items()}
    stage = get_stage(spec.strategy)  # where it starts and whether the teacher runs beside it
    init = parents[stage.starts_from] / "train" / "best.pt" if stage.starts_from != "weights" else None
    teacher = parents["teacher"] / "train" / "best.pt" if stage.needs_teacher else None

    def on_epoch(record: EpochRecord) -> None:
        metrics = {"epoch": record.epoch, "lr": record.lr, "train_loss": record.train_loss,
                   **{f"loss_{k}": v for k, v in record.loss_terms.items()},
                   **{f"train_{k}": v for k, v in record.train_metrics.items()},
                   **{f"val_{k}": v for k, v in record.val_metrics.items()},
                   "val_score": record.val_score, "epoch_seconds": record.seconds,
                   **{k: v for k, v in record.extra.items()}}
        report({"event": "epoch", **metrics})

    result = train_stage(spec, data, out / "train", init_checkpoint=init, teacher_checkpoint=teacher,
                         pretrained_weights=pretrained, device=device, on_epoch=on_epoch,
                         cache_dir=Path(storage) / "cache")
    if not is_writer:
        return {}
    model, _ = load_model(result.best_checkpoint, device)
    input_spec = input_spec_for(spec.arch, spec.input_size)
    metrics: dict[str, float] = {"best_epoch": result.best_epoch, "val_score": result.best_val_score}
    rows = []
    distilled = stage.distilled
    for test_set in test_sets(data):
        for visible, (preds, values) in evaluate_conditions(model, data.split(test_set), task, input_spec,
                                                           device=device).items():
            rows.append((test_set, node["strategy"], preds))
            metrics.update(flat_metrics(test_set, visible, values))
    files = ["train/best.pt", "predictions.parquet"]
    write_predictions(out / "predictions.parquet", rows)
    if distilled:  # fusion (spec §8) needs the distilled students' embeddings of the faces they see
        for split_name in ["train", "val", *test_sets(data)]:
            preds = predict(model, data.split(split_name), task, spec.train_visible, input_spec, device=device,
                            with_embeddings=True)
            save_numpy(out / f"embeddings_{split_name}.npy", preds.embeddings.astype(np.float32))
            files.append(f"embeddings_{split_name}.npy")
    if distilled:  # where the distilled student looks on its half of the face (spec §13)
        test = data.split("test")
        save_split_gradcam(out / "gradcam.png", model, test.images[:6], spec.train_visible, input_spec)
        files.append("gradcam.png")
    plot_path = out / "test_plot.png"
    main_preds = next(p for (ts, _, p) in rows if ts == "test" and p.visible == spec.train_visible)
    save_test_plot(plot_path, main_preds, task.class_names, title=node["key"])
    files.append("test_plot.png")
    summary = {"key": node["key"], "hash": node["hash"], "kind": "train", "strategy": node["strategy"],
               "metrics": metrics, "val_score": result.best_val_score, "best_epoch": result.best_epoch,
               "epochs_run": len(result.history), "seconds": time.perf_counter() - started,
               "timing": {"started_at": started_at, "first_step_at": result.first_step_at,
                          "last_step_at": result.last_step_at, "finished_at": time.time()}}
    write_result(out, summary, files)
    return summary


def parent_strategy(key: str) -> str:
    """'fer/vggf/teacher' -> 'teacher' (grid points and seeds stripped)."""
    return key.split("/")[2].split("[")[0]


def run_fusion_node(node: Mapping[str, Any], storage: Path, data_path: Path,
                    parent_dirs: Mapping[str, Path], *, started_at: float | None = None) -> dict[str, Any]:
    """Pick the best KD node of each kind by validation, fuse their embeddings with an SVM / ε-SVR (spec §8),
    and fit the single-embedding SVMs of the Table 4 ablation."""
    started = time.perf_counter()
    started_at = started_at or time.time()
    task = get_task(node["task"])
    data = open_face_store(data_path)
    out = fresh_node_dir(storage, node["hash"])
    chosen: dict[str, tuple[str, Path, dict]] = {}
    for key, directory in parent_dirs.items():
        strategy = parent_strategy(key)
        if strategy not in distilled_stages():
            continue
        result = read_result(Path(directory), verify=False)
        if result is None:
            raise RuntimeError(f"parent {key} has no result in {directory}")
        if strategy not in chosen or result["val_score"] > chosen[strategy][2]["val_score"]:
            chosen[strategy] = (key, Path(directory), result)
    missing = set(distilled_stages()) - set(chosen)
    if missing:
        raise RuntimeError(f"fusion {node['key']} is missing parents of kind {sorted(missing)}")
    splits = ["train", "val", *test_sets(data)]
    embeddings = {s: {k: np.load(chosen[k][1] / f"embeddings_{s}.npy") for k in chosen} for s in splits}
    labels = {s: data.split(s).labels(task.name) for s in splits}
    visible = node["params"]["visible"]
    variants = fusion_variants(node["params"].get("svr_kernels", [None]))
    metrics: dict[str, float] = {}
    rows, fitted = [], {}
    for name, (members, kernel) in variants.items():
        features = {s: concat_embeddings(*(embeddings[s][m] for m in members)) for s in splits}
        fit = fit_fusion(features["train"], labels["train"], features["val"], labels["val"], kind=task.kind,
                         Cs=tuple(node["params"]["Cs"]), kernel=kernel)
        fitted[name] = {"C": fit.C, "val_score": fit.val_score, "kernel": kernel or "default",
                        "val_scores": {str(c): v for c, v in fit.val_scores.items()}}
        prefix = "" if name == "fusion" else f"{name}_"
        for test_set in test_sets(data):
            outputs = fit.predict(features[test_set])
            preds = _fusion_predictions(outputs, labels[test_set], visible, task.num_outputs)
            rows.append((test_set, name, preds))
            metrics.update({prefix + k: v for k, v in flat_metrics(test_set, visible, task_metrics(task, preds)).items()})
    metrics["C"] = fitted["fusion"]["C"]
    metrics["val_score"] = fitted["fusion"]["val_score"]
    write_predictions(out / "predictions.parquet", rows)
    save_test_plot(out / "test_plot.png", next(p for ts, n, p in rows if ts == "test" and n == "fusion"),
                   task.class_names, title=node["key"])
    summary = {"key": node["key"], "hash": node["hash"], "kind": "fusion", "strategy": "fusion",
               "metrics": metrics, "val_score": metrics["val_score"], "fitted": fitted,
               "selected": {k: {"key": v[0], "hash": v[2]["hash"], "val_score": v[2]["val_score"]}
                            for k, v in chosen.items()},
               "seconds": time.perf_counter() - started,
               "timing": {"started_at": started_at, "finished_at": time.time()}}
    write_result(out, summary, ["predictions.parquet", "test_plot.png"])
    return summary


def fusion_variants(svr_kernels: list[str | None]) -> dict[str, tuple[tuple[str, ...], str | None]]:
    """Name -> (distilled students whose embeddings are concatenated, kernel; None = the task's default).
    "fusion" is the papers' model (spec §8) with the first kernel; each further ε-SVR kernel of the age
    task gives "fusion_<kernel>"; the single-embedding SVMs are the Table 4 ablation."""
    every = distilled_stages()
    variants = {"fusion": (every, svr_kernels[0])}
    variants.update({f"fusion_{kernel}": (every, kernel) for kernel in svr_kernels[1:]})
    variants.update({f"{stage}_svm": ((stage,), svr_kernels[0]) for stage in every})
    return variants


def _fusion_predictions(outputs: np.ndarray, targets: np.ndarray, visible: str, num_outputs: int) -> Predictions:
    if num_outputs == 1:
        return Predictions(visible=visible, outputs=outputs.reshape(-1, 1).astype(np.float32), targets=targets)
    one_hot = np.zeros((len(outputs), num_outputs), dtype=np.float32)  # SVM decisions as one-hot "logits"
    one_hot[np.arange(len(outputs)), outputs.astype(np.int64)] = 1.0
    return Predictions(visible=visible, outputs=one_hot, targets=targets)


def run_significance_node(node: Mapping[str, Any], storage: Path, data_path: Path,
                          parent_dirs: Mapping[str, Path], *, started_at: float | None = None) -> dict[str, Any]:
    """Each distilled or fused model against the main student of its architecture on the same test faces:
    McNemar on per-sample correctness (classification) or Wilcoxon on absolute errors (age), then Holm
    over the task's family of tests (spec §12)."""
    started_at = started_at or time.time()
    task = get_task(node["task"])
    data = open_face_store(data_path)
    visible = node["params"]["visible"]
    alpha = float(node["params"]["alpha"])
    out = fresh_node_dir(storage, node["hash"])
    students = {key.split("/")[1]: Path(d) for key, d in parent_dirs.items() if parent_strategy(key) == "student"}
    fusions = {key.split("/")[1]: Path(d) for key, d in parent_dirs.items() if parent_strategy(key) == "fusion"}
    comparisons = []
    for arch, fusion_dir in sorted(fusions.items()):
        fusion = read_result(fusion_dir, verify=False)
        candidates = {s: (node_dir(storage, info["hash"]) / "predictions.parquet", s)
                      for s, info in fusion["selected"].items()}
        for name in fusion["fitted"]:  # "fusion" and its kernel variants ("fusion_linear" for age)
            if name.startswith("fusion"):
                candidates[name] = (fusion_dir / "predictions.parquet", name)
        for test_set in test_sets(data):
            base = read_predictions(students[arch] / "predictions.parquet", test_set=test_set, visible=visible)
            for name, (path, model_name) in candidates.items():
                preds = read_predictions(path, test_set=test_set, visible=visible, model=model_name)
                row = {"task": task.name, "arch": arch, "test_set": test_set, "model": name, "baseline": "student",
                       "visible": visible}
                if task.is_classification:
                    model_ok, base_ok = preds["correct"].to_numpy(), base["correct"].to_numpy()
                    test = mcnemar_test(model_ok, base_ok, alpha=alpha)
                    row.update(test="mcnemar", b=test.b, c=test.c, statistic=test.statistic, pvalue=test.pvalue,
                               exact=test.exact, metric="accuracy", model_value=100 * model_ok.mean(),
                               baseline_value=100 * base_ok.mean())
                else:
                    model_err, base_err = preds["abs_error"].to_numpy(), base["abs_error"].to_numpy()
                    test = wilcoxon_test(model_err, base_err)
                    row.update(test="wilcoxon", statistic=test.statistic, pvalue=test.pvalue, metric="mae",
                               model_value=float(model_err.mean()), baseline_value=float(base_err.mean()))
                comparisons.append(row)
    if comparisons:
        improved = [(row["model_value"] > row["baseline_value"]) if task.is_classification else
                    (row["model_value"] < row["baseline_value"]) for row in comparisons]
        # Both readings: the papers' († where p < α, uncorrected) and Holm's over the task's family.
        for row, verdict in zip(comparisons, judge_comparisons([c["pvalue"] for c in comparisons], improved,
                                                               alpha=alpha)):
            row.update(improved=verdict.improved, significant_paper=verdict.significant, dagger=verdict.dagger,
                       verdict_paper=verdict.verdict, pvalue_holm=verdict.pvalue_holm,
                       significant=verdict.significant_holm, verdict=verdict.verdict_holm)
    atomic_write_bytes(out / "comparisons.json", json.dumps(comparisons, indent=1, default=float).encode())
    summary = {"key": node["key"], "hash": node["hash"], "kind": "significance", "strategy": "significance",
               "comparisons": comparisons, "metrics": {},
               "timing": {"started_at": started_at, "finished_at": time.time()}}
    write_result(out, summary, ["comparisons.json"])
    return summary


def save_test_plot(path: Path, preds: Predictions, class_names: tuple[str, ...], title: str) -> Path:
    """Confusion matrix (classification) or predicted-vs-true ages (regression), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(5, 4.5))
    if preds.outputs.shape[1] > 1:
        ConfusionMatrixDisplay.from_predictions(preds.targets, preds.predicted, labels=list(range(len(class_names))),
                                                display_labels=list(class_names), ax=ax, colorbar=False,
                                                xticks_rotation=45)
    else:
        ax.scatter(preds.targets, preds.predicted, s=4, alpha=0.5)
        lim = [0, float(max(preds.targets.max(), preds.predicted.max()) + 5)]
        ax.plot(lim, lim, "k--", lw=1)
        ax.set_xlabel("true age (years)")
        ax.set_ylabel("predicted age (years)")
    ax.set_title(f"{title} ({preds.visible} faces)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
    return path
