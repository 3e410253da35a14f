"""MatConvNet model files written as the published ones are laid out, with random weights, for tests.

The VGG-f layer list is the published imagenet-vgg-f.mat's (MatConvNet's pretrained models, md5
3513562d28089bd965cc050cbf8597a6; its 21 layers and their fields as scipy reads them from that file), not
occkd's network: names, types, LRN params, pool sizes / strides / pads and conv strides / pads are the
file's. Only the widths may be scaled (``width``), and fc6-fc8 are narrower (``fc``) to keep files small.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

#: imagenet-vgg-f.mat's layers: (name, type, fields). conv ``size`` is H × W × Cin × Cout, ``pad``
#: [top bottom left right], ``stride`` [Y X]; lrn ``param`` [N kappa alpha beta] (MatConvNet's alpha, per
#: squared input); pools pad [0 1 0 1], Caffe's ceil rounding as MatConvNet's import writes it.
IMAGENET_VGG_F: list[tuple[str, str, dict[str, Any]]] = [
    ("conv1", "conv", {"size": [11, 11, 3, 64], "pad": [0, 0, 0, 0], "stride": [4, 4]}),
    ("relu1", "relu", {"leak": 0}),
    ("norm1", "lrn", {"param": [5, 2, 0.0001, 0.75]}),
    ("pool1", "pool", {"method": "max", "pool": [3, 3], "stride": [2, 2], "pad": [0, 1, 0, 1]}),
    ("conv2", "conv", {"size": [5, 5, 64, 256], "pad": [2, 2, 2, 2], "stride": [1, 1]}),
    ("relu2", "relu", {"leak": 0}),
    ("norm2", "lrn", {"param": [5, 2, 0.0001, 0.75]}),
    ("pool2", "pool", {"method": "max", "pool": [3, 3], "stride": [2, 2], "pad": [0, 1, 0, 1]}),
    ("conv3", "conv", {"size": [3, 3, 256, 256], "pad": [1, 1, 1, 1], "stride": [1, 1]}),
    ("relu3", "relu", {"leak": 0}),
    ("conv4", "conv", {"size": [3, 3, 256, 256], "pad": [1, 1, 1, 1], "stride": [1, 1]}),
    ("relu4", "relu", {"leak": 0}),
    ("conv5", "conv", {"size": [3, 3, 256, 256], "pad": [1, 1, 1, 1], "stride": [1, 1]}),
    ("relu5", "relu", {"leak": 0}),
    ("pool5", "pool", {"method": "max", "pool": [3, 3], "stride": [2, 2], "pad": [0, 1, 0, 1]}),
    ("fc6", "conv", {"size": [6, 6, 256, 4096], "pad": [0, 0, 0, 0], "stride": [1, 1]}),
    ("relu6", "relu", {"leak": 0}),
    ("fc7", "conv", {"size": [1, 1, 4096, 4096], "pad": [0, 0, 0, 0], "stride": [1, 1]}),
    ("relu7", "relu", {"leak": 0}),
    ("fc8", "conv", {"size": [1, 1, 4096, 1000], "pad": [0, 0, 0, 0], "stride": [1, 1]}),
    ("prob", "softmax", {}),
]


def cell(items: list) -> np.ndarray:
    """A MATLAB 1×N cell array."""
    out = np.empty((1, len(items)), dtype=object)
    for index, item in enumerate(items):
        out[0, index] = item
    return out


def vgg_f_layers(seed: int = 0, *, width: float = 1.0, fc: int = 16, classes: int = 10,
                 changes: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """imagenet-vgg-f.mat's layer list with random single-precision weights, each conv's filters
    H × W × Cin × Cout and biases 1 × Cout; ``changes`` overrides fields of named layers."""
    rng = np.random.default_rng(seed)
    scaled = {3: 3, 64: max(4, round(64 * width)), 256: max(4, round(256 * width)), 4096: fc, 1000: classes}
    layers = []
    for name, kind, fields in IMAGENET_VGG_F:
        layer: dict[str, Any] = {"name": name, "type": kind, **{k: v for k, v in fields.items() if k != "size"}}
        if kind == "conv":
            height, width_, cin, cout = fields["size"]
            shape = (height, width_, scaled[cin], scaled[cout])
            fan_in = height * width_ * shape[2]
            layer["filters"] = (rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32)
            layer["biases"] = (rng.standard_normal((1, shape[3])) * 0.1).astype(np.float32)
            layer["size"] = list(shape)
        layer.update((changes or {}).get(name, {}))
        layers.append(layer)
    return layers


def mean_image(rgb: tuple[float, float, float], side: int = 224) -> np.ndarray:
    """An H × W × 3 mean image whose channels average exactly to ``rgb``: each a ramp symmetric about it."""
    ramp = (np.arange(side) - (side - 1) / 2)[:, None] * 0.05 + np.zeros((1, side))
    return np.stack([value + ramp for value in rgb], axis=2).astype(np.float32)


def write_simplenn(path: Path, layers: list[dict[str, Any]], average_image: np.ndarray | None, *,
                   old_style: bool = False, under_net: bool = False) -> Path:
    """A simplenn file: ``layers`` and ``meta`` at the top level as in the published files (or the whole net
    as one ``net`` struct), conv weights as ``weights = {filters, biases}`` (``old_style``: separate
    ``filters`` / ``biases`` fields, as before MatConvNet beta17)."""
    out = []
    for layer in layers:
        layer = dict(layer)
        if "filters" in layer and not old_style:
            layer["weights"] = cell([layer.pop("filters"), layer.pop("biases")])
        out.append(layer)
    normalization = {"imageSize": np.array([[224.0, 224.0, 3.0]]), "interpolation": "bilinear", "keepAspect": 1.0,
                     "averageImage": average_image if average_image is not None else np.zeros((0, 0))}
    meta = {"normalization": normalization,
            "classes": {"name": cell(["n01440764", "n01443537"]), "description": cell(["tench", "goldfish"])}}
    net = {"layers": cell(out), "meta": meta}
    scipy.io.savemat(path, {"net": net} if under_net else net, do_compression=False)
    return path


def write_dagnn(path: Path, layers: list[dict[str, Any]], average_image: np.ndarray | None) -> Path:
    """The same layers in MatConvNet's DagNN layout: ``dagnn.*`` layers with their settings in ``block``
    (``poolSize`` for a pool's size), conv weights in ``params``."""
    classes = {"conv": "dagnn.Conv", "relu": "dagnn.ReLU", "lrn": "dagnn.LRN", "pool": "dagnn.Pooling",
               "softmax": "dagnn.SoftMax"}
    dag_layers, params = [], []
    for index, layer in enumerate(layers):
        block = {k: v for k, v in layer.items() if k not in ("name", "type", "filters", "biases")}
        if "pool" in block:
            block["poolSize"] = block.pop("pool")
        names = []
        if layer["type"] == "conv":
            names = [f"{layer['name']}f", f"{layer['name']}b"]
            params += [{"name": names[0], "value": layer["filters"]},
                       {"name": names[1], "value": layer["biases"].reshape(-1, 1)}]
        dag_layers.append({"name": layer["name"], "type": classes[layer["type"]], "inputs": cell([f"x{index}"]),
                           "outputs": cell([f"x{index + 1}"]), "params": cell(names), "block": block})

    def struct_array(items: list[dict[str, Any]]) -> np.ndarray:
        fields = list(items[0])
        out = np.empty((1, len(items)), dtype=[(k, object) for k in fields])
        for index, item in enumerate(items):
            out[0, index] = tuple(item[k] for k in fields)
        return out

    meta = {"normalization": {"averageImage": average_image if average_image is not None else np.zeros((0, 0))}}
    scipy.io.savemat(path, {"layers": struct_array(dag_layers), "params": struct_array(params),
                            "vars": struct_array([{"name": "x0", "precious": 0}]), "meta": meta})
    return path
