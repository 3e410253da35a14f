"""Decoding face image files (AffectNet, UTKFace) into one uint8 RGB array, in threads, with a progress bar.

PIL releases the GIL while it decodes and resizes, so a thread pool scales with the cores without the
pickling cost of processes; each result is written straight into a preallocated [N, S, S, 3] array.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

Box = tuple[int, int, int, int]  # x, y, width, height in pixels of the source image
RESAMPLE = Image.Resampling.BILINEAR  # antialiased when shrinking (PIL widens the filter support)
MAX_THREADS = 8


class UnreadableImage(Exception):
    """An image file that PIL cannot decode, or whose face box lies outside it."""


@dataclass(frozen=True)
class DecodeResult:
    """Outcome of :func:`decode_faces`: which rows were filled, and why the others were not."""

    ok: np.ndarray  # bool [N]; False rows of the output array are left zero
    num_resized: int  # images whose (cropped) size was not size × size
    failures: tuple[tuple[str, str], ...]  # (path, reason) of every unreadable image


def decode_face(path: Path, size: int, box: Box | None = None, *,
                store_size: int | None = None) -> tuple[np.ndarray, bool]:
    """One image as RGB uint8 [size, size, 3], cropped to ``box`` (clipped to the image) first.

    ``store_size``: then shrink the size × size face to store_size² (PIL's antialiasing filter), so a
    grid whose networks read 48 px stores 48 px, not 200 px it would resize on every batch.
    Returns the array and whether it had to be resized to size × size. Any mode (grey, palette, RGBA,
    CMYK) is converted to RGB. Raises :class:`UnreadableImage` if the file cannot be decoded or the clipped
    box is empty.
    """
    try:
        with Image.open(path) as image:
            if box is not None:
                x, y, width, height = box
                left, top = max(0, x), max(0, y)
                right, bottom = min(image.width, x + width), min(image.height, y + height)
                if right <= left or bottom <= top:
                    raise UnreadableImage(f"face box {box} lies outside the {image.width}x{image.height} image")
                image = image.crop((left, top, right, bottom))
            image = image.convert("RGB")
            resized = image.size != (size, size)
            if resized:
                image = image.resize((size, size), RESAMPLE)
            if store_size is not None and store_size != size:
                image = image.resize((store_size, store_size), RESAMPLE)
            return np.asarray(image, dtype=np.uint8), resized
    except UnreadableImage:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        # OSError covers missing files and PIL.UnidentifiedImageError; truncated files raise OSError too.
        raise UnreadableImage(f"{type(error).__name__}: {error}") from None


def decode_faces(paths: Sequence[Path], size: int, boxes: Sequence[Box] | None = None, *,
                 desc: str = "decoding faces", num_threads: int | None = None,
                 store_size: int | None = None, out: np.ndarray | None = None) -> tuple[np.ndarray, DecodeResult]:
    """Decode ``paths`` (cropped to ``boxes``) into a uint8 array [N, side, side, 3] using a thread
    pool; side = ``store_size`` if given (see :func:`decode_face`), else ``size``. ``out``: the array to
    fill (e.g. a memory-mapped file, for sets larger than RAM), else a new one.

    Unreadable files do not stop the run: their rows stay zero and are marked False in ``ok``.
    """
    if boxes is not None and len(boxes) != len(paths):
        raise ValueError(f"got {len(boxes)} face boxes for {len(paths)} image paths; pass one box per path")
    side = store_size or size
    shape = (len(paths), side, side, 3)
    if out is None:
        images = np.zeros(shape, dtype=np.uint8)
    elif out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"out must be a uint8 array of shape {shape}, got {out.dtype} {out.shape}")
    else:
        images = out
    ok = np.zeros(len(paths), dtype=bool)
    resized = np.zeros(len(paths), dtype=bool)
    failures: list[tuple[int, str]] = []

    def work(index: int) -> None:
        try:
            images[index], resized[index] = decode_face(paths[index], size, None if boxes is None else boxes[index],
                                                                  store_size=store_size)
            ok[index] = True
        except UnreadableImage as error:
            failures.append((index, str(error)))  # list.append is atomic under the GIL

    threads = num_threads or min(MAX_THREADS, os.cpu_count() or 1)
    bar = tqdm(total=len(paths), desc=desc, unit="img", mininterval=1.0)
    with ThreadPoolExecutor(max_workers=threads) as pool, bar:
        for _ in pool.map(work, range(len(paths))):
            bar.update()
    failures.sort()
    return images, DecodeResult(
        ok=ok, num_resized=int(resized.sum()),
        failures=tuple((str(paths[index]), reason) for index, reason in failures),
    )


__all__ = ["Box", "DecodeResult", "UnreadableImage", "decode_face", "decode_faces"]
