"""Extending occkd from outside the package (issue 29): this module is a plugin. It adds a distillation
stage with a hyperparameter of its own (``beta``, which TrainSpec does not have) and a network, through
``occkd_register()``; a preset names this file under ``plugins:``. The grid registers it in the driver and
in every Ray worker, and runs it end to end on a real local Ray: no file of the package is touched.

Importing this module (as pytest does) registers nothing: only :func:`occkd_core.plugins.load_plugins` calls
``occkd_register()``. Top-level imports are the package's and the standard library's, so a worker can import it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from occkd_core.losses import supervised_loss
from occkd_core.models import ArchInfo, FaceNet, ModelSpec
from occkd_core.plugins import register_architecture, register_stage
from occkd_core.preprocess import prepare_views
from occkd_core.stages import StageInfo
from occkd_core.strategies import SupervisedStrategy

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class LogitKDSettings:
    """The stage's own hyperparameter: how much the logit term weighs beside λ."""

    beta: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise ValueError(f"beta must be a number > 0, got {self.beta!r}")


class LogitKDStrategy(SupervisedStrategy):
    """(1 − λ)·task loss + λ·β·MSE between the student's logits on the occluded face and the frozen teacher's on
    the full face."""

    def loss_terms(self, model: nn.Module, rows, flip: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        ctx, lam = self.ctx, self.ctx.train.lam
        beta = ctx.train.settings(LogitKDSettings).beta
        full, occluded = prepare_views(ctx.images(rows), ("full", ctx.visible), ctx.input_spec, flip, ctx.channels_last)
        with torch.no_grad():
            teacher_logits, _ = ctx.teacher(full)
        outputs, _ = model(occluded)
        return {"supervised": (1 - lam) * supervised_loss(outputs, ctx.targets[rows], ctx.task.kind),
                "logit_mse": lam * beta * F.mse_loss(outputs, teacher_logits)}, outputs

    @classmethod
    def loss_settings(cls, task) -> tuple[str, ...]:
        return ("lam", "beta")


class PluginNet(FaceNet):
    """One conv and a global average pool: a 16-d embedding."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.conv, self.embedding_dim = nn.Conv2d(3, 16, 5, stride=2), 16
        self.head = nn.Linear(16, spec.num_outputs)

    def forward_features(self, x: Tensor) -> Tensor:
        return torch.relu(self.conv(x))

    def forward_embedding(self, features: Tensor) -> Tensor:
        return features.mean(dim=(2, 3))

    def gradcam_layer(self) -> nn.Module:
        return self.conv


def occkd_register() -> None:
    register_stage(StageInfo("logit_kd", LogitKDStrategy, starts_from="student", needs_teacher=True, distilled=True,
                             required=("lam",), cost=1.2, settings=LogitKDSettings))
    register_architecture(ArchInfo("pluginnet", PluginNet, mean=(128.0, 128.0, 128.0), std=(64.0, 64.0, 64.0),
                                   cost=0.1, paper_name="PluginNet", ddp_efficiency_at_8=0.5))


# -- the tests ----------------------------------------------------------------------------------------------

STAGE = {"optimizer": "adam", "batch_size": 32, "epochs": 1, "lr": 1e-3}


def plugged_preset(folder: Path, **extra) -> Path:
    """A preset that runs only the plugin's network and stage (the built-in KD stages left out: skipped)."""
    preset = {
        "name": "plugged", "description": "test preset: a plugin's stage and network",
        "plugins": [Path(__file__).name],  # relative to the preset's folder
        "data": {"source": "synthetic", "num_faces": 240, "image_size": 32, "seed": 1},
        "models": {"pluginnet": {"input_size": 32, "width_mult": 1.0}},
        "fusion": {"Cs": [1.0]},
        "stage_defaults": {"teacher": {**STAGE, "epochs": 2}, "student": STAGE,
                           "logit_kd": {**STAGE, "lam": 0.5, "beta": [0.5, 2.0]}},  # its own setting, a grid
        "stages": {"gender": {"pluginnet": {}}},
        "resources": {"pluginnet": {"cpus": 1}, "fusion": {"cpus": 1}, "significance": {"cpus": 1}},
        **extra,
    }
    (folder / Path(__file__).name).write_text(Path(__file__).read_text())  # the plugin beside its preset
    path = folder / "plugged.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


@pytest.fixture
def registries():
    """The registries and the loaded plugins as they were: a test that loads the plugin leaves nothing behind."""
    from occkd_core import plugins
    from occkd_core.models import ARCHITECTURES
    from occkd_core.stages import STAGES

    saved = dict(STAGES), dict(ARCHITECTURES), dict(plugins._loaded)
    yield
    for registry, before in zip((STAGES, ARCHITECTURES, plugins._loaded), saved):
        registry.clear()
        registry.update(before)


def test_a_plugins_own_setting_is_a_grid_and_its_control_reads_none_of_it(tmp_path: Path, registries):
    from grid.graph import expand_graph
    from occkd_core.presets import load_preset

    preset = load_preset(plugged_preset(tmp_path))
    graph = expand_graph(preset, ["gender"], ["pluginnet"], train_sizes={"gender": 144},
                         data_fingerprints={"gender": "faces"})
    keys = set(graph.nodes)
    assert {"gender/pluginnet/logit_kd[beta=0.5]", "gender/pluginnet/logit_kd[beta=2.0]"} <= keys
    # β is the distilled loss's: its teacher-free control reads none of it, so both points share one control.
    assert [k for k in keys if "logit_kd_control" in k] == ["gender/pluginnet/logit_kd_control"]
    assert not [k for k in keys if "standard_kd" in k or "triplet_kd" in k]  # left out of the preset: skipped
    spec = graph.nodes["gender/pluginnet/logit_kd[beta=2.0]"].params["train"]
    assert spec["extra"] == {"beta": 2.0} and "extra" not in graph.nodes["gender/pluginnet/student"].params["train"]


@pytest.mark.parametrize("change, message", [
    ({"stage_defaults": {"teacher": {**STAGE, "epochs": 2}, "student": STAGE,
                         "logit_kd": {**STAGE, "lam": 0.5, "beta": -1.0}}}, "beta must be a number > 0, got -1.0"),
    ({"plugins": ["no_such_plugin_module"]}, "plugin 'no_such_plugin_module' cannot be imported: ModuleNotFoundError"),
])
def test_a_bad_plugin_or_plugin_setting_is_one_line(tmp_path: Path, registries, change, message):
    from occkd_core.presets import load_preset

    with pytest.raises(ValueError) as caught:
        load_preset(plugged_preset(tmp_path, **change))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_complete_preset_refuses_a_stage_it_does_not_configure(tmp_path: Path, registries, monkeypatch):
    """``paper`` says it is complete: with the plugin registered (OCCKD_PLUGINS) it names the gap; ``smoke``
    does not, and runs without the plugin's stage."""
    from occkd_core.presets import load_preset

    plugged_preset(tmp_path)
    monkeypatch.setenv("OCCKD_PLUGINS", str(tmp_path / Path(__file__).name))
    smoke = load_preset("smoke")
    assert not smoke.has_stage("gender", "vggf", "logit_kd") and "pluginnet" not in smoke.models
    with pytest.raises(ValueError, match=r"models: no entry for \['pluginnet'\] \(complete: true needs every"):
        load_preset("paper")


@pytest.mark.slow
def test_a_plugin_stage_and_network_run_through_the_real_ray_grid(tmp_path: Path):
    """The driver and every Ray worker register the plugin: its nodes train in trials, its fusion and
    significance nodes read the plugin's stage, and the report lists it. Nothing of the package changed."""
    from conftest import new_mlflow_store  # here: workers import this file as the plugin, without tests/

    preset = plugged_preset(tmp_path)
    new_mlflow_store(tmp_path / "mlflow.db")
    result = subprocess.run([sys.executable, str(REPO / "grid" / "run_all.py"), "--tasks", "gender", "--preset",
                             str(preset)], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OCCKD_PLUGINS": ""})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "preset 'plugged' configures no 'vggf' (no models entry): skipped" in out
    assert "preset 'plugged' configures no 'standard_kd' stage for gender: skipped" in out
    assert "8 nodes: 0 already complete, 8 to run" in out  # teacher, 2 students, 2 logit_kd, 1 control, fusion, sig.
    storage = tmp_path / "occkd_runs"
    results = [json.loads(p.read_text()) for p in storage.glob("nodes/*/result.json")]
    keys = {r["key"] for r in results}
    assert {"gender/pluginnet/logit_kd[beta=0.5]", "gender/pluginnet/logit_kd[beta=2.0]",
            "gender/pluginnet/logit_kd_control", "gender/pluginnet/fusion", "gender/significance"} <= keys
    fusion = next(r for r in results if r["key"] == "gender/pluginnet/fusion")
    assert fusion["fitted"]["fusion"]["members"] == ["logit_kd"]
    assert fusion["fitted"]["control_fusion"]["members"] == ["logit_kd_control"]
    significance = next(r for r in results if r["key"] == "gender/significance")
    assert {("logit_kd", "student"), ("logit_kd", "logit_kd_control")} <= {
        (c["model"], c["baseline"]) for c in significance["comparisons"]}
    report = (storage / "reports" / "occkd-plugged" / "report.md").read_text()
    assert "| pluginnet | logit_kd" in report
