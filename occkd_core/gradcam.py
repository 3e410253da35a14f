"""Grad-CAM maps on occluded faces and the figure of spec §13, through the ``grad-cam`` package.

The target layer is each network's last conv block (:meth:`FaceNet.gradcam_layer`, spec §15 #31).
For classification the target is a class logit (by default the predicted class); for age it is the
single regression output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from occkd_core.models import FaceNet
from occkd_core.preprocess import InputSpec


class _LogitsOnly(nn.Module):
    """GradCAM expects ``model(x)`` to be the outputs; FaceNet returns (logits, embedding)."""

    def __init__(self, net: FaceNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[0]


def gradcam_maps(model: FaceNet, inputs: Tensor, targets: Sequence[int] | None = None) -> np.ndarray:
    """Grad-CAM heat maps ``[B, H, W]`` in [0, 1] for prepared images ``[B, 3, H, W]`` (Selvaraju et al. 2017).

    ``targets``: one class per image (default: the predicted class); must be None for regression,
    where the map explains the scalar output. The model's train/eval modes, ``requires_grad`` flags
    and ``.grad`` tensors are restored afterwards (it runs in eval mode, so dropout is off).
    """
    if inputs.dim() != 4 or inputs.shape[1] != 3:
        raise ValueError(f"inputs must be prepared images [B, 3, H, W], got shape {tuple(inputs.shape)}")
    batch = inputs.shape[0]
    if model.num_outputs == 1:
        if targets is not None:
            raise ValueError("targets must be None for a regression model: the map explains its single output")
        cam_targets = [ClassifierOutputTarget(0) for _ in range(batch)]  # output 0 is the regressed value
    elif targets is None:
        cam_targets = None  # GradCAM picks each image's predicted class
    else:
        targets = [int(t) for t in targets]
        if len(targets) != batch or not all(0 <= t < model.num_outputs for t in targets):
            raise ValueError(f"targets must hold {batch} class indices in [0, {model.num_outputs}), got {targets}")
        cam_targets = [ClassifierOutputTarget(t) for t in targets]

    modes = {module: module.training for module in model.modules()}
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    # Frozen parameters and a gradient on the input instead: the target layer's output still gets its
    # gradient, no parameter .grad is written, and a frozen teacher works as well as a trainable student.
    for p in params:
        p.requires_grad_(False)
    cam = GradCAM(model=_LogitsOnly(model), target_layers=[model.gradcam_layer()])
    try:
        with torch.enable_grad():
            # clone: an inference-mode tensor cannot enter autograd
            maps = cam(input_tensor=inputs.detach().clone().requires_grad_(True), targets=cam_targets)
    finally:
        cam.activations_and_grads.release()  # not `with GradCAM(...)`: its __exit__ swallows IndexError
        for module, training in modes.items():
            module.train(training)
        for p, (requires_grad, grad) in zip(params, saved):
            p.requires_grad_(requires_grad)
            p.grad = grad
    return np.clip(np.asarray(maps, dtype=np.float32), 0.0, 1.0)


def save_gradcam_figure(
    path: Path,
    full_images: np.ndarray,
    occluded_images: np.ndarray,
    maps: np.ndarray,
    titles: Sequence[str] | None = None,
) -> Path:
    """One row per face: full image / occluded image / heat map / heat map over the occluded image (spec §13).

    Images are displayable pixels ``[B, H, W, 3]`` (or ``[B, 3, H, W]``, or greyscale ``[B, H, W]``), uint8 or
    floats in [0, 1], not the mean-subtracted model inputs; ``maps`` are ``[B, H, W]`` in [0, 1]. Writes a PNG.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_gradcam_figure writes PNG files; got {str(path)!r}, use a .png name")
    full = _as_rgb01(full_images, "full_images")
    occluded = _as_rgb01(occluded_images, "occluded_images")
    maps = np.asarray(maps, dtype=np.float32)
    if full.shape != occluded.shape or maps.shape != full.shape[:3]:
        raise ValueError(f"shapes disagree: full {full.shape}, occluded {occluded.shape}, maps {maps.shape} "
                         f"(need [B, H, W, 3], [B, H, W, 3], [B, H, W])")
    if maps.size and (np.nanmin(maps) < 0 or np.nanmax(maps) > 1):
        raise ValueError(f"maps must lie in [0, 1] (gradcam_maps output), got [{maps.min()}, {maps.max()}]")
    if titles is not None and len(titles) != len(full):
        raise ValueError(f"titles must hold one string per row ({len(full)}), got {len(titles)}")

    num_rows = len(full)
    figure = Figure(figsize=(8, 2.1 * max(num_rows, 1)), layout="constrained")
    FigureCanvasAgg(figure)  # no pyplot: no global backend switch, no open figures left behind
    axes = figure.subplots(max(num_rows, 1), 4, squeeze=False)
    for row in range(num_rows):
        overlay = show_cam_on_image(occluded[row], maps[row], use_rgb=True)
        panels = (full[row], occluded[row], maps[row], overlay)
        for col, (panel, heading) in enumerate(zip(panels, ("full", "occluded", "Grad-CAM", "overlay"))):
            ax = axes[row, col]
            if col == 2:
                ax.imshow(panel, cmap="jet", vmin=0.0, vmax=1.0)
            else:
                ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(heading)
        if titles is not None:
            axes[row, 0].set_ylabel(titles[row])
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path


def _as_rgb01(images: np.ndarray, name: str) -> np.ndarray:
    """``[B, H, W, 3]`` float32 in [0, 1] from HWC / CHW / greyscale, uint8 or [0, 1] floats."""
    array = np.asarray(images)
    if array.ndim == 3:
        array = np.repeat(array[..., None], 3, axis=-1)
    elif array.ndim == 4 and array.shape[1] == 3 and array.shape[-1] != 3:
        array = array.transpose(0, 2, 3, 1)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"{name} must be [B, H, W, 3], [B, 3, H, W] or [B, H, W], got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if array.size and (array.min() < 0 or array.max() > 1):
        raise ValueError(f"{name} must be uint8 or floats in [0, 1] (displayable pixels, not normalised model "
                         f"inputs), got values in [{array.min():.3g}, {array.max():.3g}]")
    return array


def save_split_gradcam(path: Path, model: FaceNet, images: np.ndarray, visible: str, input_spec: InputSpec,
                       titles: Sequence[str] | None = None) -> Path:
    """The spec §13 figure for a few faces of a split: ``images`` uint8 ``[B, H, W, C]`` as stored; the model
    sees them resized and occluded (``visible``) exactly as in evaluation."""
    from occkd_core.preprocess import prepare_batch

    batch = torch.from_numpy(np.ascontiguousarray(images))
    device = next(model.parameters()).device
    inputs = prepare_batch(batch.to(device), visible, input_spec)
    pixels = InputSpec(size=input_spec.size, mean=(0.0, 0.0, 0.0))  # same resize, no normalisation: displayable
    full = prepare_batch(batch, "full", pixels).clamp(0, 255) / 255.0
    occluded = prepare_batch(batch, visible, pixels).clamp(0, 255) / 255.0
    maps = gradcam_maps(model, inputs)
    return save_gradcam_figure(path, full.numpy(), occluded.numpy(), maps, titles)
