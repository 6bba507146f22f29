"""Aspect-ratio buckets (``pie finetune --fit native --buckets``): whole non-square films, in batches.

Each image goes to the bucket whose canvas is nearest its ``--fit native`` canvas: the short side is
R (``--resolution``), the long side the image's own long side at that scale rounded to the nearest
multiple of ``--bucket-step`` S (never below R). With S = 8 the bucket canvas is exactly
``--fit native``'s, the canvas ``pie simulate --fit native`` edits on; the default S = 64 (kohya's and
diffusers' bucket step for SD 1.x) makes a few well-filled buckets instead of many small ones.

The image is resized to *cover* its bucket canvas with its aspect kept, then centre-cropped: the
trim is at most S/2 pixels in all, along one axis (the long one when the long side was rounded down,
the short one when it was rounded up), so the film stays whole to within S/4 pixels per edge. The
whole canvas is image, as with ``--fit native`` (letterboxing would train the model on bars that
simulate never shows it). A batch holds one bucket (``dataset.BucketBatchSampler``).

Image sizes come from the files' headers (PIL opens lazily; DICOM: the header; Hugging Face
datasets: the stored bytes, undecoded), with the EXIF orientation that ``open_image`` applies.
Pure arithmetic and headers: no torch here, so ``--dry-run`` can show the buckets.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from pie_cli.errors import UserError
from pie_cli.imaging.geometry import MAX_RESOLUTION, Geometry
from pie_cli.training.data import TrainingData, image_sizes

Size = tuple[int, int]


def bucket_canvas(size: Size, resolution: int, step: int) -> Size:
    """The bucket canvas (width, height) of an image of ``size``: short side ``resolution``, long side
    the nearest multiple of ``step`` to the image's (``geometry.native_size``'s rule when ``step`` divides
    ``resolution``: with step 8 this is ``--fit native``'s canvas)."""
    w, h = size
    short, long_ = (w, h) if w <= h else (h, w)
    exact = long_ * resolution / short
    if resolution % step == 0:
        side = max(resolution, step * round(exact / step))
    else:  # the grid R + k*S, so the short side stays R
        side = resolution + step * max(0, round((exact - resolution) / step))
    return (resolution, side) if w <= h else (side, resolution)


def cover_geometry(size: Size, canvas: Size) -> Geometry:
    """``size`` resized (aspect kept) to cover ``canvas``, centred on it: the overhang is cropped."""
    w, h = size
    cw, ch = canvas
    scale = max(cw / w, ch / h)
    resized = (max(cw, round(w * scale)), max(ch, round(h * scale)))
    offset = (-((resized[0] - cw) // 2), -((resized[1] - ch) // 2))
    return Geometry("native", (w, h), resized, offset, canvas)


@dataclass(frozen=True)
class BucketPlan:
    """The bucket canvas of every example (in record order), and the images' own sizes."""

    canvases: tuple[Size, ...]
    sizes: tuple[Size, ...]
    step: int

    def counts(self) -> list[tuple[Size, int]]:
        """(canvas, examples) per bucket, squarest first (then by width)."""
        counts = Counter(self.canvases)
        return sorted(counts.items(), key=lambda kv: (max(kv[0]) / min(kv[0]), kv[0]))

    def batches(self, batch_size: int) -> int:
        """Batches per epoch: every bucket's last batch may be short (nothing is dropped)."""
        return sum(math.ceil(n / batch_size) for _, n in self.counts())

    def describe(self, batch_size: int) -> str:
        """One line for people: ``3 buckets (--bucket-step 64), 14 batches of up to 4 per epoch: ...``."""
        counts = self.counts()
        parts = ", ".join(f"{w}x{h}: {n}" for (w, h), n in counts)
        plural = "s" if len(counts) != 1 else ""
        return (
            f"{len(counts)} bucket{plural} (--bucket-step {self.step}), {self.batches(batch_size)} batches "
            f"of up to {batch_size} per epoch: {parts}"
        )


def plan_buckets(data: TrainingData, spec) -> BucketPlan:
    """Every example's bucket (cached on ``data``), from the image headers; a canvas above the
    limit is refused naming its image (as ``--fit native`` refuses it in ``pie simulate``)."""
    key = (spec.resolution, spec.bucket_step)
    cached = data.buckets
    if cached is not None and cached[0] == key:
        return cached[1]
    sizes = image_sizes(data)
    canvases = []
    for record, size in zip(data.records, sizes, strict=True):
        canvas = bucket_canvas(size, spec.resolution, spec.bucket_step)
        if max(canvas) > MAX_RESOLUTION:
            raise UserError(
                f"image {record.image} ({record.where}) is {size[0]}x{size[1]}: its bucket would be "
                f"{canvas[0]}x{canvas[1]}, above {MAX_RESOLUTION} px; crop it, or use a lower --resolution."
            )
        canvases.append(canvas)
    plan = BucketPlan(tuple(canvases), tuple(sizes), spec.bucket_step)
    data.buckets = (key, plan)
    return plan


def bucket_summary(data: TrainingData, spec) -> str:
    """What ``--dry-run`` prints about ``--buckets``: buckets, their examples, batches per epoch."""
    return plan_buckets(data, spec).describe(spec.batch_size)
