"""Pre-trained weights on the driver: the ``--weights`` files checked against the preset's teachers and
test-loaded, copied onto the grid's storage for the workers, and described in the report."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Mapping

from grid.artifacts import StorageLayout
from grid.graph import StageGraph
from occkd_core.presets import Preset
from occkd_core.pretrained import FROM_SCRATCH, WeightsFile, get_pretrained


def resolve_weights(preset: Preset, tasks: list[str], archs: list[str], given: Mapping[str, str],
                    from_scratch: bool) -> dict[str, WeightsFile]:
    """The weights files the selected teachers start from, checksummed and test-loaded into their
    architecture now, so a missing or wrong file fails before any data is prepared (ValueError /
    FileNotFoundError with one actionable line, or the layers that do not fit)."""
    from occkd_core.loading import load_pretrained
    from occkd_core.models import ModelSpec, build_model

    needed = preset.required_weights(tasks, archs)
    if from_scratch and given:
        raise ValueError("--from-scratch trains every teacher from random initialisation; drop --weights "
                         f"{','.join(given)} or --from-scratch")
    unused = sorted(set(given) - set(needed))
    if unused:
        uses = ", ".join(f"{n} ({', '.join(t)})" for n, t in needed.items()) or "none: every teacher starts from scratch"
        raise ValueError(f"--weights {','.join(unused)}: preset {preset.name!r} starts none of the selected teachers "
                         f"from {' or '.join(unused)} (it uses {uses})")
    missing = {name: teachers for name, teachers in needed.items() if name not in given}
    if missing and not from_scratch:
        listed = "; ".join(f"{name} (e.g. {get_pretrained(name).files[0]}) for {', '.join(teachers)}"
                           for name, teachers in missing.items())
        example = " ".join(f"--weights {name}=PATH" for name in missing)
        raise ValueError(f"preset {preset.name!r} starts teachers from pre-trained weights that were not given: "
                         f"{listed}; pass {example}, or --from-scratch to train them from random initialisation")
    found = {}
    for name, path in given.items():
        weights = WeightsFile.locate(name, path)
        arch = get_pretrained(name).arch
        settings = preset.arch(arch)
        model = build_model(ModelSpec(arch=arch, num_outputs=2, width_mult=settings.width_mult,
                                      dropout=settings.dropout))
        load_pretrained(model, weights.path)  # a wrong file fails now, not hours into the grid
        found[name] = weights
    return found


def stage_weights(found: Mapping[str, WeightsFile], storage: Path) -> dict[str, WeightsFile]:
    """Copy each weights file onto the grid's storage, under its sha256, and start the teachers from that
    copy: ``--weights`` paths are read where the driver runs, but teachers train on worker nodes, which
    all mount the storage. A copy is made once (an interrupted one never takes the final name)."""
    staged = {}
    for name, weights in found.items():
        target = StorageLayout(storage).pretrained(weights.sha256, Path(weights.path).name)
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f"{target.name}.partial")
            shutil.copyfile(weights.path, partial)
            os.replace(partial, target)
        staged[name] = dataclasses.replace(weights, path=str(target))
    return staged


def describe_init(graph: StageGraph, preset: Preset, from_scratch: bool) -> str:
    """The report's sentence on where the teachers started."""
    by_weights: dict[str, list[str]] = {}
    for node in graph.nodes.values():
        if node.stage == "teacher":
            init = node.init or {"weights": FROM_SCRATCH}
            mean = (", input mean " + "/".join(f"{m:.2f}" for m in init["input_mean"])
                    if "input_mean" in init else "")
            label = (f"{init['weights']} ({Path(init['file']).name}, sha256 {init['sha256'][:12]}{mean})"
                     if init["weights"] != FROM_SCRATCH else "from scratch")
            by_weights.setdefault(label, []).append(f"{node.task}/{node.arch}")
    text = "Teachers: " + "; ".join(f"{label}: {', '.join(sorted(set(t)))}" for label, t in by_weights.items()) + "."
    overridden = preset.required_weights(sorted({n.task for n in graph.nodes.values()}),
                                         sorted({n.arch for n in graph.nodes.values() if n.arch}))
    if from_scratch and overridden:
        text += (f" **Trained from scratch by --from-scratch**, although preset `{preset.name}` starts "
                 + "; ".join(f"{', '.join(t)} from {n}" for n, t in overridden.items())
                 + " (the papers' numbers assume those weights).")
    return text
