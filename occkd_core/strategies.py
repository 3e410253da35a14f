"""Training strategies: what each curriculum stage computes per batch (spec §5-§7).

A strategy decides which training rows an epoch visits (``epoch_order``) and turns a batch of rows
into named loss terms (``loss_terms``); the training loop sums and logs the terms. Nothing else
differs between stages, so there is one loop (:mod:`occkd_core.training`). The loop builds a stage's
strategy with ``build(ctx, inputs)``; :mod:`occkd_core.stages` says which class serves which stage.

A strategy also says which of the loss settings (:data:`occkd_core.specs.LOSS_SETTINGS`) it reads for a task
(``loss_settings``): a node's identity and the grid's axes hold only those, so grid points that differ
in a setting the loss never reads are one node. A distilled strategy names its teacher-free control
(``control_strategy``): the same objective with the teacher's terms removed and the same epoch order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from occkd_core.data import FaceSplit
from occkd_core.losses import hint_kd_loss, hinton_kd_loss, supervised_loss, teacher_free_loss, triplet_kd_loss
from occkd_core.mining import MinedTriplets, draw_pool, mine_hard_triplets
from occkd_core.models import FaceNet
from occkd_core.preprocess import InputSpec, prepare_batch, prepare_views
from occkd_core.specs import TrainSpec
from occkd_core.tasks import TaskInfo, Visibility


@dataclass
class BatchContext:
    """Everything a strategy needs, fixed for the whole stage."""

    task: TaskInfo
    train: TrainSpec
    split: FaceSplit
    targets: Tensor  # [N] on the device: long classes or float ages
    visible: Visibility  # what the trained model sees
    input_spec: InputSpec
    device: torch.device
    channels_last: bool
    teacher: FaceNet | None = None  # frozen, eval mode (spec §15 #34)

    def images(self, rows: np.ndarray) -> Tensor:
        """uint8 [B,H,W,C] of the given training rows, on the device."""
        return torch.from_numpy(self.split.images[rows]).to(self.device, non_blocking=True)


LossTerms = dict[str, Tensor]


@dataclass(frozen=True)
class StageInputs:
    """What a strategy may need beyond its batch context, computed only when a strategy asks."""

    teacher_embeddings: Callable[[], Tensor]  # [N, D] full-face teacher embeddings of the training set (cached)
    embed_student: Callable[[FaceNet], Tensor]  # [N, D] the model's embeddings of the occluded training set


class SupervisedStrategy:
    """Teacher (full faces) and student (one half) stages: the task loss alone (spec §5 steps 1-2)."""

    def __init__(self, ctx: BatchContext) -> None:
        self.ctx = ctx

    @classmethod
    def build(cls, ctx: BatchContext, inputs: StageInputs) -> "SupervisedStrategy":
        """The strategy for one stage run (override to take more from ``inputs``)."""
        return cls(ctx)

    def epoch_order(self, epoch: int, model: FaceNet, generator: torch.Generator) -> np.ndarray:
        return torch.randperm(len(self.ctx.split), generator=generator).numpy()

    def loss_terms(self, model: torch.nn.Module, rows: np.ndarray, flip: Tensor) -> tuple[LossTerms, Tensor]:
        ctx = self.ctx
        x = prepare_batch(ctx.images(rows), ctx.visible, ctx.input_spec, flip, ctx.channels_last)
        outputs, _ = model(x)
        return {"supervised": supervised_loss(outputs, ctx.targets[rows], ctx.task.kind)}, outputs

    def describe_epoch(self) -> dict[str, float]:
        return {}

    @classmethod
    def loss_settings(cls, task: TaskInfo) -> tuple[str, ...] | None:
        """The loss settings (:data:`~occkd_core.specs.LOSS_SETTINGS`) this strategy's loss reads for ``task``;
        None: it does not say, so every one counts (a new strategy is never merged with a neighbour by mistake)."""
        return () if cls is SupervisedStrategy else None

    @classmethod
    def control_strategy(cls) -> type["SupervisedStrategy"]:
        """The teacher-free control of this (distilled) strategy: its task term, its epoch order."""
        return TeacherFreeControl


class StandardKDStrategy(SupervisedStrategy):
    """Standard teacher-student training: Hinton KD (FER, J Eq. 2) or the L1 embedding hint (gender/age,
    J Eq. 3). The teacher sees the full image, the student the occluded one, both flipped alike."""

    def loss_terms(self, model: torch.nn.Module, rows: np.ndarray, flip: Tensor) -> tuple[LossTerms, Tensor]:
        ctx, spec = self.ctx, self.ctx.train
        assert ctx.teacher is not None
        full, occluded = prepare_views(ctx.images(rows), ("full", ctx.visible), ctx.input_spec, flip, ctx.channels_last)
        with torch.no_grad():
            teacher_logits, teacher_embedding = ctx.teacher(full)
        outputs, embedding = model(occluded)
        targets = ctx.targets[rows]
        if ctx.task.standard_kd == "hinton":
            terms = hinton_kd_loss(outputs, teacher_logits.float(), targets, lam=spec.lam,
                                   temperature=spec.temperature, tau_squared=spec.tau_squared)
        else:
            terms = hint_kd_loss(outputs, embedding, teacher_embedding.float(), targets, lam=spec.lam, kind=ctx.task.kind)
        return terms, outputs

    @classmethod
    def loss_settings(cls, task: TaskInfo) -> tuple[str, ...]:
        # The hint (gender, age) reads neither τ nor τ².
        return ("lam", "temperature", "tau_squared") if task.standard_kd == "hinton" else ("lam",)


class TripletKDStrategy(SupervisedStrategy):
    """Triplet-loss teacher-student training with offline hard mining (J Eq. 4-5, spec §7).

    At each epoch start the student embeds every occluded training image (eval mode, spec §15 #24), a
    pool of ρ·N rows is drawn, and each anchor gets its farthest same-class teacher embedding and its
    closest other-class student embedding. Batches are anchors; negatives are re-embedded with gradient,
    positives come from the teacher cache.
    """

    def __init__(self, ctx: BatchContext, teacher_embeddings: Tensor,
                 embed_student: Callable[[FaceNet], Tensor]) -> None:
        super().__init__(ctx)
        self.teacher_embeddings = teacher_embeddings  # [N, D] on the device, full faces, cached once
        self.embed_student = embed_student
        self.mined: MinedTriplets | None = None
        self.negative_of = np.zeros(0, dtype=np.int64)
        self.positive_of = np.zeros(0, dtype=np.int64)
        self.mining_seconds = 0.0

    @classmethod
    def build(cls, ctx: BatchContext, inputs: StageInputs) -> "TripletKDStrategy":
        return cls(ctx, inputs.teacher_embeddings(), inputs.embed_student)

    def epoch_order(self, epoch: int, model: FaceNet, generator: torch.Generator) -> np.ndarray:
        ctx = self.ctx
        start = time.perf_counter()
        student_embeddings = self.embed_student(model)
        teacher_embeddings = self.teacher_embeddings
        if ctx.train.triplet_normalize:  # mine in the space the loss measures
            student_embeddings = torch.nn.functional.normalize(student_embeddings, dim=1)
            teacher_embeddings = torch.nn.functional.normalize(teacher_embeddings, dim=1)
        pool = draw_pool(len(ctx.split), ctx.train.pool_fraction, generator).to(ctx.device)
        self.mined = mine_hard_triplets(student_embeddings, teacher_embeddings, ctx.targets, pool,
                                        age_threshold=ctx.task.age_threshold)
        num = len(ctx.split)
        if not len(self.mined):  # an epoch on no rows would fail later, inside a metric, saying nothing of this
            raise ValueError(f"epoch {epoch}: the mining pool of {len(pool)} of the {num} training rows (pool_fraction "
                             f"{ctx.train.pool_fraction:g}) gave no anchor a positive and a negative, so the epoch has "
                             f"nothing to train on; the train split is too small or too uniform for this pool "
                             f"(the grid checks it first: occkd_core.data.checks)")
        self.positive_of = np.full(num, -1, dtype=np.int64)
        self.negative_of = np.full(num, -1, dtype=np.int64)
        anchors = self.mined.anchors.cpu().numpy()
        self.positive_of[anchors] = self.mined.positives.cpu().numpy()
        self.negative_of[anchors] = self.mined.negatives.cpu().numpy()
        self.mining_seconds = time.perf_counter() - start
        # Every training row in random order, less those that found no triplet: the generator draws the same
        # numbers as the control's (TripletKDControl), so both visit the rows in one order, epoch after epoch.
        order = torch.randperm(num, generator=generator).numpy()
        return order[self.positive_of[order] >= 0]

    def loss_terms(self, model: torch.nn.Module, rows: np.ndarray, flip: Tensor) -> tuple[LossTerms, Tensor]:
        ctx, spec = self.ctx, self.ctx.train
        negatives = self.negative_of[rows]
        # One forward over anchors and negatives: both are occluded student inputs.
        images = torch.cat([ctx.images(rows), ctx.images(negatives)])
        x = prepare_batch(images, ctx.visible, ctx.input_spec, torch.cat([flip, flip]), ctx.channels_last)
        outputs, embedding = model(x)
        size = len(rows)
        positives = self.teacher_embeddings[torch.from_numpy(self.positive_of[rows]).to(ctx.device)]
        terms = triplet_kd_loss(
            outputs[:size], ctx.targets[rows], embedding[:size], positives, embedding[size:],
            lam=spec.lam, margin=spec.margin, kind=ctx.task.kind, squared=spec.triplet_squared,
            normalize=spec.triplet_normalize, icpr_form=spec.icpr_form,
        )
        return terms, outputs[:size]

    def describe_epoch(self) -> dict[str, float]:
        if self.mined is None:
            return {}
        return {"mining_seconds": self.mining_seconds, "num_triplets": float(len(self.mined.anchors)),
                "mining_dropped": float(self.mined.num_dropped)}

    @classmethod
    def loss_settings(cls, task: TaskInfo) -> tuple[str, ...]:
        return ("lam", "margin", "pool_fraction", "triplet_squared", "triplet_normalize", "icpr_form")

    @classmethod
    def control_strategy(cls) -> type[SupervisedStrategy]:
        return TripletKDControl


class TeacherFreeControl(SupervisedStrategy):
    """The control of a distilled stage: its objective with the teacher's terms removed, nothing else
    changed (occkd's own addition; the papers run none). The student trains on from the same checkpoint on
    the same occluded faces, rows, flips and seed, with the task term weighted as in the distilled run
    ((1-λ), or 1 in C's form), and no teacher loaded: whatever it gains over the student is more training,
    not the teacher."""

    def loss_terms(self, model: torch.nn.Module, rows: np.ndarray, flip: Tensor) -> tuple[LossTerms, Tensor]:
        ctx, spec = self.ctx, self.ctx.train
        x = prepare_batch(ctx.images(rows), ctx.visible, ctx.input_spec, flip, ctx.channels_last)
        outputs, _ = model(x)
        terms = teacher_free_loss(outputs, ctx.targets[rows], lam=spec.lam, kind=ctx.task.kind,
                                  icpr_form=spec.icpr_form)
        return terms, outputs

    @classmethod
    def loss_settings(cls, task: TaskInfo) -> tuple[str, ...]:
        return ("lam",)


class TripletKDControl(TeacherFreeControl):
    """Triplet KD's control: each epoch draws the mining pool as triplet KD does (and uses nothing of it), so
    the order generator stays in step, and visits every training row in the order triplet KD visits its
    anchors, with the task term alone. Triplet KD skips the few rows that found no triplet
    (``mining_dropped`` in its epoch log); the control, which mines nothing, visits them too."""

    def epoch_order(self, epoch: int, model: FaceNet, generator: torch.Generator) -> np.ndarray:
        draw_pool(len(self.ctx.split), self.ctx.train.pool_fraction, generator)  # triplet KD's draw, unused
        return torch.randperm(len(self.ctx.split), generator=generator).numpy()

    @classmethod
    def loss_settings(cls, task: TaskInfo) -> tuple[str, ...]:
        return ("lam", "pool_fraction", "icpr_form")
