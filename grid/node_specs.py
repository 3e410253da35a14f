"""The specs of the grid's own nodes, fusion and significance (a training node's is
:class:`occkd_core.training.StageSpec`).

grid.graph builds them and stores ``to_dict()`` as the node's params, which its hash is computed from;
grid.nodes reads them back with ``from_dict``. ``to_dict`` gives exactly the params these nodes have always
had (same keys, values and omissions): a change there changes every fusion and significance hash.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

from occkd_core.presets import SVR_KERNELS
from occkd_core.tasks import VISIBILITIES


def _check_keys(what: str, raw: Mapping[str, Any], required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """One error for params with a key missing or unknown, listing the valid ones."""
    missing = [key for key in required if key not in raw]
    unknown = sorted(set(raw) - set(required) - set(optional))
    problems = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(unknown)}"]
                                                                         if unknown else [])
    if problems:
        raise ValueError(f"{what} params {dict(raw)!r}: {'; '.join(problems)} "
                         f"(valid: {', '.join((*required, *optional))})")


@dataclass(frozen=True)
class FusionSpec:
    """A fusion node (spec §8): the SVM's C grid, the faces the fused students see, the task's kind, and for
    regression the ε-SVR kernels (the first is the papers' "fusion", each further one "fusion_<kernel>")."""

    Cs: tuple[float, ...]
    visible: str
    kind: str  # "classification" | "regression" (the task's)
    svr_kernels: tuple[str, ...] | None = None  # regression only; None for classification (no key in params)

    def __post_init__(self) -> None:
        if not self.Cs or not all(isinstance(c, numbers.Real) and not isinstance(c, bool) and math.isfinite(c)
                                  and c > 0 for c in self.Cs):
            raise ValueError(f"fusion Cs must be a non-empty list of finite numbers > 0, got {list(self.Cs)!r}")
        if self.visible not in VISIBILITIES:
            raise ValueError(f"fusion visible {self.visible!r}: expected one of {', '.join(VISIBILITIES)}")
        if self.kind not in ("classification", "regression"):
            raise ValueError(f"fusion kind {self.kind!r}: expected classification or regression")
        if (self.svr_kernels is not None) != (self.kind == "regression"):
            raise ValueError(f"fusion svr_kernels {self.svr_kernels!r}: a regression task's fusion names its ε-SVR "
                             "kernels, a classification task's none")
        kernels = self.svr_kernels
        if kernels is not None and (not kernels or any(k not in SVR_KERNELS for k in kernels)):
            raise ValueError(f"fusion svr_kernels {list(kernels)!r}: expected a non-empty list from "
                             f"{', '.join(SVR_KERNELS)}")

    @property
    def kernels(self) -> tuple[str | None, ...]:
        """The kernels the variants are fitted with: the classifiers' one default (None) where none is named."""
        return self.svr_kernels if self.svr_kernels is not None else (None,)

    def to_dict(self) -> dict[str, Any]:
        return {"Cs": list(self.Cs), "visible": self.visible, "kind": self.kind,
                **({"svr_kernels": list(self.svr_kernels)} if self.svr_kernels is not None else {})}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "FusionSpec":
        _check_keys("fusion", raw, ("Cs", "visible", "kind"), ("svr_kernels",))
        kernels = raw.get("svr_kernels")
        return cls(Cs=tuple(raw["Cs"]), visible=raw["visible"], kind=raw["kind"],
                   svr_kernels=tuple(kernels) if kernels is not None else None)


@dataclass(frozen=True)
class SignificanceSpec:
    """A task's significance node (spec §12): the test faces (the students' half) and the level α."""

    visible: str
    alpha: float = 0.05

    def __post_init__(self) -> None:
        if self.visible not in VISIBILITIES:
            raise ValueError(f"significance visible {self.visible!r}: expected one of {', '.join(VISIBILITIES)}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"significance alpha must lie in (0, 1), got {self.alpha!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "visible": self.visible}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "SignificanceSpec":
        _check_keys("significance", raw, ("alpha", "visible"))
        return cls(visible=raw["visible"], alpha=float(raw["alpha"]))
