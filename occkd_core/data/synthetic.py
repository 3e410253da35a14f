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
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

from occkd_core.data.store import FaceData, FaceSplit
from occkd_core.tasks import EXPRESSIONS

MIN_IMAGE_SIZE = 24
MAX_SYNTHETIC_AGE = 90
_CHUNK = 256  # faces drawn at once: bounds memory at about 40 MB of float32 per chunk at 64 px

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
_EYE_WHITE = np.array([0.92, 0.92, 0.92], dtype=np.float32)
_IRIS = np.array([0.12, 0.12, 0.12], dtype=np.float32)
_MOUTH_INSIDE = np.array([0.12, 0.03, 0.03], dtype=np.float32)


@dataclass(frozen=True, eq=False)
class FaceParams:
    """Everything that decides how each face looks: float32 arrays [N] (colours [N, 3]), face units.

    Face units: the face is centred at (0, 0), its skin ellipse is about 1.2 wide and 1.6 high; y
    grows downwards, eyes at y = -0.2, nose tip at 0.2, mouth at 0.48.
    """

    # nuisance
    cx: np.ndarray  # face centre in image units (-1..1)
    cy: np.ndarray
    scale: np.ndarray
    skin: np.ndarray  # [N, 3]
    background: np.ndarray  # [N, 3]
    light_x: np.ndarray  # lighting gradient: brightness × (1 + light_x·u + light_y·v)
    light_y: np.ndarray
    gain: np.ndarray
    noise_std: np.ndarray
    # identity: gender and age, mostly upper half
    hair_colour: np.ndarray  # [N, 3], greyed with age
    hair_side: np.ndarray  # hair volume beyond the face
    hair_bottom: np.ndarray  # how far down the hair reaches (long hair > 0)
    hairline: np.ndarray  # top of the forehead (receding: more negative)
    brow_thick: np.ndarray
    eye_size: np.ndarray
    lash: np.ndarray  # dark eye outline
    forehead_lines: np.ndarray  # horizontal forehead wrinkles 0..1: age, and raised brows
    glabella: np.ndarray  # vertical lines between the brows 0..1: lowered brows (anger, disgust)
    crow_feet: np.ndarray  # lines beside the eyes 0..1: smiling, and age
    # identity: gender and age, lower half
    jaw_width: np.ndarray
    face_height: np.ndarray
    beard: np.ndarray  # stubble / beard strength 0..1
    nasolabial: np.ndarray  # nose-to-mouth line strength 0..1
    lip_colour: np.ndarray  # [N, 3]
    # expression
    curve: np.ndarray
    open: np.ndarray
    width: np.ndarray
    asym: np.ndarray  # signed: which corner rises
    lip_raise: np.ndarray
    lip_thick: np.ndarray
    nose_wrinkle: np.ndarray
    brow_raise: np.ndarray
    brow_angle: np.ndarray
    eye_open: np.ndarray

    def __len__(self) -> int:
        return len(self.cx)

    def rows(self, index: slice | np.ndarray) -> FaceParams:
        return FaceParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


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


class _Canvas:
    """A chunk of faces being painted: RGB float32 [n, 3, S, S] and each face's own coordinates.

    Channels come before the pixels because numpy broadcasts a coverage map over a leading axis
    several times faster than over a trailing axis of length 3.
    """

    def __init__(self, p: FaceParams, size: int) -> None:
        grid = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
        self.p, self.size = p, size
        scale = p.scale[:, None, None]
        self.x = (grid[None, None, :] - p.cx[:, None, None]) / scale  # [n, 1, S] face units
        self.y = (grid[None, :, None] - p.cy[:, None, None]) / scale  # [n, S, 1]
        self.px = (np.float32(2.0 / size) / scale)  # [n, 1, 1]: one pixel in face units
        self.inv_px = 1 / self.px
        self.img = np.empty((len(p), 3, size, size), dtype=np.float32)
        self.img[:] = p.background[:, :, None, None]

    def band(self, y_top: float, y_bottom: float) -> tuple[slice, np.ndarray]:
        """Image rows that can hold face-unit heights y_top..y_bottom in any face of the chunk, and y there."""
        v_top = (self.p.cy + self.p.scale * y_top).min()
        v_bottom = (self.p.cy + self.p.scale * y_bottom).max()
        start = max(int(np.floor((v_top + 1) / 2 * self.size - 0.5)) - 1, 0)
        stop = min(int(np.ceil((v_bottom + 1) / 2 * self.size - 0.5)) + 2, self.size)
        rows = slice(start, max(stop, start))
        return rows, self.y[:, rows]

    def cover(self, distance: np.ndarray) -> np.ndarray:
        """Anti-aliased coverage 0..1 of a shape from its signed distance (negative inside), one pixel of ramp."""
        alpha = distance * -self.inv_px
        alpha += 0.5
        return np.clip(alpha, 0, 1, out=alpha)

    def span(self, dx: np.ndarray, half_width: np.ndarray | float, vertical: np.ndarray) -> np.ndarray:
        """Coverage of the rows' intervals |dx| < half_width ([n, R, 1]) times their own coverage ``vertical``.

        Big shapes (face, hair, neck) as one interval per row: three passes over the pixels instead of
        the nine that a distance field takes.
        """
        alpha = (half_width * self.inv_px + 0.5) - np.abs(dx) * self.inv_px
        np.clip(alpha, 0, 1, out=alpha)
        return alpha * vertical

    def paint(self, rows: slice, alpha: np.ndarray, colour: np.ndarray) -> None:
        """Blend ``colour`` ([n, 3] per face, or [3]) over the rows with coverage ``alpha`` [n, R, S]."""
        region = self.img[:, :, rows]
        colour = colour[:, :, None, None] if colour.ndim == 2 else colour[None, :, None, None]
        blend = colour - region  # in place from here on: these arrays are the bulk of the work
        blend *= alpha[:, None]
        region += blend

    def darken(self, rows: slice, alpha: np.ndarray, amount: np.ndarray | float) -> None:
        shade = alpha * amount
        np.subtract(1, shade, out=shade)
        self.img[:, :, rows] *= shade[:, None]


def _col(values: np.ndarray) -> np.ndarray:
    """Per-face values [n] as [n, 1, 1], to broadcast against the grid."""
    return values[:, None, None]


def _box(*distances: np.ndarray) -> np.ndarray:
    """Intersection of shapes given by signed distances."""
    out = distances[0]
    for d in distances[1:]:
        out = np.maximum(out, d)
    return out


def _ellipse_rows(dy: np.ndarray, a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    """Half-width [n, R, 1] of an ellipse with semi-axes a, b at heights dy from its centre (0 outside)."""
    return a * np.sqrt(np.clip(1 - (dy / b) ** 2, 0, None))


def _face_rows(c: _Canvas, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Half-width and coverage of the face's rows: the jaw narrows (men's less) below the eyes, smoothly."""
    p = c.p
    jaw = np.clip(y / 0.45, 0, 1)
    half_width = _ellipse_rows(y, 0.6 + jaw * (_col(p.jaw_width) - 0.6), _col(p.face_height))
    return half_width, c.cover(np.abs(y) - _col(p.face_height))


def _hair_rows(c: _Canvas, y: np.ndarray, grow: float) -> tuple[np.ndarray, np.ndarray]:
    """A dome over the head that falls straight down the sides below y = -0.15 (long hair)."""
    p = c.p
    height = 0.8 + grow + 0.5 * _col(p.hair_side)
    dome = np.minimum(y + 0.15, 0)
    return _ellipse_rows(dome, 0.62 + grow + _col(p.hair_side), height), c.cover(-dome - height)


def _draw_head(c: _Canvas) -> None:
    """Neck, ears, hair behind the head, the face, and the hair over the forehead."""
    p, x = c.p, c.x
    rows, y = c.band(0.45, 1.5)
    c.paint(rows, c.span(x, 0.3, c.cover(0.5 - y)), p.skin * 0.85)  # neck
    rows, y = c.band(-0.22, 0.12)
    ear = y + 0.05
    c.paint(rows, c.span(np.abs(x) - 0.6, _ellipse_rows(ear, 0.08, 0.15), c.cover(np.abs(ear) - 0.15)), p.skin * 0.93)
    rows, y = c.band(-1.2, 0.5)
    half_width, vertical = _hair_rows(c, y, 0.0)
    c.paint(rows, c.span(x, half_width, vertical * c.cover(y - _col(p.hair_bottom))), p.hair_colour)
    rows, y = c.band(-1.0, 1.0)
    c.paint(rows, c.span(x, *_face_rows(c, y)), p.skin)
    rows, y = c.band(-1.0, 0.0)
    fringe = c.span(x, *_hair_rows(c, y, 0.01))
    fringe *= c.cover(y - (_col(p.hairline) + 0.4 * x * x))
    c.paint(rows, fringe, p.hair_colour)


def _draw_upper_features(c: _Canvas) -> None:
    """Forehead lines, the lines between the brows, brows, eyes and crow's feet (all above the midline)."""
    p, x = c.p, c.x
    rows, y = c.band(-0.7, -0.4)
    dy = y + 0.56 - 0.1 * x * x
    lines = np.minimum(np.minimum(np.abs(dy - 0.06), np.abs(dy)), np.abs(dy + 0.06)) - 0.012
    lines = _box(lines, np.abs(x) - 0.3)
    # No lines above the hairline (low bangs hide them).
    c.darken(rows, c.cover(lines) * c.cover(_col(p.hairline) + 0.04 - y), 0.35 * _col(p.forehead_lines))

    rows, y = c.band(-0.48, -0.26)
    glabella = c.span(np.abs(x) - 0.04, 0.012, c.cover(np.abs(y + 0.37) - 0.08))
    c.darken(rows, glabella, 0.4 * _col(p.glabella))

    rows, y = c.band(-0.6, -0.15)
    t = np.clip((np.abs(x) - 0.07) / 0.35, 0, 1)  # 0 at the inner end of a brow, 1 at the outer end
    centre = -0.38 - 0.15 * _col(p.brow_raise) - 0.045 * (1 - (2 * t - 1) ** 2) + 0.15 * _col(p.brow_angle) * (1 - t)
    brow = _box(np.abs(y - centre) - _col(p.brow_thick) * (1 - 0.4 * t), np.abs(np.abs(x) - 0.245) - 0.175)
    c.paint(rows, c.cover(brow), p.hair_colour * 0.7)

    rows, y = c.band(-0.34, -0.06)
    ex, ey = np.abs(x) - 0.24, y + 0.2
    half_w = 0.12 * _col(p.eye_size)
    half_h = 0.06 * _col(p.eye_size) * _col(p.eye_open)
    lash = _col(p.lash)
    outline = c.span(ex, _ellipse_rows(ey, half_w + lash, half_h + lash), c.cover(np.abs(ey) - half_h - lash))
    c.paint(rows, outline, p.hair_colour * 0.3)
    white = c.span(ex, _ellipse_rows(ey, half_w, half_h), c.cover(np.abs(ey) - half_h))
    c.paint(rows, white, _EYE_WHITE)
    radius = 0.045 * _col(p.eye_size)
    iris = c.span(ex, _ellipse_rows(ey, radius, radius), c.cover(np.abs(ey) - radius))
    iris *= white
    c.paint(rows, iris, _IRIS)
    # Crow's feet: three short lines fanning out from the outer eye corner.
    fx = np.abs(x) - 0.4
    fan = np.minimum(np.minimum(np.abs(ey - 0.5 * fx), np.abs(ey)), np.abs(ey + 0.5 * fx)) - 0.01
    c.darken(rows, c.cover(_box(fan, np.abs(fx - 0.05) - 0.05)), 0.4 * _col(p.crow_feet))


def _draw_lower_features(c: _Canvas) -> None:
    """Nose, nose wrinkles, nasolabial lines, beard and mouth (all below the eyes)."""
    p, x = c.p, c.x
    rows, y = c.band(-0.12, 0.26)
    c.darken(rows, c.span(np.abs(x) - 0.07, 0.012, c.cover(np.abs(y - 0.03) - 0.15)), 0.12)  # bridge
    tip = y - 0.2
    c.darken(rows, c.span(x, _ellipse_rows(tip, 0.1, 0.04), c.cover(np.abs(tip) - 0.04)), 0.2)  # shadow under the tip
    c.darken(rows, c.span(np.abs(x) - 0.055, _ellipse_rows(tip, 0.025, 0.025), c.cover(np.abs(tip) - 0.025)), 0.5)
    wrinkle = _box(np.minimum(np.abs(y - 0.02), np.abs(y - 0.08)) - 0.01, np.abs(np.abs(x) - 0.11) - 0.05)
    c.darken(rows, c.cover(wrinkle), 0.45 * _col(np.clip(p.nose_wrinkle, 0, 1)))

    rows, y = c.band(0.15, 0.55)
    nasolabial = _box(np.abs(np.abs(x) - (0.15 + 0.47 * (y - 0.18))) - 0.012, np.abs(y - 0.35) - 0.17)
    c.darken(rows, c.cover(nasolabial), 0.35 * _col(p.nasolabial))

    rows, y = c.band(0.2, 1.0)
    half_width, vertical = _face_rows(c, y)
    c.paint(rows, c.span(x, half_width, vertical * c.cover(0.27 - y) * _col(p.beard)), p.hair_colour * 0.8)

    rows, y = c.band(0.2, 0.8)
    half_w = 0.22 * _col(p.width)
    t = x / half_w
    g = np.sqrt(np.clip(1 - t * t, 0, 1))  # lip thickness profile, 0 at the corners
    up_right, up_left = np.clip(_col(p.asym), 0, None), np.clip(-_col(p.asym), 0, None)
    line = (0.48 - 0.14 * _col(p.curve) * t * t
            - 0.15 * (up_right * np.clip(t, 0, None) ** 2 + up_left * np.clip(-t, 0, None) ** 2))
    top_in = line - (0.04 * _col(p.open) + 0.05 * _col(p.lip_raise) + 0.008) * g
    bottom_in = line + (0.12 * _col(p.open) + 0.008) * g
    top_lip = top_in - 0.03 * _col(p.lip_thick) * g
    bottom_lip = bottom_in + 0.04 * _col(p.lip_thick) * g
    ends = (np.abs(t) - 1) * half_w
    c.paint(rows, c.cover(_box(top_lip - y, y - bottom_lip, ends)), p.lip_colour)
    c.paint(rows, c.cover(_box(top_in - y, y - bottom_in, ends)), _MOUTH_INSIDE)


def _finish(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Lighting gradient, gain and pixel noise; float [n, 3, S, S] in 0..1 -> uint8 [n, S, S, 3]."""
    p, size = c.p, c.size
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    light = 1 + _col(p.light_x) * grid[None, None, :] + _col(p.light_y) * grid[None, :, None]
    light *= _col(p.gain)
    img = c.img
    img *= light[:, None]
    noise = rng.standard_normal(light.shape, dtype=np.float32)  # grey noise: a third of the draws
    noise *= _col(p.noise_std)
    img += noise[:, None]
    np.clip(img, 0, 1, out=img)
    img *= 255
    img += 0.5  # so that truncation rounds
    return img.transpose(0, 2, 3, 1)


def draw_faces(params: FaceParams, image_size: int, seed: int = 0) -> np.ndarray:
    """RGB uint8 faces [N, image_size, image_size, 3] for ``params``; ``seed`` drives the pixel noise."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE} px for the features to show, got {image_size}")
    rng = np.random.default_rng(seed)
    out = np.empty((len(params), image_size, image_size, 3), dtype=np.uint8)
    for start in range(0, len(params), _CHUNK):
        canvas = _Canvas(params.rows(slice(start, start + _CHUNK)), image_size)
        _draw_head(canvas)
        _draw_upper_features(canvas)
        _draw_lower_features(canvas)
        out[start : start + _CHUNK] = _finish(canvas, rng)  # truncating cast; values are in 0.5..255.5
    return out


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
