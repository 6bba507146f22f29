"""The numpy morphology behind `pie mask`, against brute force."""

from __future__ import annotations

import numpy as np

from pie_cli.imaging.morphology import distance_within, fill_holes, label, otsu_threshold


def test_distance_is_exact_euclidean_within_the_radius():
    rng = np.random.default_rng(0)
    mask = rng.random((40, 50)) > 0.97
    got = distance_within(mask, 6)
    points = np.argwhere(mask)
    yy, xx = np.mgrid[0:40, 0:50]
    brute = np.sqrt(((yy[..., None] - points[:, 0]) ** 2 + (xx[..., None] - points[:, 1]) ** 2).min(axis=2))
    within = brute <= 6
    assert np.allclose(got[within], brute[within])
    assert np.isinf(got[~within]).all()


def test_label_connectivity():
    diagonal = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=bool)
    assert label(diagonal, connectivity=8)[1] == 1
    assert label(diagonal, connectivity=4)[1] == 3
    u_shape = np.array([[1, 0, 1], [1, 0, 1], [1, 1, 1]], dtype=bool)  # joins only at the bottom row
    labels, count = label(u_shape)
    assert count == 1 and (labels[u_shape] == 1).all()


def test_fill_holes_keeps_bays_open():
    ring = np.zeros((9, 9), dtype=bool)
    ring[1:8, 1:8] = True
    ring[3:6, 3:6] = False  # a hole
    bay = ring.copy()
    bay[4, 6:8] = False  # ...opened to the outside: a bay, not a hole
    assert fill_holes(ring)[4, 4] and not fill_holes(bay)[4, 4]


def test_otsu_splits_two_levels():
    gray = np.array([30] * 50 + [200] * 50, dtype=np.uint8)
    t = otsu_threshold(gray)
    assert 30 <= t < 200
