"""Loading pre-trained weights into a network (spec §4): torch state dicts and MatConvNet ``.mat`` files, read
locally (nothing is downloaded). What each network's files look like is the network's own to say
(:class:`~occkd_core.models.FaceNet`: ``deleted_file_layers``, ``file_key_candidates``,
``matconvnet_layers``), so a new network needs no change here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from torch import Tensor

from occkd_core.matconvnet import MatConvNetFile, compare_layers
from occkd_core.pretrained import PRETRAINED, read_weights_file

if TYPE_CHECKING:
    from occkd_core.models import FaceNet

_MAX_LISTED = 10


def load_pretrained(model: FaceNet, path: str | Path, *, skip_head: bool = True) -> list[str]:
    """Load a state dict from ``path`` into ``model``; returns the model keys that were loaded. Never downloads.

    Accepts a plain state dict, or one under ``"state_dict"`` / ``"model"`` (our checkpoints), with or
    without a DDP ``module.`` prefix, and MatConvNet ``.mat`` files (:mod:`occkd_core.pretrained`).
    Keys are matched as: our own keys; MatConvNet's layer names and the "dag" ports of
    VGG-face / VGG-f (``conv1_1.weight`` -> ``features.conv1_1.weight``; their fc6-fc8 are skipped, the
    spec deletes them); torchvision's ResNet (``fc.*`` -> ``head.*``). With ``skip_head`` the head is
    not loaded (a new task head). Any missing, unexpected or wrongly shaped entry raises a ValueError
    that lists them and names the architecture the file seems to hold.
    """
    path = Path(path)
    content = read_weights_file(path)  # torch (weights_only) or MatConvNet .mat; errors name the file
    network = content if isinstance(content, MatConvNetFile) else None
    file_state = _unwrap_state_dict(network.state if network is not None else content, path)
    model_state = model.state_dict()

    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in file_state.items():
        if model.deleted_file_layers and key.startswith(model.deleted_file_layers):
            continue
        name = next((n for n in model.file_key_candidates(key) if n in model_state), None)
        if name is None:
            unexpected.append(key)
        elif not (skip_head and name.startswith("head.")):
            mapped[name] = value
    # BatchNorm fills a missing counter itself (older torchvision files lack it).
    missing = [name for name in model_state if name not in mapped and not name.endswith("num_batches_tracked")
               and not (skip_head and name.startswith("head."))]
    mismatched = [f"{name}: file {tuple(value.shape)} vs model {tuple(model_state[name].shape)}"
                  for name, value in mapped.items() if value.shape != model_state[name].shape]
    if missing or unexpected or mismatched:
        width = model.spec.width_mult
        problems = [f"cannot load {str(path)!r} into {model.arch} (width_mult {width:g}, "
                    f"{model.num_outputs} outputs)"]
        guess = _guess_architecture(file_state)
        if guess is not None:
            problems.append(f"the file looks like {guess}")
        if missing:
            problems.append(f"missing from the file ({len(missing)}): {_listed(missing)}")
        if unexpected:
            problems.append(f"in the file but not in the model ({len(unexpected)}): {_listed(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatch ({len(mismatched)}): " + "; ".join(mismatched))
        raise ValueError("\n  ".join(problems))
    if network is not None:
        _check_matconvnet_layers(model, network, path)
    model.load_state_dict(mapped, strict=False)
    return [name for name in model_state if name in mapped]


def _check_matconvnet_layers(model: FaceNet, network: MatConvNetFile, path: Path) -> None:
    """Refuse a MatConvNet file whose layers (LRN, pooling, conv stride and padding) are not the network's:
    its weights were trained to be read by those layers, and another LRN or pooling changes every later
    activation."""
    differences = compare_layers(network.layers, model.matconvnet_layers())
    if differences:
        raise ValueError("\n  ".join([
            f"cannot load {str(path)!r} into {model.arch}: the file's network differs from the one occkd builds "
            f"(MatConvNet settings: stride [Y X], pad [top bottom left right], LRN param [N kappa alpha beta])",
            *differences,
            f"use the published file ({', '.join(_published_files(model.arch))}), or a torch state dict of this "
            f"network"]))


def _published_files(arch: str) -> list[str]:
    return [name for weights in PRETRAINED.values() if weights.arch == arch for name in weights.files]


def _unwrap_state_dict(raw: object, path: Path) -> dict[str, Tensor]:
    if isinstance(raw, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(raw.get(wrapper), Mapping):
                raw = raw[wrapper]
                break
    if not isinstance(raw, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(raw).__name__}, not a state dict")
    not_tensors = [str(key) for key, value in raw.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise ValueError(f"{str(path)!r} is not a state dict: entries {_listed(not_tensors)} are not tensors")
    return {str(key).removeprefix("module."): value for key, value in raw.items()}


def _guess_architecture(state: Mapping[str, Tensor]) -> str | None:
    """A human description of which network a state dict is for, when recognisable."""

    def first(*names: str) -> Tensor | None:
        return next((state[n] for name in names for n in (name, f"features.{name}") if n in state), None)

    if first("conv5_3.weight") is not None:
        arch, stem = "vggface", first("conv1_1.weight")
    elif first("conv5.weight") is not None and first("conv1.weight") is not None:
        arch, stem = "vggf", first("conv1.weight")
    elif "layer4.2.conv3.weight" in state and "layer3.5.conv3.weight" in state \
            and "layer3.6.conv3.weight" not in state:
        arch, stem = "resnet50", state.get("conv1.weight")
    elif any(key.startswith("layer1.") for key in state):
        return "a torchvision ResNet other than ResNet-50"
    elif "features.0.weight" in state:
        return "a torchvision VGG/AlexNet (numbered features.N layers), which none of our models use"
    else:
        return None
    if stem is None or stem.dim() != 4:
        return arch
    return f"{arch} (width_mult ≈ {stem.shape[0] / 64:g})"


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown if len(names) <= _MAX_LISTED else f"{shown}, ... ({len(names) - _MAX_LISTED} more)"
