"""Checkpoint files: written atomically, read with ``weights_only=True``.

A checkpoint is a plain dict (tensors, numbers, strings, lists, dicts) so that ``torch.load(...,
weights_only=True)`` can read it without unpickling code: the model spec travels as a dict and the
model is rebuilt from it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch

from occkd_core.files import atomic_write
from occkd_core.models import FaceNet, ModelSpec, build_model
from occkd_core.preprocess import InputSpec, input_spec_for

CHECKPOINT_FORMAT = 1


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """Save to ``path`` so that it is either complete or absent (:func:`occkd_core.files.atomic_write`). A
    failed write (a full disk) is the OSError that caused it, naming ``path``."""
    with atomic_write(path) as tmp, open(tmp, "wb") as handle:
        try:
            torch.save(obj, handle)
        except RuntimeError as err:
            # torch's zip writer reports a failed write as "[enforce fail ...] unexpected pos"; written through
            # a Python file, the write's own OSError (ENOSPC: no space left) is its context: raise that.
            if isinstance(err.__context__, OSError):
                raise err.__context__ from None
            raise
    return Path(path)


def unwrap(model: torch.nn.Module) -> FaceNet:
    """The FaceNet inside a DistributedDataParallel (or the model itself)."""
    return getattr(model, "module", model)  # type: ignore[return-value]


def save_model_checkpoint(path: Path, model: torch.nn.Module, model_spec: ModelSpec, **extra: Any) -> Path:
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return atomic_torch_save(
        {"format": CHECKPOINT_FORMAT, "model_spec": model_spec.to_dict(), "state_dict": state, **extra}, path
    )


def read_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign file: say which, not a pickle traceback
        raise ValueError(f"checkpoint {str(path)!r} is unreadable or corrupt ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not an occkd checkpoint (format {CHECKPOINT_FORMAT})")
    return payload


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[FaceNet, dict[str, Any]]:
    """Rebuild the model a checkpoint was saved from; returns (model in eval mode, the checkpoint dict)."""
    payload = read_checkpoint(path)
    model = build_model(ModelSpec.from_dict(payload["model_spec"]))
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), payload


def checkpoint_input_spec(payload: Mapping[str, Any], size: int) -> InputSpec:
    """The input normalisation a checkpoint's network was trained with, at input side ``size``: the one
    it records (training writes it: a network started from a MatConvNet file keeps that file's mean for
    life), or, for checkpoints written before it was recorded, its architecture's registry entry, which
    every stage used then."""
    recorded = payload.get("input_spec")
    if recorded is None:
        return input_spec_for(payload["model_spec"]["arch"], size)
    return dataclasses.replace(InputSpec.from_dict(recorded), size=size)
