"""`pie finetune --fit`: training examples in the geometry `pie simulate --fit` works in."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pie_cli.imaging.geometry import fit_geometry
from pie_cli.imaging.media import prepare_image
from pie_cli.training.dataset import crop_and_flip
from tests.helpers import finetune_argv, losses


def portrait() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, size=(120, 80, 3)).astype(np.uint8), mode="RGB")


@pytest.mark.parametrize("fit", ["crop", "pad", "native"])
def test_examples_are_the_canvas_simulate_works_on(fit):
    img = portrait()
    example = crop_and_flip(img, 64, True, False, np.random.default_rng(0), fit)
    assert example.size == fit_geometry(img.size, 64, fit).canvas
    assert np.array_equal(np.asarray(example), np.asarray(prepare_image(img, 64, fit)))  # frame 0's canvas
    if fit == "pad":  # letterboxed: the whole image, black padding beside it
        assert example.size == (64, 64) and not np.asarray(example)[:, :10].any()


def test_finetune_with_fit_pad_trains_and_native_needs_batch_one(cli, tiny_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(4):
        portrait().save(data / f"{i}.png")
        rows.append(f'{{"file_name": "{i}.png", "text": "a film"}}\n')
    (data / "metadata.jsonl").write_text("".join(rows))
    out = tmp_path / "pad"
    result = cli(*finetune_argv(data, tiny_model, out, "--fit", "pad", max_steps=2))
    assert result.exit_code == 0, result.output
    assert len(losses(out)) == 2
    refused = cli(*finetune_argv(data, tiny_model, tmp_path / "native", "--fit", "native", max_steps=1))
    assert refused.exit_code == 2
    assert (
        "--fit native trains each image at its own aspect, so a batch holds one image: give --batch-size 1 "
        "(and --grad-accum 2 for the same effective batch), or --fit pad." in refused.stderr
    )
    assert not (tmp_path / "native").exists()
    native = tmp_path / "native1"
    result = cli(*finetune_argv(data, tiny_model, native, "--fit", "native", batch_size=1, max_steps=1))
    assert result.exit_code == 0, result.output
