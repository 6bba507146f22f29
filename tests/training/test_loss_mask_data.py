"""`pie finetune --loss-mask data|lungs`, the data side (issue 16, item 2): each example's mask, placed exactly
as its image (the same resize, crop, padding and mirror), as ``item["loss_mask"]``; the masks' refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pie_cli.errors import UserError
from pie_cli.imaging.geometry import fit_geometry
from pie_cli.reporting import Reporter
from pie_cli.training.config import TrainSpec
from pie_cli.training.data import check_images, load_data
from pie_cli.training.dataset import compute_lung_masks, prepare_examples, training_batches
from tests.helpers import finetune_argv


def blocky_mask(w: int, h: int, block: int, seed: int) -> np.ndarray:
    """A random, asymmetric binary mask of ``block`` x ``block`` squares (bool, h x w)."""
    rng = np.random.default_rng(seed)
    cells = rng.random((-(-h // block), -(-w // block))) < 0.5
    cells[0, 0], cells[0, -1] = True, False  # never mirror-symmetric
    return np.kron(cells, np.ones((block, block), dtype=bool))[:h, :w]


def save_mask(region: np.ndarray, path: Path, mode: str) -> None:
    if mode == "L":
        Image.fromarray(np.where(region, 255, 0).astype(np.uint8), mode="L").save(path)
    elif mode == "1":
        Image.fromarray(region).convert("1").save(path)
    elif mode == "I;16":
        Image.fromarray(np.where(region, 65535, 0).astype(np.uint16)).save(path)
    elif mode == "RGB":  # grey stored as RGB
        Image.fromarray(np.where(region, 200, 0).astype(np.uint8), mode="L").convert("RGB").save(path)
    elif mode == "labels":  # a label map: every label above 0 is weighted
        labels = np.where(region, 1 + (np.indices(region.shape)[1] % 2), 0).astype(np.uint8)
        Image.fromarray(labels, mode="L").save(path)
    else:
        raise ValueError(mode)


def masked_folder(root: Path, sizes, mode: str = "L", block: int = 4, column: str = "mask") -> Path:
    """Images whose red channel is their mask (white where it is 1) and whose other channels are noise,
    each with its mask file in ``column`` of metadata.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (w, h) in enumerate(sizes):
        region = blocky_mask(w, h, block, seed=i)
        noise = np.random.default_rng(100 + i).integers(0, 256, size=(h, w, 2), dtype=np.uint8)
        rgb = np.dstack([np.where(region, 255, 0).astype(np.uint8), noise])
        Image.fromarray(rgb, mode="RGB").save(root / f"{i}.png")
        save_mask(region, root / f"{i}-mask.png", mode)
        rows.append({"file_name": f"{i}.png", "text": "a film", column: f"{i}-mask.png"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def make_spec(data: Path, **kwargs) -> TrainSpec:
    values = {"data": str(data), "out": "unused", "resolution": 32, "batch_size": 1, "num_workers": 0}
    spec = TrainSpec(**{**values, "loss_mask": "data", **kwargs})
    spec.check()
    return spec


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import CLIPTokenizerFast

    return CLIPTokenizerFast.from_pretrained(tiny_model, subfolder="tokenizer", local_files_only=True)


def examples(spec: TrainSpec, tokenizer, epochs=(0, 1, 2)):
    """Every batch of ``epochs`` (training_batches' loader, as the loop gets them)."""
    data = load_data(spec)
    check_images(data)
    batches = training_batches(spec, data, None, tokenizer)
    for epoch in epochs:
        batches.dataset.epoch = epoch
        batches.sampler.set_epoch(epoch)
        yield from batches.loader


# Geometries without a resize (the short side, or for pad the long side, is already R = 32), so the
# red channel of each example is its mask exactly: crop (centre, random), mirrored, pad, native, buckets.
GEOMETRIES = {
    "centre crop": ([(32, 48), (48, 32)], {}),
    "random crop": ([(32, 48), (56, 32)], {"center_crop": False}),
    "random crop and flip": ([(32, 48), (56, 32)], {"center_crop": False, "random_flip": True}),
    "pad": ([(24, 32), (32, 16)], {"fit": "pad", "random_flip": True}),
    "native": ([(32, 48), (64, 32)], {"fit": "native", "random_flip": True}),
    "buckets": (
        [(32, 52), (32, 48), (52, 32), (32, 32), (32, 40)],
        {"fit": "native", "buckets": True, "bucket_step": 16, "batch_size": 2, "random_flip": True},
    ),
}


def placed_as(placed: np.ndarray, region: np.ndarray) -> str | None:
    """ "plain" or "mirrored" when ``placed`` is a window of ``region`` (a crop) or holds it whole (padding),
    as is or mirrored; None when it is neither (the mask moved away from where the image went)."""
    for name, source in (("plain", region), ("mirrored", region[:, ::-1])):
        small, large = (placed, source) if placed.size <= source.size else (source, placed)
        (sh, sw), (lh, lw) = small.shape, large.shape
        if sh > lh or sw > lw:
            continue
        for y in range(lh - sh + 1):
            for x in range(lw - sw + 1):
                if np.array_equal(large[y : y + sh, x : x + sw], small):
                    return name
    return None


@pytest.mark.parametrize("case", sorted(GEOMETRIES))
def test_the_mask_lies_on_its_image_pixel_for_pixel(tmp_path, tokenizer, case):
    sizes, options = GEOMETRIES[case]
    spec = make_spec(masked_folder(tmp_path / "d", sizes), **options)
    how = set()
    for batch in examples(spec, tokenizer):
        pixels, mask = batch["pixel_values"], batch["loss_mask"]
        assert mask.dtype == torch.float32 and mask.shape == (pixels.shape[0], 1, *pixels.shape[-2:])
        assert torch.equal(mask[:, 0], (pixels[:, 0] > 0).float())  # red channel = the mask, placed alike
        for i, m in zip(batch["index"].tolist(), mask[:, 0].numpy(), strict=True):
            region = blocky_mask(*sizes[i], 4, seed=i).astype(np.float32)
            if case == "pad":  # the frame inside the letterbox, whose padding weighs nothing
                left, top, right, bottom = fit_geometry(sizes[i], 32, "pad").content
                assert m.sum() == m[top:bottom, left:right].sum()
                m = m[top:bottom, left:right]
            found = placed_as(m, region)
            assert found is not None, (case, i)
            how.add(found)
    assert how == ({"plain", "mirrored"} if options.get("random_flip") else {"plain"})


def test_the_centre_crop_is_the_middle_of_the_mask(tmp_path, tokenizer):
    spec = make_spec(masked_folder(tmp_path / "d", [(32, 48)]))
    batch = next(examples(spec, tokenizer, epochs=(0,)))
    region = blocky_mask(32, 48, 4, seed=0)
    assert np.array_equal(batch["loss_mask"][0, 0].numpy(), region[8:40].astype(np.float32))


@pytest.mark.parametrize("mode", ["1", "I;16", "RGB", "labels"])
def test_binary_grey_sixteen_bit_rgb_and_label_masks_read_alike(tmp_path, tokenizer, mode):
    sizes = [(32, 48), (40, 32)]
    reference = [b["loss_mask"] for b in examples(make_spec(masked_folder(tmp_path / "L", sizes)), tokenizer)]
    got = [
        b["loss_mask"] for b in examples(make_spec(masked_folder(tmp_path / mode, sizes, mode)), tokenizer)
    ]
    assert all(torch.equal(a, b) for a, b in zip(reference, got, strict=True))


def test_a_resized_mask_stays_on_its_pixels(tmp_path, tokenizer):
    """Images at twice the working size (resized: Lanczos for the image, bilinear for the mask)."""
    spec = make_spec(masked_folder(tmp_path / "d", [(64, 96), (112, 64)], block=8), center_crop=False)
    for batch in examples(spec, tokenizer):
        red, mask = batch["pixel_values"][0, 0], batch["loss_mask"][0, 0]
        assert bool((red[mask == 1] > 0.5).all()) and bool((red[mask == 0] < -0.5).all())
        assert float(((mask == 0) | (mask == 1)).float().mean()) > 0.4  # soft only along the block edges


def test_without_pixels_cached_latents_still_get_the_centre_cropped_mask(tmp_path, tokenizer):
    spec = make_spec(masked_folder(tmp_path / "d", [(32, 48), (48, 32)]), cache_latents=True)
    data = load_data(spec)
    batches = training_batches(spec, data, None, tokenizer)
    assert not batches.instance.with_pixels
    for k, batch in enumerate(batches.loader):
        assert "pixel_values" not in batch
        pixels = batches.instance.image(int(batch["index"][0]))  # what the cache encodes
        assert torch.equal(batch["loss_mask"][0, 0], (pixels[0] > 0).float()), k


# ---------------------------------------------------------------------------- --loss-mask lungs


class Recorder(Reporter):
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def chest_folder(root: Path) -> Path:
    from pie_cli.demo.phantom import chest_phantom

    root.mkdir(parents=True)
    rows = []
    for seed in (0, 1):
        chest_phantom(64, seed=seed)[0].save(root / f"chest{seed}.png")
        rows.append({"file_name": f"chest{seed}.png", "text": "a chest"})
    Image.new("L", (64, 64), 128).save(root / "flat.png")  # no lungs to find
    rows.append({"file_name": "flat.png", "text": "a chest"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_lung_masks_are_found_once_deterministically_and_failures_train_with_full_weight(tmp_path, tokenizer):
    from pie_cli.demo.phantom import chest_phantom

    spec = make_spec(chest_folder(tmp_path / "d"), loss_mask="lungs")
    data = load_data(spec)
    recorder = Recorder()
    prepare_examples(spec, data, [], recorder)
    assert data.lung_mask_failures == 1
    assert recorder.warnings == [
        "--loss-mask lungs: the lung heuristic found no lungs in 1 of 3 images (metadata.jsonl row 3); "
        "they train with full weight."
    ]
    again = load_data(spec)
    assert compute_lung_masks(again, again.records, workers=2) == 1  # in worker processes: the same masks
    assert again.lung_masks == data.lung_masks
    batches = training_batches(spec, data, None, tokenizer)
    for seed in (0, 1):
        _, right, left = chest_phantom(64, seed=seed)
        truth = (
            np.asarray(Image.fromarray(np.maximum(np.asarray(right), np.asarray(left))).resize((32, 32)))
            > 127
        )
        found = batches.dataset[seed]["loss_mask"][0].numpy() > 0.5
        assert (found & truth).sum() / (found | truth).sum() > 0.8
    assert torch.equal(batches.dataset[2]["loss_mask"], torch.ones(1, 32, 32))


def test_finetune_trains_with_lung_masks_and_says_where_it_found_none(cli, tiny_model, tmp_path):
    out = tmp_path / "run"
    data = chest_folder(tmp_path / "d")
    result = cli(*finetune_argv(data, tiny_model, out, "--loss-mask", "lungs", max_steps=1))
    assert result.exit_code == 0, result.output
    assert "found no lungs in 1 of 3 images (metadata.jsonl row 3)" in " ".join(result.stderr.split())


def test_finetune_trains_with_data_masks_in_buckets(cli, tiny_model, tmp_path):
    data = masked_folder(tmp_path / "d", [(32, 52), (32, 48), (52, 32), (32, 32)], column="mask_path")
    argv = finetune_argv(data, tiny_model, tmp_path / "run", "--loss-mask", "data", max_steps=2)
    result = cli(*argv, "--fit", "native", "--buckets", "--bucket-step", "16", "--random-flip")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------- refusals


def _rewrite(root: Path, edit) -> Path:
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    edit(rows)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _replace_mask(root: Path, name: str, img: Image.Image) -> Path:
    img.save(root / name)
    return root


CLI_REFUSED = {
    "no mask column": (
        lambda d: _rewrite(d, lambda rows: [r.pop("mask") for r in rows]),
        [],
        "{d}/metadata.jsonl has no mask column (looked for mask, mask_file, mask_path); name it with "
        "--mask-column. Its columns are file_name, text.",
    ),
    "named column missing": (
        lambda d: d,
        ["--mask-column", "seg"],
        "{d}/metadata.jsonl has no column 'seg' (--mask-column); its columns are file_name, text, mask.",
    ),
    "empty mask cell": (
        lambda d: _rewrite(d, lambda rows: rows[1].update(mask="")),
        [],
        "metadata.jsonl row 2 has no mask (--loss-mask data needs a mask for every image).",
    ),
    "missing mask file": (
        lambda d: _rewrite(d, lambda rows: rows[1].update(mask="gone.png")),
        [],
        "mask {d}/gone.png (metadata.jsonl row 2) does not exist.",
    ),
    "mask of another size": (
        lambda d: _replace_mask(d, "1-mask.png", Image.new("L", (16, 24), 255)),
        [],
        "mask {d}/1-mask.png (metadata.jsonl row 2) is 16x24 but its image {d}/1.png is 32x48; a loss mask "
        "must have its image's size.",
    ),
    "colour mask": (
        lambda d: _replace_mask(d, "0-mask.png", Image.new("RGB", (32, 48), (255, 0, 0))),
        [],
        "mask {d}/0-mask.png (metadata.jsonl row 1) is a colour image; a loss mask is grey or binary "
        "(above 0 = weighted).",
    ),
    "mask column without data masks": (
        lambda d: d,
        ["--loss-mask", "lungs", "--mask-column", "mask"],
        "--mask-column names the masks of --loss-mask data: add --loss-mask data.",
    ),
    "unknown kind": (
        lambda d: d,
        ["--loss-mask", "heart"],
        "--loss-mask must be one of data, lungs; got 'heart'.",
    ),
}


@pytest.mark.parametrize("case", sorted(CLI_REFUSED))
def test_refusals_exit_2_name_the_file_or_option_and_write_nothing(cli, tiny_model, tmp_path, case):
    edit, extra, message = CLI_REFUSED[case]
    data = edit(masked_folder(tmp_path / "d", [(32, 48), (32, 48)]))
    out = tmp_path / "run"
    result = cli(*finetune_argv(data, tiny_model, out, "--loss-mask", "data", *extra, max_steps=1))
    assert result.exit_code == 2, result.output
    assert message.format(d=data) in " ".join(result.stderr.split()) and "Traceback" not in result.output
    assert not out.exists()


def test_formats_without_masks_refuse_data_and_non_chest_formats_refuse_lungs(tmp_path):
    chexpert = tmp_path / "chexpert"
    chexpert.mkdir()
    (chexpert / "train.csv").write_text("Path,Frontal/Lateral,Edema\nchexpert/a.jpg,Frontal,1.0\n")
    ham = tmp_path / "ham"
    ham.mkdir()
    (ham / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\nHAM_1,ISIC_1,mel\n")
    dr = tmp_path / "dr"
    dr.mkdir()
    (dr / "trainLabels.csv").write_text("image,level\n10_left,0\n")
    cases = [
        (
            {"data": "org/xrays", "data_format": "hf"},
            "data",
            "--loss-mask data reads each image's mask from a mask column, which --data-format hf has not; use "
            "a folder, CSV or JSONL table with a mask column, or --loss-mask lungs.",
        ),
        (
            {"data": str(chexpert)},
            "data",
            "--loss-mask data reads each image's mask from a mask column, which --data-format chexpert has not; "
            "use a folder, CSV or JSONL table with a mask column, or --loss-mask lungs.",
        ),
        (
            {"data": str(ham)},
            "data",
            "--loss-mask data reads each image's mask from a mask column, which --data-format ham10000 has "
            "not; use a folder, CSV or JSONL table with a mask column.",
        ),
        (
            {"data": str(ham)},
            "lungs",
            "--loss-mask lungs finds the lungs of chest X-rays; --data-format ham10000 holds dermoscopic "
            "images (give their masks with --loss-mask data in a folder, CSV or JSONL table).",
        ),
        (
            {"data": str(dr)},
            "lungs",
            "--loss-mask lungs finds the lungs of chest X-rays; --data-format eyepacs holds fundus images "
            "(give their masks with --loss-mask data in a folder, CSV or JSONL table).",
        ),
    ]
    for values, kind, message in cases:
        with pytest.raises(UserError) as info:
            load_data(TrainSpec(out="x", loss_mask=kind, **values))
        assert str(info.value) == message
    assert load_data(TrainSpec(out="x", data=str(chexpert), loss_mask="lungs")).format == "chexpert"
