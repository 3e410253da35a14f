"""The report's figures, PNGs beside ``report.md`` (and logged to MLflow with it).

- Per task and test set: our number for each model on the students' half beside the papers' number for the
  same network and stage, with the significance marks of the report's tables (``†`` the papers' rule,
  ``*`` Holm-corrected better, ``‡`` / ``×`` the same two for worse).
- Per task: the learning curves of each chain (teacher → student → distilled students), the validation
  metric per epoch of the node the report's table uses (the grid point chosen on validation).

Nothing here computes a metric: the figures draw the report's rows and the nodes' recorded histories.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from grid.graph import StageGraph
from grid.report import selected_keys
from grid.results import NodeResult, TrainNodeResult
from occkd_core.files import atomic_write
from occkd_core.stages import CONTROL_FUSION, control_stages, distilled_stages, stage_starting_from
from occkd_core.tasks import get_task

FIGURE_DIR = "figures"


def figure_models() -> list[str]:
    """The bars of a comparison figure, in curriculum order: teacher, student, distilled students, their
    teacher-free controls, fusion, the control fusion."""
    return ["teacher", stage_starting_from("teacher"), *distilled_stages(), *control_stages(), "fusion",
            CONTROL_FUSION]


def _metric(task: str) -> str:
    return "accuracy" if get_task(task).is_classification else "mae"


def _axis_label(metric: str) -> str:
    return "accuracy (%), higher is better" if metric == "accuracy" else "MAE (years), lower is better"


def _marks(row: Mapping[str, Any]) -> str:
    """'†*' where the model beat the student by the papers' rule and by Holm; '‡×' where it lost; '○' where
    it beat its teacher-free control after Holm, '⊗' where it lost to it."""
    verdicts_paper = str(row.get("verdict_uncorrected") or "").split(";")
    verdicts_holm = str(row.get("verdict_holm") or "").split(";")
    marks = ""
    if "better" in verdicts_paper:
        marks += "†"
    if "better" in verdicts_holm:
        marks += "*"
    if "worse" in verdicts_paper:
        marks += "‡"
    if "worse" in verdicts_holm:
        marks += "×"
    against_control = str(row.get("verdict_vs_control_holm") or "").split(";")
    if "better" in against_control:
        marks += "○"
    if "worse" in against_control:
        marks += "⊗"
    return marks


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def comparison_figure(rows: Sequence[Mapping[str, Any]], task: str, test_set: str, out: Path) -> Path | None:
    """Bars per architecture: each model on the students' half, ours (solid) and the papers' (hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info, metric, models = get_task(task), _metric(task), figure_models()
    chosen = [r for r in rows if r["task"] == task and r["test_set"] == test_set and r["metric"] == metric
              and r["test_faces"] == info.main_visible and r["model"] in models]
    archs = sorted({r["arch"] for r in chosen})
    if not archs:
        return None
    fig, axes = plt.subplots(1, len(archs), figsize=(3.6 * len(archs) + 0.6, 3.6), squeeze=False, sharey=True)
    for ax, arch in zip(axes[0], archs):
        by_model = {r["model"]: r for r in chosen if r["arch"] == arch}
        names = [m for m in models if m in by_model]
        xs = range(len(names))
        ours = [float(by_model[m]["value"]) for m in names]
        errors = [float(by_model[m]["std"]) if by_model[m]["std"] not in ("", None) else 0.0 for m in names]
        papers = [float(by_model[m]["paper_value"]) if by_model[m]["paper_value"] not in ("", None) else float("nan")
                  for m in names]
        ax.bar([x - 0.2 for x in xs], ours, 0.4, yerr=errors, color="#3b75af", label="ours")
        ax.bar([x + 0.2 for x in xs], papers, 0.4, color="white", edgecolor="#888888", hatch="///",
               label="papers")
        for x, value, model in zip(xs, ours, names):
            marks = _marks(by_model[model])
            if marks:
                ax.annotate(marks, (x - 0.2, value), ha="center", va="bottom", fontsize=11, color="#b03030",
                            xytext=(0, 2), textcoords="offset points")
        for x, value, model in zip(xs, papers, names):  # the papers' own daggers, on their bars
            if by_model[model].get("paper_significant") in (True, "True"):
                ax.annotate("†", (x + 0.2, value), ha="center", va="bottom", fontsize=10, color="#666666",
                            xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(list(xs), [m.replace("_", " ") for m in names], rotation=30, ha="right")
        ax.set_title(arch)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(_axis_label(metric))
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"{task} · {test_set}: test on the {info.main_visible} half (students' faces)   "
                 "† p < 0.05 papers' rule  * Holm  (vs the student)   ○ Holm vs its control", fontsize=9)
    return _save(fig, out)


def chain_keys(graph: StageGraph, results: Mapping[str, NodeResult], task: str, arch: str,
               seed: int) -> dict[str, str]:
    """Stage -> the node of the chain the report uses: the grid point fusion chose, else the best by validation."""
    selected = selected_keys(graph, results, task, arch, seed)
    chosen: dict[str, str] = {}
    best: dict[str, float] = {}  # stage -> the validation score of the node chosen so far
    for key, node in graph.nodes.items():
        result = results.get(key)
        if (node.task, node.arch, node.seed) != (task, arch, seed) or not isinstance(result, TrainNodeResult):
            continue
        if node.stage in (*distilled_stages(), *control_stages()) and selected:
            if key in selected:
                chosen[node.stage] = key
        elif node.stage not in chosen or result.val_score > best[node.stage]:
            chosen[node.stage], best[node.stage] = key, result.val_score
    return chosen


def curves_figure(graph: StageGraph, results: Mapping[str, NodeResult], task: str, out: Path) -> Path | None:
    """One panel per architecture: the validation metric per epoch of each stage of its chain (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = _metric(task)
    seeds = sorted({n.seed for n in graph.nodes.values() if n.task == task})
    archs = sorted({n.arch for n in graph.nodes.values() if n.task == task and n.arch})
    panels = []
    for arch in archs:
        chain = chain_keys(graph, results, task, arch, seeds[0]) if seeds else {}
        lines = [(graph.nodes[k], results[k].history) for k in chain.values()]
        lines = [(node, history) for node, history in lines if any(metric in p.val_metrics for p in history)]
        if lines:
            panels.append((arch, lines))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 0.6, 3.3), squeeze=False)
    order = {s: i for i, s in enumerate(figure_models())}
    for ax, (arch, lines) in zip(axes[0], panels):
        for node, history in sorted(lines, key=lambda line: order.get(line[0].stage, 99)):
            points = [(p.epoch, p.val_metrics[metric]) for p in history if metric in p.val_metrics]
            ax.plot(*zip(*points), marker="o", markersize=3,
                    label=f"{node.stage.replace('_', ' ')} ({node.train_faces})")
        ax.set_title(arch)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"val {metric}" + (" (%)" if "accuracy" in metric else " (years)"))
    fig.suptitle(f"{task}: validation curve of each stage (faces it trains on; seed {seeds[0]})", fontsize=9)
    return _save(fig, out)


def write_figures(rows: Sequence[Mapping[str, Any]], graph: StageGraph, results: Mapping[str, NodeResult],
                  report_dir: Path) -> list[tuple[str, Path]]:
    """Every figure of the report as (caption, path), in the report's order."""
    figures: list[tuple[str, Path]] = []
    test_sets: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        test_sets[row["task"]].add(row["test_set"])
    for task in sorted(test_sets):
        for test_set in sorted(test_sets[task]):
            path = comparison_figure(rows, task, test_set, report_dir / FIGURE_DIR / f"{task}_{test_set}_vs_papers.png")
            if path:
                figures.append((f"{task} · {test_set}: ours vs the papers on the students' half", path))
        path = curves_figure(graph, results, task, report_dir / FIGURE_DIR / f"{task}_curves.png")
        if path:
            figures.append((f"{task}: learning curves of each chain", path))
    return figures
