"""Published pre-trained weights load into the right network, from files written here in their exact
formats: MatConvNet simplenn / DagNN `.mat` (imagenet-vgg-f.mat, vgg-face.mat) and torchvision's
ResNet-50 state dict. The VGG-f files carry the published file's layer list (tests/published_files.py),
never occkd's own settings. Nothing is downloaded."""

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F
from torchvision.models import resnet50

from occkd_core.files import file_sha256
from occkd_core.loading import load_pretrained
from occkd_core.models import ModelSpec, build_model
from occkd_core.pretrained import PRETRAINED, WeightsFile, get_pretrained, read_matconvnet, weights_input_mean
from published_files import cell, mean_image, vgg_f_layers, write_dagnn, write_simplenn


def small(arch: str, outputs: int = 8, width: float = 0.125):
    return build_model(ModelSpec(arch, outputs, width))


# -- MatConvNet's layers, run as MatConvNet defines them ------------------------------------------------

def matconvnet_forward(layers: list[dict], x: torch.Tensor, until: str) -> torch.Tensor:
    """Run a simplenn layer list up to layer ``until`` as MatConvNet's documentation defines each layer,
    written from those definitions and not from occkd's network: conv (vl_nnconv) and pool (vl_nnpool)
    pad with zeros by [top bottom left right] and round down; LRN (vl_nnnormalize) is
    y_k = x_k / (kappa + alpha · Σ_{q ∈ Q(k)} x_q²)^beta with Q(k) = [k - floor((N-1)/2), k + ceil((N-1)/2)]."""
    for layer in layers:
        kind = layer["type"]
        if kind in ("conv", "pool"):
            top, bottom, left, right = (int(v) for v in layer["pad"])
            x = F.pad(x, (left, right, top, bottom))
        if kind == "conv":
            weight = torch.from_numpy(layer["filters"].transpose(3, 2, 0, 1).copy())
            x = F.conv2d(x, weight, torch.from_numpy(layer["biases"].reshape(-1)), stride=tuple(layer["stride"]))
        elif kind == "relu":
            x = x.clamp(min=0)
        elif kind == "pool":
            x = F.max_pool2d(x, tuple(layer["pool"]), stride=tuple(layer["stride"]))
        elif kind == "lrn":
            size, kappa, alpha, beta = layer["param"]
            size = int(size)
            squares, channels = x ** 2, x.shape[1]
            sums = torch.stack([squares[:, max(0, k - (size - 1) // 2): min(channels, k + size // 2 + 1)].sum(1)
                                for k in range(channels)], dim=1)
            x = x / (kappa + alpha * sums) ** beta
        if layer["name"] == until:
            return x
    raise ValueError(f"no layer {until}")


@pytest.mark.parametrize("size", [224, 64, 40])
def test_imagenet_vgg_f_mat_is_the_network_occkd_builds(tmp_path: Path, size: int) -> None:
    """The published layer list, random weights, full width: the loaded VGG-f computes what MatConvNet
    computes with that file, through LRN, both pools and conv5 (at 40 px pool2's [0 1 0 1] padding
    changes the map size: 4 rows give 2 outputs, 1 without it)."""
    layers = vgg_f_layers(seed=1)
    path = write_simplenn(tmp_path / "imagenet-vgg-f.mat", layers, mean_image((122.5, 114.25, 101.75)))
    model = build_model(ModelSpec("vggf", 8)).eval()  # full width: conv1 11×11×3×64 ... conv5 3×3×256×256
    loaded = load_pretrained(model, path)
    assert loaded == [f"features.conv{i}.{p}" for i in range(1, 6) for p in ("weight", "bias")]
    x = torch.rand(2, 3, size, size) * 255 - 120
    with torch.no_grad():
        expected = matconvnet_forward(layers, x, until="relu5")
        torch.testing.assert_close(model.forward_features(x), expected, rtol=1e-4, atol=1e-4)
    if size == 40:
        assert expected.shape[2:] == (2, 2)


@pytest.mark.parametrize("layout", ["old_style", "under_net", "dagnn"])
def test_other_matconvnet_layouts_load_and_are_checked(tmp_path: Path, layout: str) -> None:
    layers = vgg_f_layers(seed=2, width=0.125)
    path = tmp_path / "vggf.mat"
    if layout == "dagnn":
        write_dagnn(path, layers, None)
    else:
        write_simplenn(path, layers, None, **{layout: True})
    model = small("vggf").eval()
    load_pretrained(model, path)
    x = torch.rand(1, 3, 48, 48) * 255
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), matconvnet_forward(layers, x, "relu5"),
                                   rtol=1e-4, atol=1e-4)
    # a changed LRN is caught in every layout
    changed = vgg_f_layers(seed=2, width=0.125, changes={"norm2": {"param": [5, 1, 0.00002, 0.75]}})
    if layout == "dagnn":
        write_dagnn(path, changed, None)
    else:
        write_simplenn(path, changed, None, **{layout: True})
    with pytest.raises(ValueError, match=r"norm2 \(lrn\) param: file \[5 1 2e-05 0.75\], network \[5 2 0.0001 0.75\]"):
        load_pretrained(small("vggf"), path)


@pytest.mark.parametrize("layer, change, message", [
    # MatConvNet's default LRN, the setting of its from-scratch scripts (the value occkd used to build)
    ("norm1", {"param": [5, 1, 0.00002, 0.75]},
     r"norm1 \(lrn\) param: file \[5 1 2e-05 0.75\], network \[5 2 0.0001 0.75\]"),
    ("pool2", {"stride": [1, 1]}, r"pool2 \(pool\) stride: file \[1 1\], network \[2 2\]"),
    ("pool1", {"pad": [0, 0, 0, 0]}, r"pool1 \(pool\) pad: file \[0 0 0 0\], network \[0 1 0 1\]"),
    ("conv3", {"pad": [0, 0, 0, 0]}, r"conv3 \(conv\) pad: file \[0 0 0 0\], network \[1 1 1 1\]"),
    ("conv1", {"stride": [2, 2]}, r"conv1 \(conv\) stride: file \[2 2\], network \[4 4\]"),
    ("norm2", {"type": "relu"}, r"norm2: a relu layer in the file, a lrn layer in the network"),
    ("norm1", {"name": "lrn1"}, r"norm1: not in the file \(the network has a lrn layer there\)"),
])
def test_a_file_whose_layers_differ_is_refused_naming_the_layer(tmp_path: Path, layer: str, change: dict,
                                                                message: str) -> None:
    path = write_simplenn(tmp_path / "vggf.mat", vgg_f_layers(width=0.125, changes={layer: change}), None)
    model = small("vggf")
    before = model.features.conv1.weight.clone()
    with pytest.raises(ValueError, match=message) as info:
        load_pretrained(model, path)
    assert "the file's network differs from the one occkd builds" in str(info.value)
    assert "imagenet-vgg-f.mat" in str(info.value)  # what to use instead
    assert torch.equal(model.features.conv1.weight, before)  # nothing was loaded


def test_an_lrn_after_its_pool_is_another_network(tmp_path: Path) -> None:
    layers = vgg_f_layers(width=0.125)
    layers[2], layers[3] = layers[3], layers[2]  # conv1 relu1 pool1 norm1, as in Caffe's AlexNet
    path = write_simplenn(tmp_path / "vggf.mat", layers, None)
    with pytest.raises(ValueError, match=r"layer order: file \['conv1', 'relu1', 'pool1', 'norm1'"):
        load_pretrained(small("vggf"), path)


def test_missing_fields_take_matconvnet_defaults(tmp_path: Path) -> None:
    """vl_simplenn_tidy fills what a layer leaves out: an LRN without param is [5 1 0.0001/5 0.75], not
    the published one; a conv without pad has none."""
    layers = vgg_f_layers(width=0.125)
    del layers[2]["param"]
    path = write_simplenn(tmp_path / "vggf.mat", layers, None)
    with pytest.raises(ValueError, match=r"norm1 \(lrn\) param: file \[5 1 2e-05 0.75\]"):
        load_pretrained(small("vggf"), path)
    layers = vgg_f_layers(width=0.125)
    del layers[4]["pad"]
    write_simplenn(path, layers, None)
    with pytest.raises(ValueError, match=r"conv2 \(conv\) pad: file \[0 0 0 0\], network \[2 2 2 2\]"):
        load_pretrained(small("vggf"), path)
    layers = vgg_f_layers(width=0.125, changes={"conv2": {"pad": 2}, "pool1": {"stride": 2}})  # scalars
    write_simplenn(path, layers, None)
    load_pretrained(small("vggf"), path)


# -- the input mean ---------------------------------------------------------------------------------------

def test_the_mean_image_becomes_its_per_channel_mean(tmp_path: Path) -> None:
    # each channel of the 224×224 image is a ramp symmetric about its value: the channel means, exactly
    path = write_simplenn(tmp_path / "imagenet-vgg-f.mat", vgg_f_layers(width=0.125),
                          mean_image((122.5, 114.25, 101.75)))
    assert weights_input_mean(path) == pytest.approx((122.5, 114.25, 101.75), abs=1e-4)
    assert read_matconvnet(path).input_mean == pytest.approx((122.5, 114.25, 101.75), abs=1e-4)
    found = WeightsFile.locate("vggf_imagenet", path)  # recorded beside the file's sha256
    assert found.input_mean == pytest.approx((122.5, 114.25, 101.75), abs=1e-4)
    assert found.sha256 == file_sha256(path)
    # vgg-face.mat stores one value per channel (1 × 1 × 3); a wrapped net is read the same
    triple = np.array([129.1863, 104.7624, 93.5940], dtype=np.float32).reshape(1, 1, 3)
    write_simplenn(path, vgg_f_layers(width=0.125), triple, under_net=True)
    assert weights_input_mean(path) == pytest.approx((129.1863, 104.7624, 93.5940), abs=1e-4)
    write_dagnn(path, vgg_f_layers(width=0.125), triple)
    assert weights_input_mean(path) == pytest.approx((129.1863, 104.7624, 93.5940), abs=1e-4)
    # no mean in the file (an empty averageImage), and torch files, which name none
    write_simplenn(path, vgg_f_layers(width=0.125), None)
    assert weights_input_mean(path) is None
    torch.save(small("vggf").state_dict(), tmp_path / "w.pt")
    assert weights_input_mean(tmp_path / "w.pt") is None and WeightsFile.locate("vggf_imagenet",
                                                                                tmp_path / "w.pt").input_mean is None
    write_simplenn(path, vgg_f_layers(width=0.125), np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"averageImage of shape \(4, 4\) is neither"):
        weights_input_mean(path)


# -- weights ------------------------------------------------------------------------------------------------

VGGFACE_CONVS = [f"conv{b}_{i}" for b, n in enumerate((2, 2, 3, 3, 3), start=1) for i in range(1, n + 1)]


def vgg_face_layers(model) -> list[dict]:
    """vgg-face.mat's layout (convs 3×3 padded by 1, a 2×2/2 pool after each block, fc6-fc8 as convs,
    softmax), holding ``model``'s conv weights. VGG-face files' layer settings are not checked (see
    VGGFace), so only the weights matter here."""
    state, layers = model.state_dict(), []
    for name in VGGFACE_CONVS:
        weight = state[f"features.{name}.weight"]
        layers.append({"name": name, "type": "conv", "pad": [1, 1, 1, 1], "stride": [1, 1],
                       "filters": weight.numpy().transpose(2, 3, 1, 0).astype(np.float32),
                       "biases": state[f"features.{name}.bias"].numpy().reshape(1, -1).astype(np.float32)})
        layers.append({"name": name.replace("conv", "relu"), "type": "relu", "leak": 0})
        if name.endswith(("1_2", "2_2", "3_3", "4_3", "5_3")):
            layers.append({"name": f"pool{name[4]}", "type": "pool", "method": "max", "pool": [2, 2],
                           "stride": [2, 2], "pad": [0, 0, 0, 0]})
    width = layers[-3]["filters"].shape[3]  # conv5_3, relu5_3, pool5
    for name, shape in (("fc6", (7, 7, width, 8)), ("fc7", (1, 1, 8, 8)), ("fc8", (1, 1, 8, 10))):
        layers.append({"name": name, "type": "conv", "pad": [0, 0, 0, 0], "stride": [1, 1],
                       "filters": np.ones(shape, dtype=np.float32), "biases": np.zeros((1, shape[3]), np.float32)})
    return [*layers, {"name": "prob", "type": "softmax"}]


@pytest.mark.parametrize("old_style, under_net", [(False, False), (True, False), (False, True)])
def test_vgg_face_mat_loads_new_old_and_net_wrapped_layouts(tmp_path: Path, old_style: bool, under_net: bool) -> None:
    source = small("vggface")
    path = write_simplenn(tmp_path / "vgg-face.mat", vgg_face_layers(source),
                          np.array([[[129.19, 104.76, 93.59]]], dtype=np.float32), old_style=old_style,
                          under_net=under_net)
    target = small("vggface")
    assert len(load_pretrained(target, path)) == 26  # 13 convs × (weight, bias); fc6-fc8 deleted (spec §4.1)
    for key, value in source.state_dict().items():
        if key.startswith("features.conv"):
            assert torch.equal(target.state_dict()[key], value), key


def test_matconvnet_filters_are_correlations_over_rows_then_columns() -> None:
    """vl_nnconv: y(i, j, d'') = b(d'') + Σ f(i', j', d', d'') x(i + i' − 1, j + j' − 1, d'), with i the row
    (height) index. A known 2×3 filter on a ramp image checks the transpose, including H against W."""
    f = np.zeros((2, 3, 1, 1), dtype=np.float32)  # H × W × Cin × Cout
    f[:, :, 0, 0] = [[1, 2, 3], [4, 5, 6]]
    x = np.arange(20, dtype=np.float32).reshape(4, 5)  # rows × columns
    expected = np.array([[sum(f[a, b, 0, 0] * x[i + a, j + b] for a in range(2) for b in range(3))
                          for j in range(3)] for i in range(3)])
    layer = {"name": "conv1", "type": "conv", "weights": cell([f, np.array([[0.5]], dtype=np.float32)])}
    from occkd_core.matconvnet import _simplenn_state  # the conversion itself, without a file

    state = _simplenn_state(cell([_as_struct(layer)]))
    y = F.conv2d(torch.from_numpy(x)[None, None], state["conv1.weight"], state["conv1.bias"])
    assert torch.allclose(y[0, 0], torch.from_numpy(expected) + 0.5)


def _as_struct(fields: dict):
    """A dict as scipy's mat_struct (what loadmat returns with struct_as_record=False)."""
    from scipy.io.matlab import mat_struct

    struct = mat_struct()
    struct._fieldnames = list(fields)
    for key, value in fields.items():
        setattr(struct, key, value)
    return struct


def test_torchvision_resnet50_state_dict_loads_with_a_new_head(tmp_path: Path) -> None:
    """torchvision's resnet50-0676ba61.pth is a plain state dict of ``resnet50()`` (fc: 1000 ImageNet classes)."""
    torchvision_model = resnet50(weights=None)
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(torchvision_model.state_dict(), path)
    target = build_model(ModelSpec("resnet50", 2))
    head = target.head.weight.clone()
    loaded = load_pretrained(target, path)
    assert not any(k.startswith("head.") for k in loaded)
    assert torch.equal(target.head.weight, head)  # the task head is new (2 genders, not 1000 classes)
    assert torch.equal(target.layer4[2].conv3.weight, torchvision_model.layer4[2].conv3.weight)
    assert torch.equal(target.bn1.running_mean, torchvision_model.bn1.running_mean)


def test_a_wrong_published_file_names_what_it_looks_like(tmp_path: Path) -> None:
    face = write_simplenn(tmp_path / "vgg-face.mat", vgg_face_layers(small("vggface")), None)
    with pytest.raises(ValueError, match=r"looks like vggface \(width_mult ≈ 0.125\)"):
        load_pretrained(small("vggf"), face)
    vggf = write_simplenn(tmp_path / "imagenet-vgg-f.mat", vgg_f_layers(width=0.125), None)
    with pytest.raises(ValueError, match=r"looks like vggf \(width_mult ≈ 0.125\)"):
        load_pretrained(small("vggface"), vggf)
    with pytest.raises(ValueError, match=r"looks like vggf"):
        load_pretrained(small("resnet50"), vggf)
    # the right file at the wrong width: every conv's shape is named
    with pytest.raises(ValueError, match=r"shape mismatch \(10\): features.conv1.weight: file \(8, 3, 11, 11\)"):
        load_pretrained(build_model(ModelSpec("vggf", 8, 0.25)), vggf)


def test_matlab_files_that_are_not_networks_say_so(tmp_path: Path) -> None:
    scipy.io.savemat(tmp_path / "other.mat", {"images": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="without a MatConvNet network"):
        read_matconvnet(tmp_path / "other.mat")
    (tmp_path / "v73.mat").write_bytes(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: x HDF5 schema 1.00 ."
                                       + b"\0" * 200)
    with pytest.raises(ValueError, match="v7.3|cannot read"):
        read_matconvnet(tmp_path / "v73.mat")
    (tmp_path / "text.mat").write_text("not matlab")
    with pytest.raises(ValueError, match="cannot read"):
        load_pretrained(small("vggf"), tmp_path / "text.mat")


def test_weights_registry_and_files(tmp_path: Path) -> None:
    assert {w.arch for w in PRETRAINED.values()} == {"vggf", "vggface", "resnet50"}
    with pytest.raises(ValueError, match="valid names: resnet50_imagenet, vggf_imagenet, vggface"):
        get_pretrained("vgg16")
    path = tmp_path / "w.pt"
    path.write_bytes(b"abc")
    found = WeightsFile.locate("vggface", path)
    # sha256("abc"), FIPS 180-2 appendix B.1
    assert found.sha256 == file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert found.path == str(path.resolve())
    with pytest.raises(FileNotFoundError, match="is a folder"):
        WeightsFile.locate("vggface", tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a regular file"):
        WeightsFile.locate("vggface", "/dev/null")
