"""The one training loop: every stage runs, resumes, keeps the teacher frozen, stops on NaN."""

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from occkd_core.checkpoints import load_model, read_checkpoint
from occkd_core.evaluation import Predictions, evaluate_conditions, task_metrics
from occkd_core.preprocess import input_spec_for
from occkd_core.presets import TrainSpec
from occkd_core.tasks import get_task
from occkd_core.training import NonFiniteLossError, StageSpec, train_stage

ADAM = TrainSpec(optimizer="adam", batch_size=32, epochs=2, lr=1e-3)


def stage(task: str, strategy: str, visible: str, arch: str = "vggf", **train) -> StageSpec:
    spec = replace(ADAM, **train)
    if strategy == "standard_kd":
        spec = replace(spec, lam=0.5, temperature=4.0)
    if strategy == "triplet_kd":
        spec = replace(spec, lam=0.5, margin=0.2, pool_fraction=0.3)
    return StageSpec(task=task, arch=arch, strategy=strategy, train_visible=visible, input_size=32,
                     width_mult=0.125, train=spec)


@pytest.mark.parametrize("task", ["fer", "age"])
def test_curriculum_teacher_student_and_both_distillations(tiny_faces, tmp_path: Path, task: str):
    info = get_task(task)
    teacher = train_stage(stage(task, "teacher", "full"), tiny_faces, tmp_path / "teacher")
    assert teacher.best_checkpoint.exists() and len(teacher.history) == 2
    student = train_stage(stage(task, "student", info.main_visible), tiny_faces, tmp_path / "student",
                          init_checkpoint=teacher.best_checkpoint)
    teacher_state = read_checkpoint(teacher.best_checkpoint)["state_dict"]
    for strategy, terms in (("standard_kd", {"soft", "hard"} if task == "fer" else {"hint", "supervised"}),
                            ("triplet_kd", {"supervised", "triplet"})):
        result = train_stage(stage(task, strategy, info.main_visible), tiny_faces, tmp_path / strategy,
                             init_checkpoint=student.best_checkpoint, teacher_checkpoint=teacher.best_checkpoint,
                             cache_dir=tmp_path / "cache")
        assert set(result.history[-1].loss_terms) == terms
        assert all(np.isfinite(r.train_loss) for r in result.history)
    if task == "fer":
        assert result.history[-1].extra["num_triplets"] > 0
    # The teacher's file is untouched by distillation (it is only read, frozen).
    after = read_checkpoint(teacher.best_checkpoint)["state_dict"]
    assert all(torch.equal(teacher_state[k], after[k]) for k in teacher_state)
    assert list((tmp_path / "cache").glob("teacher-embeddings-*.pt"))


def test_student_starts_from_its_teacher(tiny_faces, tmp_path: Path):
    teacher = train_stage(stage("gender", "teacher", "full", epochs=1), tiny_faces, tmp_path / "t")
    seen = []
    # lr so small the weights barely move: the student's first validation equals the teacher's on upper faces.
    train_stage(stage("gender", "student", "upper", epochs=1, lr=1e-12), tiny_faces, tmp_path / "s",
                init_checkpoint=teacher.best_checkpoint, on_epoch=seen.append)
    model, _ = load_model(teacher.best_checkpoint)
    info = get_task("gender")
    _, metrics = evaluate_conditions(model, tiny_faces.split("val"), info, input_spec_for("vggf", 32),
                                     visibles=("upper",))["upper"]
    assert seen[0].val_metrics["accuracy"] == pytest.approx(metrics["accuracy"])


def test_a_teacher_from_a_matconvnet_file_keeps_its_mean_down_the_curriculum(tiny_faces, tmp_path: Path):
    """imagenet-vgg-f.mat names its own mean image: the teacher subtracts its per-channel mean, and the
    student and the distilled stages, which start from it, keep it; a teacher expecting another mean is
    refused rather than fed differently normalised views."""
    from occkd_core.checkpoints import checkpoint_input_spec
    from published_files import mean_image, vgg_f_layers, write_simplenn

    weights = write_simplenn(tmp_path / "imagenet-vgg-f.mat", vgg_f_layers(width=0.125),
                             mean_image((122.5, 114.25, 101.75)))
    teacher = train_stage(stage("gender", "teacher", "full", epochs=1), tiny_faces, tmp_path / "t",
                          pretrained_weights=weights)
    expected = pytest.approx((122.5, 114.25, 101.75), abs=1e-4)
    assert read_checkpoint(teacher.best_checkpoint)["input_spec"]["mean"] == expected
    assert read_checkpoint(tmp_path / "t" / "last.pt")["input_spec"]["mean"] == expected
    student = train_stage(stage("gender", "student", "upper", epochs=1), tiny_faces, tmp_path / "s",
                          init_checkpoint=teacher.best_checkpoint)
    student_spec = checkpoint_input_spec(read_checkpoint(student.best_checkpoint), 32)
    assert student_spec.mean == expected and student_spec.size == 32
    # a teacher trained from scratch subtracts the registry's ImageNet mean: not this student's teacher
    other = train_stage(stage("gender", "teacher", "full", epochs=1), tiny_faces, tmp_path / "other")
    assert checkpoint_input_spec(read_checkpoint(other.best_checkpoint), 32) == input_spec_for("vggf", 32)
    with pytest.raises(ValueError, match=r"expects inputs normalised by mean \(123.68, 116.78, 103.94\)"):
        train_stage(stage("gender", "standard_kd", "upper", epochs=1), tiny_faces, tmp_path / "kd",
                    init_checkpoint=student.best_checkpoint, teacher_checkpoint=other.best_checkpoint)


def test_interrupted_stage_resumes_from_last_checkpoint(tiny_faces, tmp_path: Path):
    before = time.time()
    first = train_stage(stage("fer", "teacher", "full", epochs=1), tiny_faces, tmp_path)
    assert before < first.first_step_at < first.last_step_at < time.time()  # this call's optimiser steps
    epochs_seen = []
    resumed = train_stage(stage("fer", "teacher", "full", epochs=3), tiny_faces, tmp_path,
                          on_epoch=lambda r: epochs_seen.append(r.epoch))
    assert epochs_seen == [2, 3]  # epoch 1 is not trained again
    assert [r.epoch for r in resumed.history] == [1, 2, 3]
    assert resumed.history[0] == first.history[0]
    assert resumed.first_step_at > first.last_step_at
    done = train_stage(stage("fer", "teacher", "full", epochs=3), tiny_faces, tmp_path)
    assert done.first_step_at is None and done.last_step_at is None  # nothing left to train


def test_same_seed_gives_the_same_training(tiny_faces, tmp_path: Path):
    a = train_stage(stage("fer", "teacher", "full", epochs=1), tiny_faces, tmp_path / "a")
    b = train_stage(stage("fer", "teacher", "full", epochs=1), tiny_faces, tmp_path / "b")
    assert a.history[0].train_loss == b.history[0].train_loss


def test_non_finite_loss_names_epoch_batch_and_terms(tiny_faces, tmp_path: Path):
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, batch \d+: supervised=(nan|inf)"):
        train_stage(stage("age", "teacher", "full", epochs=1, lr=1e30, optimizer="sgd"), tiny_faces, tmp_path)


def test_dsd_stage_runs_dense_sparse_dense(tiny_faces, tmp_path: Path):
    result = train_stage(stage("fer", "teacher", "full", epochs=3, dsd=True, optimizer="sgd", lr=1e-2),
                         tiny_faces, tmp_path)
    assert [r.extra["dsd_sparse"] for r in result.history] == [0.0, 1.0, 0.0]


def test_kd_without_teacher_is_an_error(tiny_faces, tmp_path: Path):
    with pytest.raises(ValueError, match="needs the teacher"):
        train_stage(stage("fer", "standard_kd", "lower"), tiny_faces, tmp_path)


def test_stage_spec_rejects_a_teacher_on_half_faces():
    with pytest.raises(ValueError, match="teacher trains on full"):
        stage("fer", "teacher", "lower")
    spec = stage("fer", "triplet_kd", "lower")
    assert StageSpec.from_dict(spec.to_dict()) == spec


def test_metrics_known_values():
    # targets 0,0,0,1 ; predictions 0,0,1,1 -> accuracy 3/4; recalls: class0 2/3, class1 1/1 -> mean 5/6
    outputs = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    preds = Predictions(visible="full", outputs=outputs, targets=np.array([0, 0, 0, 1]))
    metrics = task_metrics(get_task("gender"), preds)
    assert metrics["accuracy"] == pytest.approx(75.0)
    assert metrics["weighted_accuracy"] == pytest.approx(100 * 5 / 6)
    # ages 10, 20 predicted 13, 15 -> MAE (3 + 5) / 2 = 4
    ages = Predictions(visible="upper", outputs=np.array([[13.0], [15.0]], dtype=np.float32),
                       targets=np.array([10.0, 20.0], dtype=np.float32))
    assert task_metrics(get_task("age"), ages) == {"mae": pytest.approx(4.0)}


def test_bad_labels_fail_before_any_training(tiny_faces, tmp_path: Path):
    from occkd_core.data import FaceData

    train = tiny_faces.split("train")
    broken = train.expression.copy()
    broken[5] = 11  # no such expression
    bad = FaceData(name="bad", metadata={}, splits={**tiny_faces.splits, "train": type(train)(
        images=train.images, expression=broken, gender=train.gender, age=train.age)})
    with pytest.raises(ValueError, match="expression"):
        train_stage(stage("fer", "teacher", "full"), bad, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid names: age, fer, gender"):
        stage("emotion", "teacher", "full")
    with pytest.raises(ValueError, match="valid names: resnet50, vggf, vggface"):
        stage("fer", "teacher", "full", arch="alexnet")
    with pytest.raises(ValueError, match="valid names: .*triplet_kd"):
        StageSpec(task="fer", arch="vggf", strategy="fitnets", train_visible="lower", input_size=32,
                  width_mult=0.125, train=ADAM)


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from occkd_core.data import make_synthetic_faces

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # 181 training rows: not a multiple of the world size, nor of the batch size.
        data = make_synthetic_faces(301, image_size=32, seed=3)
        train_stage(stage("fer", "teacher", "full", epochs=2), data, Path(out_dir))
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_trains_and_rank_zero_writes(tmp_path: Path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    state = read_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 2 and (tmp_path / "best.pt").exists()


def _width_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from occkd_core.data import make_synthetic_faces

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        train_stage(_width_spec(), make_synthetic_faces(WIDTH_FACES, image_size=32, seed=5), Path(out_dir))
    finally:
        dist.destroy_process_group()


#: 300 faces: 180 training rows, even, so width 2 drops no row; batch 32: the last global batch is partial.
WIDTH_FACES = 300


def _width_spec() -> StageSpec:
    # No dropout: its masks are drawn per process, the one thing that differs by width on VGG-f.
    return replace(stage("gender", "teacher", "full", epochs=2, batch_size=32), dropout=False)


def test_a_node_trains_the_same_at_width_one_and_two(tmp_path: Path):
    """Same global batch (32) and seed: 1 worker, and 2 gloo workers each with half of every batch (rows
    r, r+2, ... of it, with their flips), end two epochs of VGG-f at the same weights to 1e-4."""
    import socket

    import torch.multiprocessing as mp

    from occkd_core.data import make_synthetic_faces

    train_stage(_width_spec(), make_synthetic_faces(WIDTH_FACES, image_size=32, seed=5), tmp_path / "one")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_width_worker, args=(2, port, str(tmp_path / "two")), nprocs=2, join=True)
    one, two = (read_checkpoint(tmp_path / name / "last.pt")["state_dict"] for name in ("one", "two"))
    assert one.keys() == two.keys()
    for name, value in one.items():
        if value.is_floating_point():
            torch.testing.assert_close(two[name], value, atol=1e-4, rtol=1e-3, msg=name)


def test_resnet50_batchnorm_is_synchronised_across_gpu_workers():
    from occkd_core.models import ModelSpec, build_model
    from occkd_core.training import with_sync_batchnorm

    count = lambda m: sum(isinstance(x, torch.nn.SyncBatchNorm) for x in m.modules())  # noqa: E731
    model = lambda: build_model(ModelSpec(arch="resnet50", num_outputs=2, width_mult=0.125))  # noqa: E731
    assert count(with_sync_batchnorm(model(), 2, torch.device("cuda", 0))) == 53  # every BatchNorm of ResNet-50
    assert count(with_sync_batchnorm(model(), 1, torch.device("cuda", 0))) == 0
    assert count(with_sync_batchnorm(model(), 2, torch.device("cpu"))) == 0  # PyTorch's SyncBatchNorm is GPU-only
