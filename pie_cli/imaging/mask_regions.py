"""Building masks from regions (``pie mask``) and describing them (``pie mask info``).

Every region is evaluated at the centres of the output pixels, mapped back into the
original image's coordinates through the same geometry ``pie simulate`` uses
(``imaging.geometry.fit_geometry``: ``--fit crop`` resizes the short side to R and crops the
centre, ``pad`` letterboxes, ``native`` keeps the aspect; ``--full-res`` is the image's own
pixels). So a box given in original-image pixels lands exactly where those pixels end up in
the frames. Pure numpy/PIL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pie_cli.errors import UserError
from pie_cli.imaging.auto_masks import HeuristicFailed, auto_mask
from pie_cli.imaging.geometry import FIT_CHOICES, Geometry, fit_geometry, fit_problem, resolution_problem
from pie_cli.imaging.masks import latent_mask, mask_in_frame, mask_to_grey
from pie_cli.imaging.media import MASK_RESAMPLE, frame_image
from pie_cli.imaging.morphology import (
    component_sizes,
    dilate,
    distance_within,
    erode,
    feather,
    fill_holes,
    keep_largest,
    label,
    otsu_threshold,
    outline,
)


@dataclass(frozen=True)
class MaskSpec:
    """What ``pie mask`` was asked for. Coordinates are strings as typed (parsed here)."""

    resolution: int = 512
    boxes: tuple[str, ...] = ()
    ellipses: tuple[str, ...] = ()
    polygons: tuple[str, ...] = ()
    from_masks: tuple[Path, ...] = ()
    level: float = 0.5
    label: int | None = None  # --from masks are label maps: this label is the region
    thresholds: tuple[str, ...] = ()
    otsu: bool = False
    otsu_dark: bool = False
    keep_largest: int | None = None
    auto: tuple[str, ...] = ()
    dilate: int = 0
    erode: int = 0
    fill_holes: bool = False
    feather: int = 0
    invert: bool = False
    fit: str = "crop"  # the frames' geometry (as `pie simulate --fit`)
    full_res: bool = False  # the image's own size (for `pie simulate --full-res`)

    def geometry(self, image_size: tuple[int, int]) -> Geometry:
        """The geometry of the mask written for an image of ``image_size``: the frames' own."""
        if self.full_res:
            return Geometry("full-res", image_size, image_size, (0, 0), image_size)
        problem = fit_problem(image_size, self.resolution, self.fit)
        if problem is not None:
            raise UserError(f"--fit {problem}.")
        return fit_geometry(image_size, self.resolution, self.fit)

    def check(self) -> None:
        """A ``UserError`` naming the first option out of range (before any image is read)."""
        from pie_cli.imaging.auto_masks import AUTO_CHOICES

        if not self.has_region():
            raise UserError(
                "no region given; use --box, --ellipse, --polygon, --from, --threshold, --otsu or --auto."
            )
        for kind in self.auto:
            if kind not in AUTO_CHOICES:
                raise UserError(f"--auto {kind!r} is not one of {', '.join(AUTO_CHOICES)}.")
        problem = resolution_problem(self.resolution)
        if problem is not None:
            raise UserError(f"--resolution {problem}.")
        for name, value in (("--dilate", self.dilate), ("--erode", self.erode), ("--feather", self.feather)):
            if value < 0:
                raise UserError(f"{name} must be >= 0 pixels, got {value}.")
        if self.keep_largest is not None and self.keep_largest < 1:
            raise UserError(f"--keep-largest must be at least 1, got {self.keep_largest}.")
        if not 0 < self.level <= 1:
            raise UserError(f"--level must be in (0, 1], got {self.level:g}.")
        if self.label is not None and not self.from_masks:
            raise UserError("--label picks a label of a --from label map; give --from MASK too.")
        if self.fit not in FIT_CHOICES:
            raise UserError(f"--fit must be one of {', '.join(FIT_CHOICES)}, got {self.fit!r}.")
        if self.label is not None and not 1 <= self.label <= 65535:
            raise UserError(f"--label must be a label value from 1 to 65535, got {self.label}.")

    def has_region(self) -> bool:
        return bool(
            self.boxes
            or self.ellipses
            or self.polygons
            or self.from_masks
            or self.thresholds
            or self.otsu
            or self.otsu_dark
            or self.auto
        )


# --------------------------------------------------------------------------- parsing


def parse_coordinates(text: str, option: str, expected: str, count: int | None = None) -> list[float]:
    """``"1,2,3"`` -> [1.0, 2.0, 3.0], or a ``UserError`` naming the option and the expected form."""
    try:
        values = [float(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise UserError(f"{option} {text!r} is not a list of numbers {expected}.") from None
    if count is not None and len(values) != count:
        raise UserError(f"{option} {text!r} needs {count} numbers {expected}, got {len(values)}.")
    if any(not np.isfinite(v) for v in values):
        raise UserError(f"{option} {text!r} contains a non-finite number.")
    return values


def _to_pixels(values: list[float], size: tuple[int, int]) -> list[float]:
    """Fractions 0..1 (when every value is <= 1) -> pixels; x values scale by width, y by height."""
    if all(0 <= v <= 1 for v in values):
        w, h = size
        return [v * (w if i % 2 == 0 else h) for i, v in enumerate(values)]
    return values


def parse_threshold(text: str) -> tuple[float, float]:
    """``LOW[:HIGH]`` on 8-bit intensity, inclusive."""
    low_s, _, high_s = text.partition(":")
    try:
        low = float(low_s)
        high = float(high_s) if high_s else 255.0
    except ValueError:
        raise UserError(
            f"--threshold {text!r} must be LOW or LOW:HIGH with 8-bit intensities (0-255)."
        ) from None
    if not (0 <= low <= 255 and 0 <= high <= 255) or high < low:
        raise UserError(f"--threshold {text!r} must satisfy 0 <= LOW <= HIGH <= 255.")
    return low, high


# --------------------------------------------------------------------------- geometry


def pixel_centres(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Original-image coordinates (X, Y) of the centres of a frame's pixels under ``geometry``."""
    w, h = geometry.source
    (rw, rh), (ox, oy) = geometry.resized, geometry.offset
    left, top, right, bottom = geometry.content
    cols = (np.arange(left, right) + 0.5 - ox) * (w / rw)
    rows = (np.arange(top, bottom) + 0.5 - oy) * (h / rh)
    return np.meshgrid(cols, rows)


def working_grey(image: Image.Image, geometry: Geometry) -> np.ndarray:
    """The image as a frame shows it, in 8-bit grey (what --threshold, --otsu and --auto look at)."""
    return np.asarray(frame_image(image, geometry).convert("L"))


def _check_overlap(
    option: str, text: str, x0: float, y0: float, x1: float, y1: float, size: tuple[int, int]
) -> None:
    w, h = size
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
        raise UserError(f"{option} {text} lies outside the image ({w}x{h} pixels).")


def box_region(text: str, size: tuple[int, int], X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = _to_pixels(parse_coordinates(text, "--box", "X0,Y0,X1,Y1", 4), size)
    if x1 <= x0 or y1 <= y0:
        raise UserError(f"--box {text}: X1 must be greater than X0 and Y1 greater than Y0.")
    _check_overlap("--box", text, x0, y0, x1, y1, size)
    return (x0 <= X) & (x1 > X) & (y0 <= Y) & (y1 > Y)


def ellipse_region(text: str, size: tuple[int, int], X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    cx, cy, rx, ry = _to_pixels(parse_coordinates(text, "--ellipse", "CX,CY,RX,RY", 4), size)
    if rx <= 0 or ry <= 0:
        raise UserError(f"--ellipse {text}: the radii RX and RY must be positive.")
    _check_overlap("--ellipse", text, cx - rx, cy - ry, cx + rx, cy + ry, size)
    return ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= 1.0


def polygon_region(text: str, size: tuple[int, int], X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    values = parse_coordinates(text, "--polygon", "X1,Y1,X2,Y2,...")
    if len(values) < 6 or len(values) % 2:
        raise UserError(f"--polygon {text!r} needs at least three X,Y points (an even count of numbers).")
    pts = np.array(_to_pixels(values, size)).reshape(-1, 2)
    _check_overlap(
        "--polygon", text, pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max(), size
    )
    inside = np.zeros(X.shape, dtype=bool)
    for (xa, ya), (xb, yb) in zip(pts, np.roll(pts, -1, axis=0), strict=True):
        if ya == yb:
            continue
        crosses = (ya > Y) != (yb > Y)
        x_at = xa + (Y - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (x_at > X)
    return inside


def from_mask_region(
    img: Image.Image, path: Path, image_size: tuple[int, int], spec: MaskSpec
) -> tuple[np.ndarray, str | None]:
    """An existing mask of any mode and size, brought to the working geometry, binarised at ``level``.

    Returns the region and a note when the mask had to be stretched to the image's aspect ratio.
    """
    grey = mask_to_grey(img, path, spec.label)
    geometry = spec.geometry(image_size)
    note = None
    if grey.size == image_size:
        grey = mask_in_frame(grey, geometry)
    elif grey.size != geometry.frame_size:
        (gw, gh), (iw, ih) = grey.size, image_size
        if abs(gw / gh - iw / ih) > 0.01 * (iw / ih):
            note = f"--from {path} is {gw}x{gh}, another aspect ratio than the image's {iw}x{ih}; it was stretched."
        grey = mask_in_frame(grey.resize(image_size, MASK_RESAMPLE), geometry)
    return np.asarray(grey, dtype=np.float64) / 255.0 >= spec.level, note


# --------------------------------------------------------------------------- building


def build_mask(
    image: Image.Image, spec: MaskSpec, from_images: dict[Path, Image.Image] | None = None
) -> tuple[np.ndarray, list[str]]:
    """The uint8 mask (255 = edit) in the frames' geometry for ``image`` (original, any size) and ``spec``,
    plus notes (R x R with ``--fit crop``)."""
    notes: list[str] = []
    size = image.size
    geometry = spec.geometry(size)
    X, Y = pixel_centres(geometry)
    region = np.zeros(X.shape, dtype=bool)
    for text in spec.boxes:
        region |= box_region(text, size, X, Y)
    for text in spec.ellipses:
        region |= ellipse_region(text, size, X, Y)
    for text in spec.polygons:
        region |= polygon_region(text, size, X, Y)
    for path in spec.from_masks:
        found, note = from_mask_region((from_images or {})[path], path, size, spec)
        region |= found
        if note:
            notes.append(note)

    gray = working_grey(image, geometry)
    intensity = np.zeros(X.shape, dtype=bool)
    for text in spec.thresholds:
        low, high = parse_threshold(text)
        intensity |= (gray >= low) & (gray <= high)
    if spec.otsu or spec.otsu_dark:
        t = otsu_threshold(gray)
        if spec.otsu:
            intensity |= gray > t
        if spec.otsu_dark:
            intensity |= gray <= t
    if spec.keep_largest is not None and intensity.any():
        intensity = keep_largest(intensity, spec.keep_largest)
    region |= intensity
    for kind in spec.auto:
        try:
            region |= auto_mask(gray, kind)
        except HeuristicFailed as exc:
            raise UserError(
                f"--auto {kind} {exc}; draw the region with --box/--ellipse/--polygon instead."
            ) from None

    # No two pixels are further apart than the diagonal: larger radii give the same result, slower.
    reach = int(np.ceil(max(X.shape) * np.sqrt(2))) + 1
    if spec.dilate:
        region = dilate(region, min(spec.dilate, reach))
    if spec.erode:
        region = erode(region, min(spec.erode, reach))
    if spec.fill_holes:
        region = fill_holes(region)
    values = _feather(region, spec.feather, reach) if spec.feather else region.astype(np.float64)
    if spec.invert:
        values = 1.0 - values
    return np.round(values * 255.0).astype(np.uint8), notes


def _feather(region: np.ndarray, radius: int, reach: int) -> np.ndarray:
    """``morphology.feather`` for any radius: depths never exceed ``reach``, so only that band is measured."""
    if radius <= reach:
        return feather(region, radius)
    depth = distance_within(~region, reach)
    return np.where(region, np.minimum(depth / radius, 1.0), 0.0)


def preview(image: Image.Image, mask: np.ndarray, geometry: Geometry) -> Image.Image:
    """Frame 0 with the mask tinted red (by strength) and outlined in yellow."""
    rgb = np.asarray(frame_image(image, geometry), dtype=np.float64)
    strength = (mask.astype(np.float64) / 255.0)[..., None] * 0.45
    tint = np.array([255.0, 40.0, 40.0])
    out = rgb * (1 - strength) + tint * strength
    out[outline(mask >= 128)] = (255, 220, 0)
    return Image.fromarray(np.round(out).astype(np.uint8), mode="RGB")


# --------------------------------------------------------------------------- describing


def describe(
    mask_img: Image.Image,
    path: Path | str,
    image: Image.Image | None = None,
    resolution: int = 512,
    latent_factor: int = 8,
    fit: str = "crop",
) -> dict:
    """Coverage, bounding box, components, binary/soft, how it was read, and warnings, for ``pie mask info``."""
    from pie_cli.imaging.masks import read_mask
    from pie_cli.imaging.media import orientation_of

    read, interpretation = read_mask(mask_img, path)
    grey = np.asarray(read)
    h, w = grey.shape
    on = grey > 0
    info: dict = {
        "mask": str(path),
        "size": [w, h],
        "interpretation": interpretation,
        "exif_orientation": orientation_of(mask_img),
        "binary": bool(np.isin(grey, (0, 255)).all()),
        "coverage_percent": round(100.0 * on.mean(), 3),
        "mean_strength_percent": round(100.0 * grey.mean() / 255.0, 3),
        "bbox": None,
        "components": 0,
        "latent_cells_percent": None,
        "warnings": [],
    }
    if on.any():
        ys, xs = np.nonzero(on)
        info["bbox"] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        labels, count = label(on)
        info["components"] = int(count)
        info["largest_component_pixels"] = int(component_sizes(labels, count)[1:].max())
    if h % latent_factor == 0 and w % latent_factor == 0:
        cells = latent_mask(grey, latent_factor)
        info["latent_cells_percent"] = round(100.0 * (cells > 0).mean(), 3)
        info["latent_grid"] = [w // latent_factor, h // latent_factor]
        if on.any() and not (cells > 0).any():
            info["warnings"].append(
                f"the mask reaches no {latent_factor}x{latent_factor} latent cell: pie simulate would edit nothing."
            )
    if not on.any():
        info["warnings"].append("the mask is empty: pie simulate would edit nothing.")
    elif on.mean() > 0.9:
        info["warnings"].append(
            f"the mask covers {100 * on.mean():.1f}% of the image (> 90%): little stays the patient's own."
        )
    if image is not None:
        info["image"] = {"size": list(image.size), "resolution": resolution, "fit": fit}
        frame = MaskSpec(resolution=resolution, fit=fit).geometry(image.size).frame_size
        if (w, h) not in (image.size, frame):
            how = "`pie mask`" if fit == "crop" else f"`pie mask --fit {fit}`"
            info["warnings"].append(
                f"the mask is {w}x{h} but the image is {image.size[0]}x{image.size[1]} and the working size "
                f"{frame[0]}x{frame[1]}{'' if fit == 'crop' else f' at --fit {fit}'}: pie simulate would refuse it "
                f"(remake it with {how})."
            )
    return info


def lost_to_crop(
    image: Image.Image, spec: MaskSpec, from_images: dict[Path, Image.Image] | None = None
) -> np.ndarray | None:
    """With ``--fit crop``: the drawn regions (boxes, ellipses, polygons, --from) over the *whole* image,
    at the image's size, so :func:`~pie_cli.imaging.masks.crop_warning` can count what the crop cuts.

    Evaluated on a grid covering the whole image (the ``pad`` geometry at R) and brought to the image's
    size; None when the fit is not ``crop`` or there are no drawn regions.
    """
    if (
        spec.full_res
        or spec.fit != "crop"
        or not (spec.boxes or spec.ellipses or spec.polygons or spec.from_masks)
    ):
        return None
    whole = MaskSpec(
        resolution=spec.resolution,
        boxes=spec.boxes,
        ellipses=spec.ellipses,
        polygons=spec.polygons,
        from_masks=spec.from_masks,
        level=spec.level,
        label=spec.label,
        fit="pad",
    )
    geometry = whole.geometry(image.size)
    X, Y = pixel_centres(geometry)
    region = np.zeros(X.shape, dtype=bool)
    for text in whole.boxes:
        region |= box_region(text, image.size, X, Y)
    for text in whole.ellipses:
        region |= ellipse_region(text, image.size, X, Y)
    for text in whole.polygons:
        region |= polygon_region(text, image.size, X, Y)
    for path in whole.from_masks:
        region |= from_mask_region((from_images or {})[path], path, image.size, whole)[0]
    small = Image.fromarray(np.where(region, 255, 0).astype(np.uint8), mode="L")
    return np.asarray(small.resize(image.size, Image.Resampling.NEAREST))
