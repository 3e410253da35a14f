"""Pre-trained weights a teacher starts from (spec §4, §5 step 1): the registry of published weights,
their files' checksums, and readers for the formats the authors and their ports distributed.

A preset names, per task × architecture, which weights its teacher starts from (a name below) or
``from_scratch`` (:mod:`occkd_core.presets`); the user maps each name to a local file, since nothing is
ever downloaded. The file's sha256 is part of the teacher's identity, so the same name pointing at other
bytes is another experiment.

Formats read by :func:`read_weights_file`:

* PyTorch state dicts (``torch.load(..., weights_only=True)``, never unpickling code): torchvision's
  ``resnet50-0676ba61.pth``, the common ``vgg_face_dag.pth`` / ``vgg_m_face`` style ports, our checkpoints;
* MatConvNet ``.mat`` files as the authors used them (``imagenet-vgg-f.mat``, ``vgg-face.mat``), read
  with :func:`scipy.io.loadmat`: the "simplenn" layout (``layers`` cell array, each conv layer with
  ``weights = {filters, biases}`` or the older ``filters`` / ``biases`` fields, at the top level or under
  ``net``) and the "DagNN" layout (``layers`` / ``params`` struct arrays, ``dagnn.Conv`` layers naming
  their filter and bias params). Filters ``H × W × Cin × Cout`` become torch's ``Cout × Cin × H × W``;
  both frameworks correlate (no kernel flip), take RGB input and, for these networks, 0-255 pixels minus
  a mean, which is how :mod:`occkd_core.preprocess` feeds them (spec §15 #17).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from occkd_core.files import file_sha256

#: What a preset writes for a teacher that starts from random initialisation.
FROM_SCRATCH = "from_scratch"


@dataclass(frozen=True)
class PretrainedWeights:
    """Published weights a teacher can start from."""

    name: str  # what presets and ``--weights NAME=PATH`` call them
    arch: str  # the architecture they load into
    trained_on: str  # one line for reports and errors
    files: tuple[str, ...]  # the file names the weights are published under (MatConvNet, PyTorch ports)


#: Weights name -> what it is. Read only through :func:`get_pretrained`.
PRETRAINED: dict[str, PretrainedWeights] = {
    "vggf_imagenet": PretrainedWeights(
        "vggf_imagenet", "vggf", "VGG-f (CNN-F, Chatfield et al. 2014) trained on ImageNet",
        ("imagenet-vgg-f.mat",)),
    "vggface": PretrainedWeights(
        "vggface", "vggface", "VGG-face (Parkhi et al. 2015) trained on face identification",
        ("vgg-face.mat", "vgg_face_dag.pth")),
    "resnet50_imagenet": PretrainedWeights(
        "resnet50_imagenet", "resnet50", "ResNet-50 trained on ImageNet (torchvision IMAGENET1K_V1)",
        ("resnet50-0676ba61.pth",)),
}


def get_pretrained(name: str) -> PretrainedWeights:
    """The weights called ``name``, or a ValueError listing the valid names."""
    try:
        return PRETRAINED[name]
    except KeyError:
        raise ValueError(f"unknown pre-trained weights {name!r}; valid names: {', '.join(sorted(PRETRAINED))} "
                         f"(or {FROM_SCRATCH})") from None


@dataclass(frozen=True)
class WeightsFile:
    """A local file holding the weights called ``name``, with the sha256 that identifies its bytes."""

    name: str
    path: str  # absolute
    sha256: str

    @classmethod
    def locate(cls, name: str, path: str | Path) -> "WeightsFile":
        """Check the name and that ``path`` is a readable file, and checksum it (FileNotFoundError / ValueError)."""
        get_pretrained(name)
        path = Path(path)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else ("is not a regular file" if path.exists() else "does not exist")
            raise FileNotFoundError(f"weights file {str(path)!r} for {name} {what}")
        return cls(name=name, path=str(path.resolve()), sha256=file_sha256(path))


def read_weights_file(path: str | Path) -> Mapping[str, Any]:
    """The raw mapping a weights file holds: a torch file's object, or a MatConvNet file as a state dict
    with the file's own layer names (``conv1.weight``, ``conv5_3.bias``, ``fc8.weight`` ...).

    Raises ValueError, naming the file, for anything that is not one of the formats above.
    """
    path = Path(path)
    if not path.is_file():
        what = "a folder" if path.is_dir() else ("not a regular file" if path.exists() else "not found")
        raise FileNotFoundError(f"pre-trained weights {str(path)!r}: {what}; occkd never downloads weights, "
                                f"so point to the local file")
    with open(path, "rb") as file:
        head = file.read(128)
    if path.suffix.lower() == ".mat" or head.startswith(b"MATLAB"):
        return read_matconvnet(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load of a file that is not torch's raises a version-
        # dependent zoo (UnpicklingError, RuntimeError, EOFError, OSError, KeyError for text, IndexError, ...)
        raise ValueError(f"cannot read {str(path)!r} as a state dict ({type(err).__name__}: {err}); save weights "
                         f"with torch.save(model.state_dict(), path), or pass a MatConvNet .mat file") from None
    if not isinstance(raw, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(raw).__name__}, not a state dict")
    return raw


# -- MatConvNet -----------------------------------------------------------------------------------------

def read_matconvnet(path: str | Path) -> dict[str, Tensor]:
    """The conv layers of a MatConvNet model file as a torch state dict keyed ``<layer>.weight`` / ``.bias``.

    Non-conv layers (ReLU, LRN, pooling, softmax) have no parameters. fc6-fc8 are conv layers in
    MatConvNet and come out too; :func:`occkd_core.models.load_pretrained` drops them (spec §4.1-4.2).
    """
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    path = Path(path)
    try:
        contents = loadmat(str(path), struct_as_record=False, squeeze_me=False)
    except NotImplementedError:  # scipy's word for MATLAB v7.3 (HDF5) files
        raise ValueError(f"{str(path)!r} is a MATLAB v7.3 (HDF5) file, which scipy cannot read; re-save it in "
                         f"MATLAB with `net = load(file); save(out, '-struct', 'net', '-v7')`") from None
    except (MatReadError, ValueError, TypeError, OSError, EOFError) as err:
        raise ValueError(f"cannot read {str(path)!r} as a MATLAB file ({type(err).__name__}: {err})") from None
    net = {key: value for key, value in contents.items() if not key.startswith("__")}
    if "layers" not in net and "net" in net:
        inner = _single(net["net"])
        net = {name: getattr(inner, name) for name in getattr(inner, "_fieldnames", [])}
    if "layers" not in net:
        raise ValueError(f"{str(path)!r} is a MATLAB file without a MatConvNet network (no 'layers' variable, "
                         f"found {sorted(net)}); expected imagenet-vgg-f.mat / vgg-face.mat as MatConvNet ships them")
    if "params" in net:
        state = _dagnn_state(net["layers"], net["params"])
    else:
        state = _simplenn_state(net["layers"])
    if not state:
        raise ValueError(f"{str(path)!r} holds a MatConvNet network without any conv layer weights")
    return state


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


__all__ = ["FROM_SCRATCH", "PRETRAINED", "PretrainedWeights", "WeightsFile", "get_pretrained",
           "read_matconvnet", "read_weights_file"]
