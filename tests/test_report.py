"""The significance node and the report, on predictions built with known discordant counts: the papers'
rule (uncorrected McNemar, †) and the Holm-corrected verdict are both shown, and here they disagree; the
tests against the teacher-free controls form a Holm family of their own."""

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from grid.artifacts import node_dir, write_predictions, write_result
from grid.graph import expand_graph
from grid.nodes import ParentOutput, run_significance_node
from grid.report import collect_rows, render_markdown, write_report
from grid.results import (
    EpochPoint, FittedModel, FusionNodeResult, ScoreRow, SelectedNode, Timing, TrainNodeResult, TrainTiming,
)
from occkd_core.data import make_synthetic_faces, write_face_store
from occkd_core.evaluation import Predictions
from occkd_core.presets import load_preset
from occkd_core.stats import judge_comparisons

#: b = 15 discordant pairs the fusion wins, c = 5 it loses: exact McNemar (b + c < 25),
#: p = 2 · P(X ≤ 5 | n = 20, ½) = 2 · 21,700 / 2^20.
FUSION_P = 2 * 21700 / 2**20  # 0.0414
#: The fusion against the control fusion: b = 10, c = 0, exact: p = 2 · ½^10.
CONTROL_P = 2 / 2**10  # 0.00195


def _gender_predictions(targets: np.ndarray, correct: np.ndarray) -> Predictions:
    predicted = np.where(correct, targets, 1 - targets)
    outputs = np.eye(2, dtype=np.float32)[predicted]
    return Predictions(visible="upper", outputs=outputs, targets=targets)


def test_judge_comparisons_reads_each_p_value_both_ways():
    verdicts = judge_comparisons([FUSION_P, 0.5, 0.01, 0.8], [True, True, False, False])
    fusion, same, worse, other = verdicts
    assert (fusion.significant, fusion.dagger, fusion.verdict) == (True, True, "better")
    # Holm: sorted p 0.01, 0.0414, 0.5, 0.8 -> 0.04, max(0.04, 3 · 0.0414), ...
    assert fusion.pvalue_holm == pytest.approx(3 * FUSION_P)
    assert (fusion.significant_holm, fusion.verdict_holm) == (False, "no significant difference")
    assert worse.pvalue_holm == pytest.approx(0.04) and worse.verdict_holm == "worse" and not worse.dagger
    assert same.verdict == other.verdict == "no significant difference"
    with pytest.raises(ValueError, match="one per comparison"):
        judge_comparisons([0.1], [True, False])


@pytest.fixture
def significance_setup(tmp_path: Path):
    data = make_synthetic_faces(300, image_size=32, seed=3)
    data_path = write_face_store(tmp_path / "faces.arrow", data)
    targets = data.split("test").labels("gender")
    n = len(targets)
    assert n >= 30
    preset = load_preset("smoke")
    graph = expand_graph(preset, ["gender"], ["vggf"], train_sizes={"gender": 180},
                         data_fingerprints={"gender": "data"})
    nodes = graph.nodes
    storage = tmp_path / "storage"
    student_ok = np.ones(n, dtype=bool)
    student_ok[:15] = False  # the fusion gets these right: b = 15
    fusion_ok = np.ones(n, dtype=bool)
    fusion_ok[15:20] = False  # ... and these wrong: c = 5
    kd_ok = student_ok.copy()  # standard KD: identical to the student, p = 1
    triplet_ok = student_ok.copy()
    triplet_ok[:3], triplet_ok[20:23] = True, False  # b = c = 3, p = 1
    control_fusion_ok = fusion_ok.copy()
    control_fusion_ok[20:30] = False  # the fusion beats the control fusion: b = 10, c = 0
    # The controls do exactly as their distilled twins: p = 1 against them.
    outcomes = {"gender/vggf/student": student_ok, "gender/vggf/standard_kd": kd_ok,
                "gender/vggf/triplet_kd[margin=0.1]": triplet_ok, "gender/vggf/standard_kd_control": kd_ok,
                "gender/vggf/triplet_kd_control": triplet_ok, "gender/vggf/fusion": fusion_ok}
    results = {}
    for key, ok in outcomes.items():
        node = nodes[key]
        directory = node_dir(storage, node.hash)
        directory.mkdir(parents=True)
        model = "fusion" if node.stage == "fusion" else node.stage
        written = [("test", model, _gender_predictions(targets, ok))]
        if node.stage == "fusion":
            written.append(("test", "control_fusion", _gender_predictions(targets, control_fusion_ok)))
        write_predictions(directory / "predictions.parquet", written)
        scores = [ScoreRow(model=model, test_set="test", visible="upper", metric="accuracy", value=100 * ok.mean())]
        common = dict(key=key, hash=node.hash, stage=node.stage, metrics={}, val_score=0.5, seconds=1.0)
        if node.stage == "fusion":
            fit = dict(val_score=0.5, kernel="default", val_scores={"1.0": 0.5})
            result = FusionNodeResult(
                **common, timing=Timing(started_at=0.0, finished_at=1.0),
                scores=(*scores, ScoreRow(model="control_fusion", test_set="test", visible="upper",
                                          metric="accuracy", value=100 * control_fusion_ok.mean())),
                fitted={"fusion": FittedModel(C=1.0, members=("standard_kd", "triplet_kd"), **fit),
                        "standard_kd_svm": FittedModel(C=1.0, members=("standard_kd",), **fit),
                        "control_fusion": FittedModel(C=1.0, members=("standard_kd_control", "triplet_kd_control"),
                                                      **fit)},
                selected={s: SelectedNode(key=k, hash=nodes[k].hash, val_score=0.5)
                          for s, k in (("standard_kd", "gender/vggf/standard_kd"),
                                       ("triplet_kd", "gender/vggf/triplet_kd[margin=0.1]"),
                                       ("standard_kd_control", "gender/vggf/standard_kd_control"),
                                       ("triplet_kd_control", "gender/vggf/triplet_kd_control"))})
        else:
            result = TrainNodeResult(**common, scores=tuple(scores), best_epoch=1, epochs_run=2, max_epochs=2,
                                     history=(), placement={},
                                     timing=TrainTiming(started_at=0.0, first_step_at=0.1, last_step_at=0.9,
                                                        finished_at=1.0))
        results[key] = write_result(directory, result, ["predictions.parquet"])
    significance = nodes["gender/significance"]
    parents = [ParentOutput(edge.role, edge.key, nodes[edge.key].arch, node_dir(storage, nodes[edge.key].hash))
               for edge in significance.parents]
    results[significance.key] = run_significance_node(significance, storage, data_path, parents)
    return graph, results


def test_significance_node_and_report_show_the_papers_rule_beside_holm(significance_setup, tmp_path: Path):
    graph, results = significance_setup
    found = results["gender/significance"].comparisons
    comparisons = {c["model"]: c for c in found if c["family"] == "student"}
    assert set(comparisons) == {"standard_kd", "triplet_kd", "fusion"}
    fusion = comparisons["fusion"]
    assert (fusion["b"], fusion["c"], fusion["exact"]) == (15, 5, True)
    assert fusion["pvalue"] == pytest.approx(FUSION_P)
    assert (fusion["dagger"], fusion["verdict_paper"]) == (True, "better")  # the papers' rule: †
    assert fusion["pvalue_holm"] == pytest.approx(3 * FUSION_P)  # Holm over the task's 3 comparisons
    assert (fusion["significant"], fusion["verdict"]) == (False, "no significant difference")
    assert comparisons["standard_kd"]["pvalue"] == 1.0 and not comparisons["standard_kd"]["dagger"]
    # The teacher's own family: each model against its control, Holm over these three alone.
    controls = {c["model"]: c for c in found if c["family"] == "control"}
    assert {m: c["baseline"] for m, c in controls.items()} == {
        "standard_kd": "standard_kd_control", "triplet_kd": "triplet_kd_control", "fusion": "control_fusion"}
    assert (controls["fusion"]["b"], controls["fusion"]["c"]) == (10, 0)
    assert controls["fusion"]["pvalue"] == pytest.approx(CONTROL_P)
    assert controls["fusion"]["pvalue_holm"] == pytest.approx(3 * CONTROL_P) and controls["fusion"]["verdict"] == "better"
    assert controls["standard_kd"]["pvalue"] == 1.0 and controls["standard_kd"]["verdict"] == "no significant difference"

    rows = collect_rows(graph, results)
    row = next(r for r in rows if r["model"] == "fusion" and r["test_faces"] == "upper")
    assert (row["pvalue"], row["dagger"], row["verdict_uncorrected"]) == ("0.0414", "True", "better")
    assert (row["pvalue_holm"], row["verdict_holm"]) == ("0.124", "no significant difference")
    assert (row["control"], row["pvalue_vs_control"], row["verdict_vs_control_holm"]) == (
        "control_fusion", "0.00195", "better")
    markdown = render_markdown(rows, title="t", setting="s")
    assert "| papers' rule: p | Holm: p, verdict | vs control: p (Holm) |" in markdown
    line = next(line for line in markdown.splitlines() if line.startswith("| vggf | fusion |"))
    assert line.endswith("| 0.0414 † | 0.124, no significant difference | vs control fusion: 0.00195 † "
                         "(Holm 0.00586, better) |")
    assert "after Holm the teacher helps significantly in 1 and hurts significantly in 0 of 3 comparisons" in markdown
    # The sentence opens its task's section (under its first heading), not the end of the section before it.
    lines = markdown.splitlines()
    heading = next(i for i, text in enumerate(lines) if text.startswith("## gender · "))
    assert lines[heading + 2].startswith("**What the teacher adds (gender, ")
    assert sum(text.startswith("**What the teacher adds") for text in lines) == 1
    assert "| vggf | control_fusion | upper |" in markdown  # no teacher: the student's faces
    assert "vggf fusion " in markdown and "vs control fusion" in markdown
    # Without controls the report says its comparisons are uncontrolled.
    bare = [{k: ("" if "control" in k else v) for k, v in r.items()} for r in rows if "control" not in r["model"]]
    assert "**Uncontrolled:**" in render_markdown(bare, title="t", setting="s")
    md_path, csv_path = write_report(rows, tmp_path / "report", title="t", setting="s")
    with open(csv_path) as handle:
        written = next(r for r in csv.DictReader(handle) if r["model"] == "fusion" and r["test_faces"] == "upper")
    assert written["dagger"] == "True" and written["verdict_holm"] == "no significant difference"
    assert json.loads(json.dumps(results["gender/significance"].comparisons))  # plain JSON for MLflow


def test_report_figures_mark_significance_and_draw_each_chains_curves(significance_setup, tmp_path: Path):
    """The comparison figure carries the marks of the table (here † alone: Holm does not confirm the
    fusion's gain), the curves figure draws the recorded histories, and report.md embeds both."""
    from PIL import Image

    from grid.figures import _marks, chain_keys, write_figures

    graph, results = significance_setup
    results = dict(results)
    for key, start in (("gender/vggf/student", 60.0), ("gender/vggf/standard_kd", 62.0)):
        results[key] = dataclasses.replace(results[key], history=tuple(
            EpochPoint(epoch=e, train_loss=1.0, val_score=start + e, val_metrics={"accuracy": start + e})
            for e in (1, 2, 3)))
    rows = collect_rows(graph, results)
    fusion = next(r for r in rows if r["model"] == "fusion" and r["test_faces"] == "upper")
    assert _marks(fusion) == "†○"  # † vs the student (not confirmed by Holm); ○ beats its control after Holm
    assert _marks({"verdict_uncorrected": "better;worse", "verdict_holm": "better;no significant difference"}) == "†*‡"
    seed = graph.nodes["gender/vggf/fusion"].seed
    assert chain_keys(graph, results, "gender", "vggf", seed)["triplet_kd"] == "gender/vggf/triplet_kd[margin=0.1]"
    report_dir = tmp_path / "report"
    figures = write_figures(rows, graph, results, report_dir)
    assert [path.name for _, path in figures] == ["gender_test_vs_papers.png", "gender_curves.png"]
    for _, path in figures:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 300
    md_path, _ = write_report(rows, report_dir, title="t", setting="s", figures=figures)
    markdown = md_path.read_text()
    assert "![gender: learning curves of each chain](figures/gender_curves.png)" in markdown
    assert "(figures/gender_test_vs_papers.png)" in markdown


def test_a_fusion_sealed_under_one_seed_still_picks_its_rows_once_the_grid_has_two(significance_setup):
    """The fusion names its chosen grid points by key, and keys change with the grid: run again with
    ``--seeds 2``, the nodes sealed under one seed are ``…/seed0`` (same hashes, so they are reused). The
    report finds the fusion's choices by hash: seed 0's distilled students and controls stay in the table
    (they were dropped, and the table showed seed 1 alone, found on real UTKFace at mid)."""
    graph, results = significance_setup
    two_seeds = expand_graph(load_preset("smoke"), ["gender"], ["vggf"], seeds=2, train_sizes={"gender": 180},
                             data_fingerprints={"gender": "data"})
    by_hash = {node.hash: key for key, node in two_seeds.nodes.items()}
    moved = {by_hash[graph.nodes[key].hash]: result for key, result in results.items()}
    assert "gender/vggf/standard_kd/seed0" in moved and "gender/vggf/fusion/seed0" in moved
    rows = collect_rows(two_seeds, moved)
    for model in ("standard_kd", "triplet_kd", "standard_kd_control", "triplet_kd_control"):
        assert [row["num_seeds"] for row in rows if row["model"] == model] == [1], model
