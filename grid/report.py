"""The grid's report: paper-style tables (Markdown + CSV) with the papers' numbers beside ours.

Per task, one row per model (architecture × teacher / students / distilled students / fusion / the
single-embedding SVMs of Table 4) and test faces, the mean (± std over seeds) of our metric, the
journal's number for the same architecture, stage, training faces and test faces
(``paper_results.json``, copied from the spec's results file), and the test against the main student
read two ways: the papers' rule (raw p, † where p < α and the model is better, spec §12) and the
Holm-corrected verdict over the task's comparisons. Where the grid ran teacher-free controls, each
distilled student is also tested against its control and the fusion against the control fusion (a
second Holm family), and each task gets one sentence on what the teacher adds beyond more training and
beyond ensembling. A model whose best validation epoch was its last is flagged (it may not have
converged). The papers' numbers come from full-size networks on the real data sets: beside a reduced
run (synthetic faces, small inputs, few epochs) they are a reference, not a target.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from grid.graph import ABLATION_SUFFIX, StageGraph, node_order
from grid.results import FusionNodeResult, NodeResult, SignificanceNodeResult, TrainNodeResult
from occkd_core.models import get_architecture
from occkd_core.presets import SVR_KERNELS
from occkd_core.stages import CONTROL_FUSION, STAGES, control_stages, distilled_stages, stage_starting_from
from occkd_core.tasks import get_task

PAPER_RESULTS = Path(__file__).parent / "paper_results.json"
def paper_stage_names() -> dict[str, str]:
    """Report rows (node stages and the fusion node's variants) -> the stage's name in the papers' results
    (their ``strategy`` field in paper_results.json), from the stage registry: the ablation student is a
    student there, each distilled stage has its single-embedding SVM (Table 4), and every ε-SVR kernel's
    fusion is compared with the papers' one."""
    student = stage_starting_from("teacher")
    return {**{name: stage.paper_name for name, stage in STAGES.items()},
            student + ABLATION_SUFFIX: STAGES[student].paper_name,
            **{f"{name}_svm": f"{STAGES[name].paper_name}_svm" for name in distilled_stages()},
            "fusion": "fusion", **{f"fusion_{kernel}": "fusion" for kernel in SVR_KERNELS},
            # occkd's controls: no paper runs them
            **{name: "" for name in (*control_stages(), CONTROL_FUSION, f"{student}_svm")}}


def row_order() -> tuple[str, ...]:
    """Rows of a report table in curriculum order (read from the registries at each call)."""
    return (*node_order()[:-2], f"{stage_starting_from('teacher')}_svm",
            *(f"{name}_svm" for name in distilled_stages()), "fusion",
            *(f"fusion_{kernel}" for kernel in SVR_KERNELS), CONTROL_FUSION)
PAPER_DATASET = {("fer", "test"): "FER+", ("fer", "test_affectnet"): "AffectNet",
                 ("gender", "test"): "UTKFace", ("age", "test"): "UTKFace"}
CSV_COLUMNS = ("task", "arch", "model", "train_faces", "test_set", "test_faces", "metric", "value", "std",
               "num_seeds", "paper_value", "paper_significant", "pvalue", "dagger", "verdict_uncorrected",
               "pvalue_holm", "verdict_holm", "control", "control_value", "pvalue_vs_control",
               "verdict_vs_control_uncorrected", "pvalue_holm_vs_control", "verdict_vs_control_holm",
               "best_epoch_is_last")


def load_paper_results(path: Path = PAPER_RESULTS) -> dict[tuple, dict[str, Any]]:
    """Journal records keyed by (dataset, model, strategy, train_faces, test_faces, metric)."""
    records = json.loads(path.read_text())["records"]
    out = {}
    for r in records:
        if r["source"] == "journal" and (r["table"] != "journal_table4" or r["strategy"].endswith("_svm")):
            out[(r["dataset"], r["model"], r["strategy"], r["train_faces"], r["test_faces"], r["metric"])] = r
    return out


def collect_rows(graph: StageGraph, results: Mapping[str, NodeResult]) -> list[dict[str, Any]]:
    """One CSV row per (task, arch, model, test set, test faces, metric), averaged over seeds."""
    paper = load_paper_results()
    values: dict[tuple, list[float]] = defaultdict(list)
    verdicts: dict[tuple, dict[str, Any]] = {}
    teacher_free_fused = {CONTROL_FUSION, f"{stage_starting_from('teacher')}_svm"}
    unconverged: set[tuple] = set()  # (task, arch, model, train faces) whose best epoch was the last run
    for key, node in graph.nodes.items():
        result = results.get(key)
        if result is None:
            continue
        if isinstance(result, SignificanceNodeResult):
            for row in result.comparisons:
                verdicts[(node.task, row["arch"], row["model"], row["test_set"], node.seed,
                          row.get("family", "student"))] = row
            continue
        selected = selected_keys(graph, results, node.task, node.arch, node.seed)
        if node.stage in (*distilled_stages(), *control_stages()) and key not in selected:
            continue  # only the grid point chosen on validation enters the table
        if isinstance(result, TrainNodeResult) and result.best_epoch_is_last:
            unconverged.add((node.task, node.arch, node.stage, node.train_faces))
        for score in result.scores:
            if score.metric == "weighted_accuracy" and node.task != "fer":
                continue  # the papers report weighted accuracy for FER+ only (spec §11)
            # The fusion node's teacher-free models saw no teacher: their faces are the student's.
            faces = (get_task(node.task).main_visible if score.model in teacher_free_fused else node.train_faces)
            values[(node.task, node.arch, score.model, faces, score.test_set, score.visible,
                    score.metric)].append(float(score.value))
    rows = []
    paper_names = paper_stage_names()
    for (task, arch, model, train_faces, test_set, visible, metric), vals in values.items():
        dataset = PAPER_DATASET.get((task, test_set))
        record = paper.get((dataset, get_architecture(arch).paper_name, paper_names[model], train_faces, visible,
                            metric))
        tested = ("accuracy" if metric != "mae" else "mae")
        verdict_rows = [v for (t, a, m, ts, _, f), v in verdicts.items() if (t, a, m, ts, f) == (
            task, arch, model, test_set, "student") and v["visible"] == visible and v["metric"] == tested]
        control_rows = [v for (t, a, m, ts, _, f), v in verdicts.items() if (t, a, m, ts, f) == (
            task, arch, model, test_set, "control") and v["visible"] == visible and v["metric"] == tested]
        rows.append({
            "task": task, "arch": arch, "model": model, "train_faces": train_faces, "test_set": test_set,
            "test_faces": visible, "metric": metric, "value": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else "", "num_seeds": len(vals),
            "paper_value": record["value"] if record else "",
            "paper_significant": record.get("significant") if record else "",
            # Seeds are separated by ";". The papers' rule: uncorrected p < α, a dagger where the model is
            # better (spec §12); Holm: corrected over the task's family of comparisons.
            "pvalue": ";".join(f"{v['pvalue']:.3g}" for v in verdict_rows),
            "dagger": ";".join(str(bool(v.get("dagger", False))) for v in verdict_rows),
            "verdict_uncorrected": ";".join(v.get("verdict_paper", "") for v in verdict_rows),
            "pvalue_holm": ";".join(f"{v['pvalue_holm']:.3g}" for v in verdict_rows),
            "verdict_holm": ";".join(v["verdict"] for v in verdict_rows),
            # against its teacher-free control (occkd's second family; seeds separated by ";")
            "control": control_rows[0]["baseline"] if control_rows else "",
            "control_value": ";".join(f"{v['baseline_value']:.4g}" for v in control_rows),
            "pvalue_vs_control": ";".join(f"{v['pvalue']:.3g}" for v in control_rows),
            "verdict_vs_control_uncorrected": ";".join(v.get("verdict_paper", "") for v in control_rows),
            "pvalue_holm_vs_control": ";".join(f"{v['pvalue_holm']:.3g}" for v in control_rows),
            "verdict_vs_control_holm": ";".join(v["verdict"] for v in control_rows),
            "best_epoch_is_last": (task, arch, model, train_faces) in unconverged,
        })
    order = {name: i for i, name in enumerate(row_order())}
    rows.sort(key=lambda r: (r["task"], r["test_set"], r["arch"], order.get(r["model"], 99), r["test_faces"], r["metric"]))
    return rows


def selected_keys(graph: StageGraph, results: Mapping[str, NodeResult], task: str, arch: str | None,
                  seed: int) -> set[str]:
    """The keys, in this graph, of the training nodes the fusion of ``task`` × ``arch`` × ``seed`` chose (empty
    until it has sealed). Found by hash: a fusion sealed by an earlier invocation names its choices by that
    invocation's keys, and keys change with the grid (``--seeds 2`` adds ``/seed0`` to the first seed's)."""
    for key, node in graph.nodes.items():
        fusion = results.get(key)
        if (node.task, node.arch, node.seed) == (task, arch, seed) and isinstance(fusion, FusionNodeResult):
            chosen = {pick.hash for pick in fusion.selected.values()}
            return {k for k, n in graph.nodes.items() if n.hash in chosen}
    return set()


def write_report(rows: list[dict[str, Any]], out_dir: Path, *, title: str, setting: str,
                 figures: Sequence[tuple[str, Path]] = ()) -> list[Path]:
    """report.csv and report.md in ``out_dir``; ``figures`` (caption, path under ``out_dir``) are embedded
    in the Markdown after the tables."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "report.csv", out_dir / "report.md"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    csv_path.write_text(buffer.getvalue())
    figure_links = [(caption, path.relative_to(out_dir).as_posix()) for caption, path in figures]
    md_path.write_text(render_markdown(rows, title=title, setting=setting, figures=figure_links))
    return [md_path, csv_path]


def _fmt(value: Any, std: Any = "") -> str:
    if value == "" or value is None:
        return "–"
    text = f"{float(value):.2f}"
    return text + (f" ± {float(std):.2f}" if std not in ("", None) else "")


def _papers_rule(cell: Mapping[str, Any]) -> str:
    """'0.041 †' per seed: the raw p-value, † a significant improvement, ‡ a significant loss."""
    if not cell.get("pvalue"):
        return "–"
    marks = {"better": " †", "worse": " ‡"}
    return "; ".join(p + marks.get(v, "") for p, v in zip(cell["pvalue"].split(";"), cell["verdict_uncorrected"].split(";")))


def _holm(cell: Mapping[str, Any]) -> str:
    if not cell.get("pvalue_holm"):
        return "–"
    return "; ".join(f"{p}, {v}" for p, v in zip(cell["pvalue_holm"].split(";"), cell["verdict_holm"].split(";")))


def _vs_control(cell: Mapping[str, Any]) -> str:
    """'p = 0.041 †, Holm 0.12 n.s.' against the control, per seed; – where the model has none."""
    if not cell.get("pvalue_vs_control"):
        return "–"
    marks = {"better": " †", "worse": " ‡"}
    raw = [p + marks.get(v, "") for p, v in zip(cell["pvalue_vs_control"].split(";"),
                                                 cell["verdict_vs_control_uncorrected"].split(";"))]
    holm = [f"{p}, {v}" for p, v in zip(cell["pvalue_holm_vs_control"].split(";"),
                                         cell["verdict_vs_control_holm"].split(";"))]
    return f"vs {cell['control'].replace('_', ' ')}: " + "; ".join(f"{r} (Holm {h})" for r, h in zip(raw, holm))


def _mean(text: str) -> float:
    values = [float(v) for v in str(text).split(";") if v != ""]
    return sum(values) / len(values)


def teacher_effect(rows: Sequence[Mapping[str, Any]], task: str) -> str:
    """One plain sentence per task: what the teacher adds beyond more training (each distilled student against
    its teacher-free control) and beyond ensembling (the fusion against the control fusion), on the main test
    set and the students' half, with the p-values; "" where the grid ran no controls."""
    info = get_task(task)
    metric = "mae" if info.kind == "regression" else "accuracy"
    found = [r for r in rows if r["task"] == task and r["test_set"] == "test" and r["metric"] == metric
             and r["test_faces"] == info.main_visible and r.get("pvalue_vs_control")]
    if not found:
        return ""
    unit = " years" if metric == "mae" else " %"
    parts, better, worse, total = [], 0, 0, 0
    for row in found:
        control = row["control"].replace("_", " ")
        holm = row["verdict_vs_control_holm"].split(";")
        total += len(holm)
        better += sum(v == "better" for v in holm)
        worse += sum(v == "worse" for v in holm)
        parts.append(f"{row['arch']} {row['model'].replace('_', ' ')} {_fmt(row['value'])} vs {control} "
                     f"{_fmt(_mean(row['control_value']))}{unit} (p = {row['pvalue_vs_control']}, Holm "
                     f"{row['pvalue_holm_vs_control']}: {row['verdict_vs_control_holm']})")
    # A significant loss to the control is the teacher's effect too (it hurt): said apart from the gains.
    verdict = (f"after Holm the teacher helps significantly in {better} and hurts significantly in {worse} of "
               f"{total} comparisons" if better or worse
               else "no comparison shows a significant effect of the teacher after Holm")
    return (f"**What the teacher adds ({task}, test on the {info.main_visible} half, {metric}):** {verdict}. "
            "A distilled student against its teacher-free control isolates the teacher from more training; "
            "the fusion against the control fusion, from ensembling: " + "; ".join(parts) + ".")


def render_markdown(rows: Iterable[dict[str, Any]], *, title: str, setting: str,
                    figures: Sequence[tuple[str, str]] = ()) -> str:
    """One table per task × test set × metric, laid out like the papers' tables: a row per model and
    training faces, a column per test faces, each cell "ours (paper)"; per task, what the teacher adds."""
    rows = list(rows)
    controlled = any(r.get("pvalue_vs_control") for r in rows)
    lines = [f"# {title}", "", setting, "",
             "Each cell: ours (paper). Paper: the journal's number for the same network, stage, training "
             "faces and test faces (full-size networks on the real data sets; † = significant there). "
             "The columns after the faces test the model against the main student of its architecture on the "
             "students' half, by McNemar (accuracy) or Wilcoxon (age MAE), α = 0.05, read two ways: "
             "**papers' rule**, the raw p-value, † where p < 0.05 and the model is better (the papers' "
             "daggers, uncorrected, spec §12), ‡ where p < 0.05 and it is worse; **Holm**, the p-value "
             "corrected over the task's comparisons with the student (every architecture × test set × "
             "distilled or fused model) and the verdict it gives.", ""]
    if controlled:
        lines += ["**vs control**: the same test against the model's teacher-free control (occkd's, not the "
                  "papers'): the distilled objective without the teacher's terms, from the same student, with the "
                  "same epochs, rows, flips and seed; for the fusion, the same SVM on the controls' embeddings "
                  "(the control fusion). Holm here corrects over the task's comparisons with controls, a family "
                  "of its own. `student_svm` is the same SVM on the student's own embedding.", ""]
    else:
        lines += ["**Uncontrolled:** this grid ran without teacher-free controls (preset `controls: false`), so a "
                  "gain over the student here cannot be told from more training or from ensembling.", ""]
    if any(r.get("best_epoch_is_last") for r in rows):
        lines += ["⚑ after a model: its best validation epoch was its last, so it may not have converged; a model "
                  "trained on from it can gain from more epochs alone.", ""]
    tables: dict[tuple[str, str, str], dict[tuple[str, str, str], dict[str, dict[str, Any]]]] = defaultdict(dict)
    for row in rows:
        table = tables[(row["task"], row["test_set"], row["metric"])]
        table.setdefault((row["arch"], row["model"], row["train_faces"]), {})[row["test_faces"]] = row
    said: set[str] = set()
    for (task, test_set, metric), table in tables.items():
        info = get_task(task)
        lines += [f"## {task} · {test_set} · {metric} (students see the {info.main_visible} half)", ""]
        if task not in said and teacher_effect(rows, task):  # under the task's first heading, not the last table's
            said.add(task)
            lines += [teacher_effect(rows, task), ""]
        lines += ["| arch | model | train faces | full | lower | upper | papers' rule: p | Holm: p, verdict |"
                  + (" vs control: p (Holm) |" if controlled else ""),
                  "|---|---|---|---|---|---|---|---|" + ("---|" if controlled else "")]
        for (arch, model, train_faces), cells in table.items():
            rendered = []
            for visible in ("full", "lower", "upper"):
                cell = cells.get(visible)
                if cell is None:
                    rendered.append("")
                    continue
                paper = _fmt(cell["paper_value"]) + ("†" if cell["paper_significant"] is True else "")
                rendered.append(f"{_fmt(cell['value'], cell['std'])} ({paper})")
            main = cells.get(info.main_visible, {})
            flag = " ⚑" if any(c.get("best_epoch_is_last") for c in cells.values()) else ""
            lines.append(f"| {arch} | {model}{flag} | {train_faces} | " + " | ".join(rendered)
                         + f" | {_papers_rule(main)} | {_holm(main)} |" + (f" {_vs_control(main)} |" if controlled else ""))
        lines.append("")
    if figures:  # (caption, path relative to the report)
        lines += ["## Figures", "", "Bars: ours (solid, ± std over seeds) and the papers' (hatched) on the students' "
                  "half; marks against the student: † p < 0.05 and better by the papers' rule, * better after Holm "
                  "(‡ / × worse); against the teacher-free control: ○ better after Holm. Curves: each stage's "
                  "validation metric per epoch.", ""]
        for caption, path in figures:
            lines += [f"![{caption}]({path})", ""]
    return "\n".join(lines)
