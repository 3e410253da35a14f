"""The settings of a run as frozen, validated dataclasses (STYLE.md habit 1): :class:`TrainSpec` (one training
stage, spec §10), :class:`ArchSettings` (one architecture's input size and channel width multiplier) and
:class:`DataSettings` (where the faces come from).

They sit below everything that reads them, the strategies, the stage registry, the training loop and the
presets (which build them from YAML, :mod:`occkd_core.presets`): this module imports none of those, so no
import goes round in a circle (tests/test_layering.py). What a stage needs of a TrainSpec is the registry's
to say (:func:`occkd_core.stages.require_settings`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Mapping

from occkd_core.data.ferplus import LABEL_RULES
from occkd_core.data.drawing import MIN_IMAGE_SIZE
from occkd_core.models import MIN_INPUT_SIZE


#: Stage settings that count something (images, epochs): whole numbers, so ``epochs: 1.5`` is refused when the
#: preset loads rather than as a TypeError inside the training loop.
WHOLE_SETTINGS = ("batch_size", "epochs", "plateau_patience", "early_stop_patience")
#: Stage settings that are real numbers: finite ones (NaN passes every ``<`` check, so it is refused by name).
NUMBER_SETTINGS = ("lr", "weight_decay", "momentum", "plateau_factor", "lam", "temperature", "margin", "pool_fraction")
#: The TrainSpec fields that only some losses read (each strategy's ``loss_settings`` says which it reads). Every
#: other field (optimiser, schedule, epochs, batch) is read by every stage.
LOSS_SETTINGS = ("lam", "temperature", "tau_squared", "margin", "pool_fraction", "triplet_squared",
                 "triplet_normalize", "icpr_form")
#: The largest learning rate a preset may give (see TrainSpec's check): three orders of magnitude above
#: the papers' largest (1e-3, spec §10).
MAX_LR = 1.0


class SettingError(ValueError):
    """A setting's value is wrong; ``key`` names the setting, so the preset loader can say where it was given."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def check_whole(name: str, value: Any, minimum: int) -> None:
    """A SettingError unless ``value`` is a whole number (not a bool) of at least ``minimum``."""
    # numbers.Integral: int and numpy's integers; bool is an int to Python, never a count to a user.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SettingError(name, f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise SettingError(name, f"{name} must be >= {minimum}, got {value!r}")


def check_number(name: str, value: Any) -> None:
    """A SettingError unless ``value`` is a finite real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SettingError(name, f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SettingError(name, f"{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class TrainSpec:
    """Hyperparameters of one training stage (spec §10; defaults from spec §15)."""

    optimizer: Literal["sgd", "adam"]
    batch_size: int
    epochs: int
    lr: float
    schedule: Literal["plateau", "constant"] = "constant"
    weight_decay: float | None = None  # None -> 5e-4 for SGD, 0 for Adam (spec §15 #3)
    momentum: float = 0.9
    plateau_patience: int = 10  # ÷10 after this many epochs without a better validation score
    plateau_factor: float = 0.1
    # Stop once validation has not improved for this many epochs (``epochs`` is then the ceiling); None:
    # always run ``epochs`` (the papers' schedules).
    early_stop_patience: int | None = None
    dsd: bool = False  # Dense-Sparse-Dense (spec §9)
    lam: float | None = None  # KD weight λ on the distillation term (spec §6)
    temperature: float | None = None  # Hinton KD τ
    tau_squared: bool = False  # multiply the soft term by τ² (spec §15 #2)
    margin: float | None = None  # triplet margin α
    pool_fraction: float | None = None  # mining pool ρ (spec §7)
    triplet_squared: bool = True  # J: squared Euclidean; False = C's plain Euclidean
    triplet_normalize: bool = True  # L2-normalise embeddings before distances (spec §15 #20)
    icpr_form: bool = False  # C Eq. 4: CE + λ·triplet instead of (1−λ)·L + λ·triplet
    # The stage's own hyperparameters, for a stage that declares a settings type (StageInfo.settings, e.g. a
    # plugin's new loss): sorted (name, value) pairs, read typed through :meth:`settings`. Empty for the
    # built-in stages, and then absent from :meth:`to_dict`, so their node identities are unchanged.
    extra: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        optional = {f.name for f in fields(self) if f.default is None}  # None: unset (a default or not used)
        for name in WHOLE_SETTINGS:
            if getattr(self, name) is not None or name not in optional:
                check_whole(name, getattr(self, name), minimum=1)
        for name in NUMBER_SETTINGS:
            if getattr(self, name) is not None or name not in optional:
                check_number(name, getattr(self, name))
        for name in ("dsd", "tau_squared", "triplet_squared", "triplet_normalize", "icpr_form"):
            if not isinstance(getattr(self, name), bool):
                raise SettingError(name, f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise SettingError("optimizer", f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.schedule not in ("plateau", "constant"):
            raise SettingError("schedule", f"schedule must be 'plateau' or 'constant', got {self.schedule!r}")
        if not self.lr > 0:
            raise SettingError("lr", f"lr must be a positive number, got {self.lr!r}")
        if self.lr > MAX_LR:
            raise SettingError("lr", f"lr must be at most {MAX_LR:g}: a step moves each weight by about lr (Adam) "
                                     f"or lr × its gradient (SGD), so above {MAX_LR:g} the first step outweighs the "
                                     f"weights themselves (spec §10 uses 1e-6 to 1e-3), got {self.lr!r}")
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", 5e-4 if self.optimizer == "sgd" else 0.0)
        if self.weight_decay < 0:
            raise SettingError("weight_decay", f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise SettingError("momentum", f"momentum must lie in [0, 1) (the share of the last step kept in the "
                                           f"next), got {self.momentum!r}")
        if not 0.0 < self.plateau_factor < 1.0:
            raise SettingError("plateau_factor", f"plateau_factor must lie in (0, 1) (what a plateau multiplies the "
                                                 f"learning rate by), got {self.plateau_factor!r}")
        if self.lam is not None and not 0.0 <= self.lam <= 1.0:
            raise SettingError("lam", f"lam (λ) must lie in [0, 1], got {self.lam!r}")
        if self.temperature is not None and self.temperature <= 0:
            raise SettingError("temperature", f"temperature must be > 0, got {self.temperature!r}")
        if self.margin is not None and self.margin < 0:
            raise SettingError("margin", f"margin must be >= 0, got {self.margin!r}")
        if self.pool_fraction is not None and not 0.0 < self.pool_fraction <= 1.0:
            raise SettingError("pool_fraction", f"pool_fraction must lie in (0, 1], got {self.pool_fraction!r}")

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        del values["extra"]
        if self.extra:
            values["extra"] = dict(self.extra)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown stage setting(s) {unknown}; valid: {sorted(known - {'extra'})}")
        values = dict(values)
        values["extra"] = tuple(sorted(dict(values.get("extra") or {}).items()))
        return cls(**values)

    def settings(self, cls: type) -> Any:
        """The stage's own hyperparameters as its settings type (a dataclass; its defaults fill the rest)."""
        return cls(**dict(self.extra))

    def keeping_loss_settings(self, read: tuple[str, ...] | None) -> "TrainSpec":
        """This spec with every loss setting a loss does not ``read`` (:data:`LOSS_SETTINGS`) at its default,
        so specs that differ only there are equal (and one node); ``read`` None keeps them all."""
        if read is None:
            return self
        defaults = {f.name: f.default for f in fields(self) if f.name in LOSS_SETTINGS and f.name not in read}
        # A stage's own settings are its loss's: kept only where read (a control reads none of its twin's).
        extra = tuple((name, value) for name, value in self.extra if name in read)
        return dataclasses.replace(self, **defaults, extra=extra)


@dataclass(frozen=True)
class ArchSettings:
    input_size: int
    width_mult: float = 1.0
    # The papers' dropout (VGG-face 0.30-0.55 after each conv of blocks 4-5) is sized for 512 channels;
    # a network cut to 1/8 channel width trained from scratch does not learn with it, so small presets switch it off.
    dropout: bool = True

    def __post_init__(self) -> None:
        check_whole("input_size", self.input_size, minimum=MIN_INPUT_SIZE)
        check_number("width_mult", self.width_mult)
        if not 0 < self.width_mult <= 4:
            raise SettingError("width_mult", f"width_mult must lie in (0, 4], got {self.width_mult}")
        if not isinstance(self.dropout, bool):
            raise SettingError("dropout", f"dropout must be true or false, got {self.dropout!r}")


@dataclass(frozen=True)
class DataSettings:
    source: Literal["synthetic", "real"]
    num_faces: int = 0  # synthetic only
    image_size: int = 64  # synthetic only: side of the generated faces
    seed: int = 0
    label_rule: str = "majority"  # real FER+ only: how the 10 crowd votes become one label (spec §15 #16)

    def __post_init__(self) -> None:
        if self.source not in ("synthetic", "real"):
            raise SettingError("source", f"source must be 'synthetic' or 'real', got {self.source!r}")
        if self.label_rule not in LABEL_RULES:
            raise SettingError("label_rule", f"label_rule must be one of {', '.join(LABEL_RULES)}, "
                                             f"got {self.label_rule!r}")
        check_whole("seed", self.seed, minimum=0)  # numpy's generators take no negative seed
        check_whole("image_size", self.image_size, minimum=MIN_IMAGE_SIZE)
        check_whole("num_faces", self.num_faces, minimum=0)
        if self.source == "synthetic" and self.num_faces < 10:
            raise SettingError("num_faces", f"synthetic data needs num_faces >= 10, got {self.num_faces}")


__all__ = ["LOSS_SETTINGS", "MAX_LR", "NUMBER_SETTINGS", "WHOLE_SETTINGS", "ArchSettings", "DataSettings",
           "SettingError", "TrainSpec", "check_number", "check_whole"]
