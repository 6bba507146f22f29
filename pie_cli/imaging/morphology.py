"""Binary morphology on numpy boolean masks: distances, dilate/erode, components, holes, Otsu.

Written for pie's masks (a few hundred pixels square) with numpy only: no scipy, no torch.
Dilation and erosion use a Euclidean disk, so ``dilate(m, 3)`` grows a straight edge by
exactly 3 pixels and rounds corners. Connected components are 8-connected.
"""

from __future__ import annotations

import numpy as np


def _column_gap(mask: np.ndarray, cap: int) -> np.ndarray:
    """Per pixel, the vertical distance (in rows) to the nearest True pixel of its column, capped."""
    h = mask.shape[0]
    rows = np.arange(h, dtype=np.int64)[:, None]
    big = h + cap + 1
    above = np.where(mask, rows, -big)
    above = np.maximum.accumulate(above, axis=0)
    below = np.where(mask, rows, 2 * h + big)
    below = np.minimum.accumulate(below[::-1], axis=0)[::-1]
    gap = np.minimum(rows - above, below - rows)
    return np.minimum(gap, cap + 1)


def distance_within(mask: np.ndarray, radius: int) -> np.ndarray:
    """Exact Euclidean distance from each pixel to the nearest True pixel (0 on True).

    Distances above ``radius`` are reported as ``inf``: callers only ever need the
    band up to a dilation/feather radius, which keeps this O(H * W * radius).
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    if not mask.any():
        return np.full((h, w), np.inf)
    radius = max(0, int(radius))
    gap2 = _column_gap(mask, radius).astype(np.float64) ** 2
    best = gap2.copy()
    for dx in range(1, radius + 1):
        shifted_left = np.full((h, w), np.inf)
        shifted_left[:, dx:] = gap2[:, :-dx]
        shifted_right = np.full((h, w), np.inf)
        shifted_right[:, :-dx] = gap2[:, dx:]
        np.minimum(best, np.minimum(shifted_left, shifted_right) + dx * dx, out=best)
    dist = np.sqrt(best)
    dist[dist > radius] = np.inf
    return dist


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow by a Euclidean disk of ``radius`` pixels."""
    if radius <= 0:
        return np.asarray(mask, dtype=bool).copy()
    return distance_within(mask, radius) <= radius


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Shrink by a Euclidean disk of ``radius`` pixels (the image border does not erode)."""
    mask = np.asarray(mask, dtype=bool)
    if radius <= 0 or mask.all():
        return mask.copy()
    return ~dilate(~mask, radius)


def opening(mask: np.ndarray, radius: int) -> np.ndarray:
    return dilate(erode(mask, radius), radius)


def closing(mask: np.ndarray, radius: int) -> np.ndarray:
    return erode(dilate(mask, radius), radius)


def feather(mask: np.ndarray, radius: int) -> np.ndarray:
    """A soft inward edge in [0, 1]: 1 at ``radius`` pixels or more inside, k / radius at depth k.

    The ramp lies inside the mask, so feathering never makes a pixel outside the
    original mask editable.
    """
    mask = np.asarray(mask, dtype=bool)
    if radius <= 0:
        return mask.astype(np.float64)
    depth = distance_within(~mask, radius)  # distance to the nearest pixel outside the mask
    return np.where(mask, np.minimum(depth / radius, 1.0), 0.0)


def outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image border counts as outside)."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _runs(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    edges = np.diff(np.concatenate(([0], row.view(np.int8), [0])))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def label(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components: (labels, count), labels 1..count and 0 for background."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    touch = 1 if connectivity == 8 else 0
    starts, ends, rows = [], [], []
    row_slices = []
    for y in range(h):
        s, e = _runs(mask[y])
        row_slices.append((len(starts), len(starts) + len(s)))
        starts.extend(s.tolist())
        ends.extend(e.tolist())
        rows.extend([y] * len(s))
    parent = list(range(len(starts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for y in range(1, h):
        i, i_end = row_slices[y - 1]
        j, j_end = row_slices[y]
        while i < i_end and j < j_end:
            if starts[i] < ends[j] + touch and starts[j] < ends[i] + touch:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1

    labels = np.zeros((h, w), dtype=np.int32)
    ids: dict[int, int] = {}
    for k in range(len(starts)):
        root = find(k)
        if root not in ids:
            ids[root] = len(ids) + 1
        labels[rows[k], starts[k] : ends[k]] = ids[root]
    return labels, len(ids)


def component_sizes(labels: np.ndarray, count: int) -> np.ndarray:
    """Pixel count of components 1..count (index 0 is background)."""
    return np.bincount(labels.ravel(), minlength=count + 1)


def keep_largest(mask: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest 8-connected components of ``mask``."""
    labels, count = label(mask)
    if count <= k:
        return np.asarray(mask, dtype=bool).copy()
    sizes = component_sizes(labels, count)[1:]
    keep = np.argsort(-sizes, kind="stable")[:k] + 1
    return np.isin(labels, keep)


def touching_border(labels: np.ndarray) -> set[int]:
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return set(np.unique(edge[edge > 0]).tolist())


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions that do not reach the image border."""
    mask = np.asarray(mask, dtype=bool)
    background, count = label(~mask, connectivity=4)
    if count == 0:
        return mask.copy()
    outside = touching_border(background)
    holes = (background > 0) & ~np.isin(background, list(outside))
    return mask | holes


def otsu_threshold(gray: np.ndarray) -> int:
    """Otsu's threshold of an 8-bit image: foreground = gray > t."""
    hist = np.bincount(np.asarray(gray, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 127
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mean_total = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_total * w0 - m0 * total) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    return int(np.argmax(between))
