"""One training loop for every curriculum stage (spec §5, §9, §10).

``train_stage`` reads top to bottom: build the model (from pretrained weights, or from the parent
stage's checkpoint), pick the strategy, then per epoch: the strategy's order of rows, batches of loss
terms, optimiser step (with DSD masks in the sparse phase), validation on the stage's faces, plateau
decay, best and last checkpoints, and a callback with the epoch's record. An interrupted stage resumes
from its last checkpoint. Runs single-process or under an initialised ``torch.distributed`` group
(DDP; every global batch's rows split over the ranks, dropout drawn per rank, rank 0 writes files).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from occkd_core.checkpoints import (checkpoint_input_spec, load_model, read_checkpoint,
                                    save_model_checkpoint, unwrap)
from occkd_core.data import FaceData
from occkd_core.ddp import dropout_seed, sum_over_ranks, with_sync_batchnorm
from occkd_core.dsd import DSDPruner, DSDSchedule
from occkd_core import embeddings
from occkd_core.evaluation import Predictions, predict, task_metrics, validation_score
from occkd_core.loading import load_pretrained
from occkd_core.models import FaceNet, ModelSpec, build_model, get_architecture
from occkd_core.preprocess import InputSpec, input_spec_for, random_flips
from occkd_core.pretrained import weights_input_mean
from occkd_core.specs import TrainSpec
from occkd_core.stage_state import (EpochRecord, make_optimizer, make_scheduler, resume, save_last,
                                    validation_plateaued)
from occkd_core.stages import get_stage, require_settings
from occkd_core.strategies import BatchContext, StageInputs, SupervisedStrategy
from occkd_core.tasks import TaskInfo, Visibility, check_name, get_task


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the message names the epoch, batch and terms."""


@dataclass(frozen=True)
class StageSpec:
    """Everything that determines one training run (with its data and parent checkpoints)."""

    task: str
    arch: str
    stage: str  # a stage of occkd_core.stages: teacher | student | standard_kd | triplet_kd
    train_visible: Visibility  # faces the trained model sees: full for the teacher, a half otherwise
    input_size: int
    width_mult: float
    train: TrainSpec
    seed: int = 0
    dropout: bool = True

    def __post_init__(self) -> None:
        get_task(self.task)
        get_architecture(self.arch)
        get_stage(self.stage)
        check_name("visibility", self.train_visible)
        if (self.stage == "teacher") != (self.train_visible == "full"):
            raise ValueError(f"a {self.stage} trains on {'full' if self.stage == 'teacher' else 'half'}"
                             f" faces, got train_visible={self.train_visible!r}")
        require_settings(self.train, self.stage)

    @property
    def task_info(self) -> TaskInfo:
        return get_task(self.task)

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec(arch=self.arch, num_outputs=self.task_info.num_outputs, width_mult=self.width_mult,
                         dropout=self.dropout)

    # The stage is written under its first name, "strategy": a node's hash is computed from this dict
    # (grid.graph; checkpoints and MLflow's spec.* params hold it too), so renaming the key would re-run every
    # sealed node on users' storage.
    def to_dict(self) -> dict[str, Any]:
        values = {**asdict(self), "train": self.train.to_dict()}  # TrainSpec's own form (its ``extra`` as a mapping)
        return {("strategy" if key == "stage" else key): value for key, value in values.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "StageSpec":
        renamed = {("stage" if key == "strategy" else key): value for key, value in values.items()}
        return cls(**{**renamed, "train": TrainSpec.from_dict(values["train"])})


@dataclass(frozen=True)
class TrainResult:
    best_checkpoint: Path
    best_epoch: int
    best_val_score: float
    history: list[EpochRecord]
    # Wall-clock time.time() of this call's first and last optimiser step (None: nothing left to train),
    # so an orchestrator can measure what it costs around the training itself.
    first_step_at: float | None = None
    last_step_at: float | None = None


EpochCallback = Callable[[EpochRecord], None]


def train_stage(
    spec: StageSpec,
    data: FaceData,
    out_dir: Path,
    *,
    init_checkpoint: Path | None = None,
    teacher_checkpoint: Path | None = None,
    pretrained_weights: Path | None = None,
    device: torch.device | str = "cpu",
    on_epoch: EpochCallback | None = None,
    cache_dir: Path | None = None,
) -> TrainResult:
    """Train one stage; resumes from ``out_dir/last.pt`` if an earlier attempt left one.

    ``init_checkpoint``: the parent stage's best checkpoint (student from teacher, KD from student).
    ``teacher_checkpoint``: the frozen teacher of a KD stage. ``pretrained_weights``: a local weights
    file for a teacher trained from pre-trained weights (spec §5 step 1).
    """
    device = torch.device(device)
    out_dir = Path(out_dir)
    task, train, stage = spec.task_info, spec.train, get_stage(spec.stage)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(spec.seed)  # the model's initial weights (DDP broadcasts rank 0's anyway)
    order_generator = torch.Generator().manual_seed(spec.seed)  # row order, mining pools: same on every rank
    # Flips are drawn for the whole global batch on every rank, each rank taking its own rows' flips, so a
    # node trains the same with any number of DDP workers (the papers' batch is the global batch).
    flip_generator = torch.Generator().manual_seed(spec.seed * 7919 + 1)
    if train.batch_size % world:
        raise ValueError(f"batch size {train.batch_size} does not split over {world} workers: the global batch "
                         f"stays the preset's, so the number of workers must divide it")
    train_split, val_split = data.split("train"), data.split("val")
    train_targets = torch.as_tensor(train_split.labels(task.name)).to(device)  # validates labels before training
    val_split.labels(task.name)
    on_gpu = device.type == "cuda"

    model = _starting_model(spec, train_targets, init_checkpoint, pretrained_weights, device)
    input_spec = _stage_input_spec(spec, init_checkpoint, pretrained_weights)
    teacher = _frozen_teacher(spec, teacher_checkpoint, input_spec, device) if stage.needs_teacher else None
    optimizer = make_optimizer(model, train)
    scheduler = make_scheduler(optimizer, train)
    dsd = DSDPruner(model) if train.dsd else None
    dsd_schedule = DSDSchedule(train.epochs) if train.dsd else None
    if world > 1:
        model = with_sync_batchnorm(model, world, device)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if on_gpu else None)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    progress = resume(last_path, best_path, model, optimizer, scheduler, order_generator, flip_generator)

    ctx = BatchContext(task=task, train=train, split=train_split, targets=train_targets, visible=spec.train_visible,
                       input_spec=input_spec, device=device, channels_last=on_gpu, teacher=teacher)
    strategy = _build_strategy(spec, ctx, teacher_checkpoint, cache_dir)

    # -- epochs -----------------------------------------------------------------------------------------
    step_clock: dict[str, float] = {}
    for epoch in range(progress.start_epoch, train.epochs + 1):
        if validation_plateaued(train, progress, epoch - 1, world, device):
            break  # early stopping: `epochs` is the ceiling
        started = time.perf_counter()
        phase = dsd_schedule.phase(epoch - 1) if dsd_schedule else "dense"
        if dsd is not None:
            if phase == "sparse":
                dsd.prune()  # at the sparse phase's start, and refreshed each sparse epoch (spec §15 #7)
            else:
                dsd.release()
        model.train()
        # Dropout draws from torch's global generator: seeded per rank, so a global batch of B rows gets B
        # distinct masks with any number of workers, and per epoch, so a resumed epoch draws what an
        # uninterrupted run would.
        torch.manual_seed(dropout_seed(spec.seed, rank, epoch))
        order = strategy.epoch_order(epoch, unwrap(model), order_generator)
        sums, train_outputs, train_rows = _run_epoch(model, strategy, order, optimizer, train.batch_size,
                                                     flip_generator, epoch, dsd if phase == "sparse" else None,
                                                     on_gpu, step_clock, rank=rank, world=world)
        num_batches = max(1, math.ceil(len(order) / train.batch_size))
        loss_terms = {name: value / num_batches for name, value in sum_over_ranks(sums, world).items()}
        train_preds = _as_predictions(train_outputs, train_split.labels(task.name)[train_rows], spec.train_visible)
        val_preds = predict(unwrap(model), val_split, task, spec.train_visible, input_spec, device=device)
        val_metrics = task_metrics(task, val_preds)
        score = validation_score(task, val_metrics)
        if scheduler is not None:
            scheduler.step(score)
        is_best = score > progress.best_score
        if is_best:
            progress.best_score, progress.best_epoch = score, epoch
        extra = {**strategy.describe_epoch(), "dsd_sparse": float(phase == "sparse")}
        record = EpochRecord(epoch=epoch, lr=optimizer.param_groups[0]["lr"], train_loss=sum(loss_terms.values()),
                             loss_terms=loss_terms, train_metrics=task_metrics(task, train_preds),
                             val_metrics=val_metrics, val_score=score, is_best=is_best,
                             seconds=time.perf_counter() - started, extra=extra)
        progress.history.append(record)
        if rank == 0:  # best.pt when it improved; last.pt always, with all a resume needs
            if is_best:
                save_model_checkpoint(best_path, model, spec.model_spec, stage_spec=spec.to_dict(), epoch=epoch,
                                      val_score=score, input_spec=input_spec.to_dict())
            save_last(last_path, spec.model_spec, spec.to_dict(), input_spec, model, epoch, optimizer, scheduler,
                      order_generator, flip_generator, progress)
        if on_epoch is not None:
            on_epoch(record)
    if world > 1:
        dist.barrier()
    return TrainResult(best_checkpoint=best_path, best_epoch=progress.best_epoch,
                       best_val_score=progress.best_score, history=progress.history,
                       first_step_at=step_clock.get("first"), last_step_at=step_clock.get("last"))


def _build_strategy(spec: StageSpec, ctx: BatchContext, teacher_checkpoint: Path | None,
                    cache_dir: Path | None) -> SupervisedStrategy:
    """The stage's strategy (its loss and epoch order, occkd_core.strategies), with what it may ask for: the
    teacher's embeddings of the training faces (cached in ``cache_dir``) and the student's own."""
    teacher, split, input_spec, device = ctx.teacher, ctx.split, ctx.input_spec, ctx.device

    def teacher_embeddings() -> torch.Tensor:
        if teacher is None or teacher_checkpoint is None:
            raise ValueError(f"stage {spec.stage!r} asks for the teacher's embeddings, but its registry entry "
                             f"(occkd_core.stages) does not say needs_teacher=True")
        return embeddings.teacher_embeddings(teacher, teacher_checkpoint, split, ctx.task, input_spec, device, cache_dir)

    inputs = StageInputs(
        teacher_embeddings=teacher_embeddings,
        embed_student=lambda m: embeddings.embed(unwrap(m), split, ctx.task, spec.train_visible, input_spec, device))
    return get_stage(spec.stage).strategy.build(ctx, inputs)


def _starting_model(spec: StageSpec, train_targets: torch.Tensor, init_checkpoint: Path | None,
                    pretrained_weights: Path | None, device: torch.device) -> FaceNet:
    """The model a stage starts from: its parent stage's best checkpoint, pre-trained weights, or random."""
    model = build_model(spec.model_spec)
    if init_checkpoint is not None:
        model.load_state_dict(read_checkpoint(init_checkpoint)["state_dict"])
    elif pretrained_weights is not None:
        load_pretrained(model, pretrained_weights)
    if init_checkpoint is None and not spec.task_info.is_classification:
        # Raw years with an L1 loss (spec §15 #14): start the regressor at the median training age so
        # that early epochs learn faces, not the offset (a head at 0 needs thousands of steps to reach 40).
        with torch.no_grad():
            model.head.bias.fill_(float(np.median(train_targets.cpu().numpy())))
    on_gpu = device.type == "cuda"
    return model.to(device, memory_format=torch.channels_last if on_gpu else torch.contiguous_format)


def _stage_input_spec(spec: StageSpec, init_checkpoint: Path | None, pretrained_weights: Path | None) -> InputSpec:
    """The normalisation the stage's network expects: its parent checkpoint's, else the mean its pre-trained
    weights file names (imagenet-vgg-f.mat's averageImage, say), else its architecture's registry entry."""
    if init_checkpoint is not None:
        return checkpoint_input_spec(read_checkpoint(init_checkpoint), spec.input_size)
    mean = weights_input_mean(pretrained_weights) if pretrained_weights is not None else None
    return input_spec_for(spec.arch, spec.input_size, mean=mean)


def _frozen_teacher(spec: StageSpec, teacher_checkpoint: Path | None, input_spec: InputSpec,
                    device: torch.device) -> FaceNet:
    if teacher_checkpoint is None:
        raise ValueError(f"{spec.stage} needs the teacher's checkpoint")
    teacher, payload = load_model(teacher_checkpoint, device)
    # Teacher and student see the same normalised views of a batch (spec §3.4-3.5), so they must expect the
    # same normalisation; a student descended from its teacher always does.
    teacher_spec = checkpoint_input_spec(payload, spec.input_size)
    if teacher_spec != input_spec:
        raise ValueError(f"the teacher {str(teacher_checkpoint)!r} expects inputs normalised by mean "
                         f"{teacher_spec.mean} / std {teacher_spec.std}, the {spec.stage} stage's network by "
                         f"{input_spec.mean} / {input_spec.std}: distil from the teacher its student was "
                         f"fine-tuned from")
    teacher.requires_grad_(False)
    return teacher


def _run_epoch(
    model: torch.nn.Module,
    strategy: SupervisedStrategy,
    order: np.ndarray,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    flip_generator: torch.Generator,
    epoch: int,
    dsd: DSDPruner | None,
    on_gpu: bool,
    step_clock: dict[str, float] | None = None,
    *,
    rank: int = 0,
    world: int = 1,
) -> tuple[dict[str, float], torch.Tensor, np.ndarray]:
    """One pass over ``order`` in global batches of ``batch_size``; returns this rank's loss terms summed
    over the batches (each weighted by the rank's share of its batch), its outputs and their rows.
    ``step_clock`` gets the wall-clock time of the first step it sees ("first") and of the last ("last").

    Rank r takes rows r, r + world, ... of every global batch, with their flips drawn for the whole batch:
    together the ranks' rows are the one-worker batch, and every rank runs the same number of steps (DDP's
    all-reduce needs it), without leaving rows out.
    """
    device = strategy.ctx.device
    window: list[tuple[int, dict[str, torch.Tensor]]] = []
    sums: dict[str, torch.Tensor] = {}
    outputs: list[torch.Tensor] = []
    seen_rows: list[np.ndarray] = []
    for batch_index, start in enumerate(range(0, len(order), batch_size)):
        global_rows = order[start : start + batch_size]
        global_flip = random_flips(len(global_rows), flip_generator, device)
        batch_rows, flip = global_rows[rank::world], global_flip[rank::world]
        # The terms are means over this rank's rows and DDP averages gradients over the ranks: weighting each
        # rank by world × its share of the batch makes the step the global batch's mean gradient, also when
        # the last batch splits unevenly.
        # A last batch smaller than the number of workers leaves some ranks no row: they still run the step on an empty
        # batch, since DDP's all-reduce (and SyncBatchNorm's, which counts an empty input as no sample) waits
        # for every rank. Its terms are means over nothing (NaN), its gradients zero, its weight 0.
        share = len(batch_rows) / len(global_rows)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on_gpu):
            terms, batch_outputs = strategy.loss_terms(model, batch_rows, flip)
        loss = sum(terms.values())
        if world > 1:
            loss = loss * (share * world)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if dsd is not None:
            dsd.apply_masks()
        if step_clock is not None:
            step_clock.setdefault("first", time.time())
            step_clock["last"] = time.time()
        if not len(batch_rows):
            continue
        detached = {name: value.detach().float() for name, value in terms.items()}
        for name, value in detached.items():
            sums[name] = sums.get(name, 0.0) + value * share
        outputs.append(batch_outputs.detach().float())
        seen_rows.append(batch_rows)
        # Check finiteness every few batches, not every batch: a per-batch .item() stalls the GPU.
        window.append((batch_index + 1, detached))
        if len(window) == 16:
            _check_finite(window, epoch)
            window.clear()
    if window:
        _check_finite(window, epoch)
    totals = {name: float(value) for name, value in sums.items()}
    all_outputs = torch.cat(outputs).cpu() if outputs else torch.zeros(0, 1)
    return totals, all_outputs, np.concatenate(seen_rows) if seen_rows else np.zeros(0, dtype=np.int64)


def _check_finite(window: list[tuple[int, dict[str, torch.Tensor]]], epoch: int) -> None:
    stacked = torch.stack([torch.stack(list(terms.values())) for _, terms in window])
    if bool(torch.isfinite(stacked).all()):
        return
    for batch, terms in window:
        values = {name: float(value) for name, value in terms.items()}
        if not all(math.isfinite(v) for v in values.values()):
            shown = ", ".join(f"{name}={value:.4g}" for name, value in values.items())
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch}, batch {batch}: {shown}. Lower the learning rate, check the "
                f"data for NaN, or resume from the last checkpoint with a smaller lr")


def _as_predictions(outputs: torch.Tensor, targets: np.ndarray, visible: Visibility) -> Predictions:
    return Predictions(visible=visible, outputs=outputs.numpy(), targets=targets)
