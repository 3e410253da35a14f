"""Pre-trained weights a teacher starts from (spec §4, §5 step 1): the registry of published weights,
their files' checksums, and readers for the formats the authors and their ports distributed.

A preset names, per task × architecture, which weights its teacher starts from (a name below) or
``from_scratch`` (:mod:`occkd_core.presets`); the user maps each name to a local file, since nothing is
ever downloaded. The file's sha256 is part of the teacher's identity, so the same name pointing at other
bytes is another experiment.

Formats read by :func:`read_weights_file`:

* PyTorch state dicts (``torch.load(..., weights_only=True)``, never unpickling code): torchvision's
  ``resnet50-0676ba61.pth``, the common ``vgg_face_dag.pth`` / ``vgg_m_face`` style ports, our checkpoints;
* MatConvNet ``.mat`` files as the authors used them (``imagenet-vgg-f.mat``, ``vgg-face.mat``):
  :mod:`occkd_core.matconvnet` reads their conv weights, every layer's settings (checked against the
  network they load into) and the input mean they name (``meta.normalization.averageImage``), which a
  teacher started from the file subtracts instead of its architecture's registry mean (spec §15 #17).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from occkd_core.files import file_sha256
from occkd_core.matconvnet import MatConvNetFile, is_matlab_file, read_input_mean, read_matconvnet

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
    # The RGB input mean (0..255) the file names (a MatConvNet file's averageImage per channel), which its
    # teacher subtracts; None: the file names none (torch files) and the architecture's registry mean
    # applies. Read from the bytes sha256 identifies, so it is recorded beside it, not part of it.
    input_mean: tuple[float, float, float] | None = None

    @classmethod
    def locate(cls, name: str, path: str | Path) -> "WeightsFile":
        """Check the name and that ``path`` is a readable file, checksum it and read the input mean it names
        (FileNotFoundError / ValueError)."""
        get_pretrained(name)
        path = Path(path)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else ("is not a regular file" if path.exists() else "does not exist")
            raise FileNotFoundError(f"weights file {str(path)!r} for {name} {what}")
        return cls(name=name, path=str(path.resolve()), sha256=file_sha256(path), input_mean=weights_input_mean(path))


def weights_input_mean(path: str | Path) -> tuple[float, float, float] | None:
    """The RGB input mean (0..255) a weights file names: a MatConvNet file's averageImage per channel
    (:func:`occkd_core.matconvnet.read_input_mean`); None for torch files, which name none."""
    path = Path(path)
    return read_input_mean(path) if is_matlab_file(path) else None


def read_weights_file(path: str | Path) -> Mapping[str, Any] | MatConvNetFile:
    """What a weights file holds: a torch file's mapping as stored, or a MatConvNet file's weights (as a state
    dict with the file's own layer names: ``conv1.weight``, ``conv5_3.bias``, ``fc8.weight`` ...), layer
    settings and input mean.

    Raises ValueError, naming the file, for anything that is not one of the formats above.
    """
    path = Path(path)
    if not path.is_file():
        what = "a folder" if path.is_dir() else ("not a regular file" if path.exists() else "not found")
        raise FileNotFoundError(f"pre-trained weights {str(path)!r}: {what}; occkd never downloads weights, "
                                f"so point to the local file")
    if is_matlab_file(path):
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


__all__ = ["FROM_SCRATCH", "PRETRAINED", "PretrainedWeights", "WeightsFile", "get_pretrained",
           "read_matconvnet", "read_weights_file", "weights_input_mean"]
