"""Synthetic faces labelled for expression, gender and age: the built-in data, needing no download.

The faces are drawn so that the information is split between the image halves the way the papers
rely on (spec §1): expressions live mostly in the mouth (lower half) with weaker, ambiguous cues in
brows and eyes; gender and age live mostly in hair, brows, eyes and forehead (upper half) with weaker
cues in jaw, beard and mouth lines. The image midline (row H // 2, where occlusion cuts) falls between
the eyes and the nose tip. Nuisance variation (position, scale, skin tone, hair colour, lighting,
noise, cue strength) keeps every task from being trivial.

Everything is vectorised over faces: per-face parameters [N, 1, 1] broadcast against the coordinate
grid; small features are drawn only on the band of rows they can occupy. Same arguments and seed give
byte-identical images (on one platform).
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from occkd_core.data.drawing import MIN_IMAGE_SIZE, FaceParams, draw_faces  # noqa: F401 - MIN_IMAGE_SIZE: re-exported
from occkd_core.data.store import FaceData, FaceSplit
from occkd_core.tasks import EXPRESSIONS

MAX_SYNTHETIC_AGE = 90

# Expression cues as offsets from a neutral face, one row per class in tasks.EXPRESSIONS order.
# Lower half (mouth, nose): curve (+ smile / - frown), open, width, asymmetry (contempt), upper-lip
# raise and nose wrinkle (disgust), lip thickness (- = pressed lips). Upper half: brow raise, brow
# angle (+ = inner ends down, as in anger), eye openness. The upper cues are weaker and shared
# between classes (neutral = contempt, surprise ~ fear, anger ~ disgust), so some classes can only be
# told apart by the mouth.
_CUE_NAMES = ("curve", "open", "width", "asym", "lip_raise", "lip_thick", "nose_wrinkle",
              "brow_raise", "brow_angle", "eye_open")
_NUM_MOUTH_CUES = 7  # the first 7 cues are drawn in the lower half
_EXPRESSION_CUES = np.array([
    # curve  open  width asym raise thick wrinkl | brow_r brow_a eye_o
    [0.00, 0.00, 0.00, 0.0, 0.0, 0.0, 0.0, 0.00, 0.00, 0.00],   # neutral
    [1.00, 0.30, 0.25, 0.0, 0.0, 0.0, 0.0, 0.00, 0.00, -0.35],  # happiness
    [0.00, 1.00, -0.35, 0.0, 0.0, 0.0, 0.0, 1.00, -0.20, 0.50],  # surprise
    [-0.75, 0.00, -0.10, 0.0, 0.0, -0.2, 0.0, 0.10, -1.00, -0.10],  # sadness
    [-0.55, 0.00, -0.15, 0.0, 0.0, -0.6, 0.0, -0.80, 1.00, 0.00],  # anger
    [-0.45, 0.10, 0.00, 0.0, 1.0, 0.0, 1.0, -0.70, 0.80, -0.30],  # disgust
    [-0.25, 0.50, 0.25, 0.0, 0.0, 0.0, 0.0, 0.90, -0.60, 0.45],  # fear
    [0.00, 0.00, 0.00, 1.0, 0.0, 0.0, 0.0, 0.00, 0.00, 0.00],   # contempt
], dtype=np.float32)
# Face-to-face variation of each cue around its class value: small for the mouth, larger for the
# upper half, which is what makes the upper-half cues ambiguous.
_CUE_NOISE = np.array([0.15, 0.08, 0.07, 0.10, 0.10, 0.12, 0.10, 0.20, 0.20, 0.08], dtype=np.float32)
assert _EXPRESSION_CUES.shape == (len(EXPRESSIONS), len(_CUE_NAMES))

_HAIR_COLOURS = np.array([[0.08, 0.06, 0.05], [0.25, 0.15, 0.08], [0.45, 0.30, 0.15],
                          [0.80, 0.68, 0.40], [0.60, 0.25, 0.10]], dtype=np.float32)
_GREY_HAIR = np.array([0.78, 0.78, 0.76], dtype=np.float32)
_LIGHT_SKIN = np.array([0.98, 0.84, 0.74], dtype=np.float32)
_DARK_SKIN = np.array([0.42, 0.28, 0.20], dtype=np.float32)


def _uniform(rng: np.random.Generator, low: float, high: float, n: int) -> np.ndarray:
    return rng.uniform(low, high, n).astype(np.float32)


def _nuisance(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Looks that carry no label: placement, skin tone, background, lighting, noise."""
    skin = _LIGHT_SKIN + _uniform(rng, 0, 1, n)[:, None] * (_DARK_SKIN - _LIGHT_SKIN)
    theta, light = _uniform(rng, 0, 2 * np.pi, n), _uniform(rng, 0, 0.3, n)
    return dict(
        cx=_uniform(rng, -0.08, 0.08, n), cy=_uniform(rng, -0.05, 0.05, n), scale=_uniform(rng, 0.95, 1.1, n),
        skin=skin + rng.normal(0, 0.025, (n, 3)), background=rng.uniform(0.12, 0.9, (n, 3)),
        light_x=light * np.cos(theta), light_y=light * np.sin(theta),
        gain=_uniform(rng, 0.8, 1.15, n), noise_std=_uniform(rng, 0.01, 0.05, n),
    )


def _identity(gender: np.ndarray, age: np.ndarray, skin: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Gender and age cues; the three *_age entries are wrinkle strengths that expressions add to."""
    n = len(gender)
    female = gender.astype(np.float32)
    child = np.clip((14 - age) / 13, 0, 1)  # 1 for babies, 0 from 14 on
    adult_male = (1 - female) * np.clip((age - 14) / 6, 0, 1)
    greying = np.clip(np.clip((age - 38) / 35, 0, 1) * _uniform(rng, 0.4, 1.1, n), 0, 1)
    hair = _HAIR_COLOURS[rng.integers(0, len(_HAIR_COLOURS), n)] + rng.normal(0, 0.03, (n, 3))
    lips = skin * np.array([0.82, 0.55, 0.55])
    lipstick = female * (rng.random(n) < 0.2)
    bangs = female * (rng.random(n) < 0.25)
    recession = (1 - female) * np.clip((age - 30) / 50, 0, 1) * _uniform(rng, 0, 0.3, n)
    return dict(
        hair_colour=hair + greying[:, None] * (_GREY_HAIR - hair),
        hair_side=np.where(female > 0, _uniform(rng, 0.04, 0.25, n), _uniform(rng, 0.0, 0.12, n)),
        hair_bottom=np.where(female > 0, _uniform(rng, -0.45, 0.15, n), _uniform(rng, -0.55, -0.15, n)),
        hairline=_uniform(rng, -0.7, -0.6, n) - recession + bangs * 0.2,
        brow_thick=(0.022 + 0.016 * (1 - female) + rng.normal(0, 0.006, n)).clip(0.01) * (1 - 0.2 * child),
        eye_size=1 + 0.1 * female + 0.25 * child + rng.normal(0, 0.06, n),
        lash=(0.008 + 0.016 * female + rng.normal(0, 0.004, n)).clip(0.002),
        jaw_width=0.5 + 0.06 * (1 - female) * (1 - child) + 0.02 * child + rng.normal(0, 0.03, n),
        face_height=0.82 - 0.06 * child + rng.normal(0, 0.02, n),
        beard=adult_male * (rng.random(n) < 0.45) * _uniform(rng, 0.3, 0.85, n),
        lip_colour=lips + lipstick[:, None] * (np.array([0.70, 0.12, 0.18]) - lips),
        lip_thick=1 + 0.15 * female,
        forehead_age=np.clip((age - 28) / 45, 0, 1) * _uniform(rng, 0.5, 1.2, n),
        crow_feet_age=0.4 * np.clip((age - 45) / 40, 0, 1),
        nasolabial_age=np.clip((age - 32) / 45, 0, 1) * _uniform(rng, 0.5, 1.2, n),
    )


def _expression_cues(expression: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each face's cue values: its class's offsets at a random strength, plus face-to-face variation."""
    n = len(expression)
    # Some expressions are subtle; mouth and upper face vary in strength independently, so the upper
    # half sometimes settles what a faint mouth leaves open.
    mouth_strength, upper_strength = _uniform(rng, 0.4, 1.0, n), _uniform(rng, 0.5, 1.0, n)
    in_mouth = np.arange(len(_CUE_NAMES)) < _NUM_MOUTH_CUES
    strength = np.where(in_mouth, mouth_strength[:, None], upper_strength[:, None])
    cues = _EXPRESSION_CUES[expression] * strength + rng.normal(0, 1, (n, len(_CUE_NAMES))) * _CUE_NOISE
    cue = dict(zip(_CUE_NAMES, cues.T))
    cue["asym"] = np.abs(cue["asym"]) * rng.choice(np.array([-1.0, 1.0]), n)  # contempt raises either corner
    return cue


def _check_labels(expression: np.ndarray, gender: np.ndarray, age: np.ndarray) -> None:
    if not len(expression) == len(gender) == len(age):
        raise ValueError(f"expression, gender and age need one value per face, got {len(expression)}, "
                         f"{len(gender)} and {len(age)}")
    for name, values, low, high in (("expression", expression, 0, len(EXPRESSIONS) - 1), ("gender", gender, 0, 1),
                                    ("age", age, 0, MAX_SYNTHETIC_AGE)):
        bad = ~((values >= low) & (values <= high))  # also catches NaN
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ValueError(f"synthetic faces need {name} in {low}..{high} (no unknowns); {int(bad.sum())} "
                             f"value(s) outside, first at index {first}: {values[first]}")


def sample_face_params(expression: np.ndarray, gender: np.ndarray, age: np.ndarray,
                       rng: np.random.Generator) -> FaceParams:
    """Random looks for faces with the given labels (int [N] expression and gender, float [N] age in years)."""
    _check_labels(expression, gender, age)
    age = np.asarray(age, dtype=np.float32)
    nuisance = _nuisance(len(expression), rng)
    identity = _identity(gender, age, nuisance["skin"], rng)
    cue = _expression_cues(expression, rng)
    smile = np.clip(cue["curve"], 0, None)
    forehead, crow_feet, nasolabial = (identity.pop(k) for k in ("forehead_age", "crow_feet_age", "nasolabial_age"))
    values = dict(
        **nuisance,
        **identity,
        # Wrinkles come with age, and with expressions: raised brows line the forehead, lowered
        # brows crease between them, smiles crease beside the eyes and deepen the nose-to-mouth lines.
        forehead_lines=np.clip(forehead + 0.7 * np.clip(cue["brow_raise"], 0, None), 0, 1.2),
        glabella=np.clip(0.8 * cue["brow_angle"], 0, 1),
        crow_feet=np.clip(crow_feet + 0.9 * smile, 0, 1),
        nasolabial=np.clip(nasolabial + 0.3 * smile, 0, 1),
        curve=cue["curve"], open=np.abs(cue["open"]), width=1 + cue["width"], asym=cue["asym"],
        lip_raise=np.abs(cue["lip_raise"]), nose_wrinkle=np.abs(cue["nose_wrinkle"]),
        brow_raise=cue["brow_raise"], brow_angle=cue["brow_angle"], eye_open=np.clip(1 + cue["eye_open"], 0.3, 1.7),
    )
    values["lip_thick"] = np.clip(values["lip_thick"] + cue["lip_thick"], 0.3, None)  # fuller lips, pressed in anger
    return FaceParams(**{name: np.asarray(value, dtype=np.float32) for name, value in values.items()})


def synthetic_split_sizes(num_faces: int, split_fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> tuple[int, int, int]:
    """(train, val, test) sizes of ``num_faces`` split by ``split_fractions``, as :func:`make_synthetic_faces` splits."""
    if len(split_fractions) != 3 or any(f <= 0 for f in split_fractions) or abs(sum(split_fractions) - 1) > 1e-6:
        raise ValueError(f"split_fractions must be 3 positive numbers (train, val, test) summing to 1, "
                         f"got {tuple(split_fractions)}")
    num_train = int(round(split_fractions[0] * num_faces))
    num_val = int(round(split_fractions[1] * num_faces))
    sizes = (num_train, num_val, num_faces - num_train - num_val)
    if min(sizes) < 1:
        raise ValueError(f"{num_faces} faces split {tuple(split_fractions)} leaves an empty split {sizes}; "
                         "ask for more faces")
    return sizes


def _draw_labels(num_faces: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expression, gender and age of every face, the generator's first draws (so labels can be had alone)."""
    expression = rng.permutation(np.arange(num_faces) % len(EXPRESSIONS)).astype(np.int64)
    gender = rng.permutation(np.arange(num_faces) % 2).astype(np.int64)
    age = rng.integers(1, MAX_SYNTHETIC_AGE + 1, num_faces).astype(np.float32)
    return expression, gender, age


def synthetic_split_labels(num_faces: int, task: str, seed: int = 0,
                           split_fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> dict[str, np.ndarray]:
    """Per split, the labels of ``task`` (fer, gender, age) that :func:`make_synthetic_faces` gives these
    arguments, without drawing a face."""
    sizes = synthetic_split_sizes(num_faces, split_fractions)
    labels = dict(zip(("fer", "gender", "age"), _draw_labels(num_faces, np.random.default_rng(seed))))[task]
    ends = np.cumsum(sizes)
    return {name: labels[end - size:end] for name, size, end in zip(("train", "val", "test"), sizes, ends)}


def make_synthetic_faces(num_faces: int, image_size: int = 64, seed: int = 0,
                         split_fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> FaceData:
    """``num_faces`` labelled RGB faces split into train/val/test, the same for the same arguments.

    Labels: expressions and genders are balanced (each class equally often, shuffled), ages are whole
    years drawn uniformly from 1..90.
    """
    if num_faces < 3:
        raise ValueError(f"num_faces must be >= 3 (one face per split at least), got {num_faces}")
    sizes = synthetic_split_sizes(num_faces, split_fractions)
    rng = np.random.default_rng(seed)
    expression, gender, age = _draw_labels(num_faces, rng)
    params = sample_face_params(expression, gender, age, rng)
    images = draw_faces(params, image_size, seed=int(rng.integers(2**63)))

    splits, start = {}, 0
    for name, size in zip(("train", "val", "test"), sizes):
        rows = slice(start, start + size)
        splits[name] = FaceSplit(images=images[rows], expression=expression[rows], gender=gender[rows], age=age[rows])
        start += size
    metadata = {
        "generator": "occkd_core.data.synthetic",
        "seed": str(seed),
        "num_faces": str(num_faces),
        "image_size": str(image_size),
        "split_fractions": json.dumps(list(split_fractions)),
    }
    return FaceData(name="synthetic", splits=splits, metadata=metadata)


__all__ = ["FaceParams", "draw_faces", "make_synthetic_faces", "sample_face_params", "synthetic_split_labels"]
