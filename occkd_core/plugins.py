"""Out-of-tree extensions: a module of your own that adds stages (distillation methods) or architectures,
named in a preset (``plugins: [my_kd.py]``, a path relative to the preset file, or an importable module
name) or in ``OCCKD_PLUGINS`` (comma-separated, the same forms).

A plugin defines ``occkd_register()``, which registers what it adds through :func:`register_stage` and
:func:`register_architecture`. Registration is explicit, not an import side effect, so that importing
the module elsewhere (its own tests, a notebook) leaves the registries alone.

The grid imports every plugin in the driver, before the preset is checked, and again in every Ray
worker before it runs a node (workers import ``occkd_core`` afresh: a registration made only in the
driver never reaches them). A plugin named by path must be readable at that path on every node.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterable

#: The environment variable naming plugins beside a preset's ``plugins:``.
PLUGINS_ENV = "OCCKD_PLUGINS"
#: The function a plugin module defines.
REGISTER = "occkd_register"

_loaded: dict[str, ModuleType] = {}  # plugin reference (resolved) -> its module, registered once per process


def env_plugins() -> tuple[str, ...]:
    return tuple(p.strip() for p in os.environ.get(PLUGINS_ENV, "").split(",") if p.strip())


def resolve_plugin(reference: str, base: Path | None = None) -> str:
    """A path (``.py``) made absolute against ``base`` (the preset's folder); a module name as given."""
    if reference.endswith(".py") or os.sep in reference:
        path = Path(reference).expanduser()
        if not path.is_absolute():
            path = (base or Path.cwd()) / path
        return str(path.resolve())
    return reference


def load_plugins(references: Iterable[str]) -> list[ModuleType]:
    """Import each plugin (resolved references: :func:`resolve_plugin`) and call its ``occkd_register()``,
    once per process. ValueError of one line for a plugin that cannot be imported or registers badly."""
    modules = []
    for reference in references:
        if reference in _loaded:
            modules.append(_loaded[reference])
            continue
        module = _import(reference)
        register = getattr(module, REGISTER, None)
        if not callable(register):
            raise ValueError(f"plugin {reference!r} defines no {REGISTER}() to register its stages or architectures")
        try:
            register()
        except ValueError as err:
            raise ValueError(f"plugin {reference!r}: {err}") from None
        _loaded[reference] = module
        modules.append(module)
    return modules


def _import(reference: str) -> ModuleType:
    try:
        if reference.endswith(".py"):
            path = Path(reference)
            if not path.is_file():
                raise ValueError(f"plugin {reference!r} is not a file")
            name = f"occkd_plugin_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses and pickling look their module up by name
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(reference)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to import is the plugin's, said in one line
        raise ValueError(f"plugin {reference!r} cannot be imported: {type(err).__name__}: {err}") from None


def register_stage(stage) -> None:
    """Add a stage (:class:`occkd_core.stages.StageInfo`) to the registry; a name taken by another is refused."""
    from occkd_core.stages import CONTROL_SUFFIX, STAGES

    if stage.name.endswith(CONTROL_SUFFIX):
        raise ValueError(f"stage name {stage.name!r} ends in {CONTROL_SUFFIX!r}, which names distilled stages' controls")
    if STAGES.get(stage.name, stage) != stage:
        raise ValueError(f"stage {stage.name!r} is already registered as another stage")
    STAGES[stage.name] = stage


def register_architecture(arch) -> None:
    """Add an architecture (:class:`occkd_core.models.ArchInfo`); a name taken by another is refused."""
    from occkd_core.models import ARCHITECTURES

    if ARCHITECTURES.get(arch.name, arch) != arch:
        raise ValueError(f"architecture {arch.name!r} is already registered as another architecture")
    ARCHITECTURES[arch.name] = arch
