"""Every entry of the stage registry (occkd_core.stages.STAGES) keeps the contract the training loop, the presets
and the grid rely on (STYLE.md habit 9: one parametrised test over every registry entry): a stage added with one
entry is checked here with no line of this file changed.

How a control behaves in the graph is tests/test_controls.py's; a new entry run through the whole chain is
tests/test_extending.py's. This test holds each entry to what those take for granted.
"""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch

from occkd_core.evaluation import predict
from occkd_core.models import ModelSpec, build_model
from occkd_core.preprocess import input_spec_for
from occkd_core.presets import load_preset
from occkd_core.specs import LOSS_SETTINGS, TrainSpec
from occkd_core.stages import CONTROL_SUFFIX, STAGES, StageInfo, control_stage, get_stage, require_settings
from occkd_core.strategies import BatchContext, StageInputs, SupervisedStrategy
from occkd_core.tasks import TASKS, get_task
from occkd_core.training import StageSpec

INPUT_SIZE = 32  # tiny_faces' size
#: Every loss setting away from its default, so a strategy that reads one is seen reading it.
ALL_SETTINGS = TrainSpec(optimizer="adam", batch_size=8, epochs=1, lr=1e-3, lam=0.5, temperature=4.0, tau_squared=True,
                         margin=0.1, pool_fraction=1.0, triplet_squared=False, triplet_normalize=False, icpr_form=True)


class ReadRecorder:
    """A TrainSpec stand-in that notes the name of every field a strategy reads."""

    def __init__(self, spec: TrainSpec) -> None:
        self.spec, self.read = spec, set()

    def __getattr__(self, name: str):
        self.read.add(name)
        return getattr(self.spec, name)


def loss_settings_read(stage: StageInfo, task: str, faces) -> set[str]:
    """The loss settings the stage's strategy reads when it builds, orders an epoch and computes a batch's terms
    for ``task``, on VGG-f models at 1/8 channel width and 32 px."""
    info, split = get_task(task), faces.split("train")
    model_spec = ModelSpec(arch="vggf", num_outputs=info.num_outputs, width_mult=0.125, dropout=False)
    torch.manual_seed(0)
    model, teacher = build_model(model_spec), build_model(model_spec).eval()
    input_spec = input_spec_for("vggf", INPUT_SIZE)
    visible = "full" if stage.starts_from == "weights" else info.main_visible
    recorder = ReadRecorder(ALL_SETTINGS)
    ctx = BatchContext(task=info, train=recorder, split=split, targets=torch.as_tensor(split.labels(task)),
                       visible=visible, input_spec=input_spec, device=torch.device("cpu"), channels_last=False,
                       teacher=teacher if stage.needs_teacher else None)

    def embed(net, seen):
        return torch.from_numpy(predict(net, split, info, seen, input_spec, with_embeddings=True).embeddings)

    inputs = StageInputs(teacher_embeddings=lambda: embed(teacher, "full"), embed_student=lambda m: embed(m, visible))
    strategy = stage.strategy.build(ctx, inputs)
    rows = strategy.epoch_order(1, model, torch.Generator().manual_seed(0))[:8]
    terms, outputs = strategy.loss_terms(model, rows, torch.tensor([True, False] * 4))
    assert terms and all(torch.isfinite(t) for t in terms.values()) and len(outputs) == len(rows)
    strategy.describe_epoch()
    return recorder.read & set(LOSS_SETTINGS)


@pytest.mark.parametrize("name", tuple(STAGES))
def test_every_registry_entry_keeps_its_contract(name: str, tiny_faces):
    stage = STAGES[name]
    # -- it resolves under its own name, and its strategy is one the training loop can drive ---------------
    assert stage.name == name and get_stage(name) is stage
    assert issubclass(stage.strategy, SupervisedStrategy)
    optional = {f.name for f in fields(TrainSpec) if f.default is None}
    assert set(stage.required) <= optional, "required names a TrainSpec field that is always set, or none at all"
    assert stage.cost > 0
    if stage.required:
        with pytest.raises(ValueError, match=f"stage {name!r} needs"):
            require_settings(TrainSpec(optimizer="adam", batch_size=8, epochs=1, lr=1e-3), name)
    assert require_settings(ALL_SETTINGS, name) is ALL_SETTINGS

    smoke = load_preset("smoke")
    for task in TASKS:
        info = get_task(task)
        # -- its specs, as a preset gives them, round-trip through the plain dicts of the edges (Ray, MLflow) --
        visible = "full" if stage.starts_from == "weights" else info.main_visible
        for train in smoke.grid(task, "vggf", name):
            spec = StageSpec(task=task, arch="vggf", stage=name, train_visible=visible, input_size=INPUT_SIZE,
                             width_mult=0.125, train=train)
            assert StageSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec

        # -- the loss settings it declares are those its strategy reads (a node's identity holds only those) --
        declared = stage.strategy.loss_settings(info)
        read = loss_settings_read(stage, task, tiny_faces)
        if declared is not None:  # None: every setting counts, which is never wrong, only coarse
            assert len(set(declared)) == len(declared) and set(declared) <= set(LOSS_SETTINGS), declared
            assert set(declared) == read, f"{name} on {task}: declares {sorted(declared)}, reads {sorted(read)}"
            # a required setting the loss does not read would be reset to None in the node, then refused
            assert set(stage.required) & set(LOSS_SETTINGS) <= set(declared)

        # -- a distilled stage has a teacher-free control derived from its entry; no other stage has one ------
        if not stage.distilled:
            with pytest.raises(ValueError, match="valid"):
                get_stage(name + CONTROL_SUFFIX)
            with pytest.raises(ValueError, match="not distilled"):
                control_stage(name)
            continue
        control = get_stage(name + CONTROL_SUFFIX)
        assert (control.name, control.control_of, control.starts_from) == (name + CONTROL_SUFFIX, name, "student")
        assert control.strategy is stage.strategy.control_strategy() and control.strategy is not stage.strategy
        assert not control.needs_teacher and not control.distilled and control.fused and not control.required
        control_declared = control.strategy.loss_settings(info)
        control_read = loss_settings_read(control, task, tiny_faces)  # runs with no teacher loaded
        assert control_declared is not None and declared is not None
        assert set(control_declared) <= control_read and set(control_declared) <= set(declared)
        # A setting the control reads without declaring it is at its default in the control's identity; its
        # distilled twin must hold it at the default too, or the two would train with different values of it.
        assert not (control_read - set(control_declared)) & set(declared), (name, task, control_read)
