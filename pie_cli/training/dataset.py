"""Records -> training batches: deterministic augmentation, tokenisation, epoch-seeded order.

Every random choice (crop offset, flip) is drawn from a generator seeded by
(seed, epoch, example), and the order of an epoch from one seeded by (seed, epoch), so a
resumed run sees exactly the batches an uninterrupted run would have seen.

An example's image and its loss mask (``--loss-mask``) go through one :class:`Placement` (resize,
crop or padding, mirror), so the mask lies on the pixels it weights. With ``--buckets`` a batch
holds the examples of one bucket canvas (``buckets.py``, :class:`BucketBatchSampler`).
"""

from __future__ import annotations

import dataclasses
import math
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pie_cli.errors import UserError
from pie_cli.imaging.geometry import Geometry, fit_geometry, square_geometry
from pie_cli.imaging.media import IMAGE_RESAMPLE, MASK_RESAMPLE, fit_to, to_rgb8
from pie_cli.reporting import SILENT, Reporter
from pie_cli.training.data import Record, TrainingData, find_lungs


@dataclass(frozen=True)
class Placement:
    """How one example is made from its image: the geometry (resize, then crop or pad) and a mirror."""

    geometry: Geometry
    flip: bool


def place(
    size: tuple[int, int],
    resolution: int,
    center: bool,
    flip: bool,
    rng: np.random.Generator,
    fit: str = "crop",
    canvas: tuple[int, int] | None = None,
) -> Placement:
    """The placement of an image of ``size``: ``fit`` as `pie simulate --fit` (``crop``: short side to
    ``resolution``, a centre or random square crop), or covering a bucket ``canvas``; then maybe a mirror.

    The draws from ``rng`` are, in order: the crop's left and top (random crop only), the mirror
    (``flip`` only).
    """
    if canvas is not None:
        from pie_cli.training.buckets import cover_geometry

        geometry = cover_geometry(size, canvas)
    elif fit != "crop":
        geometry = fit_geometry(size, resolution, fit)
    else:
        (rw, rh), (left, top, _, _) = square_geometry(size, resolution)
        if not center:
            left = int(rng.integers(0, rw - resolution + 1))
            top = int(rng.integers(0, rh - resolution + 1))
        geometry = Geometry("crop", tuple(size), (rw, rh), (-left, -top), (resolution, resolution))
    return Placement(geometry, bool(flip and rng.random() < 0.5))


def apply_placement(
    img: Image.Image, placement: Placement, resample: Image.Resampling = IMAGE_RESAMPLE, fill: int = 0
) -> Image.Image:
    """``img`` placed: resized (from whatever size it has: a mask may be stored smaller than its image),
    cropped or padded with ``fill``, maybe mirrored."""
    geometry = placement.geometry
    if img.size != geometry.source:
        geometry = dataclasses.replace(geometry, source=img.size)
    out = fit_to(img, geometry, resample, fill)
    if placement.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def crop_and_flip(
    img: Image.Image,
    resolution: int,
    center: bool,
    flip: bool,
    rng: np.random.Generator,
    fit: str = "crop",
) -> Image.Image:
    """Short side resized to ``resolution``, then a centre or random square crop, then maybe a mirror.

    With ``fit`` "pad" or "native" the image becomes the canvas `pie simulate --fit` works on
    (letterboxed on R x R, or at its own aspect), whole; then maybe a mirror.
    """
    return apply_placement(img, place(img.size, resolution, center, flip, rng, fit))


def to_pixels(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1) * 2.0 - 1.0


def to_weights(mask: Image.Image) -> torch.Tensor:
    """A placed "L" mask -> float32 1 x H x W in [0, 1]."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0).unsqueeze(0)


class PairDataset(torch.utils.data.Dataset):
    """(pixel_values, input_ids[, loss_mask]) for each record; set ``epoch`` before iterating an epoch.

    ``loss_mask`` ("data" or "lungs") adds ``item["loss_mask"]``: float32 1 x H x W in [0, 1], the
    record's mask placed exactly as its image (also without pixels, when latents are cached).
    ``buckets`` (a ``buckets.BucketPlan`` of ``records``) makes each example cover its bucket canvas.
    """

    def __init__(
        self,
        data: TrainingData,
        records: list[Record],
        tokenizer,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        seed: int,
        fit: str = "crop",
        caption_dropout: float = 0.0,
        loss_mask: str | None = None,
        buckets=None,
    ) -> None:
        self.data = data
        self.caption_dropout = caption_dropout
        self.records = records
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.fit = fit
        self.loss_mask = loss_mask
        self.buckets = buckets
        if buckets is not None and len(buckets.canvases) != len(records):
            raise ValueError(f"a bucket plan of {len(buckets.canvases)} examples for {len(records)} records")
        self.epoch = 0
        self.with_pixels = True  # False when latents are cached: no image is decoded per step
        ids = tokenizer(
            [r.prompt for r in records],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        self.input_ids = ids
        self.empty_ids = tokenizer(
            "",
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids[0]

    def __len__(self) -> int:
        return len(self.records)

    def canvas(self, index: int) -> tuple[int, int] | None:
        """Example ``index``'s bucket canvas (width, height), or None without buckets."""
        return self.buckets.canvases[index] if self.buckets is not None else None

    def placement(
        self, index: int, size: tuple[int, int], canvas: tuple[int, int] | None = None
    ) -> Placement:
        """Example ``index``'s placement this epoch, for an image of ``size`` (seeded by seed, epoch, index)."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return place(size, self.resolution, self.center_crop, self.random_flip, rng, self.fit, canvas)

    def _decoded(self, index: int) -> Image.Image:
        img = to_rgb8(self.data.open(self.records[index]))
        if self.buckets is not None and img.size != self.buckets.sizes[index]:
            record = self.records[index]
            w, h = self.buckets.sizes[index]
            raise UserError(
                f"image {record.image} ({record.where}) decodes to {img.size[0]}x{img.size[1]}, not the "
                f"{w}x{h} its header gave its bucket (an EXIF orientation after the pixel data?); "
                "save it upright without one."
            )
        return img

    def image(self, index: int, canvas: tuple[int, int] | None = None) -> torch.Tensor:
        img = self._decoded(index)
        return to_pixels(apply_placement(img, self.placement(index, img.size, canvas or self.canvas(index))))

    def mask(self, index: int) -> tuple[Image.Image | None, tuple[int, int]]:
        """(the example's loss mask as "L" at its own size, or None for full weight; its image's size)."""
        record = self.records[index]
        if self.loss_mask == "data":
            mask = self.data.open_mask(record)
            return mask, mask.size  # checked to have its image's size
        cache = self.data.lung_masks if self.data.lung_masks is not None else {}
        auto = cache.get(record) or find_lungs(self.data, record)  # computed once by prepare_examples
        return auto.image(), auto.source

    def example(self, index: int, canvas: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """``pixel_values`` (unless latents are cached) and ``loss_mask`` (with --loss-mask), placed alike."""
        canvas = canvas or self.canvas(index)
        out: dict[str, torch.Tensor] = {}
        img = self._decoded(index) if self.with_pixels else None
        if img is None and not self.loss_mask:
            return out
        mask, size = self.mask(index) if self.loss_mask else (None, None)
        placement = self.placement(index, img.size if img is not None else size, canvas)
        if img is not None:
            out["pixel_values"] = to_pixels(apply_placement(img, placement))
        if self.loss_mask:
            if mask is None:  # the lung heuristic found nothing: full weight
                w, h = placement.geometry.canvas
                out["loss_mask"] = torch.ones(1, h, w)
            else:
                out["loss_mask"] = to_weights(apply_placement(mask, placement, MASK_RESAMPLE, fill=0))
        return out

    def dropped(self, index: int) -> bool:
        """Whether example ``index`` trains on the empty prompt this epoch (--caption-dropout; seeded by
        (seed, epoch, index) on a stream of its own, so the crops and flips are the same with or without it)."""
        if self.caption_dropout <= 0:
            return False
        return bool(np.random.default_rng([self.seed, self.epoch, index, 1]).random() < self.caption_dropout)

    def item(self, index: int, canvas: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Example ``index``, on ``canvas`` if given (a class image takes its instance's bucket)."""
        ids = self.empty_ids if self.dropped(index) else self.input_ids[index]
        item = {"input_ids": ids, "index": torch.tensor(index)}
        item.update(self.example(index, canvas))
        return item

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.item(index)


class EpochSampler(torch.utils.data.Sampler[int]):
    """A permutation per epoch from a generator seeded by (seed, epoch)."""

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=g).tolist())

    def __len__(self) -> int:
        return self.length


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """``--buckets``: batches of one bucket canvas each, their membership and order seeded by (seed, epoch).

    Each epoch the examples of every bucket are shuffled and cut into batches of ``batch_size`` (the
    last one of a bucket may be short: nothing is dropped, so every example is seen once an epoch),
    then all the batches are shuffled together. ``len()`` is exact (the steps per epoch follow from
    it), and iterating again gives the same batches, as ``accelerate.skip_first_batches`` needs on
    resume. It has no ``batch_size`` attribute on purpose: accelerate's ``BatchSamplerShard`` then
    deals whole batches of varying size to the processes instead of topping a short one up with
    examples of another bucket.
    """

    drop_last = False

    def __init__(self, canvases: Sequence[tuple[int, int]], batch_size: int, seed: int) -> None:
        groups: dict[tuple[int, int], list[int]] = {}
        for index, canvas in enumerate(canvases):
            groups.setdefault(tuple(canvas), []).append(index)
        self.groups = [
            groups[canvas] for canvas in sorted(groups)
        ]  # a fixed order: the seed decides the rest
        self.size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        batches = []
        for members in self.groups:
            order = torch.randperm(len(members), generator=g).tolist()
            shuffled = [members[k] for k in order]
            batches += [shuffled[i : i + self.size] for i in range(0, len(shuffled), self.size)]
        return [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return sum(math.ceil(len(members) / self.size) for members in self.groups)


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}


class PairedBatches(torch.utils.data.Dataset):
    """Instance examples each paired with a class example (prior preservation).

    With ``--buckets`` the class example covers its instance's bucket canvas (centre crop), so the
    two stack into one batch. Class examples have no loss mask (the loop gives them full weight).
    """

    def __init__(self, instance: PairDataset, prior: PairDataset) -> None:
        self.instance = instance
        self.prior = prior

    @property
    def epoch(self) -> int:
        return self.instance.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.instance.epoch = value
        self.prior.epoch = value

    def __len__(self) -> int:
        return len(self.instance)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.instance[index]
        other = self.prior.item(index % len(self.prior), self.instance.canvas(index))
        item["prior_input_ids"] = other["input_ids"]
        if "pixel_values" in other:
            item["prior_pixel_values"] = other["pixel_values"]
        return item


@dataclass
class TrainingBatches:
    """The datasets of a run and the loader that batches them (seeded per epoch)."""

    instance: PairDataset
    prior: PairDataset | None  # class images for prior preservation
    dataset: torch.utils.data.Dataset  # ``instance``, or instance and prior examples paired
    sampler: EpochSampler | BucketBatchSampler  # BucketBatchSampler with --buckets (a batch sampler)
    loader: torch.utils.data.DataLoader


def training_batches(spec, data: TrainingData, prior: list[Record] | None, tokenizer) -> TrainingBatches:
    """Datasets, sampler and loader of a run: images only decoded per step without ``--cache-latents``."""
    common = (spec.resolution, spec.center_crop, spec.random_flip)
    buckets = None
    if spec.buckets:
        from pie_cli.training.buckets import plan_buckets

        buckets = plan_buckets(data, spec)
    instance = PairDataset(
        data,
        data.records,
        tokenizer,
        *common,
        spec.seed,
        fit=spec.fit,
        caption_dropout=spec.caption_dropout,
        loss_mask=spec.loss_mask,
        buckets=buckets,
    )
    instance.with_pixels = not spec.cache_latents
    dataset: torch.utils.data.Dataset = instance
    prior_set = None
    if prior:
        prior_set = PairDataset(data, prior, tokenizer, *common, spec.seed + 1, fit=spec.fit)
        prior_set.with_pixels = not spec.cache_latents
        dataset = PairedBatches(instance, prior_set)
    workers = {
        "collate_fn": collate,
        "num_workers": spec.num_workers,
        "worker_init_fn": _ignore_interrupts if spec.num_workers else None,
    }
    if buckets is not None:
        sampler: EpochSampler | BucketBatchSampler = BucketBatchSampler(
            buckets.canvases, spec.batch_size, spec.seed
        )
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **workers)
    else:
        sampler = EpochSampler(len(dataset), spec.seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=spec.batch_size, sampler=sampler, drop_last=False, **workers
        )
    return TrainingBatches(instance, prior_set, dataset, sampler, loader)


def prepare_examples(spec, data: TrainingData, heldout: list[Record], reporter: Reporter = SILENT) -> None:
    """What ``--buckets`` and ``--loss-mask lungs`` compute once, before the run folder is written: every
    image's bucket (a canvas above the limit refused), noted; the lung masks (``data.lung_masks``), the
    images where the heuristic found none warned about (``data.lung_mask_failures``: full weight)."""
    if spec.buckets:
        from pie_cli.training.buckets import plan_buckets

        reporter.note(f"buckets: {plan_buckets(data, spec).describe(spec.batch_size)}")
    if spec.loss_mask == "lungs":
        records = [*data.records, *heldout]
        with reporter.status(f"finding the lungs in {len(records)} images (--loss-mask lungs)"):
            failed = compute_lung_masks(data, records, spec.num_workers)
        if failed:
            masks = data.lung_masks or {}
            where = [r.where for r in records if masks[r].bits is None][:3]
            more = ", ..." if failed > len(where) else ""
            reporter.warn(
                f"--loss-mask lungs: the lung heuristic found no lungs in {failed} of {len(records)} images "
                f"({', '.join(where)}{more}); they train with full weight."
            )


class _LungJob(torch.utils.data.Dataset):
    def __init__(self, data: TrainingData, records: list[Record]) -> None:
        self.data = data
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        return find_lungs(self.data, self.records[index])


def _as_is(item):
    return item


def compute_lung_masks(
    data: TrainingData,
    records: list[Record],
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """--loss-mask lungs: the lung heuristic's mask of every record not done yet, into ``data.lung_masks``
    (in ``workers`` processes); returns how many of ``records`` it found no lungs in (full weight)."""
    done = data.lung_masks if data.lung_masks is not None else {}
    data.lung_masks = done
    todo = [r for r in dict.fromkeys(records) if r not in done]
    if todo:
        loader = torch.utils.data.DataLoader(
            _LungJob(data, todo),
            batch_size=None,
            collate_fn=_as_is,
            num_workers=min(workers, len(todo)),
            worker_init_fn=_ignore_interrupts if workers else None,
        )
        with torch.random.fork_rng(devices=[]):  # starting the loader draws from the global RNG
            for k, (record, mask) in enumerate(zip(todo, loader, strict=True)):
                done[record] = mask
                if progress is not None:
                    progress(k + 1, len(todo))
    return sum(done[r].bits is None for r in dict.fromkeys(records))


def isolated(batches):
    """Yield batches fetched without touching the global CPU RNG.

    Starting an epoch's iterator draws a seed from the global RNG (torch's DataLoader),
    and a resumed run starts one where the uninterrupted run did not: isolating the
    fetches keeps dropout and everything else on the checkpointed random stream.
    """
    iterator = iter(batches)
    while True:
        with torch.random.fork_rng(devices=[]):
            try:
                batch = next(iterator)
            except StopIteration:
                return
        yield batch


def _ignore_interrupts(worker_id: int) -> None:
    """Data workers ignore SIGINT: Ctrl-C reaches the whole process group, and a worker that
    quit on it would fail the main process's next fetch before its step is checkpointed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
