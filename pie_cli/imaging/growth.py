"""Masks that grow over a progression's steps (``--mask-growth``; numpy and PIL only).

A growth is ``MODE`` or ``MODE:START``: at step n of N the region allowed to change is a part of the
mask that grows from the fraction START (default 1/N) at step 1 to the whole mask at step N:

- ``rise``: a level rising from the mask's lowest row to its top (a fluid level filling the lung
  base upwards): the mask's pixels at or below the level;
- ``dilate``: the mask's pixels within a geodesic distance (4-connected steps inside the mask) of its
  seed, the pixel deepest inside it, the distance growing to the farthest pixel.

A pixel inside the region keeps its mask value (grey masks stay partial); outside it is 0. With
N = 1 the only step has the whole mask.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from PIL import Image

MODES = ("rise", "dilate")


def problem(text: str) -> str | None:
    """What is wrong with the growth ``text`` (to follow "--mask-growth "), or None."""
    try:
        parse(text)
    except ValueError as exc:
        return str(exc)
    return None


def parse(text: str) -> tuple[str, float | None]:
    """``"rise"`` -> ("rise", None); ``"dilate:0.2"`` -> ("dilate", 0.2); a ``ValueError`` otherwise."""
    mode, _, start = text.strip().partition(":")
    if mode not in MODES:
        raise ValueError(f"{text!r} is not one of {', '.join(MODES)} (MODE or MODE:START, e.g. rise:0.2)")
    if not start:
        return mode, None
    try:
        value = float(start)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{text!r}: START must be a number in (0, 1], got {start!r}")
    return mode, value


def fractions(steps: int, start: float | None) -> list[float]:
    """The share of the mask at steps 1..N: linear from START (default 1/N) to 1."""
    first = 1.0 / steps if start is None else start
    if steps == 1:
        return [1.0]
    return [first + (1.0 - first) * (n / (steps - 1)) for n in range(steps)]


def _rise_order(on: np.ndarray) -> np.ndarray:
    """Per pixel, how far up from the mask's lowest row it is, as a share of the mask's height."""
    rows = np.nonzero(on.any(axis=1))[0]
    top, bottom = rows.min(), rows.max()
    height = bottom - top + 1
    y = np.arange(on.shape[0], dtype=np.float64)[:, None]
    return np.broadcast_to((bottom - y + 1) / height, on.shape)


def _dilate_order(on: np.ndarray) -> np.ndarray:
    """Per pixel of the mask, its geodesic distance from the seed as a share of the largest; inf outside."""
    h, w = on.shape
    # Seed: the pixel deepest inside the mask (largest distance to its outside), by repeated erosion.
    depth = np.zeros(on.shape, dtype=np.int64)
    current = on.copy()
    level = 0
    while current.any():
        level += 1
        depth[current] = level
        padded = np.pad(current, 1)
        current = current & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    seed = np.unravel_index(int(np.argmax(depth)), on.shape)
    distance = np.full(on.shape, np.inf)
    distance[seed] = 0
    queue = deque([seed])
    while queue:
        y, x = queue.popleft()
        d = distance[y, x] + 1
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= ny < h and 0 <= nx < w and on[ny, nx] and distance[ny, nx] == np.inf:
                distance[ny, nx] = d
                queue.append((ny, nx))
    reached = np.isfinite(distance)
    far = distance[reached].max()
    order = np.where(reached, (distance + 1) / (far + 1), np.inf)
    # Parts of the mask not connected to the seed's come in last, all at once.
    return np.where(on & ~reached, 1.0, order)


def grow(mask: Image.Image, growth: str, steps: int) -> list[Image.Image]:
    """The mask of each step 1..N ("L" images of the mask's size) for the growth ``growth``."""
    mode, start = parse(growth)
    values = np.asarray(mask.convert("L"), dtype=np.uint8)
    on = values > 0
    if not on.any():
        return [mask.convert("L")] * steps
    order = _rise_order(on) if mode == "rise" else _dilate_order(on)
    out = []
    for share in fractions(steps, start):
        region = on & (order <= share + 1e-9)
        out.append(Image.fromarray(np.where(region, values, 0).astype(np.uint8), mode="L"))
    return out
