"""Shapes, dropout, head init and pre-trained loading of the three networks (spec §4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import resnet50

from occkd_core.loading import load_pretrained
from occkd_core.models import ARCHITECTURES, FaceNet, ModelSpec, build_model

#: Embedding width at width_mult 0.125: VGG-f 256·0.125, VGG-face 512·0.125, ResNet-50 4·round(512·0.125).
SMALL_DIMS = {"vggf": 32, "vggface": 64, "resnet50": 256}


def small(arch: str, num_outputs: int = 8, **kwargs: object) -> FaceNet:
    return build_model(ModelSpec(arch, num_outputs, width_mult=0.125, **kwargs))


def test_registry_covers_every_architecture() -> None:
    from occkd_core.models import get_architecture

    assert list(ARCHITECTURES) == ["vggf", "vggface", "resnet50"]
    assert all(isinstance(build_model(ModelSpec(name, 2, 0.125)), info.model) for name, info in ARCHITECTURES.items())
    with pytest.raises(ValueError, match="unknown architecture 'vgg19'; valid names: resnet50, vggf, vggface"):
        get_architecture("vgg19")


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("num_outputs", [8, 2, 1])
@pytest.mark.parametrize("size", [32, 64])
def test_logits_and_embedding_shapes(arch: str, num_outputs: int, size: int) -> None:
    model = small(arch, num_outputs).eval()
    seen: list[torch.Tensor] = []
    model.gradcam_layer().register_forward_hook(lambda module, inputs, output: seen.append(output))
    with torch.no_grad():
        logits, embedding = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, num_outputs)
    assert embedding.shape == (2, SMALL_DIMS[arch]) == (2, model.embedding_dim)
    (features,) = seen  # the Grad-CAM layer's output is the feature map, produced once per forward
    assert features.shape[:2] == (2, model.embedding_dim) and min(features.shape[2:]) >= 1
    # forward() is the stages chained: features -> embedding -> head
    torch.testing.assert_close(model.forward_embedding(features), embedding)
    torch.testing.assert_close(model.forward_head(embedding), logits)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("size", [48, 112, 224])
def test_other_input_sizes_keep_a_spatial_map(arch: str, size: int) -> None:
    model = small(arch).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, size, size))
    assert min(features.shape[2:]) >= 1


def test_feature_map_sizes_match_the_papers_geometry() -> None:
    # VGG-f at 224: conv1 (224-11)//4+1 = 54, pool1 ceil((54-3)/2)+1 = 27, pool2 ceil((27-3)/2)+1 = 13:
    # conv5 is 13x13 as in MatConvNet (spec §4.2). VGG-face: 224 / 2^4 = 14 (conv5_3). ResNet-50: 224 / 32 = 7.
    expected = {"vggf": 13, "vggface": 14, "resnet50": 7}
    for arch, side in expected.items():
        with torch.no_grad():
            features = small(arch).eval().forward_features(torch.randn(1, 3, 224, 224))
        assert features.shape[2:] == (side, side), arch


def test_embedding_is_global_max_for_vgg_and_mean_for_resnet() -> None:
    # one channel with map [[1, 4], [2, -3]]: max 4 (spec §15 #8), mean (1 + 4 + 2 - 3) / 4 = 1 (spec §4.3)
    features = torch.tensor([[[[1.0, 4.0], [2.0, -3.0]]]])
    assert small("vggf").forward_embedding(features).tolist() == [[4.0]]
    assert small("vggface").forward_embedding(features).tolist() == [[4.0]]
    assert small("resnet50").forward_embedding(features).tolist() == [[1.0]]


def test_vggf_layer_order() -> None:
    names = [name for name, _ in small("vggf").features.named_children()]
    assert names == ["conv1", "relu1", "norm1", "pool1", "conv2", "relu2", "norm2", "pool2",
                     "conv3", "relu3", "drop3", "conv4", "relu4", "drop4", "conv5", "relu5", "drop5"]


def test_vggf_lrn_is_caffes_cnn_f_lrn_computed_by_hand() -> None:
    """Caffe's LRN (CNN_F: local_size 5, alpha 0.0005, beta 0.75, k 2): y_c = x_c / (k + alpha/5 · Σ x²)^beta,
    the sum over channels c-2 .. c+2 that exist. MatConvNet's [5 2 0.0001 0.75] is the same formula with
    alpha/5 written out."""
    x = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0]).view(1, 7, 1, 1)
    norm1, norm2 = small("vggf").features.norm1, small("vggf").features.norm2
    y = norm1(x).view(-1)
    # c = 0: channels 0..2, Σ x² = 100 + 400 + 900 = 1400; 0.0005 / 5 · 1400 = 0.14
    assert y[0].item() == pytest.approx(10 / (2 + 0.14) ** 0.75, rel=1e-6)
    # c = 3: channels 1..5, Σ x² = 400 + 900 + 1600 + 2500 + 3600 = 9000 -> 0.9
    assert y[3].item() == pytest.approx(40 / (2 + 0.9) ** 0.75, rel=1e-6)
    values = x.view(-1).tolist()
    by_hand = [v / (2 + 0.0005 / 5 * sum(u * u for u in values[max(0, c - 2): c + 3])) ** 0.75
               for c, v in enumerate(values)]
    assert y.tolist() == pytest.approx(by_hand, rel=1e-6)
    assert norm2(x).view(-1).tolist() == pytest.approx(by_hand, rel=1e-6)


def test_full_width_networks() -> None:
    vggf = build_model(ModelSpec("vggf", 8)).eval()
    res = build_model(ModelSpec("resnet50", 2)).eval()
    vggface = build_model(ModelSpec("vggface", 8))
    with torch.no_grad():
        assert vggf(torch.randn(1, 3, 224, 224))[1].shape == (1, 256)
        assert res(torch.randn(1, 3, 64, 64))[1].shape == (1, 2048)
    assert (vggf.embedding_dim, vggface.embedding_dim, res.embedding_dim) == (256, 512, 2048)
    # 13 convs 3x3: [64,64][128,128][256,256,256][512,512,512][512,512,512] (spec §4.1)
    widths = [m.out_channels for m in vggface.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def test_input_too_small_or_wrong_channels_is_rejected() -> None:
    model = small("vggf")
    with pytest.raises(ValueError, match="at least 32x32"):
        model(torch.randn(1, 3, 31, 40))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\].*\(1, 1, 32, 32\)"):
        model(torch.randn(1, 1, 32, 32))


def test_dropout_layers_and_rates() -> None:
    vggface = small("vggface")
    rates = [(name, m.p) for name, m in vggface.features.named_children() if isinstance(m, nn.Dropout)]
    assert rates == [("drop4_1", 0.30), ("drop4_2", 0.35), ("drop4_3", 0.40),
                     ("drop5_1", 0.45), ("drop5_2", 0.50), ("drop5_3", 0.55)]
    names = list(dict(vggface.features.named_children()))
    assert names.index("drop4_1") == names.index("relu4_1") + 1  # after the ReLU (spec §4.1)
    vggf = small("vggf")
    rates = [(name, m.p) for name, m in vggf.features.named_children() if isinstance(m, nn.Dropout)]
    assert rates == [("drop3", 0.2), ("drop4", 0.2), ("drop5", 0.2)]
    for arch in ARCHITECTURES:
        model = small(arch, dropout=False)
        assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    assert not any(isinstance(m, nn.Dropout) for m in small("resnet50").modules())


def test_dropout_off_keeps_the_parameter_keys() -> None:
    with_dropout, without = small("vggface").state_dict(), small("vggface", dropout=False).state_dict()
    assert list(with_dropout) == list(without)


@pytest.mark.parametrize("arch", ["vggf", "vggface"])
def test_vgg_head_init_is_gaussian_std_0_1(arch: str) -> None:
    torch.manual_seed(0)
    # 64 x 256 = 16,384 draws: the sample std of N(0, 0.1²) is 0.1 ± 0.1/sqrt(2·16384) ≈ ±0.0006
    head = build_model(ModelSpec(arch, 64, width_mult=1.0 if arch == "vggf" else 0.5)).head
    assert head.weight.std().item() == pytest.approx(0.1, abs=0.003)
    assert head.weight.mean().item() == pytest.approx(0.0, abs=0.003)
    assert torch.count_nonzero(head.bias) == 0


def test_dsd_sparsities() -> None:
    vggface = small("vggface").dsd_sparsities()
    assert list(vggface) == [f"features.conv{n}.weight" for n in
                             ("1_2", "2_1", "2_2", "3_1", "3_2", "3_3", "4_1", "4_2", "4_3", "5_1", "5_2", "5_3")]
    # linear from 0.2 to 0.7 over 12 layers: step 0.5/11; conv3_1 is the 4th: 0.2 + 3·0.5/11 = 0.33636...
    assert vggface["features.conv1_2.weight"] == pytest.approx(0.2)
    assert vggface["features.conv3_1.weight"] == pytest.approx(0.336363636)
    assert vggface["features.conv5_3.weight"] == pytest.approx(0.7)
    assert small("vggf").dsd_sparsities() == {"features.conv2.weight": 0.2, "features.conv3.weight": 0.3,
                                              "features.conv4.weight": 0.4, "features.conv5.weight": 0.5}
    assert small("resnet50").dsd_sparsities() == {}


def test_scaled_resnet_at_width_1_matches_torchvision() -> None:
    from occkd_core.models import _scaled_resnet50_class

    ours = {k: v.shape for k, v in _scaled_resnet50_class()(1.0).state_dict().items()}  # the scaled class at 1.0
    theirs = {k: v.shape for k, v in resnet50(weights=None).state_dict().items()}
    assert ours == theirs


# -- ModelSpec ------------------------------------------------------------------------------------------

def test_model_spec_round_trip_and_validation() -> None:
    spec = ModelSpec("vggface", 2, width_mult=0.25, dropout=False)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict() == {"arch": "vggface", "num_outputs": 2, "width_mult": 0.25, "dropout": False}
    with pytest.raises(ValueError, match="valid names: resnet50, vggf, vggface"):
        ModelSpec("vgg16", 8)
    with pytest.raises(ValueError, match="num_outputs"):
        ModelSpec("vggf", 0)
    with pytest.raises(ValueError, match="width_mult"):
        ModelSpec("vggf", 8, width_mult=0.0)
    with pytest.raises(ValueError, match="width_mult"):
        ModelSpec("vggf", 8, width_mult=5)
    with pytest.raises(ValueError, match="unknown ModelSpec keys \\['depth'\\]"):
        ModelSpec.from_dict({"arch": "vggf", "num_outputs": 8, "depth": 3})


# -- load_pretrained ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_state_dict_round_trips(arch: str, tmp_path: Path) -> None:
    source, target = small(arch, 8), small(arch, 8)
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    loaded = load_pretrained(target, path, skip_head=False)
    assert loaded == [k for k in source.state_dict()]
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_skip_head_keeps_the_new_head(tmp_path: Path) -> None:
    source, target = small("vggf", 8), small("vggf", 2)  # another task: head 8 -> 2
    head_before = target.head.weight.clone()
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    loaded = load_pretrained(target, path)
    assert not any(name.startswith("head.") for name in loaded)
    assert torch.equal(target.head.weight, head_before)
    assert torch.equal(target.features.conv5.weight, source.features.conv5.weight)
    with pytest.raises(ValueError, match=r"head\.weight: file \(8, 32\) vs model \(2, 32\)"):
        load_pretrained(target, path, skip_head=False)


def test_torchvision_and_dag_keys_are_mapped(tmp_path: Path) -> None:
    # torchvision ResNet layout: fc.* is the head, "module." from DDP is stripped
    source = small("resnet50", 8)
    torchvision_state = {("module." + k.replace("head.", "fc.")): v for k, v in source.state_dict().items()}
    torch.save(torchvision_state, tmp_path / "tv.pt")
    target = small("resnet50", 8)
    load_pretrained(target, tmp_path / "tv.pt", skip_head=False)
    assert torch.equal(target.head.weight, source.head.weight)
    # MatConvNet "dag" VGG-face port: conv1_1.weight ... plus the fc6-fc8 the spec deletes
    vgg = small("vggface")
    dag = {k.removeprefix("features."): v for k, v in vgg.state_dict().items() if k.startswith("features.")}
    dag |= {"fc6.weight": torch.zeros(3, 3), "fc8.bias": torch.zeros(3)}
    torch.save(dag, tmp_path / "dag.pt")
    target = small("vggface")
    loaded = load_pretrained(target, tmp_path / "dag.pt")
    assert len(loaded) == 26  # 13 convs x (weight, bias)
    assert torch.equal(target.features.conv5_3.weight, vgg.features.conv5_3.weight)


def test_vggface_file_into_resnet_names_the_layers_and_the_architecture(tmp_path: Path) -> None:
    path = tmp_path / "vggface.pt"
    torch.save(small("vggface").state_dict(), path)
    with pytest.raises(ValueError) as info:
        load_pretrained(small("resnet50"), path)
    message = str(info.value)
    assert "looks like vggface (width_mult ≈ 0.125)" in message
    assert "features.conv1_1.weight" in message  # unexpected
    assert "conv1.weight" in message and "layer1.0.conv1.weight" in message  # missing
    assert "(16 more)" in message  # 26 unexpected keys, 10 listed


def test_one_wrong_shape_is_named(tmp_path: Path) -> None:
    state = small("vggf").state_dict()
    state["features.conv3.weight"] = torch.zeros(32, 32, 5, 5)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_pretrained(small("vggf"), path)
    message = str(info.value)
    assert "shape mismatch (1): features.conv3.weight: file (32, 32, 5, 5) vs model (32, 32, 3, 3)" in message
    assert "missing" not in message


def test_unreadable_or_absent_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_pretrained(small("vggf"), tmp_path / "nope.pt")
    torch.save({"weights": [1, 2]}, tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        load_pretrained(small("vggf"), tmp_path / "list.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read .*garbage.pt"):
        load_pretrained(small("vggf"), tmp_path / "garbage.pt")


class _Payload:
    """Unpickling this would run code: weights_only=True must refuse it before it gets the chance."""

    def __reduce__(self):
        return (open, ("/tmp/occkd-pickle-executed", "w"))


def test_weights_and_checkpoints_never_unpickle_code(tmp_path):
    import os

    from occkd_core.checkpoints import read_checkpoint

    marker = "/tmp/occkd-pickle-executed"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": _Payload()}}, path)
    with pytest.raises(ValueError, match="cannot read"):
        load_pretrained(build_model(ModelSpec("vggf", 2, 0.125)), path)
    with pytest.raises(ValueError, match="unreadable or corrupt"):
        read_checkpoint(path)
    assert not os.path.exists(marker)
