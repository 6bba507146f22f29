"""`pie finetune --fit native --buckets` (issue 16, item 4): non-square films trained whole, in batches of
one bucket canvas each, with batches seeded by (seed, epoch) so a resumed run sees the same ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pie_cli.imaging.geometry import fit_geometry, native_size
from pie_cli.training.buckets import bucket_canvas, cover_geometry, plan_buckets
from pie_cli.training.config import TrainSpec
from pie_cli.training.data import check_images, load_data
from pie_cli.training.dataset import BucketBatchSampler, training_batches
from tests.helpers import finetune_argv, losses

# At --resolution 32 and --bucket-step 16: square, portrait and landscape films, and one (40x52) whose
# native canvas 32x41.6 rounds to the portrait bucket: covered (37x48), then 5 px of its width trimmed.
SIZES = [(32, 32)] * 4 + [(32, 48), (32, 48), (40, 52)] + [(64, 32)]
BUCKET = {(32, 32): (32, 32), (32, 48): (32, 48), (40, 52): (32, 48), (64, 32): (64, 32)}


def aspect_folder(root: Path, sizes=SIZES, seed: int = 0) -> Path:
    """Random-content images of ``sizes`` with a metadata.jsonl (one prompt per aspect)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels, mode="RGB").save(root / f"{i}.png")
        rows.append(
            {"file_name": f"{i}.png", "text": f"a {'tall' if h > w else 'wide' if w > h else 'square'} film"}
        )
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def spec_for(data: Path, **kwargs) -> TrainSpec:
    values = {
        "data": str(data),
        "out": "unused",
        "resolution": 32,
        "fit": "native",
        "buckets": True,
        "bucket_step": 16,
        "batch_size": 2,
        "num_workers": 0,
        "seed": 5,
        **kwargs,
    }
    spec = TrainSpec(**values)
    spec.check()
    return spec


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import CLIPTokenizerFast

    return CLIPTokenizerFast.from_pretrained(tiny_model, subfolder="tokenizer", local_files_only=True)


# ---------------------------------------------------------------------------- geometry


def test_step_8_is_fit_natives_canvas_and_the_trim_is_at_most_half_a_step():
    rng = np.random.default_rng(1)
    for _ in range(400):
        w = int(rng.integers(20, 3000))
        size = (w, int(rng.integers(max(8, w // 3), 3 * w)))  # aspects up to 1:3, as films have
        assert (
            bucket_canvas(size, 512, 8) == native_size(size, 512) == fit_geometry(size, 512, "native").canvas
        )
        for resolution, step in ((512, 64), (64, 16), (48, 32)):  # 48 % 32 != 0: the grid R + k*S
            canvas = bucket_canvas(size, resolution, step)
            assert min(canvas) == resolution and (max(canvas) - resolution) % step == 0
            g = cover_geometry(size, canvas)
            trim = (g.resized[0] - canvas[0], g.resized[1] - canvas[1])
            assert min(trim) == 0 and 0 <= max(trim) <= step / 2 + 1  # +1: the resize rounds to whole pixels
            assert g.content == (0, 0, *canvas)  # the canvas is all image: nothing letterboxed


def test_images_of_three_aspects_go_to_their_buckets(tmp_path):
    data = load_data(spec_for(aspect_folder(tmp_path / "d")))
    plan = plan_buckets(data, spec_for(tmp_path / "d"))
    assert list(plan.canvases) == [BUCKET[s] for s in SIZES]
    assert plan.counts() == [((32, 32), 4), ((32, 48), 3), ((64, 32), 1)]
    assert plan.batches(2) == 2 + 2 + 1
    assert plan.describe(2) == (
        "3 buckets (--bucket-step 16), 5 batches of up to 2 per epoch: 32x32: 4, 32x48: 3, 64x32: 1"
    )


def test_sizes_come_from_headers_with_the_exif_orientation(tmp_path):
    """A phone photo stored 48x32 with EXIF orientation 6 is displayed (and trained) 32x48: portrait."""
    root = tmp_path / "d"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (48, 32), (90, 90, 90)).save(root / "0.jpg", exif=exif.tobytes())
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "0.jpg", "text": "a film"}) + "\n")
    spec = spec_for(root)
    data = load_data(spec)
    assert plan_buckets(data, spec).canvases == ((32, 48),)
    assert data.open(data.records[0]).size == (32, 48)  # what open_image decodes agrees
    check_images(data)
    assert data.sizes == [(32, 48)]


def test_sizes_are_read_without_decoding_any_pixels(tmp_path, monkeypatch):
    """PNG and DICOM from their headers, a Hugging Face dataset from its stored bytes (opened lazily)."""
    pytest.importorskip("pydicom")
    datasets = pytest.importorskip(
        "datasets", reason="--data-format hf needs the optional `datasets` package"
    )
    from PIL import ImageFile

    from pie_cli.imaging import dicom
    from tests.imaging.test_dicom import write_dicom

    root = aspect_folder(tmp_path / "d", sizes=[(32, 48), (64, 32)])
    write_dicom(root / "2.dcm", np.zeros((40, 60), dtype=np.uint16))  # 60 wide, 40 high
    with open(root / "metadata.jsonl", "a") as fh:
        fh.write(json.dumps({"file_name": "2.dcm", "text": "a wide film"}) + "\n")
    images = [Image.new("RGB", s, (200, 0, 0)) for s in ((32, 48), (64, 32), (32, 32))]
    saved = tmp_path / "hf"
    datasets.Dataset.from_dict(
        {"image": images, "text": ["a", "b", "c"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    ).save_to_disk(str(saved))

    def no_decoding(*args, **kwargs):
        raise AssertionError("pixels decoded")

    folder, hf = load_data(spec_for(root)), load_data(spec_for(saved))
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(dicom, "read_dicom", no_decoding)
    monkeypatch.setattr(datasets.Image, "decode_example", no_decoding)
    assert plan_buckets(folder, spec_for(root)).canvases == ((32, 48), (64, 32), (48, 32))
    assert plan_buckets(hf, spec_for(saved)).canvases == ((32, 48), (64, 32), (32, 32))


# ---------------------------------------------------------------------------- batches


@pytest.mark.parametrize("workers", [0, 2])
def test_every_batch_has_one_size_and_each_image_appears_once_per_epoch(tmp_path, tokenizer, workers):
    spec = spec_for(aspect_folder(tmp_path / "d"), num_workers=workers)
    data = load_data(spec)
    batches = training_batches(spec, data, None, tokenizer)
    seen = []
    for epoch in (0, 1):
        batches.dataset.epoch = epoch
        batches.sampler.set_epoch(epoch)
        got = list(batches.loader)
        assert len(got) == len(batches.loader) == 5  # len() is exact: steps per epoch follow from it
        indices = [int(i) for b in got for i in b["index"]]
        assert sorted(indices) == list(range(len(SIZES)))  # each image exactly once, none dropped
        for batch in got:
            h, w = batch["pixel_values"].shape[-2:]
            assert {BUCKET[SIZES[int(i)]] for i in batch["index"]} == {(w, h)}
        seen.append([b["index"].tolist() for b in got])
    assert seen[0] != seen[1]  # another epoch, another order


def test_the_same_seed_gives_the_same_batches_and_another_epoch_another_order():
    canvases = [(32, 32)] * 9 + [(32, 48)] * 6 + [(48, 32)] * 5
    sampler = BucketBatchSampler(canvases, 4, seed=3)
    first = list(sampler)
    assert list(BucketBatchSampler(canvases, 4, seed=3)) == first
    assert list(sampler) == first  # iterating again (as skip_first_batches does): the same batches
    assert all(len({canvases[i] for i in batch}) == 1 for batch in first)
    assert sorted(len(b) for b in first) == [1, 1, 2, 4, 4, 4, 4]  # 9 = 4+4+1, 6 = 4+2, 5 = 4+1
    assert len(sampler) == 7
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert sorted(i for b in sampler for i in b) == list(range(20))
    assert list(BucketBatchSampler(canvases, 4, seed=4)) != first


def test_skip_first_batches_resumes_the_same_epoch(tokenizer, tmp_path):
    """accelerate's skip_first_batches (used on resume) wraps the batch sampler and yields the rest."""
    from accelerate.data_loader import skip_first_batches

    spec = spec_for(aspect_folder(tmp_path / "d"))
    batches = training_batches(spec, load_data(spec), None, tokenizer)
    batches.sampler.set_epoch(3)
    full = [b["index"].tolist() for b in batches.loader]
    rest = [b["index"].tolist() for b in skip_first_batches(batches.loader, 2)]
    assert rest == full[2:]


def test_class_images_take_their_instances_bucket(tmp_path, tokenizer):
    spec = spec_for(aspect_folder(tmp_path / "d"), class_data=str(tmp_path / "c"), class_prompt="a film")
    (tmp_path / "c").mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (10 * i, 0, 0)).save(tmp_path / "c" / f"{i}.png")
    from pie_cli.training.data import class_records

    batches = training_batches(spec, load_data(spec), class_records(spec), tokenizer)
    for batch in batches.loader:
        assert batch["prior_pixel_values"].shape == batch["pixel_values"].shape


# ---------------------------------------------------------------------------- end to end


def test_training_on_mixed_aspects_resumes_mid_epoch_bit_identically(cli, tiny_model, tmp_path, monkeypatch):
    """6 steps of 5 batches an epoch: stopped at step 3 (mid-epoch), resumed: the weights of 6 straight steps.
    The straight run loads with 2 workers, the interrupted one in-process: the same batches either way."""
    from safetensors.torch import load_file

    data = aspect_folder(tmp_path / "d")
    common = [
        "--fit",
        "native",
        "--buckets",
        "--bucket-step",
        "16",
        "--max-steps",
        "6",
        "--checkpoint-every",
        "3",
    ]
    common += ["--lr", "1e-2", "--random-flip", "--caption-dropout", "0.3"]
    straight = tmp_path / "straight"
    result = cli(*finetune_argv(data, tiny_model, straight, *common, num_workers=2))
    assert result.exit_code == 0, result.output

    from pie_cli.training import loop

    real_checkpoint = loop.Trainer.checkpoint

    def checkpoint_then_interrupt(self, step):
        path = real_checkpoint(self, step)
        if step == 3:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop.Trainer, "checkpoint", checkpoint_then_interrupt)
    resumed = tmp_path / "resumed"
    assert cli(*finetune_argv(data, tiny_model, resumed, *common)).exit_code == 130
    monkeypatch.setattr(loop.Trainer, "checkpoint", real_checkpoint)
    result = cli("finetune", "--out", resumed, "--resume", "latest")
    assert result.exit_code == 0, result.output
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(straight) == losses(resumed) and len(losses(straight)) == 6


def test_dry_run_shows_the_buckets_and_their_steps(cli, tiny_model, tmp_path):
    data = aspect_folder(tmp_path / "d")
    out = tmp_path / "run"
    argv = finetune_argv(data, tiny_model, out, "--fit", "native", "--buckets", "--bucket-step", "16")
    result = cli(*argv, "--dry-run", "--no-probe", "--epochs", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert (
        "buckets: 3 buckets (--bucket-step 16), 5 batches of up to 2 per epoch: 32x32: 4, 32x48: 3, 64x32: 1"
        in lines
    )
    assert any(
        line.startswith("schedule: 10 optimizer steps") and "5 steps per epoch" in line for line in lines
    )
    assert not out.exists()


# ---------------------------------------------------------------------------- refusals


REFUSED = {
    "crop": (
        ["--buckets"],
        "--buckets groups whole images by aspect, which needs --fit native (--fit crop makes every example "
        "32x32: one bucket).",
    ),
    "pad": (
        ["--buckets", "--fit", "pad"],
        "--buckets groups whole images by aspect, which needs --fit native (--fit pad makes every example "
        "32x32: one bucket).",
    ),
    "step": (
        ["--fit", "native", "--buckets", "--bucket-step", "12"],
        "--bucket-step must be a positive multiple of 8 (the latent cell), got 12.",
    ),
    "step without buckets": (
        ["--bucket-step", "32"],
        "--bucket-step sizes the buckets of --buckets: add --buckets, or leave it out.",
    ),
    "cache latents": (
        ["--fit", "native", "--buckets", "--cache-latents"],
        "--buckets trains images of several sizes, which --cache-latents cannot batch yet: give one of them.",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusals_exit_2_name_the_option_and_write_nothing(cli, tiny_model, tmp_path, case):
    extra, message = REFUSED[case]
    out = tmp_path / "run"
    result = cli(*finetune_argv(aspect_folder(tmp_path / "d"), tiny_model, out, *extra, max_steps=1))
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not out.exists()


def test_a_bucket_above_the_limit_is_refused_naming_the_image(cli, tiny_model, tmp_path):
    """A 1:80 strip at --resolution 64 would need a 64x5120 canvas: refused before anything is written."""
    data = aspect_folder(tmp_path / "d", sizes=[(32, 32), (8, 640)])
    out = tmp_path / "run"
    argv = finetune_argv(data, tiny_model, out, "--fit", "native", "--buckets", resolution=64, max_steps=1)
    result = cli(*argv)
    assert result.exit_code == 2, result.output
    assert (
        f"image {data / '1.png'} (metadata.jsonl row 2) is 8x640: its bucket would be 64x5120, above 4096 px; "
        "crop it, or use a lower --resolution." in result.stderr
    )
    assert not out.exists()
