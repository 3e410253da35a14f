"""Whole-batch preprocessing: occlusion rows, normalisation of hidden pixels, grey input, flips, resize."""

from __future__ import annotations

import pytest
import torch

from occkd_core.preprocess import InputSpec, input_spec_for, occlude, prepare_batch, prepare_views, random_flips
from occkd_core.models import ARCHITECTURES

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _images(batch: int, height: int, width: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Random uint8 images with no zero pixel, so zeroed rows are told apart from image content."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (batch, height, width, channels), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("height", [8, 7])
def test_occlude_zeroes_exactly_the_hidden_rows(height: int) -> None:
    x = torch.rand(2, 3, height, 5) + 1  # all values >= 1
    cut = height // 2  # 8 -> rows 0-3 | 4-7; 7 -> rows 0-2 | 3-6 (the odd middle row goes with the lower half)
    lower, upper, full = occlude(x, "lower"), occlude(x, "upper"), occlude(x, "full")
    assert torch.all(lower[:, :, :cut] == 0) and torch.equal(lower[:, :, cut:], x[:, :, cut:])
    assert torch.all(upper[:, :, cut:] == 0) and torch.equal(upper[:, :, :cut], x[:, :, :cut])
    assert torch.equal(full, x) and full is not x
    assert torch.all(x >= 1)  # the input was not touched
    with pytest.raises(ValueError, match="valid names: full, lower, upper"):
        occlude(x, "left")  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [6, 7])
def test_hidden_rows_hold_normalised_black(size: int) -> None:
    spec = input_spec_for("resnet50", size)
    images = _images(2, 10, 10)
    full = prepare_batch(images, "full", spec)
    # (0 - mean) / std per channel: 123.675 / 58.395 = 2.1179, 116.28 / 57.12 = 2.0357, 103.53 / 57.375 = 1.8044
    black = torch.tensor([-2.1179, -2.0357, -1.8044]).view(1, 3, 1, 1)
    cut = size // 2
    for visible, hidden, shown in (("lower", slice(0, cut), slice(cut, size)), ("upper", slice(cut, size), slice(0, cut))):
        out = prepare_batch(images, visible, spec)
        assert torch.allclose(out[:, :, hidden], black.expand(2, 3, len(range(size)[hidden]), size), atol=1e-4)
        assert torch.equal(out[:, :, shown], full[:, :, shown])


def test_grey_becomes_three_identical_channels() -> None:
    spec = InputSpec(size=5, mean=(10.0, 10.0, 10.0), std=(2.0, 2.0, 2.0))
    out = prepare_batch(_images(3, 9, 9, channels=1), "upper", spec)
    assert out.shape == (3, 3, 5, 5)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    rgb = prepare_batch(_images(3, 9, 9, channels=1).expand(-1, -1, -1, 3), "upper", spec)
    assert torch.allclose(out, rgb)  # same as a grey image stored as RGB


def test_resize_known_values_and_constant_images() -> None:
    identity = InputSpec(size=2, mean=(0.0, 0.0, 0.0))
    blocks = torch.tensor([[0, 0, 40, 40], [0, 0, 40, 40], [80, 80, 120, 120], [80, 80, 120, 120]], dtype=torch.uint8)
    out = prepare_batch(blocks.view(1, 4, 4, 1), "full", identity)
    # Antialiased 4 -> 2: output pixel 0 is centred at input position 1.0; the triangle filter of
    # half-width 2 weighs input pixels 0, 1, 2 (centres 0.5, 1.5, 2.5) by 0.75, 0.75, 0.25, i.e.
    # w = (3, 3, 1) / 7 per axis. Pixel (0, 0) = w · [[0, 0, 40], [0, 0, 40], [80, 80, 120]] · w
    # = (3/7)(40/7) + (3/7)(40/7) + (1/7)(600/7) = 840 / 49 = 17.1429.
    assert abs(out[0, 0, 0, 0].item() - 840 / 49) < 1e-4
    for size in (3, 20, 224):  # down- and up-sampling keep a constant image constant
        spec = input_spec_for("vggf", size)
        out = prepare_batch(torch.full((2, 48, 48, 3), 200, dtype=torch.uint8), "full", spec)
        expected = torch.tensor([200 - 123.68, 200 - 116.78, 200 - 103.94]).view(1, 3, 1, 1)
        assert torch.allclose(out, expected.expand_as(out), atol=1e-3)


def test_flip_only_selected_rows_and_views_share_it() -> None:
    spec = input_spec_for("vggface", 6)
    images = _images(3, 6, 6)
    flip = torch.tensor([True, False, True])
    plain = prepare_batch(images, "full", spec)
    flipped = prepare_batch(images, "full", spec, flip=flip)
    assert torch.equal(flipped[0], plain[0].flip(-1)) and torch.equal(flipped[2], plain[2].flip(-1))
    assert torch.equal(flipped[1], plain[1])
    full, lower = prepare_views(images, ("full", "lower"), spec, flip=flip)
    assert torch.equal(full, flipped)
    assert torch.equal(lower, prepare_batch(images, "lower", spec, flip=flip))
    with pytest.raises(ValueError, match=r"flip must be a bool tensor \[B\] with B = 3"):
        prepare_batch(images, "full", spec, flip=torch.tensor([1, 0, 1]))


def test_random_flips_are_seeded_bools() -> None:
    first = random_flips(1000, torch.Generator().manual_seed(5), "cpu")
    again = random_flips(1000, torch.Generator().manual_seed(5), "cpu")
    assert first.dtype == torch.bool and first.shape == (1000,)
    assert torch.equal(first, again)
    assert 430 < int(first.sum()) < 570  # Binomial(1000, 0.5): mean 500, sd 15.8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_output_dtype_shape_device_and_layout(device: str, channels_last: bool) -> None:
    spec = input_spec_for("vggf", 16)
    views = prepare_views(_images(4, 12, 12).to(device), ("full", "lower", "upper"), spec, channels_last=channels_last)
    for out in views:
        assert out.dtype == torch.float32 and out.shape == (4, 3, 16, 16) and out.device.type == device
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert out.is_contiguous(memory_format=layout)


def test_input_specs_and_bad_inputs() -> None:
    assert input_spec_for("vggf", 224) == InputSpec(224, (123.68, 116.78, 103.94))
    assert input_spec_for("vggface", 64).mean == (129.19, 104.76, 93.59)
    assert input_spec_for("resnet50", 32).std == (58.395, 57.12, 57.375)
    for arch in ARCHITECTURES:
        spec = input_spec_for(arch, 32)
        assert InputSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="valid names: resnet50, vggf, vggface"):
        input_spec_for("vgg16", 224)
    with pytest.raises(ValueError, match="std values must be positive"):
        InputSpec(32, (0.0, 0.0, 0.0), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="size must be an int >= 2"):
        InputSpec(1, (0.0, 0.0, 0.0))
    spec = input_spec_for("vggf", 8)
    with pytest.raises(ValueError, match="uint8"):
        prepare_batch(torch.zeros(2, 8, 8, 3), "full", spec)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        prepare_batch(torch.zeros(2, 8, 8, 4, dtype=torch.uint8), "full", spec)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU torch.Generator"):
            random_flips(4, torch.Generator(device="cuda"), "cuda")
