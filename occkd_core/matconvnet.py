"""MatConvNet model files (``imagenet-vgg-f.mat``, ``vgg-face.mat``) as the authors used them, and what a
torch layer is in MatConvNet's terms, so that a file can be checked against the network it is loaded into.

Files are read with :func:`scipy.io.loadmat` in both of MatConvNet's layouts: "simplenn" (a ``layers``
cell array, at the top level or under ``net``, each conv layer with ``weights = {filters, biases}`` or the
older ``filters`` / ``biases`` fields) and "DagNN" (``layers`` / ``params`` struct arrays, each layer's
settings in its ``block``). Filters ``H × W × Cin × Cout`` become torch's ``Cout × Cin × H × W``; both
frameworks correlate (no kernel flip) and, for these networks, take RGB pixels in 0..255 minus a mean.

Layer settings are kept in MatConvNet's conventions (``vl_nnconv``, ``vl_nnpool``, ``vl_nnnormalize``):
``stride`` [Y X], ``pad`` [TOP BOTTOM LEFT RIGHT], pool size [H W], LRN ``param`` [N KAPPA ALPHA BETA]
computing ``x / (KAPPA + ALPHA · Σ x²)^BETA`` over N channels, so ALPHA is per squared input (Caffe's and
torch's alpha is divided by N: ALPHA = alpha / N). A field a layer leaves out takes the default MatConvNet
itself would run it with (``vl_simplenn_tidy``; the ``dagnn.Filter`` / ``Pooling`` / ``LRN`` / ``ReLU``
classes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

#: A layer setting: numbers (stride, pad, pool size, LRN param, leak) or a word (the pool method).
Setting = tuple[float, ...] | str

#: MatConvNet's LRN default, ``[5 1 0.0001/5 0.75]`` (``vl_simplenn_tidy``, ``dagnn.LRN``): what a file's LRN
#: layer without ``param`` computes. It is the setting of MatConvNet's own from-scratch ImageNet scripts, not
#: the one of the published imagenet-vgg-f.mat (see :data:`occkd_core.models.VGGF_LRN`).
_LRN_DEFAULT = (5.0, 1.0, 0.0001 / 5, 0.75)

#: DagNN layer classes -> simplenn's layer type, so both layouts compare alike.
_DAGNN_TYPES = {"dagnn.Conv": "conv", "dagnn.ReLU": "relu", "dagnn.LRN": "lrn", "dagnn.Pooling": "pool",
                "dagnn.SoftMax": "softmax", "dagnn.DropOut": "dropout"}


@dataclass(frozen=True)
class MatConvNetLayer:
    """One layer as MatConvNet runs it: its name, its simplenn type and its settings."""

    name: str
    type: str  # "conv", "relu", "lrn", "pool", "softmax", ... (DagNN's "dagnn.Conv" etc. under these names)
    settings: Mapping[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class MatConvNetFile:
    """What occkd reads from a MatConvNet model file."""

    state: dict[str, Tensor]  # every conv layer as ``<layer>.weight`` / ``.bias`` (fc6-fc8 too: they are convs)
    layers: tuple[MatConvNetLayer, ...]  # every layer, in the file's order
    input_mean: tuple[float, float, float] | None  # RGB, 0..255: see :func:`_average_rgb`; None if it names none


def is_matlab_file(path: Path) -> bool:
    """A ``.mat`` name or MATLAB's header: the file is for :func:`read_matconvnet`, not ``torch.load``."""
    with open(path, "rb") as file:
        head = file.read(128)
    return path.suffix.lower() == ".mat" or head.startswith(b"MATLAB")


def read_matconvnet(path: str | Path) -> MatConvNetFile:
    """The conv weights, every layer's settings and the input mean of a MatConvNet model file.

    fc6-fc8 are conv layers in MatConvNet and come out too; :func:`occkd_core.loading.load_pretrained`
    drops them (spec §4.1-4.2). Raises ValueError, naming the file, for anything that is not a network.
    """
    path = Path(path)
    net = _network(_loadmat(path), path)
    if "layers" not in net:
        raise ValueError(f"{str(path)!r} is a MATLAB file without a MatConvNet network (no 'layers' variable, "
                         f"found {sorted(net)}); expected imagenet-vgg-f.mat / vgg-face.mat as MatConvNet ships them")
    if "params" in net:
        state, layers = _dagnn_state(net["layers"], net["params"]), _dagnn_layers(net["layers"])
    else:
        state, layers = _simplenn_state(net["layers"]), _simplenn_layers(net["layers"])
    if not state:
        raise ValueError(f"{str(path)!r} holds a MatConvNet network without any conv layer weights")
    return MatConvNetFile(state=state, layers=layers, input_mean=_average_rgb(net, path))


def read_input_mean(path: str | Path) -> tuple[float, float, float] | None:
    """The RGB input mean (0..255) a MatConvNet file names, or None. Reads only the ``meta`` /
    ``normalization`` variables where the file keeps them at the top level (as imagenet-vgg-f.mat and
    vgg-face.mat do), so checksumming a file and noting its mean does not read its weights twice."""
    path = Path(path)
    return _average_rgb(_network(_loadmat(path, ("meta", "normalization", "net")), path), path)


def _loadmat(path: Path, variable_names: Sequence[str] | None = None) -> dict[str, Any]:
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        contents = loadmat(str(path), struct_as_record=False, squeeze_me=False, variable_names=variable_names)
    except NotImplementedError:  # scipy's word for MATLAB v7.3 (HDF5) files
        raise ValueError(f"{str(path)!r} is a MATLAB v7.3 (HDF5) file, which scipy cannot read; re-save it in "
                         f"MATLAB with `net = load(file); save(out, '-struct', 'net', '-v7')`") from None
    except (MatReadError, ValueError, TypeError, OSError, EOFError) as err:
        raise ValueError(f"cannot read {str(path)!r} as a MATLAB file ({type(err).__name__}: {err})") from None
    return {key: value for key, value in contents.items() if not key.startswith("__")}


def _network(contents: dict[str, Any], path: Path) -> dict[str, Any]:
    """The network's variables, whether saved at the top level or as one ``net`` struct."""
    if "net" in contents and not {"layers", "meta", "normalization"} & set(contents):
        inner = _single(contents["net"])
        return {name: getattr(inner, name) for name in getattr(inner, "_fieldnames", [])}
    return contents


def _average_rgb(net: Mapping[str, Any], path: Path) -> tuple[float, float, float] | None:
    """``meta.normalization.averageImage`` (top-level ``normalization`` in files older than MatConvNet
    beta17) as one RGB value per channel, or None when the file has none.

    The published imagenet-vgg-f.mat stores a whole H × W × 3 mean image: MatConvNet's import
    (utils/import-ref-models.sh, ``--average-image``, ``--color-format=rgb``) resized the mean image of
    Chatfield et al.'s release to the 224 × 224 input. occkd subtracts one value per channel
    (:class:`occkd_core.preprocess.InputSpec`): presets resize faces to 32-224 px, not the file's 224, and an
    occluded half must become one constant, -mean (spec §3.2). So a mean image is reduced to its
    per-channel average, which subtracts the same total per channel and gives up only the image's
    variation across pixels (MatConvNet's own evaluation resizes the image instead,
    examples/imagenet/cnn_imagenet_evaluate.m). A file that stores three values is taken as they are.
    """
    normalization = net.get("normalization")
    if "meta" in net:
        normalization = getattr(_single(net["meta"]), "normalization", normalization)
    image = getattr(_single(normalization), "averageImage", None) if normalization is not None else None
    if image is None:
        return None
    values = np.asarray(_single(image), dtype=np.float64)
    if values.size == 0:  # an import without a mean: the network expects raw pixels, which we never feed it
        return None
    if values.size == 3:
        red, green, blue = values.reshape(3)
    elif values.ndim == 3 and values.shape[2] == 3:
        red, green, blue = values.mean(axis=(0, 1))
    else:
        raise ValueError(f"{str(path)!r}: averageImage of shape {values.shape} is neither an RGB triple nor an "
                         f"H × W × 3 image")
    return float(red), float(green), float(blue)


# -- MATLAB values ----------------------------------------------------------------------------------------

def _single(value: Any) -> Any:
    """Unwrap MATLAB's 1×1 cell / struct arrays down to the element."""
    while isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
        value = value.reshape(-1)[0]
    return value


def _text(value: Any) -> str:
    value = _single(value)
    if isinstance(value, np.ndarray):
        return "".join(str(part) for part in value.reshape(-1))
    return str(value)


def _elements(value: Any) -> list[Any]:
    """A MATLAB cell or struct array as a flat list of its elements."""
    if isinstance(value, np.ndarray):
        return [_single(item) for item in value.reshape(-1, order="F")]
    return [value]


def _numbers(value: Any) -> tuple[float, ...]:
    """A MATLAB numeric array as a flat tuple of floats; () for a missing or empty field."""
    value = _single(value)
    if value is None:
        return ()
    return tuple(float(v) for v in np.asarray(value, dtype=np.float64).reshape(-1, order="F"))


# -- weights ----------------------------------------------------------------------------------------------

def _conv_tensors(name: str, filters: Any, biases: Any) -> dict[str, Tensor]:
    filters = np.asarray(filters, dtype=np.float32)
    if filters.ndim > 4 or filters.ndim < 2:
        raise ValueError(f"MatConvNet layer {name!r}: filters of shape {filters.shape}, expected H × W × Cin × Cout")
    # MATLAB drops trailing singleton dimensions (a single output filter is H × W × Cin).
    filters = filters.reshape(filters.shape + (1,) * (4 - filters.ndim))
    weight = torch.from_numpy(np.ascontiguousarray(filters.transpose(3, 2, 0, 1)))
    out = {f"{name}.weight": weight}
    bias = np.asarray(biases, dtype=np.float32).reshape(-1) if biases is not None else np.zeros(0)
    if bias.size:
        if bias.size != weight.shape[0]:
            raise ValueError(f"MatConvNet layer {name!r}: {bias.size} biases for {weight.shape[0]} filters")
        out[f"{name}.bias"] = torch.from_numpy(bias.copy())
    return out


def _simplenn_state(layers: Any) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for index, layer in enumerate(_elements(layers)):
        fields = set(getattr(layer, "_fieldnames", []))
        if not fields or _text(getattr(layer, "type", "")) != "conv":
            continue
        name = _text(layer.name) if "name" in fields else f"layer{index + 1}"
        if "weights" in fields:  # MatConvNet beta17 and later: weights = {filters, biases}
            parts = _elements(layer.weights)
            filters, biases = parts[0], (parts[1] if len(parts) > 1 else None)
        elif "filters" in fields:  # older files
            filters, biases = layer.filters, getattr(layer, "biases", None)
        else:
            raise ValueError(f"MatConvNet conv layer {name!r} has neither 'weights' nor 'filters'")
        state.update(_conv_tensors(name, filters, biases))
    return state


def _dagnn_state(layers: Any, params: Any) -> dict[str, Tensor]:
    values = {_text(p.name): p.value for p in _elements(params)}
    state: dict[str, Tensor] = {}
    for layer in _elements(layers):
        if _text(layer.type) != "dagnn.Conv":
            continue
        names = [_text(n) for n in _elements(layer.params)]
        filters = values[names[0]]
        biases = values[names[1]] if len(names) > 1 and names[1] else None
        state.update(_conv_tensors(_text(layer.name), filters, biases))
    return state


# -- layer settings ---------------------------------------------------------------------------------------

def _simplenn_layers(layers: Any) -> tuple[MatConvNetLayer, ...]:
    out = []
    for index, layer in enumerate(_elements(layers)):
        fields = set(getattr(layer, "_fieldnames", []))
        name = _text(layer.name) if "name" in fields else f"layer{index + 1}"
        kind = _text(layer.type) if "type" in fields else "?"
        kind = "lrn" if kind == "normalize" else kind  # the older name of the same layer
        out.append(MatConvNetLayer(name, kind, _settings(name, kind, lambda key: getattr(layer, key, None))))
    return tuple(out)


def _dagnn_layers(layers: Any) -> tuple[MatConvNetLayer, ...]:
    out = []
    for layer in _elements(layers):
        name, kind = _text(layer.name), _text(layer.type)
        kind = _DAGNN_TYPES.get(kind, kind)
        block = _single(getattr(layer, "block", None))

        def get(key: str, block: Any = block) -> Any:
            return getattr(block, "poolSize" if key == "pool" else key, None)

        out.append(MatConvNetLayer(name, kind, _settings(name, kind, get)))
    return tuple(out)


def _settings(name: str, kind: str, get: Callable[[str], Any]) -> dict[str, Setting]:
    """A layer's settings in MatConvNet's conventions, its defaults filled in; {} for layers without any."""
    if kind == "conv":
        return {"stride": _pair(name, "stride", _numbers(get("stride")), 1.0), "pad": _pad(name, _numbers(get("pad"))),
                "dilate": _pair(name, "dilate", _numbers(get("dilate")), 1.0)}
    if kind == "pool":
        size = _numbers(get("pool"))
        if not size:
            raise ValueError(f"MatConvNet pool layer {name!r} has no pool size")
        method = get("method")
        return {"method": _text(method) if method is not None and np.size(method) else "max",
                "pool": _pair(name, "pool", size, 1.0), "stride": _pair(name, "stride", _numbers(get("stride")), 1.0),
                "pad": _pad(name, _numbers(get("pad")))}
    if kind == "lrn":
        param = _numbers(get("param")) or _LRN_DEFAULT
        if len(param) != 4:
            raise ValueError(f"MatConvNet LRN layer {name!r}: param {list(param)}, expected [N KAPPA ALPHA BETA]")
        return {"param": param}
    if kind == "relu":
        return {"leak": _numbers(get("leak"))[:1] or (0.0,)}
    return {}


def _pair(name: str, key: str, values: tuple[float, ...], default: float) -> tuple[float, float]:
    """MatConvNet's scalar-or-[Y X] fields."""
    if not values:
        return default, default
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise ValueError(f"MatConvNet layer {name!r}: {key} {list(values)}, expected one or two values")


def _pad(name: str, values: tuple[float, ...]) -> tuple[float, float, float, float]:
    """MatConvNet's padding: a scalar, [Y X] (as ``dagnn.Filter`` reads it) or [TOP BOTTOM LEFT RIGHT]."""
    if not values:
        return 0.0, 0.0, 0.0, 0.0
    if len(values) == 1:
        return (values[0],) * 4
    if len(values) == 2:
        return values[0], values[0], values[1], values[1]
    if len(values) == 4:
        return values[0], values[1], values[2], values[3]
    raise ValueError(f"MatConvNet layer {name!r}: pad {list(values)}, expected 1, 2 or 4 values")


# -- torch layers in MatConvNet's terms -------------------------------------------------------------------

def matconvnet_layers(modules: Iterable[tuple[str, nn.Module]]) -> tuple[MatConvNetLayer, ...]:
    """The layers a MatConvNet file must hold, in this order and under these names, to compute what the
    named torch ``modules`` compute. Dropout is left out: the identity at inference, and MatConvNet's
    imports remove it. Raises ValueError for a layer MatConvNet cannot express."""
    out = []
    for name, module in modules:
        if not isinstance(module, nn.Dropout):
            out.append(_equivalent(name, module))
    return tuple(out)


def _equivalent(name: str, module: nn.Module) -> MatConvNetLayer:
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str) or module.groups != 1:
            raise ValueError(f"{name}: {module} has no MatConvNet equivalent here")
        (pad_y, pad_x), (stride_y, stride_x) = module.padding, module.stride
        return MatConvNetLayer(name, "conv", {"stride": (float(stride_y), float(stride_x)),
                                              "pad": (float(pad_y), float(pad_y), float(pad_x), float(pad_x)),
                                              "dilate": tuple(float(d) for d in module.dilation)})
    if isinstance(module, nn.ReLU):
        return MatConvNetLayer(name, "relu", {"leak": (0.0,)})
    if isinstance(module, nn.LocalResponseNorm):
        # torch: x / (k + alpha/n · Σ x²)^beta over channels [c - n//2, c + (n-1)//2]; MatConvNet sums over
        # [c - floor((N-1)/2), c + ceil((N-1)/2)]: the same window only for odd n.
        if module.size % 2 == 0:
            raise ValueError(f"{name}: LRN over {module.size} channels is centred differently in MatConvNet")
        return MatConvNetLayer(name, "lrn", {"param": (float(module.size), float(module.k),
                                                       module.alpha / module.size, float(module.beta))})
    if isinstance(module, nn.MaxPool2d):
        return MatConvNetLayer(name, "pool", _max_pool_settings(name, module))
    raise ValueError(f"{name}: no MatConvNet equivalent for {type(module).__name__}")


def _max_pool_settings(name: str, module: nn.MaxPool2d) -> dict[str, Setting]:
    """A torch max-pool as MatConvNet's ``pool`` layer.

    torch's ceil_mode gives ceil((H - k) / s) + 1 outputs, the windows still starting at 0, s, 2s ...;
    MatConvNet gives floor((H + TOP + BOTTOM - k) / s) + 1, so padding the bottom (and right) by s - 1
    yields the same windows when s <= k (torch's rule that the last window start inside the input then never
    applies). That padding is how MatConvNet's Caffe import (utils/layers.py, CaffePooling) expresses
    Caffe's own ceil rounding. The padded cells hold zeros in MatConvNet and are skipped by torch: the
    same maximum after a ReLU, which is where every pool of these networks sits.
    """
    pair = (lambda v: (v, v) if isinstance(v, int) else tuple(v))  # noqa: E731
    size, stride = pair(module.kernel_size), pair(module.stride or module.kernel_size)
    if pair(module.padding) != (0, 0) or pair(module.dilation) != (1, 1) \
            or (module.ceil_mode and any(s > k for s, k in zip(stride, size))):
        raise ValueError(f"{name}: {module} has no MatConvNet equivalent here")
    extra = [float(s - 1) if module.ceil_mode else 0.0 for s in stride]
    return {"method": "max", "pool": (float(size[0]), float(size[1])), "stride": (float(stride[0]), float(stride[1])),
            "pad": (0.0, extra[0], 0.0, extra[1])}


def compare_layers(found: Sequence[MatConvNetLayer], expected: Sequence[MatConvNetLayer]) -> list[str]:
    """Where a file's layers differ from the ``expected`` ones, one line per difference (empty: none).

    Every expected layer must be in the file under its name, with its type and settings; the file may
    hold more (pool5, fc6-fc8, softmax: layers the spec deletes). The expected layers' order must be the
    file's, since an LRN after a pool is not an LRN before it.
    """
    by_name = {layer.name: layer for layer in found}
    problems = []
    for want in expected:
        got = by_name.get(want.name)
        if got is None:
            problems.append(f"{want.name}: not in the file (the network has a {want.type} layer there)")
        elif got.type != want.type:
            problems.append(f"{want.name}: a {got.type} layer in the file, a {want.type} layer in the network")
        else:
            problems += [f"{want.name} ({want.type}) {key}: file {_shown(got.settings.get(key))}, network "
                         f"{_shown(value)}" for key, value in want.settings.items()
                         if not _same(got.settings.get(key), value)]
    names = {want.name for want in expected}
    order = [layer.name for layer in found if layer.name in names]
    if not problems and order != [want.name for want in expected]:
        problems.append(f"layer order: file {order}, network {[want.name for want in expected]}")
    return problems


def _same(a: Setting | None, b: Setting) -> bool:
    if isinstance(a, str) or isinstance(b, str) or a is None:
        return a == b
    # float32 / float64 storage and 0.0005 / 5 vs 0.0001: equal to a relative 1e-6
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-12) for x, y in zip(a, b))


def _shown(value: Setting | None) -> str:
    if value is None or isinstance(value, str):
        return str(value)
    return "[" + " ".join(f"{v:g}" for v in value) + "]"


__all__ = ["MatConvNetFile", "MatConvNetLayer", "compare_layers", "is_matlab_file", "matconvnet_layers",
           "read_input_mean", "read_matconvnet"]
