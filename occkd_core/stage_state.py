"""A training stage's state across epochs and attempts: its optimiser and learning-rate schedule, its
progress (the epochs so far, the best validation score), early stopping, and the last checkpoint that
lets an interrupted stage resume exactly where it stopped (model, optimiser, schedule, both generators).
:func:`occkd_core.training.train_stage` drives them.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from occkd_core.checkpoints import read_checkpoint, save_model_checkpoint, unwrap
from occkd_core.models import FaceNet, ModelSpec
from occkd_core.preprocess import InputSpec
from occkd_core.specs import TrainSpec


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    lr: float
    train_loss: float
    loss_terms: dict[str, float]
    train_metrics: dict[str, float]
    val_metrics: dict[str, float]
    val_score: float  # accuracy, or −MAE: higher is better
    is_best: bool
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)  # DSD phase sparsity, mining time, ...


@dataclass
class Progress:
    """Where a stage stands: its epochs so far and its best validation score."""

    history: list[EpochRecord] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    start_epoch: int = 1


def make_optimizer(model: FaceNet, train: TrainSpec) -> torch.optim.Optimizer:
    if train.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum,
                               weight_decay=train.weight_decay)
    # Adam β and ε: PyTorch defaults (0.9, 0.999), 1e-8 (spec §15 #4).
    return torch.optim.Adam(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)



def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainSpec) -> Any:
    """Plateau decay (÷10 after ``plateau_patience`` flat validation epochs, spec §15 #5), or None."""
    if train.schedule != "plateau":
        return None
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=train.plateau_factor,
                                                      patience=train.plateau_patience)


def validation_plateaued(train: TrainSpec, progress: "Progress", last_epoch: int, world: int,
                          device: torch.device) -> bool:
    """Whether validation has not improved for ``early_stop_patience`` epochs after ``last_epoch`` (also right
    after a resume). Rank 0 decides for every rank: ranks that stopped apart would hang DDP's all-reduce."""
    if train.early_stop_patience is None:
        return False
    stop = last_epoch - progress.best_epoch >= train.early_stop_patience
    if world > 1:
        flag = torch.tensor([float(stop)], device=device)
        dist.broadcast(flag, src=0)
        stop = bool(flag.item())
    return stop


def save_last(path: Path, model_spec: ModelSpec, stage_spec: dict[str, Any], input_spec: InputSpec,
              model: torch.nn.Module, epoch: int, optimizer: torch.optim.Optimizer, scheduler: Any,
              order_generator: torch.Generator, flip_generator: torch.Generator, progress: Progress) -> None:
    """The checkpoint a resume needs (``last.pt``): the model with its spec and the stage's
    (``StageSpec.to_dict()``), the optimiser, schedule, both generators and the progress so far."""
    save_model_checkpoint(
        path, model, model_spec, stage_spec=stage_spec, input_spec=input_spec.to_dict(), epoch=epoch,
        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict() if scheduler else {},
        order_generator=order_generator.get_state(), flip_generator=flip_generator.get_state(),
        history=json.dumps([asdict(r) for r in progress.history]), best_score=progress.best_score,
        best_epoch=progress.best_epoch)


def resume(last_path: Path, best_path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any, order_generator: torch.Generator, flip_generator: torch.Generator) -> Progress:
    """Restore an interrupted stage from its last checkpoint (model, optimiser, schedule, generators)."""
    state = _read_resume_state(last_path, best_path)
    if state is None:
        return Progress()
    unwrap(model).load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    order_generator.set_state(state["order_generator"])
    flip_generator.set_state(state["flip_generator"])
    return Progress(history=[EpochRecord(**record) for record in json.loads(state["history"])],
                     best_score=state["best_score"], best_epoch=state["best_epoch"], start_epoch=state["epoch"] + 1)


def _read_resume_state(last_path: Path, best_path: Path) -> dict[str, Any] | None:
    """The last checkpoint of an interrupted attempt, or None to start fresh (also when it is unreadable:
    files are written atomically, so that means outside damage, and a fresh start is the safe answer)."""
    if not (last_path.exists() and best_path.exists()):
        return None
    try:
        read_checkpoint(best_path)
        return read_checkpoint(last_path)
    except ValueError as err:
        warnings.warn(f"starting {last_path.parent} afresh: {err}", stacklevel=3)
        last_path.unlink(missing_ok=True)
        best_path.unlink(missing_ok=True)
        return None


__all__ = ["EpochRecord", "Progress", "make_optimizer", "make_scheduler", "resume", "save_last",
           "validation_plateaued"]
