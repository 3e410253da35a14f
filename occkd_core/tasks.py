"""Tasks and face visibilities: the names everything else keys on (architectures and training stages
have registries of their own, :data:`occkd_core.models.ARCHITECTURES` and :mod:`occkd_core.stages`).

Each registry is a plain module-level dict, read through one ``get_*`` function that raises an error
listing the valid names (spec §1, §4, §5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, TypeVar

Visibility = Literal["full", "lower", "upper"]
TaskKind = Literal["classification", "regression"]

#: Which half of the image stays visible. ``lower`` hides the upper half (VR headset, spec §0);
#: ``upper`` hides the lower half (surgical mask / eye region).
VISIBILITIES: tuple[Visibility, ...] = ("full", "lower", "upper")


@dataclass(frozen=True)
class TaskInfo:
    """What a task predicts and which halves its students see (spec §1)."""

    name: str
    kind: TaskKind
    num_outputs: int  # head width: 8 expressions, 2 genders, 1 age regressor
    label_column: str  # column of the prepared data that holds the target
    main_visible: Visibility  # half the distilled student sees
    ablation_visible: Visibility  # the other half: a student only, never distilled
    standard_kd: Literal["hinton", "hint"]  # what "standard teacher-student" means for this task
    class_names: tuple[str, ...] = ()
    # Age has no classes: mining treats |Δage| < threshold as "same class" (spec §7, §15 #25).
    age_threshold: float | None = None

    @property
    def is_classification(self) -> bool:
        return self.kind == "classification"


#: FER+ class order (spec §2.1); AffectNet codes are mapped onto it by the loaders.
EXPRESSIONS: tuple[str, ...] = (
    "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt",
)

TASKS: dict[str, TaskInfo] = {
    "fer": TaskInfo(
        name="fer", kind="classification", num_outputs=8, label_column="expression",
        main_visible="lower", ablation_visible="upper", standard_kd="hinton",
        class_names=EXPRESSIONS,
    ),
    "gender": TaskInfo(
        name="gender", kind="classification", num_outputs=2, label_column="gender",
        main_visible="upper", ablation_visible="lower", standard_kd="hint",
        class_names=("male", "female"),
    ),
    "age": TaskInfo(
        name="age", kind="regression", num_outputs=1, label_column="age",
        main_visible="upper", ablation_visible="lower", standard_kd="hint",
        age_threshold=5.0,
    ),
}


_T = TypeVar("_T")


def lookup(kind: str, name: str, registry: Mapping[str, _T]) -> _T:
    """``registry[name]``, or a ValueError that names the ``kind`` and lists the valid names: how every
    registry of occkd is read (tasks here, :mod:`occkd_core.stages`, architectures, pre-trained weights)."""
    try:
        return registry[name]
    except KeyError:
        valid = ", ".join(sorted(registry))
        raise ValueError(f"unknown {kind} {name!r}; valid names: {valid}") from None


def get_task(name: str) -> TaskInfo:
    """The task called ``name``, or a ValueError listing the valid task names."""
    return lookup("task", name, TASKS)


def check_name(kind: Literal["visibility"], name: str) -> str:
    """Return ``name`` if it is a known visibility, else raise listing them. (Architectures and training
    stages have registries of their own: :mod:`occkd_core.models`, :mod:`occkd_core.stages`.)"""
    names = {"visibility": VISIBILITIES}[kind]
    return lookup(kind, name, {n: n for n in names})
