"""Turning frames into things people look at: animated GIF/WebP, a PNG contact strip, MP4.

Used by ``pie export-gif`` and by ``pie simulate`` for its ``progression.gif``. PIL/numpy
only (MP4 through the optional PyAV extra). Every output is written atomically.

GIFs get one global palette for all frames (an exact 256-level grey ramp when every
frame is grey, as X-rays are; otherwise a median-cut palette of all frames), are stored
as changed rectangles over the previous frame, and keep every frame and duration asked
for (Pillow's own writer merges identical consecutive frames).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import GifImagePlugin, Image

from pie_cli.errors import UserError
from pie_cli.imaging.annotate import OUTLINE_RGB, abs_diff, draw_caption, draw_outline, heat_panel, hstack
from pie_cli.imaging.files import atomic_path, provenance, save_png, writing

FORMATS = (".gif", ".webp", ".png", ".mp4")


@dataclass(frozen=True)
class SourceFrame:
    """A frame to animate: its progression step (or position) and the file it came from."""

    index: int
    path: Path


@dataclass(frozen=True)
class ExportOptions:
    duration_ms: int = 500
    hold_last_ms: int = 1500
    loop: int = 0
    bounce: bool = False
    every: int = 1
    resize: int | None = None
    columns: int | None = None
    caption: str | None = None
    side_by_side: bool = False
    diff: bool = False
    mask_outline: bool = False
    lossless: bool = False  # WebP
    quality: int = 90  # WebP (lossy)


# --------------------------------------------------------------------------- sequence


def sequence(count: int, every: int = 1, bounce: bool = False) -> tuple[list[int], int]:
    """Positions to show, and the position of the last progression frame (held longer).

    ``every`` keeps every K-th frame and always the last; ``bounce`` plays forward then
    backward (without repeating the end frames, so the loop is seamless).
    """
    picks = list(range(0, count, max(1, every)))
    if picks[-1] != count - 1:
        picks.append(count - 1)
    turn = len(picks) - 1
    if bounce and len(picks) > 2:
        picks = picks + picks[-2:0:-1]
    return picks, turn


def durations(length: int, turn: int, duration_ms: int, hold_last_ms: int) -> list[int]:
    out = [duration_ms] * length
    if hold_last_ms > 0:
        out[turn] = hold_last_ms
    return out


MAX_CAPTION = 500  # characters drawn on a frame


def caption_text(template: str, index: int, last: int, name: str) -> str:
    problem = None
    try:
        for _, _, spec, _ in string.Formatter().parse(template):
            if spec and (re.search(r"\d{4,}", spec) or "{" in spec):
                problem = f"the format {spec!r} is too wide or nested"
        text = template.format(i=index, n=last, name=name) if problem is None else ""
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
        problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if problem is None and len(text) > MAX_CAPTION:
        problem = f"it makes a caption of {len(text)} characters, more than {MAX_CAPTION}"
    if problem is not None:
        shown = template if len(template) <= 60 else template[:57] + "..."
        raise UserError(
            f"--caption {shown!r} is not a valid template ({problem}); use {{i}} (step), {{n}} (last step), {{name}}."
        ) from None
    return text


def compose(
    images: list[Image.Image],
    sources: list[SourceFrame],
    picks: list[int],
    options: ExportOptions,
    mask: np.ndarray | None = None,
) -> list[Image.Image]:
    """The frames to write, one per pick: panels side by side, outlines, resize, caption."""
    reference = images[0]
    scale = 1.0
    if options.diff:
        scale = max([float(abs_diff(images[p], reference).max()) for p in set(picks)] + [1.0])
    last = sources[-1].index
    out = []
    for p in picks:
        panels = []
        if options.side_by_side:
            panels.append(reference)
        panels.append(images[p])
        if options.diff:
            panels.append(heat_panel(abs_diff(images[p], reference), scale))
        if mask is not None:
            panels = [draw_outline(panel, mask) for panel in panels]
        frame = hstack(panels) if len(panels) > 1 else panels[0].convert("RGB")
        if options.resize:
            height = max(1, round(frame.height * options.resize / frame.width))
            frame = frame.resize((options.resize, height), Image.Resampling.LANCZOS)
        if options.caption:
            frame = draw_caption(
                frame, caption_text(options.caption, sources[p].index, last, sources[p].path.name)
            )
        out.append(frame)
    return out


# --------------------------------------------------------------------------- writers


def _is_grey(frames: Sequence[Image.Image]) -> bool:
    for f in frames:
        a = np.asarray(f)
        if not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])):
            return False
    return True


def _palette(frames: Sequence[Image.Image]) -> np.ndarray:
    """One palette (256 x RGB) for every frame: a grey ramp for grey frames, else median cut."""
    if _is_grey(frames):
        return np.repeat(np.arange(256, dtype=np.int32)[:, None], 3, axis=1)
    thumbs = []
    for f in frames:
        scale = min(1.0, 160 / max(f.size))
        thumbs.append(f.resize((max(1, round(f.width * scale)), max(1, round(f.height * scale)))))
    montage = Image.new("RGB", (max(t.width for t in thumbs), sum(t.height for t in thumbs)))
    y = 0
    for t in thumbs:
        montage.paste(t, (0, y))
        y += t.height
    # Thin annotations (outlines, caption text) vanish from thumbnails: give them fixed entries.
    fixed = np.array([(0, 0, 0), (255, 255, 255), OUTLINE_RGB], dtype=np.int32)
    quantized = montage.quantize(colors=256 - len(fixed), method=Image.Quantize.MEDIANCUT)
    entries = np.array(quantized.getpalette()[: 3 * (256 - len(fixed))], dtype=np.int32).reshape(-1, 3)
    entries = np.vstack([entries, fixed])
    return np.vstack([entries, np.zeros((256 - len(entries), 3), dtype=np.int32)])


def _indexed(frame: Image.Image, palette: np.ndarray) -> Image.Image:
    """``frame`` as a "P" image over ``palette``, each colour mapped to its exact nearest entry."""
    rgb = np.asarray(frame.convert("RGB"), dtype=np.int32)
    flat = rgb.reshape(-1, 3)
    codes = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    unique, inverse = np.unique(codes, return_inverse=True)
    colours = np.stack([(unique >> 16) & 255, (unique >> 8) & 255, unique & 255], axis=1)
    # |c - p|^2 = |c|^2 - 2 c.p + |p|^2; |c|^2 does not change the argmin over p.
    pal = palette.astype(np.float32)
    pal_norm = (pal**2).sum(axis=1)
    nearest = np.empty(len(colours), dtype=np.uint8)
    for start in range(0, len(colours), 65536):
        chunk = colours[start : start + 65536].astype(np.float32)
        nearest[start : start + 65536] = (pal_norm[None, :] - 2.0 * chunk @ pal.T).argmin(axis=1)
    out = Image.fromarray(nearest[inverse.reshape(-1)].reshape(rgb.shape[:2]), mode="P")
    out.putpalette(palette.astype(np.uint8).ravel().tolist())
    return out


def _comment(run_id: str | None) -> str:
    text = provenance(run_id)
    run = f" (run {text['pie_run']})" if "pie_run" in text else ""
    return f"{text['Comment']} {text['Software']}{run}; synthetic=true"


def write_gif(
    frames: Sequence[Image.Image],
    path: Path,
    durations_ms: Sequence[int],
    loop: int = 0,
    run_id: str | None = None,
) -> None:
    """Animated GIF with every frame and duration as given (GIF stores delays in 10 ms units).

    A comment extension says the animation is synthetic and made by pie (and from which run).
    """
    if not frames:
        raise ValueError("write_gif needs at least one frame")
    palette = _palette(frames)
    indexed = [_indexed(f, palette) for f in frames]
    header, _ = GifImagePlugin.getheader(indexed[0].copy(), info={"loop": loop, "comment": _comment(run_id)})
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        for chunk in header:
            fh.write(chunk)
        previous = None
        for img, ms in zip(indexed, durations_ms, strict=True):
            arr = np.asarray(img)
            if previous is None:
                box = (0, 0, img.width, img.height)
            else:
                changed = np.argwhere(arr != previous)
                if changed.size:
                    (y0, x0), (y1, x1) = changed.min(axis=0), changed.max(axis=0) + 1
                    box = (int(x0), int(y0), int(x1), int(y1))
                else:
                    box = (0, 0, 1, 1)  # an unchanged frame still takes its place and its time
            for chunk in GifImagePlugin.getdata(img.crop(box), offset=box[:2], duration=ms, disposal=1):
                fh.write(chunk)
            previous = arr
        fh.write(b";")


def write_webp(
    frames: Sequence[Image.Image],
    path: Path,
    durations_ms: Sequence[int],
    loop: int = 0,
    lossless: bool = False,
    quality: int = 90,
    run_id: str | None = None,
) -> None:
    """Animated WebP. (libwebp itself merges identical consecutive frames, adding their durations.)

    Provenance goes into EXIF: Software and ImageDescription (synthetic, made by pie, the run).
    """
    exif = Image.Exif()
    exif[0x0131] = provenance(run_id)["Software"]
    exif[0x010E] = _comment(run_id)
    with atomic_path(path) as tmp:
        frames[0].save(
            tmp,
            format="WEBP",
            save_all=True,
            append_images=list(frames[1:]),
            duration=list(durations_ms),
            loop=loop,
            lossless=lossless,
            quality=quality,
            exif=exif,
        )


def write_grid(
    frames: Sequence[Image.Image], path: Path, columns: int | None = None, run_id: str | None = None
) -> None:
    """All frames on one PNG, ``columns`` per row (default: one row, a strip)."""
    cols = min(len(frames), columns or len(frames))
    rows = math.ceil(len(frames) / cols)
    w, h = frames[0].size
    sheet = Image.new("RGB", (cols * w, rows * h))
    for k, f in enumerate(frames):
        sheet.paste(f, ((k % cols) * w, (k // cols) * h))
    save_png(sheet, path, run_id)


def write_mp4(
    frames: Sequence[Image.Image], path: Path, durations_ms: Sequence[int], run_id: str | None = None
) -> None:
    """H.264 MP4 with each frame's own duration (needs the optional PyAV extra)."""
    try:
        import av
    except ImportError:
        raise UserError(
            f"writing {path.name} needs the optional video extra: pip install 'pie-cli[video]' (PyAV)."
        ) from None
    w, h = frames[0].size
    even = (w + w % 2, h + h % 2)  # yuv420p needs even dimensions
    ms = Fraction(1, 1000)
    with atomic_path(path) as tmp:
        container = av.open(str(tmp), mode="w", format="mp4")
        container.metadata["comment"] = _comment(run_id)
        try:
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            stream = container.add_stream(
                codec, rate=Fraction(1000, max(1, durations_ms[0])), options={"bf": "0"}
            )
            stream.width, stream.height, stream.pix_fmt = even[0], even[1], "yuv420p"
            stream.codec_context.time_base = ms
            start, by_pts = 0, {}

            def mux(packets):
                for packet in packets:
                    if packet.pts is not None and packet.pts in by_pts:
                        packet.duration = int(by_pts[packet.pts] * ms / packet.time_base)
                    container.mux(packet)

            for img, d in zip(frames, durations_ms, strict=True):
                canvas = Image.new("RGB", even)
                canvas.paste(img.convert("RGB"), (0, 0))
                frame = av.VideoFrame.from_ndarray(np.asarray(canvas), format="rgb24")
                frame.pts, frame.time_base = start, ms
                by_pts[start] = d
                start += d
                mux(stream.encode(frame))
            mux(stream.encode())
        finally:
            container.close()


def write(
    frames: Sequence[Image.Image],
    path: Path,
    options: ExportOptions,
    turn: int | None = None,
    run_id: str | None = None,
) -> None:
    """Write ``frames`` in the format named by ``path``'s extension, marked synthetic (see media.provenance)."""
    suffix = Path(path).suffix.lower()
    times = durations(
        len(frames), len(frames) - 1 if turn is None else turn, options.duration_ms, options.hold_last_ms
    )
    with writing(path):  # a full disk names the file (write errors carry no file name)
        if suffix == ".gif":
            write_gif(frames, path, times, options.loop, run_id)
        elif suffix == ".webp":
            write_webp(frames, path, times, options.loop, options.lossless, options.quality, run_id)
        elif suffix == ".png":
            write_grid(frames, path, options.columns, run_id)
        elif suffix == ".mp4":
            write_mp4(frames, path, times, run_id)
        else:
            raise UserError(f"--out {path}: unknown format {suffix or '(none)'!r}; use {', '.join(FORMATS)}.")


LANCZOS = Image.Resampling.LANCZOS


def tile(images: Sequence[Image.Image], columns: int) -> Image.Image:
    """Images of one size on a grid, ``columns`` per row, left to right then top to bottom."""
    cols = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, rows * h), "black")
    for k, img in enumerate(images):
        sheet.paste(img.convert("RGB"), ((k % cols) * w, (k // cols) * h))
    return sheet
