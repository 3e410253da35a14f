"""The `paper` preset matches spec §10 row by row; presets validate their input."""

import re
from pathlib import Path

import pytest

from occkd_core.presets import builtin_presets, load_preset
from occkd_core.specs import TrainSpec
from occkd_core.stages import STAGES
from occkd_core.models import ARCHITECTURES
from occkd_core.tasks import TASKS

STAGE_NAMES = tuple(STAGES)

MARGINS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]

# Spec §10, typed from the tables (not from the YAML): (task, arch, stage) ->
# (optimizer, batch, epochs, lr, schedule, lam, temperature, pool_fraction, dsd)
SPEC_10 = {
    ("fer", "vggf", "teacher"): ("sgd", 512, 800, 1e-3, "plateau", None, None, None, True),
    ("fer", "vggface", "teacher"): ("sgd", 64, 50, 1e-4, "plateau", None, None, None, True),
    ("fer", "resnet50", "teacher"): ("adam", 16, 75, 1e-4, "constant", None, None, None, False),
    ("fer", "vggf", "student"): ("sgd", 512, 80, 1e-3, "constant", None, None, None, True),
    ("fer", "vggface", "student"): ("sgd", 64, 40, 1e-3, "plateau", None, None, None, True),
    ("fer", "resnet50", "student"): ("adam", 16, 75, 1e-4, "constant", None, None, None, False),
    ("fer", "vggf", "standard_kd"): ("sgd", 512, 200, 1e-3, "plateau", 0.7, 20.0, None, False),
    ("fer", "vggface", "standard_kd"): ("sgd", 64, 50, 1e-4, "plateau", 0.7, 20.0, None, False),
    ("fer", "resnet50", "standard_kd"): ("adam", 16, 10, 1e-5, "constant", 0.9, 20.0, None, False),
    ("fer", "vggf", "triplet_kd"): ("sgd", 512, 10, 1e-5, "constant", 0.5, None, 0.1, False),
    ("fer", "vggface", "triplet_kd"): ("sgd", 64, 10, 1e-6, "constant", 0.5, None, 0.1, False),
    ("fer", "resnet50", "triplet_kd"): ("adam", 16, 10, 1e-5, "constant", 0.1, None, 0.1, False),
}
for _task, _lams in (("gender", {"vggf": (0.3, 0.7), "vggface": (0.3, 0.7), "resnet50": (0.1, 0.4)}),
                     ("age", {"vggf": (0.5, 0.7), "vggface": (0.3, 0.7), "resnet50": (0.1, 0.7)})):
    SPEC_10.update({
        (_task, "vggf", "teacher"): ("sgd", 512, 200, 1e-4, "plateau", None, None, None, False),
        (_task, "vggf", "student"): ("sgd", 512, 200, 1e-4, "plateau", None, None, None, False),
        (_task, "vggface", "teacher"): ("sgd", 64, 250, 1e-4, "constant", None, None, None, False),
        (_task, "vggface", "student"): ("sgd", 64, 250, 1e-4, "constant", None, None, None, False),
        (_task, "resnet50", "teacher"): ("adam", 16, 100, 1e-4, "constant", None, None, None, False),
        (_task, "resnet50", "student"): ("adam", 16, 100, 1e-4, "constant", None, None, None, False),
        (_task, "vggf", "standard_kd"): ("sgd", 512, 20, 1e-6, "plateau", _lams["vggf"][0], None, None, False),
        (_task, "vggface", "standard_kd"): ("sgd", 64, 40, 1e-6 if _task == "gender" else 1e-5, "constant",
                                            _lams["vggface"][0], None, None, False),
        (_task, "resnet50", "standard_kd"): ("adam", 16, 40, 1e-5, "plateau", _lams["resnet50"][0], None, None, False),
        (_task, "vggf", "triplet_kd"): ("sgd", 512, 30 if _task == "gender" else 40, 1e-5 if _task == "gender" else 1e-6,
                                        "plateau" if _task == "gender" else "constant", _lams["vggf"][1], None, 0.2, False),
        (_task, "vggface", "triplet_kd"): ("sgd", 64, 40, 1e-6, "constant", _lams["vggface"][1], None, 0.2, False),
        (_task, "resnet50", "triplet_kd"): ("adam", 16, 40, 1e-5, "constant", _lams["resnet50"][1], None, 0.2, False),
    })


@pytest.mark.parametrize("key", sorted(SPEC_10), ids=lambda k: "/".join(k))
def test_paper_preset_matches_spec_section_10(key):
    preset = load_preset("paper")
    grid = preset.grid(*key)
    optimizer, batch, epochs, lr, schedule, lam, temperature, pool, dsd = SPEC_10[key]
    expected_margins = MARGINS if key[2] == "triplet_kd" else [None]
    assert [spec.margin for spec in grid] == expected_margins
    for spec in grid:
        assert (spec.optimizer, spec.batch_size, spec.epochs, spec.schedule, spec.dsd) == (optimizer, batch, epochs, schedule, dsd)
        assert spec.lr == pytest.approx(lr)
        assert spec.lam == lam and spec.temperature == temperature and spec.pool_fraction == pool
        assert spec.weight_decay == (5e-4 if optimizer == "sgd" else 0.0)  # spec §15 #3
        assert spec.momentum == 0.9 and not spec.tau_squared  # formula as printed (§15 #2)
        assert spec.plateau_factor == 0.1 and spec.plateau_patience == 10


def test_paper_preset_covers_every_stage_at_full_size():
    preset = load_preset("paper")
    assert set(SPEC_10) == {(t, a, s) for t in TASKS for a in ARCHITECTURES for s in STAGE_NAMES}
    assert all(preset.arch(a).input_size == 224 and preset.arch(a).width_mult == 1.0 for a in ARCHITECTURES)
    assert preset.fusion_Cs == (0.1, 1.0, 10.0, 100.0, 1000.0)
    assert preset.data.source == "real"


@pytest.mark.parametrize("name", builtin_presets())
def test_every_builtin_preset_resolves_every_stage(name):
    preset = load_preset(name)
    for task in TASKS:
        for arch in ARCHITECTURES:
            for stage in STAGE_NAMES:
                assert preset.grid(task, arch, stage)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: .*paper.*smoke"):
        load_preset("papr")


@pytest.mark.parametrize("change, message", [
    ({"lr": -0.1}, "lr must be a positive"),
    ({"lam": 1.5}, r"lam \(λ\) must lie in \[0, 1\]"),
    ({"optimizer": "rmsprop"}, "optimizer must be"),
    ({"margin": ["x"]}, "margin must be a number"),
    ({"batch_size": [16, 32]}, "cannot be a grid"),
    ({"margin": [0.1, -0.2]}, "margin must be >= 0"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"temprature": 4.0}, r"unknown stage setting\(s\) \['temprature'\]"),
])
@pytest.mark.parametrize("base", ["smoke", "mid"])
def test_bad_preset_file_is_rejected_before_training(tmp_path: Path, change, message, base):
    text = (Path(load_preset.__code__.co_filename).parent / "presets" / f"{base}.yaml").read_text()
    import yaml

    raw = yaml.safe_load(text)
    raw["stage_defaults"]["triplet_kd"].update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=message):
        load_preset(path)


def test_unknown_stage_in_a_preset_file_lists_the_valid_ones(tmp_path: Path):
    import yaml

    raw = yaml.safe_load((Path(load_preset.__code__.co_filename).parent / "presets" / "smoke.yaml").read_text())
    raw["stages"]["fer"]["vggf"] = {"fitnets": {"epochs": 3}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"stages.fer.vggf: unknown name\(s\) \['fitnets'\]; valid names: teacher"):
        load_preset(path)


def test_train_spec_round_trips_and_rejects_unknown_keys():
    spec = TrainSpec(optimizer="adam", batch_size=8, epochs=1, lr=1e-3, lam=0.5, margin=0.1, pool_fraction=0.2)
    assert TrainSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown stage setting"):
        TrainSpec.from_dict({**spec.to_dict(), "lambda": 0.3})


# Spec §4, §5 step 1 and the journal's §4.3.4, typed from the text (not from the YAML): VGG teachers are
# fine-tuned from ImageNet (VGG-f) / face-identification (VGG-face) weights for every task, the expression
# ResNet-50 from ImageNet (§15 #10), the UTKFace ResNet-50 from scratch (§4.3).
PAPER_WEIGHTS = {(task, "vggf"): "vggf_imagenet" for task in TASKS} | {
    (task, "vggface"): "vggface" for task in TASKS} | {
    ("fer", "resnet50"): "resnet50_imagenet", ("gender", "resnet50"): "from_scratch",
    ("age", "resnet50"): "from_scratch"}


def test_paper_preset_starts_each_teacher_where_the_papers_did():
    paper = load_preset("paper")
    assert {(t, a): paper.teacher_weights(t, a) for t in TASKS for a in ARCHITECTURES} == PAPER_WEIGHTS
    assert paper.required_weights(["gender", "age"], ["resnet50"]) == {}
    assert paper.required_weights(["fer", "age"], ["vggf", "resnet50"]) == {
        "vggf_imagenet": ["fer/vggf", "age/vggf"], "resnet50_imagenet": ["fer/resnet50"]}
    for name in ("smoke", "mini", "mid"):  # no weights can be had for these: stated, not implied
        assert load_preset(name).required_weights(list(TASKS), list(ARCHITECTURES)) == {}


def _smoke_with(tmp_path: Path, **top_level) -> Path:
    import yaml

    raw = yaml.safe_load((Path(load_preset.__code__.co_filename).parent / "presets" / "smoke.yaml").read_text())
    raw.update(top_level)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("pretrained, message", [
    ({"fer": "vggface"}, r"pretrained.fer.vggf: weights 'vggface' are for vggface, not vggf"),
    ({"fer": {"vggf": "imagenet"}}, "unknown pre-trained weights 'imagenet'; valid names: resnet50_imagenet"),
    ({"fer": "from_scratch", "gender": "from_scratch"}, "pretrained: no entry for task 'age'"),
    ({t: {"vggf": "from_scratch"} for t in TASKS}, r"pretrained.fer: no entry for architecture 'vggface'"),
    ("imagenet", "expected from_scratch or a mapping"),
])
def test_bad_pretrained_sections_name_the_problem(tmp_path: Path, pretrained, message):
    with pytest.raises(ValueError, match=message):
        load_preset(_smoke_with(tmp_path, pretrained=pretrained))


def test_fusion_kernels_label_rule_and_the_raw_embedding_grid(tmp_path: Path):
    assert load_preset("paper").svr_kernels == ("rbf", "linear")
    assert load_preset("paper").data.label_rule == "majority"
    preset = load_preset(_smoke_with(tmp_path, fusion={"Cs": [1.0], "svr_kernels": ["linear"]},
                                     data={"source": "real", "label_rule": "plurality"}))
    assert preset.svr_kernels == ("linear",) and preset.data.label_rule == "plurality"
    for fusion, message in (({"Cs": [1.0], "svr_kernels": ["poly"]}, "svr_kernels must be"),
                            ({"Cs": [1.0], "kernel": "rbf"}, r"fusion: unknown key\(s\) \['kernel'\]")):
        with pytest.raises(ValueError, match=message):
            load_preset(_smoke_with(tmp_path, fusion=fusion))
    with pytest.raises(ValueError, match="label_rule must be one of majority, plurality"):
        load_preset(_smoke_with(tmp_path, data={"source": "real", "label_rule": "mode"}))
    # spec §15 #20: L2-normalised and raw embeddings in the triplet loss, as one grid
    import yaml

    raw = yaml.safe_load(_smoke_with(tmp_path).read_text())
    raw["stage_defaults"]["triplet_kd"].update(margin=0.1, triplet_normalize=[True, False])
    path = tmp_path / "raw.yaml"
    path.write_text(yaml.safe_dump(raw))
    grid = load_preset(path).grid("fer", "vggf", "triplet_kd")
    assert [spec.triplet_normalize for spec in grid] == [True, False]
    raw["stage_defaults"]["triplet_kd"].update(triplet_normalize=["yes"])
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="triplet_normalize must be true or false"):
        load_preset(path)


# The two variants spec §15 says to "also run": Hinton KD with τ² (#2), where τ is used (FER+ standard KD),
# and the triplet loss on raw embeddings (#20), on every triplet stage.
VARIANT_AXES = {("fer", arch, "standard_kd"): ("tau_squared", (False, True)) for arch in ARCHITECTURES} | {
    (task, arch, "triplet_kd"): ("triplet_normalize", (True, False)) for task in TASKS for arch in ARCHITECTURES}


def test_paper_variants_is_paper_plus_exactly_the_tau_squared_and_raw_embedding_axes():
    from dataclasses import replace

    paper, variants = load_preset("paper"), load_preset("paper-variants")
    for key in SPEC_10:
        expected = paper.grid(*key)
        if key in VARIANT_AXES:
            name, values = VARIANT_AXES[key]
            assert all(getattr(spec, name) == values[0] for spec in expected)  # paper: the spec's default only
            expected = [replace(spec, **{name: value}) for spec in expected for value in values]
        assert variants.grid(*key) == expected, key
    for field in ("data", "models", "fusion_Cs", "resources", "pretrained", "svr_kernels"):
        assert getattr(variants, field) == getattr(paper, field), field
    assert variants.name == "paper-variants"


def test_a_preset_extends_another_and_overrides_only_what_it_names(tmp_path: Path):
    import yaml

    base = tmp_path / "presets" / "base.yaml"
    base.parent.mkdir()
    base.write_text((Path(load_preset.__code__.co_filename).parent / "presets" / "smoke.yaml").read_text())
    (tmp_path / "presets" / "child.yaml").write_text(yaml.safe_dump({
        "extends": "base.yaml",  # relative to this file's folder
        "name": "child", "models": {"vggf": {"input_size": 64}},
        "stages": {"gender": {"vggf": {"triplet_kd": {"margin": [0.2, 0.4]}}}}}))
    grandchild = tmp_path / "grandchild.yaml"
    grandchild.write_text(yaml.safe_dump({"extends": "presets/child.yaml", "fusion": {"Cs": [2.0]}}))
    smoke, child = load_preset("smoke"), load_preset(grandchild)
    assert child.name == "child" and child.fusion_Cs == (2.0,)
    assert child.arch("vggf").input_size == 64 and child.arch("vggf").width_mult == smoke.arch("vggf").width_mult
    assert [s.margin for s in child.grid("gender", "vggf", "triplet_kd")] == [0.2, 0.4]
    assert child.grid("fer", "vggf", "triplet_kd") == smoke.grid("fer", "vggf", "triplet_kd")
    assert child.grid("gender", "vggf", "teacher") == smoke.grid("gender", "vggf", "teacher")


@pytest.mark.parametrize("overlay, message", [
    ({"extends": "papr"}, "unknown preset 'papr'; valid names: .*paper"),
    ({"extends": ["paper", "mid"]}, "extends must name one preset"),
    ({"extends": "loop.yaml"}, "extends goes round in a circle"),
    ({"extends": "paper", "stages": {"fer": {"vggf": {"standard_kd": {"tau_sqared": [False, True]}}}}},
     "tau_sqared cannot be a grid"),
    ({"extends": "paper", "stages": {"fer": {"vgg": {"standard_kd": {"tau_squared": [False, True]}}}}},
     r"stages.fer: unknown name\(s\) \['vgg'\]"),
])
def test_a_bad_extends_names_the_problem(tmp_path: Path, overlay, message):
    import yaml

    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(overlay))
    with pytest.raises(ValueError, match=message):
        load_preset(path)


# -- values that passed validation and failed at run time or meant nothing (issue 28 item 8) -----------------
# Each is a real preset file extending smoke; the message names the file, where the key was given and the value.

@pytest.mark.parametrize("overlay, message", [
    ("stage_defaults: {student: {epochs: 1.5}}", "stage_defaults.student: epochs must be a whole number, got 1.5"),
    ("stage_defaults: {student: {batch_size: 64.5}}", "stage_defaults.student: batch_size must be a whole number, got 64.5"),
    ("stage_defaults: {student: {epochs: true}}", "stage_defaults.student: epochs must be a whole number, got True"),
    ("stage_defaults: {student: {batch_size: null}}", "stage_defaults.student: batch_size must be a whole number, got None"),
    ("stage_defaults: {student: {momentum: null}}", "stage_defaults.student: momentum must be a number, got None"),
    ("stages: {age: {vggf: {teacher: {plateau_patience: 2.5}}}}",
     "stages.age.vggf.teacher: plateau_patience must be a whole number, got 2.5"),
    ("stage_defaults: {standard_kd: {temperature: .nan}}", "stage_defaults.standard_kd: temperature must be a finite number, got nan"),
    ("stage_defaults: {triplet_kd: {margin: [0.1, .inf]}}", "stage_defaults.triplet_kd: margin must be a finite number, got inf"),
    ("stage_defaults: {student: {weight_decay: .nan}}", "stage_defaults.student: weight_decay must be a finite number, got nan"),
    ("stage_defaults: {student: {weight_decay: -.inf}}", "stage_defaults.student: weight_decay must be a finite number, got -inf"),
    ("stage_defaults: {student: {lr: .nan}}", "stage_defaults.student: lr must be a finite number, got nan"),
    ("stage_defaults: {student: {momentum: -5}}", r"stage_defaults.student: momentum must lie in \[0, 1\)"),
    ("stage_defaults: {student: {momentum: 1.0}}", r"stage_defaults.student: momentum must lie in \[0, 1\).*got 1.0"),
    ("stage_defaults: {student: {plateau_factor: 50}}", r"stage_defaults.student: plateau_factor must lie in \(0, 1\)"),
    ("stage_defaults: {student: {lr: 1.0e+300}}", "stage_defaults.student: lr must be at most 1: .*got 1e\\+300"),
    ("stages: {fer: {vggf: {student: {lr: 2.0}}}}", "stages.fer.vggf.student: lr must be at most 1"),
    ("data: {image_size: 5}", "data: image_size must be >= 24, got 5"),
    ("data: {seed: -1}", "data: seed must be >= 0, got -1"),
    ("data: {seed: 0.5}", "data: seed must be a whole number, got 0.5"),
    ("data: {num_faces: \"2400\"}", "data: num_faces must be a whole number, got '2400'"),
    ("data: {nun_faces: 2400}", r"data: unknown name\(s\) \['nun_faces'\]"),
    ("models: {vggf: {input_size: 48.5}}", "models.vggf: input_size must be a whole number, got 48.5"),
    ("models: {vggf: {width_mult: .nan}}", "models.vggf: width_mult must be a finite number, got nan"),
    ("models: {vggf: 5}", "models.vggf must be a mapping of settings, got 5"),
    ("name: true", "name must be text, got True"),
    ("description: [a, b]", "description must be text, got a list"),
    ("fusion: {Cs: [1.0, .nan]}", r"fusion.Cs must be a non-empty list of finite numbers > 0 .*got \[1.0, nan\]"),
    ("fusion: {Cs: [\"1\"]}", "fusion.Cs must be a non-empty list of finite numbers > 0"),
    ("resources: {vggf: {cpus: .nan}}", "resources.vggf.cpus: cpus must be a finite number, got nan"),
    ("resources: {vggf: {gpus: true}}", "resources.vggf.gpus: gpus must be a number, got True"),
    ("resources: {vggf: 4}", "resources.vggf must be a mapping of settings, got 4"),
    ("stages: {fer: {vggf: {teacher: 5}}}", "stages.fer.vggf.teacher must be a mapping of settings, got 5"),
    ("stage_defaults: [1, 2]", "stage_defaults must be a mapping, got"),
])
def test_values_that_would_fail_at_run_time_are_refused_naming_file_key_and_value(tmp_path: Path, overlay, message):
    path = tmp_path / "hostile.yaml"
    path.write_text(f"extends: smoke\n{overlay}\n")
    with pytest.raises(ValueError, match=f"^preset {re.escape(str(path))}: {message}"):
        load_preset(path)


def test_the_old_resources_key_max_workers_is_refused_naming_its_new_name(tmp_path: Path):
    """``max_workers`` was both the preset's DDP cap and Ray's autoscaler node count; the preset's is now
    ``max_ddp_workers``, and a preset still saying ``max_workers`` stops with one line, not a silent alias."""
    path = tmp_path / "old.yaml"
    path.write_text("extends: smoke\nresources: {vggface: {cpus: 1, gpus: 1, max_workers: 4}}\n")
    with pytest.raises(ValueError) as caught:
        load_preset(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message == (f"preset {path}: resources.vggface.max_workers is now called max_ddp_workers (the most DDP "
                       f"workers the grid may give one node); rename the key")
    path.write_text("extends: smoke\nresources: {vggface: {cpus: 1, gpus: 1, max_ddp_workers: 4}}\n")
    assert load_preset(path).resources["vggface"]["max_ddp_workers"] == 4


def test_the_limits_admit_what_the_papers_and_the_built_in_presets_use(tmp_path: Path):
    path = tmp_path / "edge.yaml"
    path.write_text("extends: smoke\nname: edge_1.0-b\ndata: {seed: 0, image_size: 24}\n"
                    "stage_defaults: {student: {lr: 1.0, momentum: 0.0, plateau_factor: 0.5, weight_decay: 0.0}}\n")
    preset = load_preset(path)
    assert preset.name == "edge_1.0-b" and preset.data.image_size == 24
    spec = preset.grid("fer", "vggface", "student")[0]
    assert (spec.lr, spec.momentum, spec.plateau_factor) == (1.0, 0.0, 0.5)


# -- names that become paths (issue 28 item 10) --------------------------------------------------------------

@pytest.mark.parametrize("name", ["x/../../../../tmp/escape", "..", ".hidden", "a\\b", "-rf", "", "a b", "x" * 101])
def test_a_preset_name_must_be_one_safe_path_component(tmp_path: Path, name):
    import yaml

    path = tmp_path / "named.yaml"
    path.write_text(yaml.safe_dump({"extends": "smoke", "name": name}))
    with pytest.raises(ValueError, match=r"name must be one folder name of at most 100 letters, digits"):
        load_preset(path)


# -- YAML aliases that expand without bound (issue 28 item 9) -------------------------------------------------

def alias_bomb(levels: int, width: int = 9) -> str:
    """``levels`` anchors, each a list of ``width`` aliases of the one before: width**levels values."""
    lines = ['_a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        lines.append(f"_a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("key", ["description", "name"])
def test_an_alias_bomb_is_refused_before_anything_is_built(tmp_path: Path, key):
    path = tmp_path / "bomb.yaml"
    path.write_text(f"extends: smoke\n{alias_bomb(6)}{key}: *a6\n")  # 9**6 = 531,441 values in 1 KB
    with pytest.raises(ValueError, match=f"^preset '{re.escape(str(path))}' holds more than 100,000 values once its aliases"):
        load_preset(path)


def test_a_self_referring_alias_and_a_deep_nest_are_refused(tmp_path: Path):
    path = tmp_path / "loop.yaml"
    path.write_text("extends: smoke\n_x: &x [*x]\ndescription: *x\n")
    with pytest.raises(ValueError, match=r"has an alias \(\*name\) inside the value it refers to"):
        load_preset(path)
    path.write_text("extends: smoke\ndescription: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ValueError, match="nests its values too deeply to read"):
        load_preset(path)


def test_anchors_and_aliases_of_plain_entries_still_load_as_safe_load_reads_them(tmp_path: Path):
    import yaml

    from occkd_core.preset_files import PRESET_DIR, _read_preset_file

    for file in sorted(PRESET_DIR.glob("*.yaml")):  # the built-in presets share entries through anchors
        assert _read_preset_file(file) == yaml.safe_load(file.read_text())
    path = tmp_path / "few.yaml"
    path.write_text(f"{alias_bomb(4)}x: *a4\n")  # 9**4 = 6,561 values: within the bound
    assert _read_preset_file(path) == yaml.safe_load(path.read_text())
