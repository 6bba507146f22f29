"""Masks: modes, the image's working geometry, empty after the crop, the latent-grid mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pie_cli.errors import UserError
from pie_cli.imaging.masks import latent_mask, mask_to_grey, prepare_mask, require_nonempty


def test_mask_modes():
    assert mask_to_grey(Image.new("1", (4, 4), 1)).getextrema() == (255, 255)
    assert mask_to_grey(Image.new("RGB", (4, 4), (200, 200, 200))).getextrema() == (200, 200)
    assert mask_to_grey(Image.new("LA", (4, 4), (90, 255))).getextrema() == (90, 90)  # opaque: its grey
    assert mask_to_grey(Image.new("LA", (4, 4), (90, 0))).getextrema() == (0, 0)  # transparent = keep
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert mask_to_grey(sixteen).getextrema() == (255, 255)
    with pytest.raises(UserError, match="is a colour image"):
        mask_to_grey(Image.new("RGB", (4, 4), (0, 255, 0)), "m.png")
    label_map = Image.fromarray(
        np.eye(4, dtype=np.uint16)
    )  # a 16-bit {0, 1} label map: the 1s are the region
    assert np.array_equal(np.asarray(mask_to_grey(label_map, "labels.png")), np.eye(4, dtype=np.uint8) * 255)
    with pytest.raises(UserError, match="label map with labels 1, 2"):
        mask_to_grey(Image.fromarray(np.diag([0, 1, 2, 0]).astype(np.uint8)), "labels.png")


def test_mask_follows_the_image_geometry():
    mask = np.zeros((64, 96), dtype=np.uint8)
    mask[:, 40:56] = 255
    out = prepare_mask(Image.fromarray(mask), (96, 64), 64)
    assert out.size == (64, 64) and np.asarray(out)[:, 24:40].min() == 255
    ready = Image.new("L", (64, 64), 255)  # already in working geometry (e.g. from `pie mask`)
    assert prepare_mask(ready, (96, 64), 64) is not None
    with pytest.raises(UserError, match="mask m.png is 50x50 but the image is 96x64"):
        prepare_mask(Image.new("L", (50, 50), 255), (96, 64), 64, "m.png")


def test_mask_cropped_away_is_reported_as_such():
    mask = np.zeros((64, 96), dtype=np.uint8)
    mask[:, :10] = 255  # only in the part the centre crop removes
    original = Image.fromarray(mask)
    prepared = prepare_mask(original, (96, 64), 64)
    with pytest.raises(UserError, match="inside the centre crop used at --resolution 64"):
        require_nonempty(prepared, original, 64, "m.png")


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_numpy_latent_mask_matches_torch_bilinear(factor):
    rng = np.random.default_rng(factor)
    arr = rng.integers(0, 256, size=(64, 64)).astype(np.uint8)
    t = torch.nn.functional.interpolate(
        torch.from_numpy(arr).float()[None, None],
        size=(64 // factor,) * 2,
        mode="bilinear",
        align_corners=False,
    )
    assert np.allclose(latent_mask(arr, factor), t[0, 0].numpy() / 255.0, atol=1e-6)
