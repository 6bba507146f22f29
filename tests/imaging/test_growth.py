"""--mask-growth: masks that grow over the steps, on shapes whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pie_cli.imaging.growth import fractions, grow, parse, problem


def rectangle(grey: int = 255) -> Image.Image:
    a = np.zeros((40, 30), dtype=np.uint8)
    a[10:30, 5:25] = grey  # rows 10..29: 20 rows
    return Image.fromarray(a, mode="L")


def test_rise_fills_from_the_lowest_row_up():
    masks = [np.asarray(m) for m in grow(rectangle(), "rise", 4)]
    rows = [np.nonzero(m.any(axis=1))[0] for m in masks]
    assert [(r.min(), r.max()) for r in rows] == [(25, 29), (20, 29), (15, 29), (10, 29)]  # 1/4 .. 4/4
    assert (masks[-1] == np.asarray(rectangle())).all()
    for a, b in zip(masks, masks[1:], strict=False):
        assert ((a > 0) <= (b > 0)).all()  # each step's region holds the last


def test_start_and_grey_values():
    masks = [np.asarray(m) for m in grow(rectangle(128), "rise:0.5", 3)]
    assert [int((m > 0).any(axis=1).sum()) for m in masks] == [10, 15, 20]
    assert set(np.unique(masks[0])) == {0, 128}  # a grey mask stays grey where it grows
    assert fractions(1, None) == [1.0] and fractions(3, 0.4) == pytest.approx([0.4, 0.7, 1.0])


def test_dilate_grows_outwards_from_the_deepest_point():
    masks = [np.asarray(m) > 0 for m in grow(rectangle(), "dilate", 5)]
    first = np.argwhere(masks[0])
    centre = first.mean(axis=0)
    assert abs(centre[0] - 19.5) <= 1.5 and abs(centre[1] - 14.5) <= 1.5  # around the middle
    assert masks[0].sum() < masks[2].sum() < masks[4].sum() == np.asarray(rectangle()).astype(bool).sum()
    for a, b in zip(masks, masks[1:], strict=False):
        assert (a <= b).all()
    # a second piece, not connected to the seed's, comes in at the last step
    two = np.asarray(rectangle()).copy()
    two[34:38, 2:6] = 255
    grown = [np.asarray(m) > 0 for m in grow(Image.fromarray(two), "dilate", 3)]
    assert not grown[1][34:38, 2:6].any() and grown[2][34:38, 2:6].all()


def test_an_empty_mask_stays_empty_and_bad_growths_are_named():
    empty = Image.new("L", (8, 8))
    assert all(not np.asarray(m).any() for m in grow(empty, "rise", 3))
    assert parse("rise") == ("rise", None) and parse("dilate:0.25") == ("dilate", 0.25)
    assert problem("rise") is None
    assert problem("up") == "'up' is not one of rise, dilate (MODE or MODE:START, e.g. rise:0.2)"
    assert problem("rise:0") == "'rise:0': START must be a number in (0, 1], got '0'"
    assert problem("rise:x") == "'rise:x': START must be a number in (0, 1], got 'x'"
    assert problem("rise:nan") is not None and problem("rise:1.5") is not None
