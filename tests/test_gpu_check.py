"""benchmarks/gpu_check.py (issue 27): its CPU version runs end to end as the GPU machine would run it (the
core alone, with the packages its image lacks blocked), writes every section to Markdown and JSON, and its
chain runs whatever stages the core's registry holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
#: Packages occkd declares that the lent GPU image lacks (KINDS.md's package list): the check must never need them.
ABSENT_ON_GPU_IMAGE = ("ray", "mlflow", "pytorch_grad_cam")
#: Every module gpu_check imports (the test below checks that list is complete).
CHECK_MODULES = ("benchmarks.gpu_check", "benchmarks.gpu_check_chain", "benchmarks.bench_throughput",
                 "benchmarks.common")


def _blocker(names: tuple[str, ...]) -> str:
    """Python source that makes ``import name`` (and its submodules) fail, as on a machine without them."""
    return f"import sys\nfor name in {names!r}:\n    sys.modules[name] = None\n"


def _python(source: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", source], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def write_utkface_folder(root: Path, num_faces: int) -> Path:
    """UTKFace's layout and file names (``age_gender_race_datetime.jpg.chip.jpg``, 200x200 JPEG) holding
    synthetic faces with their own genders and ages."""
    from PIL import Image

    from occkd_core.data import make_synthetic_faces

    folder = root / "utkface" / "UTKFace"
    folder.mkdir(parents=True)
    faces = make_synthetic_faces(num_faces, image_size=64, seed=1)
    index = 0
    for split in faces.splits.values():
        for image, gender, age in zip(split.images, split.gender, split.age):
            name = f"{int(age)}_{int(gender)}_0_20170101{index:06d}.jpg.chip.jpg"
            Image.fromarray(image).resize((200, 200)).save(folder / name)
            index += 1
    return root


@pytest.mark.slow
def test_core_and_the_check_import_without_ray_mlflow_or_grad_cam():
    probe = _blocker(ABSENT_ON_GPU_IMAGE) + f"""
import importlib, pkgutil, occkd_core
modules = [m.name for m in pkgutil.walk_packages(occkd_core.__path__, "occkd_core.")]
# Grad-CAM figures need the grad-cam package, which the GPU image lacks: the grid's nodes draw them, the check does not.
for name in [m for m in modules if m != "occkd_core.gradcam"] + {list(CHECK_MODULES)!r}:
    importlib.import_module(name)
assert "occkd_core.gradcam" not in sys.modules
for name in {ABSENT_ON_GPU_IMAGE!r}:
    assert sys.modules[name] is None, name
try:
    import grid.searcher  # imports Ray: the block works
except ImportError:
    print("blocked as expected")
del sys.modules["pytorch_grad_cam"]  # and the core's one module that needs grad-cam needs neither Ray nor MLflow
importlib.import_module("occkd_core.gradcam")
print(len(modules))
"""
    result = _python(probe)
    assert result.returncode == 0, result.stderr
    assert "blocked as expected" in result.stdout
    assert int(result.stdout.split()[-1]) >= 20  # the walk found the core's modules


@pytest.mark.slow
def test_cpu_version_runs_every_part_and_writes_every_section(tmp_path: Path):
    from occkd_core.fusion import fusion_variants
    from occkd_core.models import ARCHITECTURES
    from occkd_core.stages import STAGES, control_stages, distilled_stages

    data_root = write_utkface_folder(tmp_path / "data", 200)
    out = tmp_path / "out"
    args = ["--out", str(out), "--data-root", str(data_root), "--cache", str(tmp_path / "cache"),
            "--work", str(tmp_path / "work"), "--device", "cpu",
            "--budget-s", "1200"]  # the time guard is not under test: every part must run, however busy the machine
    # The command as the GPU machine runs it, with the packages its image lacks blocked.
    source = _blocker(ABSENT_ON_GPU_IMAGE) + f"""
import runpy
sys.argv = ["benchmarks/gpu_check.py", *{args!r}]
runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
"""
    started = time.perf_counter()
    result = _python(source, timeout=600)
    print(f"CPU version of the GPU check: {time.perf_counter() - started:.1f} s")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    markdown = (out / "gpu_check.md").read_text()
    values = json.loads((out / "gpu_check.json").read_text())
    for heading in ("# occkd GPU check", "## Plan and time per part", "## 1. DDP code path and resume",
                    "## 2. Training loop vs bare loop (smoke sizes)", "## 3. The `mid` chain, gender, UTKFace",
                    "Fusion (SVM", "Against the student on the upper half", "Time per architecture"):
        assert heading in markdown, heading
    assert "Mode: CPU, a REDUCED setting" in markdown
    assert values["meta"]["torch"] == torch.__version__ and torch.__version__ in markdown
    assert [p["part"] for p in values["parts"]] == ["ddp", "throughput", "chain"]
    assert all(p["status"] == "ok" for p in values["parts"]), values["parts"]

    ddp = values["ddp"]
    assert ddp["ok"] and ddp["resume"] and ddp["backend"].startswith("gloo")
    assert ddp["BatchNorm layers"] == 53  # ResNet-50's; converted to SyncBatchNorm on a GPU only
    assert "history [1, 2]" in ddp["train_stage under the process group"]

    assert [r["arch"] for r in values["throughput"]] == list(ARCHITECTURES)
    for row in values["throughput"]:
        assert row["bare"] > 0 and row["occkd"] > 0 and row["ratio"] == pytest.approx(row["ratio"])
        assert f"| {row['arch']} | {row['model']} |" in markdown

    chain = values["chain"]
    sizes = chain["split_sizes"]
    assert sum(sizes.values()) == 200
    for arch in ARCHITECTURES:
        rows = {r["stage"]: r for r in chain["stages"] if r["arch"] == arch}
        assert list(rows) == [*STAGES, *control_stages()]  # every stage in curriculum order, then the controls
        for name, row in rows.items():
            assert row["status"] == "ran" and row["chosen"] and row["epochs_run"] == row["epochs_planned"] == 1
            assert 0 <= row["test_full"] <= 100 and 0 <= row["test_upper"] <= 100
            assert f"| {arch} | {name} |" in markdown
        fused = {r["model"] for r in chain["fusion"] if r["arch"] == arch and r["status"] == "ran"}
        variants = [v.name for v in fusion_variants(distilled_stages(), controls=control_stages(), student="student")]
        assert fused == set(variants)
        compared = [r for r in chain["comparisons"] if r["arch"] == arch]
        after_student = [n for n, s in STAGES.items() if s.starts_from == "student"] + list(control_stages())
        against_control = [*distilled_stages(), "fusion"]
        assert [r["model"] for r in compared] == after_student + variants + against_control
        assert [r["baseline"] for r in compared][-len(against_control):] == [*control_stages(), "control_fusion"]
        for row in compared:
            assert row["test"] == "mcnemar" and 0 <= row["pvalue"] <= row["pvalue_holm"] <= 1
            assert row["b"] + row["c"] <= sizes["test"]
        timing = next(r for r in chain["timing"] if r["arch"] == arch)
        assert timing["status"] == "ran" and timing["seconds"] >= timing["train_seconds"] > 0
    # A capped chain (1 epoch, first grid point) gives no FER+ extrapolation: it would not be the preset's chain.
    assert all("fer_minutes" not in r for r in chain["timing"])
    assert "Not given here: epochs or grid points were capped" in markdown


@pytest.mark.slow
def test_the_teacher_free_controls_run_in_the_chain_and_are_compared(tmp_path: Path, monkeypatch):
    """Each distilled stage's control (from the core's registry) trains after the student from the student's
    checkpoint with no teacher, and is tested against the student; each distilled model against its control
    and the fusion against the control fusion form a family of their own."""
    import benchmarks.gpu_check_chain as chain_module
    from benchmarks.gpu_check_chain import ChainSettings, run_chain
    from occkd_core.data import make_synthetic_faces
    from occkd_core.presets import load_preset

    started_from: dict[str, tuple] = {}

    def recording_train_stage(spec, data, out, **kwargs):
        started_from[f"{spec.stage}/{spec.train_visible}"] = (kwargs["init_checkpoint"], kwargs["teacher_checkpoint"])
        return train_stage(spec, data, out, **kwargs)

    train_stage = chain_module.train_stage
    monkeypatch.setattr(chain_module, "train_stage", recording_train_stage)
    data = make_synthetic_faces(300, image_size=32, seed=3)
    lines: list[str] = []
    result = run_chain(data, ChainSettings(preset=load_preset("smoke"), task="gender", archs=("vggf",),
                                           device=torch.device("cpu"), work=tmp_path,
                                           deadline=time.monotonic() + 600, max_epochs=1, grid_points=1), lines.append)
    assert [r["stage"] for r in result["stages"]] == ["teacher", "student", "standard_kd", "triplet_kd",
                                                      "standard_kd_control", "triplet_kd_control"]
    assert all(r["status"] == "ran" for r in result["stages"]) and not result["notes"]
    best = {name: tmp_path / "vggf" / f"{name}-0" / "best.pt" for name in ("teacher", "student")}
    assert started_from == {"teacher/full": (None, None), "student/upper": (best["teacher"], None),
                            "standard_kd/upper": (best["student"], best["teacher"]),
                            "triplet_kd/upper": (best["student"], best["teacher"]),
                            "standard_kd_control/upper": (best["student"], None),
                            "triplet_kd_control/upper": (best["student"], None)}
    assert {r["model"] for r in result["fusion"]} >= {"fusion", "control_fusion", "student_svm"}
    pairs = {(r["model"], r["baseline"]) for r in result["comparisons"]}
    assert {("standard_kd_control", "student"), ("standard_kd", "standard_kd_control"),
            ("triplet_kd", "triplet_kd_control"), ("fusion", "control_fusion")} <= pairs
    assert any(line.startswith("  standard_kd_control") for line in lines)


def test_a_spent_budget_leaves_every_stage_listed_as_not_run(tmp_path: Path):
    from benchmarks.gpu_check_chain import ChainSettings, run_chain
    from occkd_core.data import make_synthetic_faces
    from occkd_core.presets import load_preset

    result = run_chain(make_synthetic_faces(60, image_size=32, seed=3),
                       ChainSettings(preset=load_preset("smoke"), task="gender", archs=("vggf", "vggface"),
                                     device=torch.device("cpu"), work=tmp_path, deadline=time.monotonic() - 1),
                       lambda line: None)
    assert [r["status"] for r in result["timing"]] == ["not run (time budget)"] * 2
    assert not result["stages"] and not result["comparisons"]


def test_a_face_cap_links_an_even_spread_of_the_files(tmp_path: Path):
    from benchmarks.gpu_check import utkface_root

    folder = tmp_path / "data" / "utkface" / "UTKFace"
    folder.mkdir(parents=True)
    names = sorted(f"{age}_{age % 2}_0_2017010100{age:04d}.jpg.chip.jpg" for age in range(1, 101))
    for name in names + ["notes.txt", "bad_name.jpg"]:
        (folder / name).write_bytes(b"x")
    assert utkface_root(tmp_path / "data", tmp_path / "cache", None) == tmp_path / "data"
    assert utkface_root(tmp_path / "data", tmp_path / "cache", 500) == tmp_path / "data"  # fewer files than the cap
    root = utkface_root(tmp_path / "data", tmp_path / "cache", 10)
    linked = sorted(os.listdir(root / "utkface" / "UTKFace"))
    assert linked == [names[i * 10] for i in range(10)]
    assert np.all([(root / "utkface" / "UTKFace" / n).resolve() == (folder / n).resolve() for n in linked])
    with pytest.raises(SystemExit, match="no UTKFace faces under"):
        utkface_root(tmp_path / "nothing", tmp_path / "cache", None)
