"""Whole-batch preprocessing on the batch's own device: resize, occlude, normalise, flip (spec §3).

Images stay uint8 NHWC until they reach the device (4× fewer bytes to move); everything after that is
a handful of batched tensor ops, so the same code serves a CPU test and a GPU worker.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from occkd_core.models import get_architecture
from occkd_core.tasks import Visibility, check_name


@dataclass(frozen=True)
class InputSpec:
    """What a network expects: input side and per-channel normalisation in 0..255 pixel units (spec §15 #17)."""

    size: int  # model input side, e.g. 224 (paper) or 32 (smoke)
    mean: tuple[float, float, float]  # RGB, subtracted after occlusion, so hidden pixels become -mean/std
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 2:
            raise ValueError(f"InputSpec.size must be an int >= 2, got {self.size!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 (RGB) values, got mean={self.mean}, std={self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> InputSpec:
        return cls(size=int(values["size"]), mean=tuple(values["mean"]), std=tuple(values.get("std", (1.0, 1.0, 1.0))))


def input_spec_for(arch: str, size: int, mean: tuple[float, float, float] | None = None) -> InputSpec:
    """The :class:`InputSpec` of architecture ``arch`` at input side ``size``: its registry entry's
    normalisation (:data:`occkd_core.models.ARCHITECTURES`), with ``mean`` instead of the registry's when
    given (the mean a pre-trained weights file names, :attr:`occkd_core.pretrained.WeightsFile.input_mean`)."""
    info = get_architecture(arch)
    return InputSpec(size=size, mean=info.mean if mean is None else mean, std=info.std)


def _hidden_rows(visible: Visibility, height: int) -> slice | None:
    """Rows zeroed for ``visible`` faces: the cut is the image midline, row ``height // 2`` (spec §0, §3.2)."""
    check_name("visibility", visible)
    if visible == "lower":
        return slice(0, height // 2)
    if visible == "upper":
        return slice(height // 2, height)
    return None


def occlude(x: torch.Tensor, visible: Visibility) -> torch.Tensor:
    """Copy of ``x`` [B, C, H, W] with the hidden half set to 0 ("full": an unchanged copy)."""
    if x.ndim != 4:
        raise ValueError(f"occlude expects [B, C, H, W], got shape {tuple(x.shape)}")
    out = x.clone()
    rows = _hidden_rows(visible, x.shape[2])
    if rows is not None:
        out[:, :, rows, :] = 0
    return out


def random_flips(batch_size: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """bool [B], each True with p = 0.5; drawn on the CPU so a seed gives the same flips on any device."""
    if generator.device.type != "cpu":
        raise ValueError(f"random_flips needs a CPU torch.Generator, got one on {generator.device}")
    return (torch.rand(batch_size, generator=generator) < 0.5).to(device)


def _resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, H, W, C] -> float32 [B, C', size, size] in 0..255 pixel units (C' = 1 stays grey). May
    keep the input's NHWC strides: :func:`_finish_view` writes the model's layout in the same pass as
    the normalisation."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ValueError(
            f"images must be uint8 [B, H, W, C] with C = 1 or 3, got {images.dtype} of shape {tuple(images.shape)}"
        )
    x = images.permute(0, 3, 1, 2).float()
    height, width = x.shape[2:]
    if (height, width) != (size, size):
        # Grey is resized before it is copied to 3 channels: the same numbers, a third of the work.
        # antialias only when shrinking: upsampling (FER+ 48 -> 224) needs plain bilinear.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=height > size or width > size)
    return x


@functools.lru_cache(maxsize=32)
def _normalisation(spec: InputSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """mean, std (None when all ones: VGG-f and VGG-face only subtract) and the normalised value of a
    black pixel, each [1, 3, 1, 1] float32 on ``device``.

    Cached so a training loop does not copy three numbers to the GPU for every batch.
    """
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    black = (torch.zeros_like(mean) - mean) / std
    return mean, (None if all(s == 1.0 for s in spec.std) else std), black


def _finish_view(x: torch.Tensor, visible: Visibility, spec: InputSpec, flip: torch.Tensor | None,
                 channels_last: bool) -> torch.Tensor:
    mean, std, black = _normalisation(spec, x.device)
    batch, _, height, width = x.shape
    # One pass writes the new tensor in the model's layout, broadcasting grey to 3 channels; x (shared
    # between views) is never written.
    out = torch.empty((batch, 3, height, width), dtype=torch.float32, device=x.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.sub(x.expand(-1, 3, -1, -1), mean, out=out)
    if std is not None:
        out.div_(std)
    rows = _hidden_rows(visible, height)
    if rows is not None:
        # Same as zeroing raw pixels before normalising (spec §3.2 [inferred]), with one pass fewer:
        # the hidden rows get exactly (0 - mean) / std.
        out[:, :, rows, :] = black
    if flip is not None and out.device.type == "cpu":
        # On a CPU copy only the flipped rows (torch.where over the whole batch costs 3x more there).
        rows_to_flip = flip.nonzero().squeeze(1)
        out.index_copy_(0, rows_to_flip, out.index_select(0, rows_to_flip).flip(3))
    elif flip is not None:  # on a GPU, nonzero() would wait for the device; where() does not
        out = torch.where(flip.view(-1, 1, 1, 1), out.flip(3), out).contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return out


def _check_flip(flip: torch.Tensor | None, images: torch.Tensor) -> torch.Tensor | None:
    if flip is None:
        return None
    if flip.dtype != torch.bool or flip.shape != (images.shape[0],):
        raise ValueError(f"flip must be a bool tensor [B] with B = {images.shape[0]}, "
                         f"got {flip.dtype} of shape {tuple(flip.shape)}")
    return flip.to(images.device)


def prepare_batch(images: torch.Tensor, visible: Visibility, spec: InputSpec, flip: torch.Tensor | None = None,
                  channels_last: bool = False) -> torch.Tensor:
    """uint8 images [B, H, W, C] -> float32 network input [B, 3, size, size] on the same device.

    Resize, zero the hidden half (cut at row size // 2 of the resized image), normalise, then flip
    horizontally the rows b where ``flip[b]`` is True.
    """
    return prepare_views(images, (visible,), spec, flip, channels_last)[0]


def prepare_views(images: torch.Tensor, visibles: tuple[Visibility, ...], spec: InputSpec,
                  flip: torch.Tensor | None = None, channels_last: bool = False) -> tuple[torch.Tensor, ...]:
    """One input [B, 3, size, size] per visibility (e.g. teacher "full", student "lower") of the same batch.

    The float conversion and resize are shared; every view gets the same flips, so teacher and
    student see the same image (spec §3.4-3.5).
    """
    flip = _check_flip(flip, images)
    x = _resized(images, spec.size)
    return tuple(_finish_view(x, visible, spec, flip, channels_last) for visible in visibles)


__all__ = ["InputSpec", "input_spec_for", "occlude", "prepare_batch", "prepare_views", "random_flips"]
