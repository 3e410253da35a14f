"""Teacher-free controls: each distilled stage's twin without the teacher, in the graph of every preset.

A control must differ from its distilled node in the teacher's terms and nothing else; grid points that
differ only in teacher settings (τ, τ², margin) share one control; and a node's identity holds only the
settings its loss reads, so a grid over a setting the loss ignores (τ² for the gender/age hint) is one node.
"""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import pytest
import torch

from grid.graph import expand_graph
from occkd_core.losses import hint_kd_loss, hinton_kd_loss, teacher_free_loss
from occkd_core.presets import builtin_presets, load_preset
from occkd_core.preprocess import input_spec_for
from occkd_core.specs import LOSS_SETTINGS, TrainSpec
from occkd_core.stages import CONTROL_SUFFIX, control_stage, distilled_stages, get_stage
from occkd_core.strategies import BatchContext, TripletKDControl, TripletKDStrategy
from occkd_core.tasks import get_task
from occkd_core.training import StageSpec, train_stage

TASKS = ("fer", "gender", "age")


def graph_of(preset_name: str, archs=("vggf",)):
    return expand_graph(load_preset(preset_name), TASKS, list(archs), train_sizes={t: 1000 for t in TASKS},
                        data_fingerprints={t: t for t in TASKS}, from_scratch=True)


def test_teacher_free_loss_is_the_task_term_weighted_as_in_the_distilled_run():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    targets = torch.tensor([0, 2])
    # Cross-entropy by hand: -log softmax at the target, averaged over the batch.
    by_hand = -(math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1)))
                + math.log(1 / (math.exp(0.5) + math.exp(1.5) + 1))) / 2
    terms = teacher_free_loss(logits, targets, lam=0.7, kind="classification")
    assert list(terms) == ["supervised"] and terms["supervised"].item() == pytest.approx(0.3 * by_hand, rel=1e-6)
    # the distilled objectives' own task terms, with the teacher's terms dropped
    teacher = torch.randn(2, 3)
    assert terms["supervised"].item() == pytest.approx(
        hinton_kd_loss(logits, teacher, targets, lam=0.7, temperature=4.0)["hard"].item())
    ages, years = torch.tensor([[30.0], [52.0]]), torch.tensor([34.0, 50.0])
    hint = hint_kd_loss(ages, torch.randn(2, 4), torch.randn(2, 4), years, lam=0.25, kind="regression")
    assert teacher_free_loss(ages, years, lam=0.25, kind="regression")["supervised"].item() == pytest.approx(
        hint["supervised"].item()) == pytest.approx(0.75 * 3.0)
    # C's form (ICPR) keeps the task term at weight 1
    assert teacher_free_loss(logits, targets, lam=0.7, kind="classification", icpr_form=True)[
        "supervised"].item() == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize("preset_name", builtin_presets())
def test_a_control_is_its_distilled_node_but_for_the_teachers_terms(preset_name: str):
    graph = graph_of(preset_name)
    for task in TASKS:
        for stage in distilled_stages():
            control = stage + CONTROL_SUFFIX
            distilled = [n for n in graph.nodes.values() if n.task == task and n.stage == stage]
            controls = {n.hash: n for n in graph.nodes.values() if n.task == task and n.stage == control}
            assert distilled and controls, (task, stage)
            teacher_terms = (set(get_stage(stage).strategy.loss_settings(get_task(task)))
                             - set(control_stage(stage).strategy.loss_settings(get_task(task))))
            defaults = {f.name: f.default for f in fields(TrainSpec)}
            for node in distilled:
                spec = StageSpec.from_dict(node.params)
                expected = {**spec.to_dict(), "strategy": control,
                            "train": {**spec.train.to_dict(), **{k: defaults[k] for k in teacher_terms}}}
                twins = [c for c in controls.values() if c.params == expected]
                assert len(twins) == 1, (node.key, expected)
                twin = twins[0]
                # The same student checkpoint, no teacher edge: it never loads the teacher.
                assert [e.role for e in twin.parents] == ["student"]
                assert twin.parent_keys[0] == next(e.key for e in node.parents if e.role == "student")
                assert twin.train_faces == spec.train_visible and not get_stage(control).needs_teacher
            assert set(controls) == {c.hash for c in controls.values()}  # no two controls alike


def test_teacher_setting_points_share_one_control_and_unread_settings_make_no_nodes():
    mid = graph_of("mid")
    keys = set(mid.nodes)
    # FER+: Hinton KD reads τ²: two nodes, one control; two margins, one control.
    assert {"fer/vggf/standard_kd[tau_squared=False]", "fer/vggf/standard_kd[tau_squared=True]",
            "fer/vggf/standard_kd_control", "fer/vggf/triplet_kd[margin=0.1]", "fer/vggf/triplet_kd[margin=0.3]",
            "fer/vggf/triplet_kd_control"} <= keys
    # Gender and age: the hint reads neither τ nor τ², so mid's τ² grid is one node there, not two.
    for task in ("gender", "age"):
        standard = [k for k in keys if k.startswith(f"{task}/vggf/standard_kd")]
        assert sorted(standard) == [f"{task}/vggf/standard_kd", f"{task}/vggf/standard_kd_control"]
        train = mid.nodes[f"{task}/vggf/standard_kd"].params["train"]
        assert train["temperature"] is None and train["tau_squared"] is False
    paper = graph_of("paper")
    assert len([k for k in paper.nodes if k.startswith("fer/vggf/triplet_kd[")]) == 6
    assert [k for k in paper.nodes if k.startswith("fer/vggf/triplet_kd_control")] == ["fer/vggf/triplet_kd_control"]


def test_a_preset_can_turn_the_controls_off(tmp_path):
    import yaml

    from occkd_core.presets import PRESET_DIR

    raw = yaml.safe_load((PRESET_DIR / "smoke.yaml").read_text())
    path = tmp_path / "off.yaml"
    path.write_text(yaml.safe_dump({**raw, "controls": False}))
    graph = expand_graph(load_preset(path), ["gender"], ["vggf"], train_sizes={"gender": 100},
                         data_fingerprints={"gender": "g"})
    assert not [k for k in graph.nodes if CONTROL_SUFFIX in k]
    path.write_text(yaml.safe_dump({**raw, "controls": "yes"}))
    with pytest.raises(ValueError, match="controls must be true or false"):
        load_preset(path)


def test_triplet_kd_and_its_control_visit_the_rows_in_one_order_every_epoch(tiny_faces):
    """Triplet KD visits its anchors (every training row that found a triplet) in the order the control visits
    every row: both draw the same numbers from the order generator, in every epoch, not only the first. Age,
    with a small pool, so that some rows find no positive within the age threshold and are dropped."""
    task, split = get_task("age"), tiny_faces.split("train")
    targets = torch.as_tensor(split.labels("age"), dtype=torch.float32)
    train = TrainSpec(optimizer="adam", batch_size=8, epochs=2, lr=1e-3, lam=0.5, margin=0.1, pool_fraction=0.05)

    def context() -> BatchContext:
        return BatchContext(task=task, train=train, split=split, targets=targets, visible="upper",
                            input_spec=input_spec_for("vggf", 32), device=torch.device("cpu"), channels_last=False)

    rng = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(len(split), 8, generator=rng), torch.randn(len(split), 8, generator=rng)
    triplet = TripletKDStrategy(context(), teacher, embed_student=lambda model: student)
    control = TripletKDControl(context())
    kd_generator, control_generator = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    dropped = 0
    for epoch in (1, 2):
        kd_rows = triplet.epoch_order(epoch, None, kd_generator)
        control_rows = control.epoch_order(epoch, None, control_generator)
        assert sorted(control_rows.tolist()) == list(range(len(split)))
        anchors = set(triplet.mined.anchors.tolist())
        assert kd_rows.tolist() == [r for r in control_rows.tolist() if r in anchors]
        dropped += triplet.mined.num_dropped
        assert len(kd_rows) == len(split) - triplet.mined.num_dropped
    assert dropped > 0  # the case where the two differ is exercised


def test_a_stage_stops_early_once_validation_stops_improving(tiny_faces, tmp_path):
    """A learning rate too small to move the weights: validation is flat from epoch 1, so with patience 2 the
    stage stops after epoch 3 of its ceiling of 10, its best epoch the first."""
    train = TrainSpec(optimizer="sgd", batch_size=32, epochs=10, lr=1e-12, early_stop_patience=2)
    spec = StageSpec(task="gender", arch="vggf", stage="teacher", train_visible="full", input_size=32,
                     width_mult=0.125, train=train)
    result = train_stage(spec, tiny_faces, tmp_path / "teacher")
    assert [r.epoch for r in result.history] == [1, 2, 3] and result.best_epoch == 1
    # Without early stopping the same stage runs its every epoch.
    longer = train_stage(StageSpec(**{**spec.__dict__, "train": TrainSpec(
        optimizer="sgd", batch_size=32, epochs=4, lr=1e-12)}), tiny_faces, tmp_path / "full")
    assert len(longer.history) == 4
    with pytest.raises(ValueError, match="early_stop_patience must be >= 1"):
        TrainSpec(optimizer="sgd", batch_size=32, epochs=4, lr=1e-3, early_stop_patience=0)


def test_the_loss_settings_cover_every_loss_field():
    """A new loss field must be named in LOSS_SETTINGS, or specs would keep it whatever their loss reads."""
    loss_like = {"lam", "temperature", "tau_squared", "margin", "pool_fraction", "triplet_squared",
                 "triplet_normalize", "icpr_form"}
    assert set(LOSS_SETTINGS) == loss_like and loss_like <= {f.name for f in fields(TrainSpec)}
    assert np.all([get_stage(s).strategy.loss_settings(get_task("fer")) is not None for s in distilled_stages()])
