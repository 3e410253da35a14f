"""The three networks of spec §4 (VGG-f, VGG-face, ResNet-50) with a task head (pre-trained weights are loaded
by :mod:`occkd_core.loading`).

Every network is a :class:`FaceNet`: conv features -> global pool -> embedding ``[B, D]`` -> head ``[B, K]``.
The embedding is whatever enters the final layer (spec §4.1, J's "penultimate layer"), so the KD
losses, mining and fusion all read it from ``forward``, which returns ``(logits, embedding)`` in one pass.

``width_mult`` scales every conv width so that small CPU runs are possible; 1.0 is the paper's network.
"""

from __future__ import annotations

import abc
import functools
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from occkd_core.matconvnet import MatConvNetLayer, matconvnet_layers
from occkd_core.tasks import lookup

#: Smallest input side every architecture handles: VGG-f's conv1 (11x11/4) and two 3x3/2 pools need 31 px
#: to keep a non-empty map; 32 is the round number we promise for all three.
MIN_INPUT_SIZE = 32


@dataclass(frozen=True)
class ModelSpec:
    """Which network to build: architecture, head width and conv width multiplier."""

    arch: str  # "vggf" | "vggface" | "resnet50"
    num_outputs: int  # 8 (fer), 2 (gender), 1 (age regression)
    width_mult: float = 1.0  # scales every conv width; 1.0 = the paper's network
    dropout: bool = True  # spec §4.1/§4.2 dropout; False removes the layers (tests, ablations)

    def __post_init__(self) -> None:
        get_architecture(self.arch)
        if isinstance(self.num_outputs, bool) or not isinstance(self.num_outputs, int) or self.num_outputs < 1:
            raise ValueError(f"num_outputs must be an int >= 1 (8 fer, 2 gender, 1 age), got {self.num_outputs!r}")
        if isinstance(self.width_mult, bool) or not isinstance(self.width_mult, (int, float)) \
                or not 0 < self.width_mult <= 4:
            raise ValueError(f"width_mult must be a number in (0, 4] (1.0 = the paper's network), "
                             f"got {self.width_mult!r}")
        object.__setattr__(self, "width_mult", float(self.width_mult))
        if not isinstance(self.dropout, bool):
            raise ValueError(f"dropout must be True or False, got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown ModelSpec keys {unknown}; valid keys: {', '.join(sorted(known))}")
        return cls(**raw)


def _scaled(channels: int, width_mult: float) -> int:
    """A conv width scaled by ``width_mult``, never below 4 channels."""
    return max(4, round(channels * width_mult))


class FaceNet(nn.Module, abc.ABC):
    """Conv features -> global pool -> embedding ``[B, D]`` -> task head ``[B, K]`` (spec §4)."""

    spec: ModelSpec
    embedding_dim: int
    head: nn.Linear

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec

    @property
    def arch(self) -> str:
        return self.spec.arch

    @property
    def num_outputs(self) -> int:
        return self.spec.num_outputs

    @abc.abstractmethod
    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` images -> the last conv block's map ``[B, C, h, w]`` (the Grad-CAM layer's output)."""

    @abc.abstractmethod
    def forward_embedding(self, features: Tensor) -> Tensor:
        """``[B, C, h, w]`` -> globally pooled embedding ``[B, D]``."""

    @abc.abstractmethod
    def gradcam_layer(self) -> nn.Module:
        """The module whose output is ``forward_features``' output (spec §13, §15 #31: last conv block)."""

    def forward_head(self, embedding: Tensor) -> Tensor:
        """``[B, D]`` -> logits ``[B, K]`` (for age, the regressed value ``[B, 1]``)."""
        return self.head(embedding)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, 3, H, W]`` -> (logits ``[B, K]``, embedding ``[B, D]``) in one pass."""
        embedding = self.forward_embedding(self.forward_features(x))
        return self.forward_head(embedding), embedding

    def dsd_sparsities(self) -> dict[str, float]:
        """Parameter name -> DSD sparsity rate (spec §9); empty where DSD is not used."""
        return {}

    def matconvnet_layers(self) -> tuple[MatConvNetLayer, ...]:
        """The layers a MatConvNet weights file must hold, with these settings, to be this network
        (:func:`occkd_core.loading.load_pretrained` refuses one that differs); empty: such files are not checked."""
        return ()

    #: Prefixes of a published file's layers that this network deletes (skipped when loading weights).
    deleted_file_layers: tuple[str, ...] = ()

    def file_key_candidates(self, key: str) -> list[str]:
        """The model keys a published weights file's ``key`` may stand for, in order (loading weights):
        the key itself, or the same under ``features.`` (the VGGs' layer stack)."""
        return [key, f"features.{key}"]

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.arch} expects images [B, 3, H, W], got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(f"{self.arch} needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} px, got "
                             f"{tuple(x.shape[-2:])}; raise the input size")


def _init_vgg(model: nn.Module) -> None:
    """torchvision's VGG init for the convs (used only without pre-trained weights); head N(0, 0.1²), bias 0.

    The head init is the paper's (spec §4.1 for VGG-face; §15 #9 carries it to VGG-f).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    nn.init.normal_(model.head.weight, mean=0.0, std=0.1)
    nn.init.zeros_(model.head.bias)


class _VGGBase(FaceNet):
    """A flat ``features`` stack named after the paper's layers, then a global spatial max-pool (spec §15 #8)."""

    features: nn.Sequential
    deleted_file_layers = ("fc6.", "fc7.", "fc8.")  # spec §4.1/§4.2 delete the original VGGs' fc6-fc8

    def forward_features(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return self.features(x)

    def forward_embedding(self, features: Tensor) -> Tensor:
        # The single max-pool that replaces pool5 + fc6-8: a max over conv5's map equals a max over pool5's.
        return torch.amax(features, dim=(2, 3))

    def gradcam_layer(self) -> nn.Module:
        # Last layer of the stack: conv5 after its ReLU (and dropout, the identity in eval mode).
        return self.features[-1]


#: VGG-face conv widths per block (Parkhi et al. 2015; spec §4.1).
VGGFACE_BLOCKS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
#: Dropout after the ReLU of conv4_1 ... conv5_3, rising by 0.05 (spec §4.1, [I]).
VGGFACE_DROPOUT: tuple[float, ...] = (0.30, 0.35, 0.40, 0.45, 0.50, 0.55)


class VGGFace(_VGGBase):
    """VGG-face's 13 convs, 2x2 max-pools after blocks 1-4, global max-pool -> 512-d embedding (spec §4.1).

    Layers are named ``conv1_1`` ... ``conv5_3`` like the MatConvNet/"dag" ports of VGG-face, so their
    state dicts load with a ``features.`` prefix (see :func:`load_pretrained`).
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        in_channels, dropout_rates = 3, iter(VGGFACE_DROPOUT)
        for block, widths in enumerate(VGGFACE_BLOCKS, start=1):
            for index, width in enumerate(widths, start=1):
                out_channels = _scaled(width, spec.width_mult)
                layers[f"conv{block}_{index}"] = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
                layers[f"relu{block}_{index}"] = nn.ReLU(inplace=True)
                if block >= 4:
                    rate = next(dropout_rates)
                    if spec.dropout:
                        layers[f"drop{block}_{index}"] = nn.Dropout(rate)
                in_channels = out_channels
            if block <= 4:
                # ceil_mode keeps odd maps (e.g. 100 -> 50 -> 25 -> 13 -> 7) instead of dropping a row.
                layers[f"pool{block}"] = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.features = nn.Sequential(layers)
        self.embedding_dim = in_channels
        self.head = nn.Linear(in_channels, spec.num_outputs)
        _init_vgg(self)

    # matconvnet_layers() stays empty: the pool padding of the published vgg-face.mat is not verified here
    # (these ceil_mode pools are MatConvNet's [0 1 0 1]; a file padding by 0 differs at odd map sizes only),
    # and a check that refused the paper's own file would be worse than none.

    def dsd_sparsities(self) -> dict[str, float]:
        # 0.2 at conv1_2 rising linearly to 0.7 at conv5_3: 12 layers, step 0.5 / 11 ≈ 0.045 (spec §9).
        names = [f"conv{b}_{i}" for b, widths in enumerate(VGGFACE_BLOCKS, start=1)
                 for i in range(1, len(widths) + 1)][1:]
        return {f"features.{name}.weight": 0.2 + 0.5 * k / (len(names) - 1) for k, name in enumerate(names)}


#: VGG-f's LRN (norm1, norm2) in torch's terms: x / (k + alpha/size · Σ x²)^beta over 5 channels. The
#: published imagenet-vgg-f.mat (MatConvNet's pretrained models, md5 3513562d28089bd965cc050cbf8597a6) is
#: MatConvNet's import (utils/import-ref-models.sh) of Chatfield et al.'s Caffe CNN_F; its norm1/norm2
#: ``param`` is [5 2 0.0001 0.75], which MatConvNet's LRN converter (utils/layers.py, CaffeLRN: [N k
#: alpha/N beta]) writes for Caffe's ``local_size 5, alpha 0.0005, beta 0.75, k 2``. torch divides alpha
#: by the size as Caffe does. (MatConvNet's default [5 1 0.0001/5 0.75], k = 1, is the setting of its own
#: from-scratch ImageNet scripts: another network, whose norm outputs are 2^0.75 ≈ 1.7 (small Σ x²) to
#: 5^0.75 ≈ 3.3 (large Σ x²) times these.)
VGGF_LRN: Mapping[str, float] = {"size": 5, "alpha": 5e-4, "beta": 0.75, "k": 2.0}


class VGGF(_VGGBase):
    """Chatfield et al.'s CNN-F conv1-conv5, global max-pool instead of pool5 + fc6-8 -> 256-d (spec §4.2).

    Every layer is the published imagenet-vgg-f.mat's (:meth:`matconvnet_layers` lists them in MatConvNet's
    terms, and :func:`load_pretrained` refuses a file that differs): conv1 11×11 stride 4, no padding;
    LRN :data:`VGGF_LRN`; 3×3 max-pools with stride 2, which the file pads by [0 1 0 1] (Caffe's ceil
    rounding as MatConvNet writes it) and torch computes with ``ceil_mode``; conv2 5×5 padded by 2;
    conv3-5 3×3 padded by 1. pool5 is dropped: at 48-64 px inputs it would leave no spatial extent, and
    the global max-pool over conv5 replaces it.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        c1, c = _scaled(64, spec.width_mult), _scaled(256, spec.width_mult)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv1"] = nn.Conv2d(3, c1, kernel_size=11, stride=4)
        layers["relu1"] = nn.ReLU(inplace=True)
        layers["norm1"] = nn.LocalResponseNorm(**VGGF_LRN)
        layers["pool1"] = nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)
        layers["conv2"] = nn.Conv2d(c1, c, kernel_size=5, padding=2)
        layers["relu2"] = nn.ReLU(inplace=True)
        layers["norm2"] = nn.LocalResponseNorm(**VGGF_LRN)
        layers["pool2"] = nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)
        for index in (3, 4, 5):
            layers[f"conv{index}"] = nn.Conv2d(c, c, kernel_size=3, padding=1)
            layers[f"relu{index}"] = nn.ReLU(inplace=True)
            if spec.dropout:
                layers[f"drop{index}"] = nn.Dropout(0.2)  # spec §4.2, [I]
        self.features = nn.Sequential(layers)
        self.embedding_dim = c
        self.head = nn.Linear(c, spec.num_outputs)
        _init_vgg(self)

    def matconvnet_layers(self) -> tuple[MatConvNetLayer, ...]:
        return matconvnet_layers(self.features.named_children())

    def dsd_sparsities(self) -> dict[str, float]:
        return {"features.conv2.weight": 0.2, "features.conv3.weight": 0.3,
                "features.conv4.weight": 0.4, "features.conv5.weight": 0.5}  # spec §9


def _resnet50_trunk(width_mult: float) -> nn.Module:
    """torchvision's ResNet-50 (``fc`` included) with every stage width multiplied by ``width_mult``.

    torchvision is imported here, not with this module: importing it costs ~2 s of CPU (its ops import
    ``torch._dynamo``), which every process that reads the architecture registry would pay (the grid's
    driver, each trial, ``run_all.py --help``), while only a ResNet-50 node builds one.
    """
    from torchvision.models import resnet50

    return resnet50(weights=None) if width_mult == 1.0 else _scaled_resnet50_class()(width_mult)


@functools.cache
def _scaled_resnet50_class() -> type[nn.Module]:
    """``ResNet.__init__`` hard-codes the widths 64/128/256/512, so this subclass sets the same attributes it
    sets and reuses torchvision's ``Bottleneck``, ``_make_layer`` and init; a test checks that width 1.0 gives
    exactly torchvision's keys and shapes. Made on first use, with torchvision (:func:`_resnet50_trunk`)."""
    from torchvision.models.resnet import Bottleneck, ResNet

    class ScaledResNet50(ResNet):
        def __init__(self, width_mult: float) -> None:
            nn.Module.__init__(self)  # skip ResNet.__init__: it builds the full-width network first
            self._norm_layer = nn.BatchNorm2d
            self.inplanes, self.dilation, self.groups, self.base_width = _scaled(64, width_mult), 1, 1, 64
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(self.inplanes)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.layer1 = self._make_layer(Bottleneck, _scaled(64, width_mult), 3)
            self.layer2 = self._make_layer(Bottleneck, _scaled(128, width_mult), 4, stride=2)
            self.layer3 = self._make_layer(Bottleneck, _scaled(256, width_mult), 6, stride=2)
            self.layer4 = self._make_layer(Bottleneck, _scaled(512, width_mult), 3, stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(self.inplanes, 1000)
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(module, nn.BatchNorm2d):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)

    return ScaledResNet50


_RESNET_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


class ResNet50(FaceNet):
    """torchvision's ResNet-50 trunk, global average pool -> 2048-d embedding, task head (spec §4.3).

    The trunk's modules sit at the top level, so the state-dict keys are torchvision's except ``fc.*``,
    which is ``head.*`` here. The head keeps torch's default ``nn.Linear`` init: the paper gives no init
    for ResNet-50, and N(0, 0.1²) on 2048 inputs would start the logits at std ≈ 4.5·rms(embedding),
    saturating the softmax. No dropout (spec §4.3), so ``spec.dropout`` has no effect.
    """


    def file_key_candidates(self, key: str) -> list[str]:
        """torchvision's ``fc.*`` is this network's ``head.*``."""
        return [*super().file_key_candidates(key), *(["head." + key.removeprefix("fc.")] if key.startswith("fc.") else [])]

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        trunk = _resnet50_trunk(spec.width_mult)
        for name in _RESNET_TRUNK:
            self.add_module(name, getattr(trunk, name))
        self.embedding_dim = trunk.fc.in_features
        self.head = nn.Linear(self.embedding_dim, spec.num_outputs)

    def forward_features(self, x: Tensor) -> Tensor:
        self._check_input(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_embedding(self, features: Tensor) -> Tensor:
        return features.mean(dim=(2, 3))

    def gradcam_layer(self) -> nn.Module:
        return self.layer4


@dataclass(frozen=True)
class ArchInfo:
    """One network of spec §4: everything the method, the grid and the report need to know of it."""

    name: str
    model: type[FaceNet]
    # RGB mean and std of its pre-training data in 0..255 pixel units, subtracted after occlusion (spec §15 #17).
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cost: float  # relative cost of one training image at 224 px and full channel width (scheduling; bare-loop throughput)
    paper_name: str  # as the papers' tables name it (grid/paper_results.json)
    # DDP scaling efficiency at 8 GPUs, for the grid's DDP worker rule (grid/ddp_workers.py says where the built-in
    # values come from); a new network without a measurement gets the most cautious of the built-in ones.
    ddp_efficiency_at_8: float = 0.6


#: Architecture name -> what it is. Read through :func:`get_architecture`; iterating gives the names in order.
ARCHITECTURES: dict[str, ArchInfo] = {
    # VGG-f: the ImageNet RGB mean (as MatConvNet ships with its VGG-VD imports), no std scaling. A VGG-f
    # started from imagenet-vgg-f.mat subtracts that file's own averageImage instead (its descendants too,
    # through their checkpoints); this mean serves a VGG-f trained from scratch, which has no file to ask.
    "vggf": ArchInfo("vggf", VGGF, (123.68, 116.78, 103.94), (1.0, 1.0, 1.0), cost=1.0, paper_name="VGG-f",
                     ddp_efficiency_at_8=0.6),
    # VGG-face (Parkhi et al.): the face-identification data's RGB mean, no std scaling.
    "vggface": ArchInfo("vggface", VGGFace, (129.19, 104.76, 93.59), (1.0, 1.0, 1.0), cost=35.0,
                        paper_name="VGG-face", ddp_efficiency_at_8=0.65),
    # torchvision ResNet-50: ImageNet mean/std (0.485, 0.456, 0.406)/(0.229, 0.224, 0.225) × 255.
    "resnet50": ArchInfo("resnet50", ResNet50, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), cost=18.0,
                         paper_name="ResNet-50", ddp_efficiency_at_8=0.8),
}


def get_architecture(name: str) -> ArchInfo:
    """The architecture called ``name``, or a ValueError listing the valid names."""
    return lookup("architecture", name, ARCHITECTURES)


def build_model(spec: ModelSpec) -> FaceNet:
    """A freshly initialised network for ``spec`` (load pre-trained weights with :func:`load_pretrained`)."""
    return get_architecture(spec.arch).model(spec)
