"""A new distillation strategy and a new architecture, added *only* through the registries from this
module (their classes, one entry each, a preset): the presets, the stage graph, the training loop, the
fusion and significance nodes, the progress line and the report all handle them. This is the recipe
of README's "Extending occkd"."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from grid.artifacts import node_dir, read_result
from grid.graph import expand_graph, node_order
from grid.nodes import ParentOutput, run_fusion_node, run_significance_node, run_train_node
from grid.report import collect_rows, render_markdown
from occkd_core.data import make_synthetic_faces, write_face_store
from occkd_core.losses import supervised_loss
from occkd_core.models import ARCHITECTURES, ArchInfo
from occkd_core.preprocess import prepare_views
from occkd_core.presets import load_preset
from occkd_core.stages import STAGES, StageInfo
from occkd_core.strategies import SupervisedStrategy
from test_plugins import PluginNet


class LogitMatchingStrategy(SupervisedStrategy):
    """A toy distillation: (1 − λ)·task loss + λ·MSE between the student's logits on the occluded face
    and the frozen teacher's on the full face."""

    def loss_terms(self, model: nn.Module, rows, flip: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        ctx, lam = self.ctx, self.ctx.train.lam
        full, occluded = prepare_views(ctx.images(rows), ("full", ctx.visible), ctx.input_spec, flip, ctx.channels_last)
        with torch.no_grad():
            teacher_logits, _ = ctx.teacher(full)
        outputs, _ = model(occluded)
        return {"supervised": (1 - lam) * supervised_loss(outputs, ctx.targets[rows], ctx.task.kind),
                "logit_mse": lam * F.mse_loss(outputs, teacher_logits)}, outputs


# The same one-conv network as the out-of-tree plugin's (tests/test_plugins.py), registered here in-process.
TinyNet = PluginNet


@pytest.fixture
def extended(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(STAGES, "logit_kd", StageInfo(
        "logit_kd", LogitMatchingStrategy, starts_from="student", needs_teacher=True, distilled=True,
        required=("lam",), cost=1.3, paper_name="logit_ts"))
    monkeypatch.setitem(ARCHITECTURES, "tinynet", ArchInfo(
        "tinynet", TinyNet, mean=(128.0, 128.0, 128.0), std=(64.0, 64.0, 64.0), cost=0.1, paper_name="TinyNet"))
    models = {a: {"input_size": 32, "width_mult": 0.125} for a in ARCHITECTURES}
    stage = {"optimizer": "adam", "batch_size": 32, "epochs": 1, "lr": 1e-3}
    preset = {
        "name": "extended", "description": "test preset with a toy stage and a toy network",
        "data": {"source": "synthetic", "num_faces": 240, "image_size": 32, "seed": 1},
        "models": models, "pretrained": "from_scratch", "fusion": {"Cs": [1.0]},
        "stage_defaults": {"teacher": {**stage, "epochs": 2}, "student": stage,
                           "standard_kd": {**stage, "lam": 0.5},
                           "triplet_kd": {**stage, "lam": 0.5, "margin": 0.1, "pool_fraction": 0.3},
                           "logit_kd": {**stage, "lam": [0.3, 0.7]}},  # a grid, like any stage's
        "stages": {t: {a: {} for a in ARCHITECTURES} for t in ("fer", "gender", "age")},
    }
    path = tmp_path / "extended.yaml"
    path.write_text(yaml.safe_dump(preset))
    return load_preset(path)


@pytest.mark.slow
def test_a_new_stage_and_architecture_run_through_graph_training_fusion_and_report(extended, tmp_path: Path):
    data = make_synthetic_faces(240, image_size=32, seed=1)
    data_path = write_face_store(tmp_path / "faces.arrow", data)
    graph = expand_graph(extended, ["gender"], ["tinynet"], train_sizes={"gender": 144},
                         data_fingerprints={"gender": "faces"})
    nodes = graph.nodes
    assert {"gender/tinynet/logit_kd[lam=0.3]", "gender/tinynet/logit_kd[lam=0.7]"} <= set(nodes)
    # Its teacher-free control comes for free: a node per λ (the control keeps the task term's weight 1 − λ).
    assert {"gender/tinynet/logit_kd_control[lam=0.3]", "gender/tinynet/logit_kd_control[lam=0.7]"} <= set(nodes)
    assert [e.role for e in nodes["gender/tinynet/logit_kd_control[lam=0.3]"].parents] == ["student"]
    assert {e.role for e in nodes["gender/tinynet/fusion"].parents} == {
        "student", "standard_kd", "triplet_kd", "logit_kd", "standard_kd_control", "triplet_kd_control",
        "logit_kd_control"}
    assert node_order().index("logit_kd") < node_order().index("fusion")  # the progress line shows it

    storage, results = tmp_path / "storage", {}
    for key, node in nodes.items():  # topological order: what the searcher would hand out, one by one
        parents = [ParentOutput(e.role, e.key, nodes[e.key].arch, node_dir(storage, nodes[e.key].hash))
                   for e in node.parents]
        if node.kind == "train":
            results[key] = run_train_node(node, storage, data_path, parents, device=torch.device("cpu"),
                                          report=lambda metrics: None)
        elif node.kind == "fusion":
            results[key] = run_fusion_node(node, storage, data_path, parents)
        else:
            results[key] = run_significance_node(node, storage, data_path, parents)

    toy = read_result(node_dir(storage, nodes["gender/tinynet/logit_kd[lam=0.7]"].hash))
    assert toy is not None and toy.epochs_run == 1  # trained from the student, with the teacher beside it
    fusion = results["gender/tinynet/fusion"]
    assert fusion.fitted["fusion"].members == ("standard_kd", "triplet_kd", "logit_kd")
    assert "logit_kd_svm" in fusion.fitted  # its single-embedding SVM (the Table 4 ablation)
    assert fusion.fitted["control_fusion"].members == ("standard_kd_control", "triplet_kd_control", "logit_kd_control")
    tested = {(c["model"], c["baseline"]) for c in results["gender/significance"].comparisons}
    assert {("logit_kd", "student"), ("logit_kd", "logit_kd_control"), ("fusion", "control_fusion")} <= tested
    rows = collect_rows(graph, results)
    assert {r["model"] for r in rows} >= {"logit_kd", "logit_kd_svm", "fusion"}
    markdown = render_markdown(rows, title="t", setting="s")
    assert "| tinynet | logit_kd ⚑ | full+upper |" in markdown  # one epoch: its best is its last
    order = [line.split("|")[2].strip().removesuffix(" ⚑") for line in markdown.splitlines()
             if line.startswith("| tinynet |")]
    assert order.index("triplet_kd") < order.index("logit_kd") < order.index("fusion")
