"""Preset files: where a preset's YAML is (a built-in name or a path), how it is read safely (aliases bounded:
a YAML alias bomb is refused before it expands), and how ``extends:`` merges a preset onto its base. What the
mapping means, and its checks, is :mod:`occkd_core.presets`' business.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

from occkd_core.plugins import resolve_plugin

PRESET_DIR = Path(__file__).parent / "presets"
#: The keys a preset file may hold at its top (besides ``_name`` entries that carry YAML anchors).
TOP_LEVEL_KEYS = ("name", "description", "extends", "data", "models", "pretrained", "fusion", "stage_defaults",
                  "stages", "resources", "controls", "complete", "plugins")


def builtin_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_mapping(name_or_path: str | Path) -> dict[str, Any]:
    """A preset's YAML as one mapping, its ``extends:`` bases merged in (not validated: see :func:`load_preset`),
    for tools that write a changed copy of a preset."""
    return dict(_read_with_bases(_preset_path(name_or_path), ()))


def _preset_path(name_or_path: str | Path, folder: Path | None = None) -> Path:
    """The file of a built-in preset name, or a .yaml path (relative to ``folder`` when given)."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ValueError(f"unknown preset {str(name_or_path)!r}; valid names: {', '.join(builtin_presets())} (or a path to a .yaml file)")
        return path
    if folder is not None and not path.is_absolute():
        path = folder / path
    if not path.exists():
        raise ValueError(f"preset file {str(path)!r} does not exist")
    return path


def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> Mapping[str, Any]:
    """A preset file's mapping with its ``extends:`` base (and the base's base ...) merged underneath."""
    raw = _read_preset_file(path)
    if "plugins" in raw:  # paths are the file's own, relative to its folder
        plugins = raw["plugins"]
        if not isinstance(plugins, list) or not all(isinstance(p, str) and p for p in plugins):
            raise ValueError(f"preset {str(path)!r}: plugins must be a list of module names or .py paths, got {plugins!r}")
        raw = {**raw, "plugins": [resolve_plugin(p, path.parent) for p in plugins]}
    if "extends" not in raw:
        return raw
    base_name = raw["extends"]
    if not isinstance(base_name, str):
        raise ValueError(f"preset {str(path)!r}: extends must name one preset (a built-in name or a .yaml path), "
                         f"got {base_name!r}")
    chain = (*seen, path.resolve())
    base_path = _preset_path(base_name, path.parent)
    if base_path.resolve() in chain:
        names = " -> ".join(str(p) for p in (*chain, base_path.resolve()))
        raise ValueError(f"preset {str(path)!r}: extends goes round in a circle ({names})")
    base = _read_with_bases(base_path, chain)
    return _merged(base, {key: value for key, value in raw.items() if key != "extends"})


def _merged(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overlay`` on top: mappings merge key by key, any other value replaces the base's."""
    out = dict(base)
    for key, value in overlay.items():
        both_mappings = isinstance(value, Mapping) and isinstance(base.get(key), Mapping)
        out[key] = _merged(base[key], value) if both_mappings else value
    return out


#: The most values (scalars, lists, mappings, keys included) a preset file may hold once its aliases (``*name``) are
#: expanded. The built-in presets hold at most ~700; aliases of aliases expand exponentially (2.6 KB of
#: 9 levels of 9 aliases hold 9⁹ values, gigabytes once anything walks or prints them), so a file beyond
#: this is refused before anything is built from it.
MAX_PRESET_VALUES = 100_000


class _TooLarge(Exception):
    pass


class _PresetLoader(yaml.SafeLoader):
    """``yaml.safe_load``, less documents whose aliases expand beyond :data:`MAX_PRESET_VALUES` values or
    refer to themselves: counted on the composed node graph, where an alias is a shared node, before any
    Python object is built."""

    def construct_document(self, node: yaml.Node) -> Any:
        _count_values(node, {}, set())
        return super().construct_document(node)


def _count_values(node: yaml.Node, counted: dict[int, int], open_nodes: set[int]) -> int:
    """Values in ``node`` with every alias expanded; each distinct node is counted once (``counted``)."""
    if id(node) in counted:
        return counted[id(node)]
    if id(node) in open_nodes:
        raise _TooLarge("has an alias (*name) inside the value it refers to, which expands without end")
    open_nodes.add(id(node))
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_count_values(child, counted, open_nodes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_count_values(key, counted, open_nodes) + _count_values(value, counted, open_nodes)
                     for key, value in node.value)
    open_nodes.discard(id(node))
    if total > MAX_PRESET_VALUES:
        raise _TooLarge(f"holds more than {MAX_PRESET_VALUES:,} values once its aliases (*name) are expanded "
                        f"(aliases of aliases?); a preset holds a few hundred, so write the values out or alias "
                        f"only plain entries")
    counted[id(node)] = total
    return total


def _read_preset_file(path: Path) -> Mapping[str, Any]:
    """The YAML mapping of a preset file; ValueError naming the file for anything else."""
    if not path.is_file():
        raise ValueError(f"preset {str(path)!r} is not a file (a folder or a device?); give a preset .yaml file")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_PresetLoader)
    except UnicodeDecodeError:
        raise ValueError(f"preset {str(path)!r} is not a text file (not UTF-8); give a preset .yaml file") from None
    except _TooLarge as err:
        raise ValueError(f"preset {str(path)!r} {err}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ValueError(f"preset {str(path)!r} nests its values too deeply to read; a preset is a few levels "
                         f"of mappings") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"preset {str(path)!r} is not valid YAML{line}: {problem}") from None
    if raw is None:
        raise ValueError(f"preset {str(path)!r} is empty; copy a built-in one (occkd_core/presets/smoke.yaml) to start")
    if not isinstance(raw, Mapping):
        raise ValueError(f"preset {str(path)!r} holds a {type(raw).__name__}, not a mapping of preset keys "
                         f"({', '.join(TOP_LEVEL_KEYS)})")
    return raw
