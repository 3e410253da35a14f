"""Published pre-trained weights load into the right network, from files written here in their exact
formats: MatConvNet simplenn / DagNN `.mat` (imagenet-vgg-f.mat, vgg-face.mat) and torchvision's
ResNet-50 state dict. Nothing is downloaded."""

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F
from torchvision.models import resnet50

from occkd_core.models import ModelSpec, build_model, load_pretrained
from occkd_core.files import file_sha256
from occkd_core.pretrained import PRETRAINED, WeightsFile, get_pretrained, read_matconvnet


def small(arch: str, outputs: int = 8, width: float = 0.125):
    return build_model(ModelSpec(arch, outputs, width))


def _cell(items: list) -> np.ndarray:
    """A MATLAB 1×N cell array."""
    cell = np.empty((1, len(items)), dtype=object)
    for index, item in enumerate(items):
        cell[0, index] = item
    return cell


def _matconvnet_filters(weight: torch.Tensor) -> np.ndarray:
    """torch Cout × Cin × H × W -> MatConvNet H × W × Cin × Cout, single precision."""
    return weight.detach().numpy().transpose(2, 3, 1, 0).astype(np.float32)


def _conv(name: str, weight: torch.Tensor, bias: torch.Tensor, *, old_style: bool = False, **extra) -> dict:
    layer = {"name": name, "type": "conv", "stride": np.array([[1.0, 1.0]]), "pad": np.zeros((1, 4)), **extra}
    filters, biases = _matconvnet_filters(weight), bias.detach().numpy().reshape(1, -1).astype(np.float32)
    if old_style:  # MatConvNet before beta17: separate fields
        layer.update(filters=filters, biases=biases)
    else:
        layer["weights"] = _cell([filters, biases])
    return layer


def write_simplenn(path: Path, model, conv_names: list[str], *, fc_channels: int, mean: list[float],
                   old_style: bool = False, under_net: bool = False) -> None:
    """A simplenn file laid out as MatConvNet ships imagenet-vgg-f.mat / vgg-face.mat: every layer in
    order (conv, relu, lrn, pool), fc6-fc8 as conv layers, softmax, and meta.normalization."""
    state = model.state_dict()
    layers = []
    for index, name in enumerate(conv_names):
        layers.append(_conv(name, state[f"features.{name}.weight"], state[f"features.{name}.bias"],
                            old_style=old_style))
        layers.append({"name": name.replace("conv", "relu"), "type": "relu", "leak": 0.0})
        if name == "conv1" or name == "conv2":
            layers.append({"name": name.replace("conv", "norm"), "type": "lrn",
                           "param": np.array([[5.0, 1.0, 2e-5, 0.75]])})
    last = state[f"features.{conv_names[-1]}.weight"].shape[0]
    layers.append({"name": "pool5", "type": "pool", "method": "max", "pool": np.array([[3.0, 3.0]])})
    # fc6-fc8 are convolutions in MatConvNet (smaller than the real 4096-wide ones, same layout).
    for name, shape in (("fc6", (6, 6, last, fc_channels)), ("fc7", (1, 1, fc_channels, fc_channels)),
                        ("fc8", (1, 1, fc_channels, 1000))):
        weight = torch.randn(shape[3], shape[2], shape[0], shape[1])
        layers.append(_conv(name, weight, torch.zeros(shape[3]), old_style=old_style))
    layers.append({"name": "prob", "type": "softmax"})
    meta = {"normalization": {"imageSize": np.array([[224.0, 224.0, 3.0]]),
                              "averageImage": np.array(mean, dtype=np.float32).reshape(1, 1, 3),
                              "interpolation": "bilinear", "keepAspect": 1.0},
            "classes": {"name": _cell(["n01440764", "n01443537"]), "description": _cell(["tench", "goldfish"])}}
    net = {"layers": _cell(layers), "meta": meta}
    scipy.io.savemat(path, {"net": net} if under_net else net, do_compression=False)


VGGF_CONVS = ["conv1", "conv2", "conv3", "conv4", "conv5"]
VGGFACE_CONVS = [f"conv{b}_{i}" for b, n in enumerate((2, 2, 3, 3, 3), start=1) for i in range(1, n + 1)]


def _assert_same_features(target, source) -> None:
    for key, value in source.state_dict().items():
        if key.startswith("features.") and "conv" in key:
            assert torch.equal(target.state_dict()[key], value), key


def test_imagenet_vgg_f_mat_loads_into_full_width_vggf(tmp_path: Path) -> None:
    source = build_model(ModelSpec("vggf", 8))  # full width: conv1 11×11×3×64 ... conv5 3×3×256×256
    path = tmp_path / "imagenet-vgg-f.mat"
    write_simplenn(path, source, VGGF_CONVS, fc_channels=16, mean=[122.8, 114.8, 101.9])
    target = build_model(ModelSpec("vggf", 8))
    loaded = load_pretrained(target, path)
    assert loaded == [f"features.{n}.{p}" for n in VGGF_CONVS for p in ("weight", "bias")]
    _assert_same_features(target, source)
    target.eval(), source.eval()
    x = torch.rand(2, 3, 64, 64) * 255
    assert torch.allclose(target.forward_features(x), source.forward_features(x))


@pytest.mark.parametrize("old_style, under_net", [(False, False), (True, False), (False, True)])
def test_vgg_face_mat_loads_new_old_and_net_wrapped_layouts(tmp_path: Path, old_style: bool, under_net: bool) -> None:
    source = small("vggface")
    path = tmp_path / "vgg-face.mat"
    write_simplenn(path, source, VGGFACE_CONVS, fc_channels=8, mean=[129.19, 104.76, 93.59],
                   old_style=old_style, under_net=under_net)
    target = small("vggface")
    assert len(load_pretrained(target, path)) == 26  # 13 convs × (weight, bias); fc6-fc8 deleted (spec §4.1)
    _assert_same_features(target, source)


def test_matconvnet_filters_are_correlations_over_rows_then_columns() -> None:
    """vl_nnconv: y(i, j, d'') = b(d'') + Σ f(i', j', d', d'') x(i + i' − 1, j + j' − 1, d'), with i the row
    (height) index. A known 2×3 filter on a ramp image checks the transpose, including H against W."""
    f = np.zeros((2, 3, 1, 1), dtype=np.float32)  # H × W × Cin × Cout
    f[:, :, 0, 0] = [[1, 2, 3], [4, 5, 6]]
    x = np.arange(20, dtype=np.float32).reshape(4, 5)  # rows × columns
    expected = np.array([[sum(f[a, b, 0, 0] * x[i + a, j + b] for a in range(2) for b in range(3))
                          for j in range(3)] for i in range(3)])
    layer = {"name": "conv1", "type": "conv", "weights": _cell([f, np.array([[0.5]], dtype=np.float32)])}
    from occkd_core.pretrained import _simplenn_state  # the conversion itself, without a file

    state = _simplenn_state(_cell([_as_struct(layer)]))
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


def test_dagnn_mat_loads(tmp_path: Path) -> None:
    source = small("vggf")
    state = source.state_dict()
    layers, params = [], []
    for name in VGGF_CONVS:
        layers.append({"name": name, "type": "dagnn.Conv", "inputs": _cell(["x"]), "outputs": _cell(["y"]),
                       "params": _cell([f"{name}f", f"{name}b"]), "block": {"size": np.zeros((1, 4))}})
        params.append({"name": f"{name}f", "value": _matconvnet_filters(state[f"features.{name}.weight"])})
        params.append({"name": f"{name}b", "value": state[f"features.{name}.bias"].numpy().reshape(-1, 1)})
        layers.append({"name": name.replace("conv", "relu"), "type": "dagnn.ReLU", "inputs": _cell(["y"]),
                       "outputs": _cell(["z"]), "params": _cell([]), "block": {"leak": 0.0}})
    path = tmp_path / "vggf-dag.mat"
    struct_array = lambda items: np.array([tuple(i.values()) for i in items],  # noqa: E731
                                          dtype=[(k, object) for k in items[0]]).reshape(1, -1)
    scipy.io.savemat(path, {"layers": struct_array(layers), "params": struct_array(params),
                            "vars": struct_array([{"name": "x", "precious": 0}])})
    target = small("vggf")
    load_pretrained(target, path)
    _assert_same_features(target, source)


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
    face = tmp_path / "vgg-face.mat"
    write_simplenn(face, small("vggface"), VGGFACE_CONVS, fc_channels=8, mean=[129.19, 104.76, 93.59])
    with pytest.raises(ValueError, match=r"looks like vggface \(width_mult ≈ 0.125\)"):
        load_pretrained(small("vggf"), face)
    vggf = tmp_path / "imagenet-vgg-f.mat"
    write_simplenn(vggf, small("vggf"), VGGF_CONVS, fc_channels=8, mean=[122.8, 114.8, 101.9])
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
