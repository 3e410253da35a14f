"""A sealed node's result.json as typed results (grid.results), and the fusion and significance nodes' specs
(grid.node_specs). The literal dicts below are result.json as grid/nodes.py wrote it before the types existed
(keys, order, omissions): files already sealed on users' storage must read, and a result written now must be
the same file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grid.artifacts import RESULT_FILE, read_result, write_result
from grid.graph import expand_graph
from grid.mlflow_content import placement_tags, result_metrics
from grid.node_specs import FusionSpec, SignificanceSpec
from grid.results import (
    FusionNodeResult, ResultFormatError, SignificanceNodeResult, TrainNodeResult, result_from_dict,
)
from occkd_core.presets import load_preset

SCORE = {"model": "triplet_kd", "test_set": "test", "visible": "upper", "metric": "accuracy", "value": 71.5}

#: A distilled student's result.json, as run_train_node wrote it (with "files" from write_result).
TRAIN = {
    "key": "gender/vggf/triplet_kd[margin=0.1]", "hash": "cff8e5453a4cbf8e", "kind": "train", "strategy": "triplet_kd",
    "metrics": {"best_epoch": 2, "val_score": 72.0},
    "scores": [SCORE, {**SCORE, "visible": "full", "value": 80.25}],
    "val_score": 72.0, "best_epoch": 2, "epochs_run": 3, "max_epochs": 3, "seconds": 12.5,
    "history": [{"epoch": 1, "train_loss": 0.9, "val_score": 60.0, "val_accuracy": 60.0},
                {"epoch": 2, "train_loss": 0.7, "val_score": 72.0, "val_accuracy": 72.0},
                {"epoch": 3, "train_loss": 0.6, "val_score": 70.0, "val_accuracy": 70.0}],
    "placement": {"ray_node": "abc", "gpu_ids": [], "device": "cpu", "workers": 1, "ray_train": False,
                  "code_root": "/src", "width": "1 (the preset's)"},
    "timing": {"started_at": 1000.0, "first_step_at": 1002.5, "last_step_at": 1010.0, "finished_at": 1012.0},
    "files": {"train/best.pt": "aa", "predictions.parquet": "bb", "test_plot.png": "cc"},
}

#: An age fusion node's result.json: two ε-SVR kernels, a control fusion; "standard_kd_svm" as sealed before
#: the solver's convergence was recorded (no "converged").
FUSION = {
    "key": "age/vggf/fusion", "hash": "5eff6ec3d824aa15", "kind": "fusion", "strategy": "fusion",
    "metrics": {"C": 10.0, "val_score": -6.5},
    "scores": [{"model": "fusion", "test_set": "test", "visible": "upper", "metric": "mae", "value": 6.75},
               {"model": "fusion_linear", "test_set": "test", "visible": "upper", "metric": "mae", "value": 7.0}],
    "val_score": -6.5,
    "fitted": {
        "fusion": {"C": 10.0, "val_score": -6.5, "kernel": "rbf", "members": ["standard_kd", "triplet_kd"],
                   "val_scores": {"1.0": -7.0, "10.0": -6.5}, "converged": {"1.0": True, "10.0": True}},
        "fusion_linear": {"C": 1.0, "val_score": -6.9, "kernel": "linear", "members": ["standard_kd", "triplet_kd"],
                          "val_scores": {"1.0": -6.9, "10.0": -7.2}, "converged": {"1.0": True, "10.0": False}},
        "standard_kd_svm": {"C": 1.0, "val_score": -7.5, "kernel": "rbf", "members": ["standard_kd"],
                            "val_scores": {"1.0": -7.5, "10.0": -7.6}},
        "control_fusion": {"C": 1.0, "val_score": -7.1, "kernel": "rbf",
                           "members": ["standard_kd_control", "triplet_kd_control"],
                           "val_scores": {"1.0": -7.1, "10.0": -7.3}, "converged": {"1.0": True, "10.0": True}},
    },
    "selected": {"standard_kd": {"key": "age/vggf/standard_kd", "hash": "1111", "val_score": -7.4},
                 "triplet_kd": {"key": "age/vggf/triplet_kd[margin=0.3]", "hash": "2222", "val_score": -7.2}},
    "seconds": 3.25,
    "timing": {"started_at": 1020.0, "finished_at": 1024.0},
    "files": {"predictions.parquet": "dd", "test_plot.png": "ee"},
}

#: A significance node's result.json: one McNemar row of each family.
COMPARISON = {"task": "gender", "arch": "vggf", "test_set": "test", "model": "fusion", "baseline": "student",
              "family": "student", "visible": "upper", "test": "mcnemar", "metric": "accuracy", "model_value": 75.0,
              "baseline_value": 70.0, "statistic": 5.0, "pvalue": 0.0414, "b": 15, "c": 5, "exact": True,
              "improved": True, "significant_paper": True, "dagger": True, "verdict_paper": "better",
              "pvalue_holm": 0.124, "significant": False, "verdict": "no significant difference"}
SIGNIFICANCE = {
    "key": "gender/significance", "hash": "96a5db7af8e14817", "kind": "significance", "strategy": "significance",
    "comparisons": [COMPARISON, {**COMPARISON, "baseline": "control_fusion", "family": "control", "pvalue": 0.002,
                                 "pvalue_holm": 0.006, "significant": True, "verdict": "better"}],
    "metrics": {}, "scores": [],
    "timing": {"started_at": 1030.0, "finished_at": 1031.0},
    "files": {"comparisons.json": "ff"},
}

SEALED = {"train": (TRAIN, TrainNodeResult), "fusion": (FUSION, FusionNodeResult),
          "significance": (SIGNIFICANCE, SignificanceNodeResult)}


@pytest.mark.parametrize("kind", list(SEALED))
def test_todays_result_json_reads_typed_and_writes_back_the_same_keys_in_the_same_order(kind):
    raw, cls = SEALED[kind]
    result = result_from_dict(json.loads(json.dumps(raw)))
    assert type(result) is cls and result.kind == kind
    assert result.to_dict() == raw
    assert json.dumps(result.to_dict()) == json.dumps(raw)  # key order too: the file is byte-for-byte the same
    assert cls.from_dict(result.to_dict()) == result


def test_the_typed_fields_hold_what_the_consumers_read():
    train = result_from_dict(TRAIN)
    assert (train.val_score, train.best_epoch, train.epochs_run, train.best_epoch_is_last) == (72.0, 2, 3, False)
    assert train.scores[1].visible == "full" and train.scores[1].value == 80.25
    assert [p.val_metrics["accuracy"] for p in train.history] == [60.0, 72.0, 70.0]
    assert train.timing.steps == (1002.5, 1010.0) and train.placement["device"] == "cpu"
    fusion = result_from_dict(FUSION)
    assert fusion.selected["triplet_kd"].hash == "2222" and fusion.fitted["fusion_linear"].kernel == "linear"
    assert fusion.fitted["fusion"].members == ("standard_kd", "triplet_kd")
    assert fusion.fitted["standard_kd_svm"].converged is None
    assert fusion.fitted["fusion_linear"].converged["10.0"] is False
    assert fusion.timing.steps == (None, None) and fusion.placement is None
    significance = result_from_dict(SIGNIFICANCE)
    assert [c["family"] for c in significance.comparisons] == ["student", "control"]


@pytest.mark.parametrize("kind", list(SEALED))
def test_write_result_seals_and_read_result_reads_it_back(kind, tmp_path: Path):
    raw, _ = SEALED[kind]
    (tmp_path / "out.bin").write_bytes(b"abc")
    sealed = write_result(tmp_path, result_from_dict({**raw, "files": {}}), ["out.bin"])
    # the SHA-256 of b"abc" (FIPS 180-2's example)
    assert sealed.files == {"out.bin": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    assert json.loads((tmp_path / RESULT_FILE).read_text()) == {**raw, "files": sealed.files}
    assert read_result(tmp_path) == sealed
    (tmp_path / "out.bin").write_bytes(b"abd")  # a changed file: the node is not complete
    assert read_result(tmp_path) is None and read_result(tmp_path, verify=False) == sealed


def test_a_result_json_missing_a_key_fails_with_one_line_naming_the_file_and_the_keys(tmp_path: Path):
    raw = {k: v for k, v in FUSION.items() if k not in ("selected", "timing")}
    (tmp_path / RESULT_FILE).write_text(json.dumps(raw))
    with pytest.raises(ResultFormatError) as caught:
        read_result(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(tmp_path / RESULT_FILE))
    assert "'timing'" in message and "'selected'" in message and "delete the node's folder" in message
    broken = json.loads(json.dumps(FUSION))
    del broken["fitted"]["fusion"]["members"]  # inside a sub-record, the file is named all the same
    with pytest.raises(ResultFormatError, match=r"^here\.json: a fitted entry lacks 'members'"):
        result_from_dict(broken, source="here.json")
    with pytest.raises(ResultFormatError, match="unknown node kind 'tuning'"):
        result_from_dict({**TRAIN, "kind": "tuning"})
    (tmp_path / RESULT_FILE).write_text('{"key": ')  # cut short: not sealed, the node runs again
    assert read_result(tmp_path) is None


def test_a_sealed_results_mlflow_metrics_and_placement_tags():
    fusion = result_from_dict(FUSION)
    metrics = {m.key: m.value for m in result_metrics(fusion, "fusion", None, timestamp=0)}
    # its own figures, then each score: the node's own model unprefixed, a variant under its name
    assert metrics == {"C": 10.0, "val_score": -6.5, "test_upper_mae": 6.75, "fusion_linear_test_upper_mae": 7.0}
    # A result sealed before the driver tagged the workers' choice itself still holds "width": not tagged from here.
    tags = {t.key: t.value for t in placement_tags(result_from_dict(TRAIN).placement)}
    assert tags == {"occkd.ray_node": "abc", "occkd.device": "cpu", "occkd.workers": "1", "occkd.ray_train": "False",
                    "occkd.gpu_ids": "-"}
    assert placement_tags(fusion.placement) == []


def test_fusion_and_significance_specs_give_exactly_the_params_the_graph_always_hashed():
    """The params dicts as grid/graph.py built them before the specs (and so every node hash): classification
    fusion has no svr_kernels key; regression's lists the preset's kernels."""
    preset = load_preset("paper")
    graph = expand_graph(preset, ["fer", "age"], ["vggf"], train_sizes={"fer": 10, "age": 10},
                         data_fingerprints={"fer": "a", "age": "b"}, from_scratch=True)
    Cs = list(preset.fusion_Cs)
    assert graph.nodes["fer/vggf/fusion"].params == {"Cs": Cs, "visible": "lower", "kind": "classification"}
    assert graph.nodes["age/vggf/fusion"].params == {"Cs": Cs, "visible": "upper", "kind": "regression",
                                                      "svr_kernels": list(preset.svr_kernels)}
    assert graph.nodes["fer/significance"].params == {"alpha": 0.05, "visible": "lower"}
    for key in ("fer/vggf/fusion", "age/vggf/fusion"):
        params = graph.nodes[key].params
        assert FusionSpec.from_dict(params).to_dict() == params
    assert SignificanceSpec.from_dict({"alpha": 0.05, "visible": "lower"}) == SignificanceSpec(visible="lower")
    assert FusionSpec.from_dict(graph.nodes["fer/vggf/fusion"].params).kernels == (None,)
    with pytest.raises(ValueError, match="missing visible"):
        FusionSpec.from_dict({"Cs": [1.0], "kind": "classification"})
    with pytest.raises(ValueError, match="classification task's none"):
        FusionSpec(Cs=(1.0,), visible="lower", kind="classification", svr_kernels=("rbf",))
    with pytest.raises(ValueError, match="alpha must lie in"):
        SignificanceSpec(visible="upper", alpha=5)
