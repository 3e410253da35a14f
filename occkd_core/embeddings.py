"""Embeddings a training stage reads besides its own batches: a split's embeddings from a model (triplet
mining), and the frozen teacher's embeddings of the full training faces, computed once and cached on disk
under a key of the teacher's checkpoint and the data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from occkd_core.checkpoints import atomic_torch_save
from occkd_core.data import FaceSplit
from occkd_core.evaluation import predict
from occkd_core.models import FaceNet
from occkd_core.preprocess import InputSpec
from occkd_core.tasks import TaskInfo, Visibility


def embed(model: FaceNet, split: FaceSplit, task: TaskInfo, visible: Visibility, input_spec: InputSpec,
           device: torch.device) -> torch.Tensor:
    """Embeddings [N, D] of a split's faces, model in eval mode (restored after), on the device."""
    preds = predict(model, split, task, visible, input_spec, device=device, with_embeddings=True)
    return torch.from_numpy(preds.embeddings).to(device)


def teacher_embeddings(teacher: FaceNet, teacher_checkpoint: Path, split: FaceSplit, task: TaskInfo,
                        input_spec: InputSpec, device: torch.device, cache_dir: Path | None) -> torch.Tensor:
    """Teacher embeddings of the FULL training faces, computed once per node and cached on disk."""
    if cache_dir is None:
        return embed(teacher, split, task, "full", input_spec, device)
    key = hashlib.sha256()
    key.update(Path(teacher_checkpoint).read_bytes())
    key.update(f"{len(split)}:{split.images.shape}:{input_spec}".encode())
    key.update(np.ascontiguousarray(split.images[:: max(1, len(split) // 64)]).tobytes())
    path = Path(cache_dir) / f"teacher-embeddings-{key.hexdigest()[:20]}.pt"
    if path.exists():
        try:
            return torch.load(path, map_location=device, weights_only=True)
        except Exception:  # partial or corrupt cache file: recompute below
            path.unlink(missing_ok=True)
    embeddings = embed(teacher, split, task, "full", input_spec, device)
    atomic_torch_save(embeddings.cpu(), path)
    return embeddings
