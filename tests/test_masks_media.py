"""Image and mask geometry, modes and file writing (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pie_cli.errors import UserError
from pie_cli.imaging.files import atomic_path
from pie_cli.imaging.masks import latent_mask, mask_to_grey, prepare_mask, require_nonempty
from pie_cli.imaging.media import fit_square, open_image, square_geometry, to_rgb8


@pytest.mark.parametrize(
    ("size", "resized", "box"),
    [
        ((512, 512), (512, 512), (0, 0, 512, 512)),
        ((1024, 768), (683, 512), (85, 0, 597, 512)),
        ((300, 600), (512, 1024), (0, 256, 512, 768)),
        ((2048, 2500), (512, 625), (0, 56, 512, 568)),
    ],
)
def test_square_geometry(size, resized, box):
    assert square_geometry(size, 512) == (resized, box)
    assert fit_square(Image.new("RGB", size), 512).size == (512, 512)


def test_centre_crop_keeps_the_centre():
    arr = np.zeros((64, 96), dtype=np.uint8)
    arr[:, 40:56] = 255  # a bright stripe around the centre column 48
    out = np.asarray(fit_square(Image.fromarray(arr), 64))
    assert out[:, 24:40].min() == 255 and out[:, :16].max() == 0 and out[:, 50:].max() == 0


def test_sixteen_bit_images_scale_by_depth():
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    rgb = np.asarray(to_rgb8(Image.fromarray(arr)))
    assert rgb.shape == (1, 3, 3) and rgb[0, :, 0].tolist() == [0, 128, 255]


def test_open_image_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match=f"image {tmp_path}/x.png does not exist"):
        open_image(tmp_path / "x.png")
    with pytest.raises(UserError, match="is a directory"):
        open_image(tmp_path)
    (tmp_path / "t.png").write_text("text")
    with pytest.raises(UserError, match="is not an image pie can read"):
        open_image(tmp_path / "t.png", "mask")


def test_mask_modes():
    assert mask_to_grey(Image.new("1", (4, 4), 1)).getextrema() == (255, 255)
    assert mask_to_grey(Image.new("RGB", (4, 4), (200, 200, 200))).getextrema() == (200, 200)
    assert mask_to_grey(Image.new("LA", (4, 4), (90, 0))).getextrema() == (90, 90)
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert mask_to_grey(sixteen).getextrema() == (255, 255)
    with pytest.raises(UserError, match="is a colour image"):
        mask_to_grey(Image.new("RGB", (4, 4), (0, 255, 0)), "m.png")
    label_map = Image.fromarray(np.eye(4, dtype=np.uint16))
    with pytest.raises(UserError, match="looks like a 0/1 label map"):
        mask_to_grey(label_map, "labels.png")


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


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
