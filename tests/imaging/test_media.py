"""Images in: square geometry and the centre crop, 16-bit depth, unreadable files; atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pie_cli.errors import UserError
from pie_cli.imaging.files import atomic_path
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


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
