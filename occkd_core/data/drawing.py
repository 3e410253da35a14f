"""Painting synthetic faces: :class:`FaceParams` (everything that decides how each face looks) and
:func:`draw_faces`, which paints them, vectorised over faces. What the parameters are drawn from (the
labels' cues, the nuisance variation) is :mod:`occkd_core.data.synthetic`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

MIN_IMAGE_SIZE = 24
_CHUNK = 256  # faces drawn at once: bounds memory at about 40 MB of float32 per chunk at 64 px
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


