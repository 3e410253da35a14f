"""The curriculum's training stages (spec §5), one registry entry each: everything the training loop,
the presets, the grid and the report need to know about a stage, in one place.

A stage names its strategy class (the loss terms per batch, :mod:`occkd_core.strategies`), where its
training starts, whether the frozen teacher runs beside it, whether it is a *distilled* student (one
node per point of its hyperparameter grid, the best on validation enters fusion and the significance
tests), the preset fields it cannot do without, its relative cost per training image (for scheduling)
and its name in the papers' tables. Adding a distillation method is its loss, its strategy class and
one entry here (plus its values in the presets and its tests).

Every distilled stage has a teacher-free **control** (``<stage>_control``, :func:`control_stage`), made
from its entry when asked for, so a new distillation method gets one without a line here: the same
objective with the teacher's terms removed (its strategy's ``control_strategy``), from the same student
checkpoint, with the settings of the distilled stage's preset entry that the control's loss reads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from occkd_core.specs import TrainSpec
from occkd_core.strategies import StandardKDStrategy, SupervisedStrategy, TripletKDStrategy
from occkd_core.tasks import lookup

StartsFrom = Literal["weights", "teacher", "student"]


@dataclass(frozen=True)
class StageInfo:
    """One curriculum stage (spec §5)."""

    name: str
    strategy: type[SupervisedStrategy]
    # "weights": pre-trained weights or random init (the teacher, spec §5 step 1); "teacher": the teacher's
    # best checkpoint (the students, step 2); "student": the main student's (distillation, step 3).
    starts_from: StartsFrom
    needs_teacher: bool = False  # the frozen teacher runs beside the trained model (spec §15 #34)
    distilled: bool = False  # a distilled student: a grid of nodes, the best one per kind enters fusion (§8)
    required: tuple[str, ...] = ()  # TrainSpec fields a preset must set for this stage
    cost: float = 1.0  # work per training image relative to plain supervised training (scheduling)
    paper_name: str = ""  # the strategy's name in the papers' results (grid/paper_results.json)
    control_of: str = ""  # a control: the distilled stage whose teacher-free twin it is (see control_stage)
    # The stage's own hyperparameters beyond TrainSpec's (a new loss's, say): a frozen dataclass whose fields a
    # preset may set (lists make grids, like TrainSpec's grid fields) and that validates them in
    # __post_init__; the strategy reads them with ``ctx.train.settings(<that type>)``. None: TrainSpec's only.
    settings: type | None = None

    def __post_init__(self) -> None:
        if self.distilled and (self.starts_from != "student" or not self.needs_teacher):
            raise ValueError(f"stage {self.name!r}: a distilled stage starts from the student and needs the teacher")

    @property
    def fused(self) -> bool:
        """Whether its embeddings enter the fusion node (distilled stages and their controls, spec §8)."""
        return self.distilled or bool(self.control_of)


#: Stage name -> what it is, in curriculum order. Read through :func:`get_stage` / :func:`distilled_stages`.
STAGES: dict[str, StageInfo] = {
    "teacher": StageInfo("teacher", SupervisedStrategy, starts_from="weights", paper_name="teacher"),
    "student": StageInfo("student", SupervisedStrategy, starts_from="teacher", paper_name="student"),
    # KD runs the frozen teacher too (×1.35); triplet KD also forwards the negatives and re-embeds the
    # training set for mining each epoch (×2.4): measured ratios of epoch times at the mini preset.
    "standard_kd": StageInfo("standard_kd", StandardKDStrategy, starts_from="student", needs_teacher=True,
                             distilled=True, required=("lam",), cost=1.35, paper_name="standard_ts"),
    "triplet_kd": StageInfo("triplet_kd", TripletKDStrategy, starts_from="student", needs_teacher=True,
                            distilled=True, required=("lam", "margin", "pool_fraction"), cost=2.4,
                            paper_name="triplet_ts"),
}


#: A distilled stage's control is called ``<stage><CONTROL_SUFFIX>``.
CONTROL_SUFFIX = "_control"
#: The teacher-free counterpart of "fusion": the same SVM on the controls' embeddings concatenated
#: (:func:`occkd_core.fusion.fusion_variants`). Here, not in the fusion module, so that the grid's driver
#: names it without importing scikit-learn.
CONTROL_FUSION = "control_fusion"


def control_stage(distilled: str) -> StageInfo:
    """The teacher-free control of the distilled stage ``distilled``: its strategy's control, from the student,
    no teacher; a training node like any other, not distilled itself."""
    stage = get_stage(distilled)
    if not stage.distilled:
        raise ValueError(f"stage {distilled!r} is not distilled, so it has no teacher-free control")
    # Its settings come from the distilled stage's preset entry, checked against that stage's `required`.
    return replace(stage, name=distilled + CONTROL_SUFFIX, strategy=stage.strategy.control_strategy(),
                   needs_teacher=False, distilled=False, required=(), cost=1.0, paper_name="", control_of=distilled,
                   settings=stage.settings)


def get_stage(name: str) -> StageInfo:
    """The stage called ``name`` (a registry entry or a distilled stage's control), or a ValueError listing
    the valid names."""
    base = name[: -len(CONTROL_SUFFIX)] if name.endswith(CONTROL_SUFFIX) else ""
    if base in STAGES and STAGES[base].distilled:
        return control_stage(base)
    return lookup("stage", name, STAGES)


def require_settings(train: TrainSpec, stage: str) -> TrainSpec:
    """``train``, once it is checked to set every field stage ``stage`` cannot do without (its ``required``);
    a ValueError naming the missing ones otherwise."""
    missing = [n for n in get_stage(stage).required if getattr(train, n) is None]
    if missing:
        raise ValueError(f"stage {stage!r} needs {missing} in its preset entry")
    return train


def stage_names() -> tuple[str, ...]:
    """The registry's stages (those a preset configures); controls are derived from the distilled ones."""
    return tuple(STAGES)


def control_stages() -> tuple[str, ...]:
    """Every distilled stage's control, in registry order."""
    return tuple(name + CONTROL_SUFFIX for name in distilled_stages())


def distilled_stages() -> tuple[str, ...]:
    """The distilled students' stages, in registry order (their embeddings are fused, spec §8)."""
    return tuple(name for name, stage in STAGES.items() if stage.distilled)


def stage_starting_from(origin: StartsFrom) -> str:
    """The one stage that starts from ``origin`` ("weights": the teacher; "teacher": the student)."""
    names = [name for name, stage in STAGES.items() if stage.starts_from == origin]
    if len(names) != 1:
        raise ValueError(f"the curriculum needs exactly one stage starting from {origin!r}, found {names}")
    return names[0]


__all__ = ["CONTROL_SUFFIX", "STAGES", "StageInfo", "control_stage", "control_stages", "distilled_stages", "get_stage",
           "require_settings", "stage_names", "stage_starting_from"]
