"""Evaluation: per-sample predictions on full, lower-visible and upper-visible faces, and metrics (spec §11).

Per-sample outputs are kept (not just accuracy) because McNemar and fusion need them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from occkd_core.data import FaceSplit
from occkd_core.models import FaceNet
from occkd_core.preprocess import InputSpec, prepare_batch
from occkd_core.tasks import VISIBILITIES, TaskInfo, Visibility


@dataclass(frozen=True)
class Predictions:
    """One model's outputs on one split under one visibility."""

    visible: Visibility
    outputs: np.ndarray  # float32 [N, K]: logits, or [N, 1] age in years
    targets: np.ndarray  # int64 [N] classes or float32 [N] ages
    embeddings: np.ndarray | None = None  # float32 [N, D] when asked for

    @property
    def predicted(self) -> np.ndarray:
        """Predicted class ids [N], or predicted ages [N]."""
        if self.outputs.shape[1] == 1:
            return self.outputs[:, 0]
        return self.outputs.argmax(axis=1)

    @property
    def correct(self) -> np.ndarray:
        """bool [N]; for age, whether the rounded prediction hits the age exactly is meaningless, so
        this is only defined for classification."""
        if self.outputs.shape[1] == 1:
            raise ValueError("per-sample correctness is undefined for regression; use abs_error")
        return self.predicted == self.targets

    @property
    def abs_error(self) -> np.ndarray:
        if self.outputs.shape[1] != 1:
            raise ValueError("abs_error is defined for regression (age) only")
        return np.abs(self.predicted - self.targets)


def task_metrics(task: TaskInfo, predictions: Predictions) -> dict[str, float]:
    """Accuracy and weighted accuracy (mean per-class recall, spec §11) in %, or MAE in years."""
    # scikit-learn (and SciPy with it, ~2 s of CPU) is imported on first use: the grid's driver imports this
    # module for Predictions and never scores.
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, mean_absolute_error

    if task.is_classification:
        return {
            "accuracy": 100.0 * accuracy_score(predictions.targets, predictions.predicted),
            "weighted_accuracy": 100.0 * balanced_accuracy_score(predictions.targets, predictions.predicted),
        }
    return {"mae": float(mean_absolute_error(predictions.targets, predictions.predicted))}


def validation_score(task: TaskInfo, metrics: dict[str, float]) -> float:
    """One number where higher is better: accuracy, or −MAE."""
    return metrics["accuracy"] if task.is_classification else -metrics["mae"]


@torch.no_grad()
def predict(
    model: FaceNet,
    split: FaceSplit,
    task: TaskInfo,
    visible: Visibility,
    input_spec: InputSpec,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    with_embeddings: bool = False,
) -> Predictions:
    """Run ``model`` (in eval mode, restored afterwards) over ``split`` with ``visible`` faces."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    outputs, embeddings = [], []
    use_amp = device.type == "cuda"
    try:
        for start in range(0, len(split), batch_size):
            images = torch.from_numpy(np.array(split.images[start : start + batch_size]))  # copy: the store is read-only
            x = prepare_batch(images.to(device, non_blocking=True), visible, input_spec, channels_last=use_amp)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits, embedding = model(x)
            outputs.append(logits.float().cpu())
            if with_embeddings:
                embeddings.append(embedding.float().cpu())
    finally:
        model.train(was_training)
    return Predictions(
        visible=visible,
        outputs=torch.cat(outputs).numpy(),
        targets=split.labels(task.name),
        embeddings=torch.cat(embeddings).numpy() if with_embeddings else None,
    )


def evaluate_conditions(
    model: FaceNet,
    split: FaceSplit,
    task: TaskInfo,
    input_spec: InputSpec,
    *,
    visibles: tuple[Visibility, ...] = VISIBILITIES,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    with_embeddings: bool = False,
) -> dict[Visibility, tuple[Predictions, dict[str, float]]]:
    """Predictions and metrics of ``model`` on full, lower-visible and upper-visible faces."""
    results = {}
    for visible in visibles:
        preds = predict(model, split, task, visible, input_spec, device=device, batch_size=batch_size,
                        with_embeddings=with_embeddings)
        results[visible] = (preds, task_metrics(task, preds))
    return results
