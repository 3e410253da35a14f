"""The data each task trains on, prepared once as memory-mappable Arrow files on the storage path.

With no data root, every task uses the built-in synthetic faces (one store holds labels for all
three tasks). With ``--data-root DIR``, the data sets are read in their authors' formats from DIR
(``ferplus/``, ``affectnet/``, ``utkface/``; see :func:`occkd_core.data.sources.find_sources`) and
converted once into stores cached on the storage path by the source files' checksums.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from occkd_core.data import make_synthetic_faces, open_face_store, write_face_store
from occkd_core.data.sources import prepare_real_data
from occkd_core.presets import Preset

#: Bump when the synthetic generator changes what it draws (part of the data fingerprint).
SYNTHETIC_VERSION = 1


@dataclass(frozen=True)
class PreparedData:
    path: Path
    fingerprint: str
    num_train: int


def synthetic_fingerprint(preset: Preset) -> str:
    settings = {"version": SYNTHETIC_VERSION, "num_faces": preset.data.num_faces,
                "image_size": preset.data.image_size, "seed": preset.data.seed}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def prepare_data(preset: Preset, tasks: list[str], storage: Path, data_root: Path | None = None,
                 *, write: bool = True) -> dict[str, PreparedData]:
    """Per task, the prepared store (written now if absent and ``write``), its fingerprint and size."""
    if data_root is None:
        if preset.data.source != "synthetic":
            raise ValueError(f"preset {preset.name!r} trains on real data: pass --data-root DIR")
        fingerprint = synthetic_fingerprint(preset)
        path = Path(storage) / "data" / f"synthetic-{fingerprint}.arrow"
        num_train = round(preset.data.num_faces * 0.6)
        if write and not path.exists():
            data = make_synthetic_faces(preset.data.num_faces, image_size=preset.data.image_size,
                                        seed=preset.data.seed)
            write_face_store(path, data)
        if path.exists():
            num_train = len(open_face_store(path).split("train"))
        return {task: PreparedData(path, fingerprint, num_train) for task in tasks}
    root = Path(data_root)
    if not root.is_dir():
        raise ValueError(f"data root {str(root)!r} is not a readable directory")
    prepared = {}
    # Every architecture of the preset, not only this run's: a later run with more --archs then finds
    # the same store and the same node hashes. UTKFace and the FER+ ∪ AffectNet union are stored at this
    # size (AffectNet crops are resized once from their originals, not upsampled from 48 px per batch);
    # FER+ alone stays at its native 48 px, which every network resizes on the device.
    max_input_size = max(settings.input_size for settings in preset.models.values())
    for task in tasks:
        path = prepare_real_data(task, root, Path(storage) / "data", max_input_size=max_input_size,
                                 union_size=max_input_size, label_rule=preset.data.label_rule)
        prepared[task] = PreparedData(path, path.stem, len(open_face_store(path).split("train")))
    return prepared
