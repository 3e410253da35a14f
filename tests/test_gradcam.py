"""Grad-CAM maps and the §13 figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from occkd_core.gradcam import gradcam_maps, save_gradcam_figure
from occkd_core.models import ARCHITECTURES, FaceNet, ModelSpec, build_model


class _HalfGate(nn.Module):
    """Channel 0 keeps only the lower half of the map, channel 1 only the upper half."""

    def forward(self, x: Tensor) -> Tensor:
        gate = torch.zeros_like(x)
        middle = x.shape[2] // 2
        gate[:, 0, middle:] = 1
        gate[:, 1, :middle] = 1
        return x * gate


class HalfNet(FaceNet):
    """Class 0 (or the regressed value) depends only on the lower half, class 1 only on the upper half."""

    def __init__(self, num_outputs: int) -> None:
        super().__init__(ModelSpec("vggf", num_outputs, dropout=False))  # the spec only labels it
        self.features = nn.Sequential(nn.Conv2d(3, 2, kernel_size=1), nn.ReLU(), _HalfGate())
        with torch.no_grad():
            self.features[0].weight.fill_(1.0)  # positive activations for positive pixels
            self.features[0].bias.zero_()
        self.embedding_dim = 2
        self.head = nn.Linear(2, num_outputs)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(2)[:num_outputs])  # class k reads channel k
            self.head.bias.zero_()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_embedding(self, features: Tensor) -> Tensor:
        return torch.amax(features, dim=(2, 3))

    def gradcam_layer(self) -> nn.Module:
        return self.features[-1]


def _images(batch: int = 2, height: int = 40, width: int = 32) -> Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(0)) + 0.1


@pytest.mark.parametrize("num_outputs", [2, 1])
def test_heat_follows_the_half_the_output_depends_on(num_outputs: int) -> None:
    model = HalfNet(num_outputs)
    targets = [0, 0] if num_outputs == 2 else None
    maps = gradcam_maps(model, _images(), targets)
    assert maps.shape == (2, 40, 32) and maps.dtype == np.float32  # [B, H, W], not transposed
    upper, lower = maps[:, :20].sum(), maps[:, 20:].sum()
    assert upper == 0.0 and lower > 0.25 * maps[:, 20:].size  # all heat in the lower half
    if num_outputs == 2:
        flipped = gradcam_maps(model, _images(), [1, 1])
        assert flipped[:, 20:].sum() == 0.0 and flipped[:, :20].sum() > 0  # class 1 looks at the upper half


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_maps_on_every_architecture_and_model_state_is_restored(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch, 8, width_mult=0.125))
    model.train()
    model.head.requires_grad_(False)  # a partly frozen model
    first_layer = model.bn1 if arch == "resnet50" else model.features[0]
    first_layer.eval()  # mixed modes must come back as they were
    first = next(model.parameters())
    first.grad = torch.ones_like(first)
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.inference_mode():  # a caller in inference mode must still get maps
        images = torch.rand(3, 3, 48, 40)
    maps = gradcam_maps(model, images, targets=[0, 3, 7])
    assert maps.shape == (3, 48, 40)
    assert maps.min() >= 0.0 and maps.max() <= 1.0 and np.isfinite(maps).all()
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert torch.equal(first.grad, torch.ones_like(first))
    assert all(p.grad is None for p in list(model.parameters())[1:])


def test_bad_targets_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"2 class indices in \[0, 2\)"):
        gradcam_maps(HalfNet(2), _images(), [0, 2])
    with pytest.raises(ValueError, match="must be None for a regression model"):
        gradcam_maps(HalfNet(1), _images(), [0, 0])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        gradcam_maps(HalfNet(2), torch.rand(2, 40, 32))


def test_figure_is_a_readable_png(tmp_path: Path) -> None:
    images = _images(3, 40, 32)
    occluded = images.clone()
    occluded[:, :, :20] = 0  # upper half hidden (VR headset, spec §0)
    maps = gradcam_maps(HalfNet(2), occluded, [0, 0, 0])
    full_rgb = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)  # [B, H, W, 3] uint8
    occluded_chw = occluded.clamp(0, 1).numpy()  # [B, 3, H, W] floats also accepted
    path = save_gradcam_figure(tmp_path / "figs" / "cam.png", full_rgb, occluded_chw, maps,
                               titles=["a", "b", "c"])
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        width, height = image.size
    assert width > 400 and height > 3 * 100  # 4 panels per row, 3 rows at 100 dpi


def test_figure_rejects_normalised_inputs_and_bad_names(tmp_path: Path) -> None:
    maps = np.zeros((1, 40, 32), dtype=np.float32)
    pixels = np.zeros((1, 40, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="not normalised model inputs"):
        save_gradcam_figure(tmp_path / "x.png", pixels.astype(np.float32) - 120.0, pixels, maps)
    with pytest.raises(ValueError, match="use a .png name"):
        save_gradcam_figure(tmp_path / "x.jpg", pixels, pixels, maps)
    with pytest.raises(ValueError, match="shapes disagree"):
        save_gradcam_figure(tmp_path / "x.png", pixels, pixels, maps[:, :20])
