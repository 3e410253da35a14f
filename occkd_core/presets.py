"""Presets: every hyperparameter of a run, as validated data (YAML files beside this module).

A preset names its data, each architecture's input size and channel width multiplier, the fusion C grid, and one
:class:`~occkd_core.specs.TrainSpec` per task × architecture × stage. A list value in a stage entry is a grid
(e.g. ``margin: [0.0, 0.1, ...]``); :meth:`Preset.grid` expands it. ``paper`` is spec §10 row by row;
``smoke`` runs every stage in minutes on 2 CPU cores. Users add their own by passing a YAML path.
A preset may start from another (``extends: paper``) and give only what it changes: its mappings are
merged into the base's, key by key, and anything else (a value, a list) replaces the base's.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from occkd_core.models import ARCHITECTURES, get_architecture
from occkd_core.pretrained import FROM_SCRATCH, get_pretrained
from occkd_core.specs import ArchSettings, DataSettings, SettingError, TrainSpec, check_number
from occkd_core.plugins import env_plugins, load_plugins, resolve_plugin
from occkd_core.preset_files import (  # noqa: F401 - PRESET_DIR, builtin_presets: this module's public names too
    PRESET_DIR, TOP_LEVEL_KEYS, _preset_path, builtin_presets, preset_mapping,
)
from occkd_core.stages import STAGES, StageInfo, get_stage, require_settings
from occkd_core.tasks import TASKS, get_task


#: Stage fields that may be given as a list to make a hyperparameter grid. ``triplet_normalize: [true,
#: false]`` compares L2-normalised with raw embeddings in the triplet loss (spec §15 #20); ``tau_squared: [false,
#: true]`` Hinton KD with and without the τ² factor (spec §15 #2).
GRID_FIELDS = ("lr", "lam", "temperature", "margin", "triplet_normalize", "tau_squared")
#: Kernels of the age fusion's ε-SVR (spec §15 #28: RBF by default, "also try a linear kernel").
SVR_KERNELS = ("rbf", "linear")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    data: DataSettings
    models: Mapping[str, ArchSettings]
    fusion_Cs: tuple[float, ...]
    # (task, arch, stage) -> raw entry (scalars, or lists for grid fields)
    stages: Mapping[tuple[str, str, str], Mapping[str, Any]] = field(repr=False)
    # What a grid node of each architecture (and "fusion", "significance") asks the cluster for:
    # {"cpus": 4, "gpus": 1, "workers": 1}. Read by the grid only; the method ignores it.
    resources: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    # (task, arch) -> the pre-trained weights its teacher starts from (occkd_core.pretrained), or FROM_SCRATCH.
    pretrained: Mapping[tuple[str, str], str] = field(default_factory=dict)
    # Kernels of the age fusion's ε-SVR; the first is the model called "fusion", the others "fusion_<kernel>".
    svr_kernels: tuple[str, ...] = ("rbf",)
    # Train every distilled stage's teacher-free control and the control fusion beside it (occkd's own);
    # False leaves them out and the report says its comparisons are uncontrolled.
    controls: bool = True
    # Out-of-tree modules that register stages or architectures (occkd_core.plugins), resolved: the preset's
    # ``plugins:`` and OCCKD_PLUGINS. The grid imports them again in every worker.
    plugins: tuple[str, ...] = ()

    def arch(self, arch: str) -> ArchSettings:
        get_architecture(arch)
        if arch not in self.models:
            raise ValueError(f"preset {self.name!r} has no models entry for {arch!r} (it runs {', '.join(self.models)})")
        return self.models[arch]

    def grid(self, task: str, arch: str, stage: str) -> list[TrainSpec]:
        """Every distinct TrainSpec of the grid for one stage, in a stable order (one item if no grid). A
        control's grid is its distilled stage's entry; a loss setting the stage's loss does not read for
        ``task`` is left at its default, so points that differ only there are one (e.g. τ² for the hint)."""
        task_info, stage_info = get_task(task), get_stage(stage)
        get_architecture(arch)
        configured = stage_info.control_of or stage
        entry = dict(self.stages[(task, arch, configured)])
        axes = [(k, v) for k, v in entry.items() if isinstance(v, list)]
        combos = itertools.product(*(v for _, v in axes)) if axes else [()]
        read = stage_info.strategy.loss_settings(task_info)
        specs = [require_settings(_train_spec({**entry, **dict(zip((k for k, _ in axes), values))}, stage_info),
                                  configured).keeping_loss_settings(read) for values in combos]
        return list(dict.fromkeys(specs))  # distinct, first-seen order

    def has_stage(self, task: str, arch: str, stage: str) -> bool:
        """Whether the preset configures this stage (a control: its distilled stage) for ``task`` × ``arch``."""
        return arch in self.models and (task, arch, get_stage(stage).control_of or stage) in self.stages

    def train_spec(self, task: str, arch: str, stage: str) -> TrainSpec:
        """The single TrainSpec of a stage; an error if the stage is a grid."""
        specs = self.grid(task, arch, stage)
        if len(specs) != 1:
            raise ValueError(f"{task}/{arch}/{stage} is a grid of {len(specs)} settings in preset {self.name!r}")
        return specs[0]

    def teacher_weights(self, task: str, arch: str) -> str:
        """The weights name the teacher of ``task`` × ``arch`` starts from, or ``from_scratch``."""
        get_task(task), get_architecture(arch)
        return self.pretrained.get((task, arch), FROM_SCRATCH)

    def required_weights(self, tasks: list[str], archs: list[str]) -> dict[str, list[str]]:
        """Weights name -> the teachers (``task/arch``) among ``tasks`` × ``archs`` that start from it."""
        needed: dict[str, list[str]] = {}
        for task in tasks:
            for arch in archs:
                name = self.teacher_weights(task, arch)
                if name != FROM_SCRATCH:
                    needed.setdefault(name, []).append(f"{task}/{arch}")
        return needed


FUSION_KEYS = ("Cs", "svr_kernels")


def _parse_preset(raw: Mapping[str, Any], origin: str) -> Preset:
    # Keys starting with "_" hold YAML anchors shared by several entries.
    unknown = sorted(k for k in raw if k not in TOP_LEVEL_KEYS and not str(k).startswith("_"))
    if unknown:
        raise ValueError(f"preset {origin}: unknown key(s) {unknown}; valid: {', '.join(TOP_LEVEL_KEYS)}")
    for key in ("data", "models", "fusion", "stages", "stage_defaults", "resources"):
        optional = key in ("stage_defaults", "resources") and raw.get(key) is None  # an empty section
        if key in raw and not optional and not isinstance(raw[key], Mapping):
            raise ValueError(f"preset {origin}: {key} must be a mapping, got {raw[key]!r}"
                             + (" (it is empty)" if raw[key] is None else ""))
    try:
        name = _parse_name(raw["name"])
        description = raw.get("description", "")
        if not isinstance(description, str):
            raise ValueError(f"description must be text, got a {type(description).__name__}")
        _check_keys("models", raw["models"], ARCHITECTURES)
        complete = raw.get("complete", False)
        if not isinstance(complete, bool):
            raise ValueError(f"complete must be true or false, got {complete!r}")
        if complete:  # a preset that must configure every architecture and stage (the papers' own)
            missing = [arch for arch in ARCHITECTURES if arch not in raw["models"]]
            if missing:
                raise ValueError(f"models: no entry for {missing} (complete: true needs every architecture)")
        models = {arch: _build_setting(ArchSettings, f"models.{arch}", _mapping(f"models.{arch}", raw["models"][arch]))
                  for arch in ARCHITECTURES if arch in raw["models"]}
        data = _build_setting(DataSettings, "data", raw["data"])
        stages, given_in = _stage_entries(raw)
        preset = Preset(
            name=name,
            description=description,
            data=data,
            models=models,
            fusion_Cs=_parse_fusion_Cs(raw["fusion"]),
            stages=stages,
            resources=_parse_resources(raw.get("resources") or {}),
            pretrained=_parse_pretrained(raw.get("pretrained", FROM_SCRATCH)),
            svr_kernels=_parse_svr_kernels(raw["fusion"]),
            controls=_parse_controls(raw.get("controls", True)),
            plugins=tuple(raw.get("plugins") or ()),
        )
        for task, arch, stage in stages:  # validate every grid point now, not mid-run
            try:
                preset.grid(task, arch, stage)
            except ValueError as err:  # name the mapping the value came from, or at least the stage
                key = getattr(err, "key", None)
                where = given_in[(task, arch, get_stage(stage).control_of or stage)].get(key)
                raise ValueError(f"{where or f'stage {task}/{arch}/{stage}'}: {err}") from None
    except KeyError as err:
        raise ValueError(f"preset {origin}: missing key {err}") from None
    except (TypeError, ValueError) as err:
        raise ValueError(f"preset {origin}: {err}") from None
    return preset


#: A preset's name becomes a folder (``<storage>/reports/occkd-<name>``): one path component, no separator,
#: no "..", nothing a shell or a file system treats specially.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


def name_problem(value: Any) -> str | None:
    """Why ``value`` cannot name a folder safely (see :data:`SAFE_NAME`), or None."""
    if not isinstance(value, str):
        return f"must be text, got {value!r}"
    if not SAFE_NAME.fullmatch(value):
        return (f"must be one folder name of at most 100 letters, digits, '.', '_' and '-' (not starting with '.' "
                f"or '-'; it names the report folder under --storage), got {value!r}")
    return None


def _parse_name(value: Any) -> str:
    problem = name_problem(value)
    if problem:
        raise ValueError(f"name {problem}")
    return value


def _mapping(where: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a mapping of settings, got {value!r}")
    return value


def _build_setting(cls: type, where: str, values: Mapping[str, Any]) -> Any:
    """``cls(**values)`` with unknown keys listed and a bad value named by where it was given."""
    _check_keys(where, values, tuple(f.name for f in fields(cls)))
    try:
        return cls(**values)
    except SettingError as err:
        raise ValueError(f"{where}: {err}") from None


def _train_spec(entry: Mapping[str, Any], stage: StageInfo) -> TrainSpec:
    """One grid point's TrainSpec: TrainSpec's fields, and the stage's own settings (``stage.settings``, checked
    by building that type) in ``extra``."""
    own = {f.name for f in dataclasses.fields(stage.settings)} if stage.settings else set()
    extra = {k: v for k, v in entry.items() if k in own}
    if stage.settings is not None:
        stage.settings(**extra)  # its own checks, now
    return TrainSpec.from_dict({**{k: v for k, v in entry.items() if k not in own}, "extra": extra})


def _stage_settings(stage: str) -> tuple[str, ...]:
    info = STAGES.get(stage)
    return tuple(f.name for f in dataclasses.fields(info.settings)) if info and info.settings else ()


def _stage_entries(raw: Mapping[str, Any]) -> tuple[dict[tuple[str, str, str], Mapping[str, Any]],
                                                       dict[tuple[str, str, str], dict[str, str]]]:
    """Every (task, arch, stage) entry, stage_defaults merged under its own settings, and for each entry
    where each setting was given (``stage_defaults.student`` or ``stages.fer.vggf.student``)."""
    defaults = raw.get("stage_defaults", {}) or {}
    _check_keys("stage_defaults", defaults, tuple(STAGES))
    for stage, entry in defaults.items():
        _mapping(f"stage_defaults.{stage}", entry or {})
    _check_keys("stages", raw["stages"], tuple(TASKS))
    for task, archs in raw["stages"].items():
        _check_keys(f"stages.{task}", _mapping(f"stages.{task}", archs or {}), ARCHITECTURES)
        for arch, entries in (archs or {}).items():
            _check_keys(f"stages.{task}.{arch}", _mapping(f"stages.{task}.{arch}", entries or {}), tuple(STAGES))
            for stage, entry in (entries or {}).items():
                _mapping(f"stages.{task}.{arch}.{stage}", entry or {})
    stages: dict[tuple[str, str, str], Mapping[str, Any]] = {}
    given_in: dict[tuple[str, str, str], dict[str, str]] = {}
    complete = raw.get("complete", False)
    for task in TASKS:
        for arch in (a for a in ARCHITECTURES if complete or a in raw["models"]):
            given = (raw["stages"].get(task) or {}).get(arch) or {}
            for stage in tuple(STAGES):
                own = given.get(stage) or {}
                entry = {**(defaults.get(stage) or {}), **own}
                if not entry and (complete or not STAGES[stage].distilled):
                    raise ValueError(f"no settings for stage {task}/{arch}/{stage}")
                if not entry:  # a distilled stage this preset does not run (e.g. a plugin's): the grid skips it
                    continue
                where = {key: f"stages.{task}.{arch}.{stage}" if key in own else f"stage_defaults.{stage}"
                         for key in entry}
                grid_fields = (*GRID_FIELDS, *_stage_settings(stage))
                for key, value in entry.items():
                    if isinstance(value, list) and key not in grid_fields:
                        raise ValueError(f"{where[key]}: {key} cannot be a grid (only {grid_fields})")
                    if isinstance(value, list) and not value:
                        raise ValueError(f"{where[key]}: grid {key} is empty")
                stages[(task, arch, stage)] = entry
                given_in[(task, arch, stage)] = where
    return stages, given_in


def _parse_fusion_Cs(fusion: Mapping[str, Any]) -> tuple[float, ...]:
    Cs = fusion["Cs"]
    if not isinstance(Cs, list) or not Cs or not all(
            isinstance(c, numbers.Real) and not isinstance(c, bool) and math.isfinite(c) and c > 0 for c in Cs):
        raise ValueError(f"fusion.Cs must be a non-empty list of finite numbers > 0 (the SVM's C grid), got {Cs!r}")
    return tuple(float(c) for c in Cs)


RESOURCE_KEYS = ("cpus", "gpus", "workers", "max_ddp_workers")
#: Resource keys renamed before 1.0, refused with their new name rather than read under the old one: a silent
#: alias would keep the ambiguous word alive (``max_workers`` is also Ray's autoscaler node count).
RENAMED_RESOURCE_KEYS = {"max_workers": "max_ddp_workers"}


def _parse_pretrained(raw: Any) -> dict[tuple[str, str], str]:
    """``pretrained:`` is ``from_scratch`` (every teacher), or per task either one name for every
    architecture or a mapping architecture -> name. A mapping must cover every task and architecture:
    where a teacher starts from is part of the experiment, so it is never left to a default."""
    if raw == FROM_SCRATCH:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"pretrained: expected {FROM_SCRATCH} or a mapping task -> architecture -> weights name, "
                         f"got {raw!r}")
    _check_keys("pretrained", raw, tuple(TASKS))
    out: dict[tuple[str, str], str] = {}
    for task in TASKS:
        if task not in raw:
            raise ValueError(f"pretrained: no entry for task {task!r}; give a weights name or {FROM_SCRATCH} "
                             f"for each architecture")
        entry = raw[task]
        per_arch = {arch: entry for arch in ARCHITECTURES} if isinstance(entry, str) else entry
        if not isinstance(per_arch, Mapping):
            raise ValueError(f"pretrained.{task}: expected a weights name or a mapping architecture -> name, got {entry!r}")
        _check_keys(f"pretrained.{task}", per_arch, ARCHITECTURES)
        for arch in ARCHITECTURES:
            if arch not in per_arch:
                raise ValueError(f"pretrained.{task}: no entry for architecture {arch!r}; give a weights name or "
                                 f"{FROM_SCRATCH}")
            name = str(per_arch[arch])
            if name == FROM_SCRATCH:
                continue
            weights = get_pretrained(name)
            if weights.arch != arch:
                raise ValueError(f"pretrained.{task}.{arch}: weights {name!r} are for {weights.arch}, not {arch}")
            out[(task, arch)] = name
    return out


def _parse_controls(raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise ValueError(f"controls must be true or false (train each distilled stage's teacher-free control), "
                         f"got {raw!r}")
    return raw


def _parse_svr_kernels(fusion: Mapping[str, Any]) -> tuple[str, ...]:
    unknown = sorted(set(fusion) - set(FUSION_KEYS))
    if unknown:
        raise ValueError(f"fusion: unknown key(s) {unknown}; valid: {', '.join(FUSION_KEYS)}")
    kernels = fusion.get("svr_kernels", ["rbf"])
    if not isinstance(kernels, list) or not kernels or any(k not in SVR_KERNELS for k in kernels) \
            or len(set(kernels)) != len(kernels):
        raise ValueError(f"fusion.svr_kernels must be a non-empty list of distinct kernels from "
                         f"{', '.join(SVR_KERNELS)}, got {kernels!r}")
    return tuple(kernels)


def _check_keys(where: str, values: Mapping[str, Any], valid: tuple[str, ...]) -> None:
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown name(s) {unknown}; valid names: {', '.join(valid)}")


def _parse_resources(raw: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    valid_owners = (*ARCHITECTURES, "fusion", "significance")
    out = {}
    for owner, values in raw.items():
        if owner not in valid_owners:
            raise ValueError(f"resources: unknown entry {owner!r}; valid: {', '.join(valid_owners)}")
        values = _mapping(f"resources.{owner}", values or {})
        for old, new in RENAMED_RESOURCE_KEYS.items():
            if old in values:
                raise ValueError(f"resources.{owner}.{old} is now called {new} (the most DDP workers the grid may "
                                 f"give one node); rename the key")
        unknown = sorted(set(values) - set(RESOURCE_KEYS))
        if unknown:
            raise ValueError(f"resources.{owner}: unknown key(s) {unknown}; valid: {', '.join(RESOURCE_KEYS)}")
        for key, value in values.items():
            try:
                check_number(key, value)
            except SettingError as err:
                raise ValueError(f"resources.{owner}.{key}: {err}") from None
            if value < 0:
                raise ValueError(f"resources.{owner}.{key} must be >= 0, got {value!r}")
        if values.get("workers", 1) < 1:
            raise ValueError(f"resources.{owner}: workers must be >= 1")
        for key in ("workers", "max_ddp_workers"):
            if key in values and int(values[key]) != values[key]:
                raise ValueError(f"resources.{owner}: {key} must be a whole number, got {values[key]}")
        if "max_ddp_workers" in values and values["max_ddp_workers"] < values.get("workers", 1):
            raise ValueError(f"resources.{owner}: max_ddp_workers ({values['max_ddp_workers']}) is below workers "
                             f"({values.get('workers', 1)}); set workers alone to fix the DDP worker count")
        out[owner] = dict(values)
    return out


def load_preset(name_or_path: str | Path) -> Preset:
    """A built-in preset by name (``paper``, ``smoke``, ...) or a preset YAML file by path. Its plugins (and
    OCCKD_PLUGINS') are imported and registered first: the stages and architectures they add are checked
    like the built-in ones."""
    raw = preset_mapping(name_or_path)
    plugins = tuple(dict.fromkeys([*(resolve_plugin(p) for p in env_plugins()), *raw.get("plugins", ())]))
    load_plugins(plugins)
    return _parse_preset({**raw, "plugins": list(plugins)}, str(_preset_path(name_or_path)))
