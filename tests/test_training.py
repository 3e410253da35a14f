"""The one training loop: every stage runs, resumes, keeps the teacher frozen, stops on NaN."""

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from occkd_core.checkpoints import load_model, read_checkpoint
from occkd_core.evaluation import Predictions, evaluate_conditions, task_metrics
from occkd_core.preprocess import input_spec_for
from occkd_core.specs import TrainSpec
from occkd_core.tasks import get_task
from occkd_core.training import NonFiniteLossError, StageSpec, train_stage

ADAM = TrainSpec(optimizer="adam", batch_size=32, epochs=2, lr=1e-3)


def stage(task: str, name: str, visible: str, arch: str = "vggf", **train) -> StageSpec:
    spec = replace(ADAM, **train)
    if name == "standard_kd":
        spec = replace(spec, lam=0.5, temperature=4.0)
    if name == "triplet_kd":
        spec = replace(spec, lam=0.5, margin=0.2, pool_fraction=0.3)
    return StageSpec(task=task, arch=arch, stage=name, train_visible=visible, input_size=32,
                     width_mult=0.125, train=spec)


@pytest.mark.parametrize("task", ["fer", "age"])
def test_curriculum_teacher_student_and_both_distillations(tiny_faces, tmp_path: Path, task: str):
    info = get_task(task)
    teacher = train_stage(stage(task, "teacher", "full"), tiny_faces, tmp_path / "teacher")
    assert teacher.best_checkpoint.exists() and len(teacher.history) == 2
    student = train_stage(stage(task, "student", info.main_visible), tiny_faces, tmp_path / "student",
                          init_checkpoint=teacher.best_checkpoint)
    teacher_state = read_checkpoint(teacher.best_checkpoint)["state_dict"]
    for name, terms in (("standard_kd", {"soft", "hard"} if task == "fer" else {"hint", "supervised"}),
                        ("triplet_kd", {"supervised", "triplet"})):
        result = train_stage(stage(task, name, info.main_visible), tiny_faces, tmp_path / name,
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
    # Dropout (VGG-f's, on here) is seeded per epoch: the resumed epochs are the uninterrupted run's.
    whole = train_stage(stage("fer", "teacher", "full", epochs=3), tiny_faces, tmp_path / "whole")
    scores = lambda result: [(r.train_loss, r.val_score) for r in result.history]  # noqa: E731
    assert scores(whole) == scores(resumed)


def test_same_seed_gives_the_same_training(tiny_faces, tmp_path: Path):
    a = train_stage(stage("fer", "teacher", "full", epochs=1), tiny_faces, tmp_path / "a")
    b = train_stage(stage("fer", "teacher", "full", epochs=1), tiny_faces, tmp_path / "b")
    assert a.history[0].train_loss == b.history[0].train_loss


def test_non_finite_loss_names_epoch_batch_and_terms(tiny_faces, tmp_path: Path):
    spec = stage("age", "teacher", "full", epochs=1, lr=1e-3, optimizer="sgd")
    # A learning rate presets now refuse (lr <= 1), set past the check: the loop's own guard is under test.
    object.__setattr__(spec.train, "lr", 1e30)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, batch \d+: supervised=(nan|inf)"):
        train_stage(spec, tiny_faces, tmp_path)


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
        StageSpec(task="fer", arch="vggf", stage="fitnets", train_visible="lower", input_size=32,
                  width_mult=0.125, train=ADAM)


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    import occkd_core.training as training
    from occkd_core.data import make_synthetic_faces

    torch.set_num_threads(1)
    # Record what each rank draws: the flips of every global batch, and the dropout masks of its first batch
    # (VGG-f drops after conv3, conv4 and conv5; evaluation passes run with dropout off and are skipped).
    flips, masks = [], []
    draw_flips = training.random_flips
    training.random_flips = lambda *args, **kwargs: flips.append(draw_flips(*args, **kwargs)) or flips[-1]

    def record_mask(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Dropout) and module.training and len(masks) < 3:
            live = args[0] != 0  # ReLU zeroes many units before dropout sees them
            masks.append(((output == 0) & live, live))

    hook = torch.nn.modules.module.register_module_forward_hook(record_mask)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # 181 training rows: not a multiple of the world size, nor of the batch size.
        data = make_synthetic_faces(301, image_size=32, seed=3)
        train_stage(stage("fer", "teacher", "full", epochs=2), data, Path(out_dir))
    finally:
        dist.destroy_process_group()
        hook.remove()
    torch.save({"flips": flips, "masks": masks}, Path(out_dir) / f"draws-{rank}.pt")


@pytest.mark.slow
def test_two_process_ddp_trains_and_rank_zero_writes_with_per_rank_dropout(tmp_path: Path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    state = read_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 2 and (tmp_path / "best.pt").exists()
    zero, one = (torch.load(tmp_path / f"draws-{rank}.pt") for rank in (0, 1))
    # Both ranks draw every global batch's flips (2 epochs of ceil(181 / 32) batches), the same ones ...
    assert len(zero["flips"]) == 2 * 6 and [len(f) for f in zero["flips"][:6]] == [32] * 5 + [21]
    assert all(torch.equal(a, b) for a, b in zip(zero["flips"], one["flips"], strict=True))
    # ... but each rank drops its own units: a global batch of 32 rows gets 32 masks, not 16 twice.
    assert len(zero["masks"]) == len(one["masks"]) == 3
    for (dropped_0, live_0), (dropped_1, live_1) in zip(zero["masks"], one["masks"]):
        assert dropped_0.shape == dropped_1.shape and dropped_0.shape[0] == 16
        assert 0.1 < dropped_0.sum() / live_0.sum() < 0.3  # VGG-f's dropout rate, 0.2
        # Where both ranks' units are live, one shared mask would drop the same ones; two drop ~32 % apart.
        both = live_0 & live_1
        assert both.sum() > 100
        assert 0.2 < (dropped_0[both] != dropped_1[both]).float().mean() < 0.45


def test_dropout_seeds_differ_by_rank_and_epoch():
    from occkd_core.ddp import dropout_seed

    seeds = {dropout_seed(seed, rank, epoch) for seed in (0, 1) for rank in (0, 1, 2) for epoch in (1, 2)}
    assert len(seeds) == 12
    assert dropout_seed(3, 1, 2) == dropout_seed(3, 1, 2)


#: 162 faces: 97 training rows, odd, so every epoch's last global batch splits unevenly over 2 workers.
DDP_FACES = 162


def _ddp_stages() -> dict[str, StageSpec]:
    """The teacher and the three distillations, plain SGD (Adam's step would hide a gradient off by a
    constant factor), no dropout (its masks are drawn per worker: the one thing that differs by worker count)."""
    sgd = dict(optimizer="sgd", lr=0.01, epochs=2)
    specs = {
        "teacher": stage("fer", "teacher", "full", batch_size=16, **sgd),  # last batch 1 row: rank 1 stands in
        "hinton": stage("fer", "standard_kd", "lower", batch_size=10, **sgd),  # last batch 7 rows: 4 and 3
        "hint": stage("gender", "standard_kd", "upper", batch_size=20, **sgd),  # 17 rows: 9 and 8
        # Each epoch every worker mines the 97 rows' triplets from its copy of the student: the same ones.
        "triplet": replace(stage("fer", "triplet_kd", "lower", batch_size=8, **sgd), seed=1),
    }
    return {name: replace(spec, dropout=False) for name, spec in specs.items()}


def _train_ddp_stages(parents: Path, out_dir: Path) -> None:
    from occkd_core.data import make_synthetic_faces

    data = make_synthetic_faces(DDP_FACES, image_size=32, seed=5)
    for name, spec in _ddp_stages().items():
        parent = {} if spec.stage == "teacher" else {"init_checkpoint": parents / f"{spec.task}.pt",
                                                         "teacher_checkpoint": parents / f"{spec.task}.pt"}
        train_stage(spec, data, out_dir / name, **parent)


def _ddp_stages_worker(rank: int, world: int, port: int, parents: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _train_ddp_stages(Path(parents), Path(out_dir))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_node_trains_the_same_with_one_and_two_ddp_workers(tmp_path: Path):
    """Same global batches and seed: 1 worker, and 2 gloo workers each with part of every batch (rows r,
    r+2, ... of it, with their flips), end two epochs of each stage at the same weights to 1e-6: the
    teacher, Hinton KD, hint KD and triplet KD (mining each epoch on every worker), on 97 rows."""
    import socket

    import torch.multiprocessing as mp

    from occkd_core.checkpoints import save_model_checkpoint
    from occkd_core.models import ModelSpec, build_model

    # The distillations start from, and distil, one random network per task (its training is not the point).
    torch.manual_seed(11)
    for task in ("fer", "gender"):
        parent_spec = ModelSpec(arch="vggf", num_outputs=get_task(task).num_outputs, width_mult=0.125,
                                dropout=False)
        save_model_checkpoint(tmp_path / "parents" / f"{task}.pt", build_model(parent_spec), parent_spec)
    _train_ddp_stages(tmp_path / "parents", tmp_path / "one")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_ddp_stages_worker, args=(2, port, str(tmp_path / "parents"), str(tmp_path / "two")), nprocs=2,
             join=True)
    for name, spec in _ddp_stages().items():
        one, two = (read_checkpoint(tmp_path / run / name / "last.pt") for run in ("one", "two"))
        assert one["state_dict"].keys() == two["state_dict"].keys()
        for key, value in one["state_dict"].items():
            torch.testing.assert_close(two["state_dict"][key], value, atol=1e-6, rtol=0, msg=f"{name}: {key}")
        # The weights moved far beyond the tolerance (the test compares training, not two starting points).
        if spec.stage == "teacher":
            torch.manual_seed(spec.seed)
            start = build_model(spec.model_spec).state_dict()
        else:
            start = read_checkpoint(tmp_path / "parents" / f"{spec.task}.pt")["state_dict"]
        assert max(float((one["state_dict"][k] - v).abs().max()) for k, v in start.items()) > 1e-3, name
        # The logged loss is the global batches' too (each worker's terms weighted by its share of a batch).
        losses = [[record["train_loss"] for record in json.loads(c["history"])] for c in (one, two)]
        assert losses[1] == pytest.approx(losses[0], rel=1e-6, abs=0), name


def test_resnet50_batchnorm_is_synchronised_across_gpu_workers():
    from occkd_core.models import ModelSpec, build_model
    from occkd_core.ddp import with_sync_batchnorm

    count = lambda m: sum(isinstance(x, torch.nn.SyncBatchNorm) for x in m.modules())  # noqa: E731
    model = lambda: build_model(ModelSpec(arch="resnet50", num_outputs=2, width_mult=0.125))  # noqa: E731
    assert count(with_sync_batchnorm(model(), 2, torch.device("cuda", 0))) == 53  # every BatchNorm of ResNet-50
    assert count(with_sync_batchnorm(model(), 1, torch.device("cuda", 0))) == 0
    assert count(with_sync_batchnorm(model(), 2, torch.device("cpu"))) == 0  # PyTorch's SyncBatchNorm is GPU-only


def test_an_epoch_whose_pool_gives_no_anchor_a_triplet_stops_the_node_saying_so(tiny_faces, tmp_path: Path):
    """Every training age within the 5-year threshold: no anchor ever has a negative. Before, the epoch trained
    on no rows and the node failed inside scikit-learn ("Found array with 0 sample(s)")."""
    from occkd_core.data.store import FaceData

    train = tiny_faces.split("train")
    ages = replace(train, age=np.full(len(train), 30.0, dtype=np.float32))
    data = FaceData(name=tiny_faces.name, splits={**tiny_faces.splits, "train": ages}, metadata=tiny_faces.metadata)
    teacher = train_stage(stage("age", "teacher", "full", epochs=1), data, tmp_path / "t")
    with pytest.raises(ValueError, match=r"epoch 1: the mining pool of 54 of the 180 training rows \(pool_fraction 0.3\) "
                                         r"gave no anchor a positive and a negative"):
        train_stage(stage("age", "triplet_kd", "lower"), data, tmp_path / "k", init_checkpoint=teacher.best_checkpoint,
                    teacher_checkpoint=teacher.best_checkpoint)
