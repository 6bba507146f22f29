"""Records -> training batches: deterministic augmentation, tokenisation, epoch-seeded order.

Every random choice (crop offset, flip) is drawn from a generator seeded by
(seed, epoch, example), and the order of an epoch from one seeded by (seed, epoch), so a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pie_cli.imaging.geometry import fit_geometry, square_geometry
from pie_cli.imaging.media import IMAGE_RESAMPLE, fit_to, to_rgb8
from pie_cli.training.data import Record, TrainingData


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
    if fit != "crop":
        img = fit_to(img, fit_geometry(img.size, resolution, fit))
        if flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img
    (rw, rh), (left, top, _, _) = square_geometry(img.size, resolution)
    if img.size != (rw, rh):
        img = img.resize((rw, rh), IMAGE_RESAMPLE)  # the filter inference uses too
    if not center:
        left = int(rng.integers(0, rw - resolution + 1))
        top = int(rng.integers(0, rh - resolution + 1))
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def to_pixels(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1) * 2.0 - 1.0


class PairDataset(torch.utils.data.Dataset):
    """(pixel_values, input_ids) for each record; set ``epoch`` before iterating an epoch."""

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
    ) -> None:
        self.data = data
        self.caption_dropout = caption_dropout
        self.records = records
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.fit = fit
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

    def image(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        img = to_rgb8(self.data.open(self.records[index]))
        return to_pixels(
            crop_and_flip(img, self.resolution, self.center_crop, self.random_flip, rng, self.fit)
        )

    def dropped(self, index: int) -> bool:
        """Whether example ``index`` trains on the empty prompt this epoch (--caption-dropout; seeded by
        (seed, epoch, index) on a stream of its own, so the crops and flips are the same with or without it)."""
        if self.caption_dropout <= 0:
            return False
        return bool(np.random.default_rng([self.seed, self.epoch, index, 1]).random() < self.caption_dropout)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.empty_ids if self.dropped(index) else self.input_ids[index]
        item = {"input_ids": ids, "index": torch.tensor(index)}
        if self.with_pixels:
            item["pixel_values"] = self.image(index)
        return item


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


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}


class PairedBatches(torch.utils.data.Dataset):
    """Instance examples each paired with a class example (prior preservation)."""

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
        other = self.prior[index % len(self.prior)]
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
    sampler: EpochSampler
    loader: torch.utils.data.DataLoader


def training_batches(spec, data: TrainingData, prior: list[Record] | None, tokenizer) -> TrainingBatches:
    """Datasets, sampler and loader of a run: images only decoded per step without ``--cache-latents``."""
    common = (spec.resolution, spec.center_crop, spec.random_flip)
    instance = PairDataset(
        data, data.records, tokenizer, *common, spec.seed, fit=spec.fit, caption_dropout=spec.caption_dropout
    )
    instance.with_pixels = not spec.cache_latents
    dataset: torch.utils.data.Dataset = instance
    prior_set = None
    if prior:
        prior_set = PairDataset(data, prior, tokenizer, *common, spec.seed + 1, fit=spec.fit)
        prior_set.with_pixels = not spec.cache_latents
        dataset = PairedBatches(instance, prior_set)
    sampler = EpochSampler(len(dataset), spec.seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=spec.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=spec.num_workers,
        worker_init_fn=_ignore_interrupts if spec.num_workers else None,
        drop_last=False,
    )
    return TrainingBatches(instance, prior_set, dataset, sampler, loader)


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
