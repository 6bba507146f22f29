"""`pie export-gif RUN_DIR_OR_FRAMES... --out FILE`: frames -> an animation, strip or video; with
`--format dicom --out DIR`, a DICOM Secondary Capture series. Never imports torch."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from pie_cli.cli.console import info, result, warn
from pie_cli.cli.options import DebugOpt, OverwriteOpt, WatermarkOpt, out_option
from pie_cli.errors import UserError

ExportOut = out_option(
    "Output: .gif, .webp (animated), .png (contact strip/grid), .mp4; with --format dicom, a folder."
)


class ExportFormat(str, Enum):
    gif = "gif"
    webp = "webp"
    png = "png"
    mp4 = "mp4"
    dicom = "dicom"


DICOM_SUFFIXES = (".dcm", ".dicom")
# The options that shape an animation or a sheet; a DICOM series is each frame as it is (name, flag).
NOT_FOR_DICOM = (
    ("duration_ms", "--duration-ms"),
    ("hold_last_ms", "--hold-last-ms"),
    ("loop", "--loop"),
    ("bounce", "--bounce"),
    ("resize", "--resize"),
    ("columns", "--columns"),
    ("caption", "--caption"),
    ("side_by_side", "--side-by-side"),
    ("diff", "--diff"),
    ("mask_outline", "--mask-outline"),
    ("lossless", "--lossless"),
)
# GIF stores a delay in 16 bits of 10 ms and a loop count in 16 bits (WebP: the same loop field).
MAX_DELAY_MS = 655_350
MAX_LOOP = 65_535
MAX_WIDTH = 16_384  # --resize


def export_gif(
    ctx: typer.Context,
    inputs: Annotated[
        list[Path],
        typer.Argument(
            metavar="RUN_DIR_OR_FRAMES",
            show_default=False,
            help="A `pie simulate` run directory, or frame files in order.",
        ),
    ],
    out_path: ExportOut,
    export_format: Annotated[
        ExportFormat | None,
        typer.Option(
            "--format",
            metavar="FORMAT",
            show_default=False,
            help="gif, webp, png, mp4 or dicom (a folder of DICOM files, one per frame); default: --out's extension.",
        ),
    ] = None,
    duration_ms: Annotated[
        int, typer.Option("--duration-ms", help="Time per frame (GIF stores 10 ms units).")
    ] = 500,
    hold_last_ms: Annotated[
        int, typer.Option("--hold-last-ms", help="Time on the last progression frame (0 = as others).")
    ] = 1500,
    loop: Annotated[int, typer.Option("--loop", help="Times to play; 0 = forever.")] = 0,
    bounce: Annotated[bool, typer.Option("--bounce", help="Play forward, then backward.")] = False,
    every: Annotated[
        int, typer.Option("--every", metavar="K", help="Every K-th frame (the last is always kept).")
    ] = 1,
    resize: Annotated[
        int | None,
        typer.Option(
            "--resize", metavar="W", help="Output width in pixels (aspect kept).", show_default=False
        ),
    ] = None,
    columns: Annotated[
        int | None,
        typer.Option("--columns", help=".png: frames per row (default: one row).", show_default=False),
    ] = None,
    caption: Annotated[
        str | None,
        typer.Option(
            "--caption",
            metavar="TEMPLATE",
            show_default=False,
            help='Text on each frame, e.g. "step {i}/{n}" ({name} = file name).',
        ),
    ] = None,
    side_by_side: Annotated[bool, typer.Option("--side-by-side", help="Frame 0 beside each frame.")] = False,
    diff: Annotated[
        bool, typer.Option("--diff", help="|frame - frame 0| heat map beside each frame (one scale for all).")
    ] = False,
    mask_outline: Annotated[
        bool, typer.Option("--mask-outline", help="Draw the run directory's mask.png contour.")
    ] = False,
    lossless: Annotated[
        bool, typer.Option("--lossless", help=".webp: lossless instead of quality 90.")
    ] = False,
    watermark: WatermarkOpt = False,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Turn frames into an animation, a contact strip or a video for people to look at, or into a
    DICOM series for a PACS viewer.

    With --format dicom, --out is a folder (created, or empty, or with --overwrite holding only a
    series pie wrote there) that gets frame_000.dcm, frame_001.dcm ...: one new Secondary Capture
    series, the frames' pixels as the run had them (8-bit grey, RGB or 16-bit grey) with "SYNTHETIC"
    burnt into a corner and no attribute taken from the input image or the run. --every applies;
    the animation and panel options do not.

    Examples:

    \b
      pie export-gif runs/case1 --out case1.gif --side-by-side --diff --caption "step {i}/{n}"
      pie export-gif runs/case1 --out case1.png --columns 4 --every 2
      pie export-gif runs/case1 --format dicom --out case1-dicom      # frame_000.dcm ...
    """
    from pie_cli.imaging import animation as export
    from pie_cli.imaging.files import check_out_file
    from pie_cli.imaging.ownership import refuse_overlap
    from pie_cli.runs import frames as run_frames
    from pie_cli.runs.manifest import run_id_of

    suffix = out_path.suffix.lower()
    if export_format is ExportFormat.dicom:
        given = [flag for name, flag in NOT_FOR_DICOM if _given(ctx, name)]
        if given:
            raise UserError(
                f"{given[0]} does not apply to --format dicom, which writes each frame as it is; leave it out."
            )
        if every < 1:
            raise UserError(f"--every must be at least 1, got {every}.")
        _export_dicom(inputs, out_path, every, overwrite)
        return
    if export_format is None and suffix in DICOM_SUFFIXES:
        raise UserError(
            f"--out {out_path}: a DICOM export is a series, one file per frame, written into a folder; "
            "use --format dicom --out DIR."
        )
    if export_format is not None and suffix != f".{export_format.value}":
        ending = f"ends in {suffix}" if suffix else "has no extension"
        raise UserError(
            f"--format {export_format.value} writes a .{export_format.value} file but --out {out_path} "
            f"{ending}; name it {out_path.stem}.{export_format.value}."
        )
    if suffix not in export.FORMATS:
        raise UserError(
            f"--out {out_path}: unknown format {suffix or '(none)'!r}; use {', '.join(export.FORMATS)}, "
            "or --format dicom with a folder."
        )
    check_out_file(out_path, "--out", overwrite)
    for name, value, low, high in (
        ("--duration-ms", duration_ms, 1, MAX_DELAY_MS),
        ("--hold-last-ms", hold_last_ms, 0, MAX_DELAY_MS),
        ("--loop", loop, 0, MAX_LOOP),
        ("--every", every, 1, None),
        ("--resize", resize, 1, MAX_WIDTH),
        ("--columns", columns, 1, None),
    ):
        if value is not None and value < low:
            raise UserError(f"{name} must be at least {low}, got {value}.")
        if value is not None and high is not None and value > high:
            raise UserError(f"{name} must be at most {high}, got {value}.")
    if suffix == ".mp4":
        try:
            import av  # noqa: F401
        except ImportError:
            raise UserError(
                f"writing {out_path.name} needs the optional video extra: pip install 'pie-cli[video]' (PyAV)."
            ) from None

    groups = run_frames.frame_groups(inputs[0]) if len(inputs) == 1 and Path(inputs[0]).is_dir() else None
    if groups is not None:
        _export_groups(groups, out_path, inputs, suffix, options_of(locals()), mask_outline, watermark)
        return
    sources, mask_path = run_frames.collect(inputs)
    read = [("RUN_DIR_OR_FRAMES", source.path) for source in sources] + [("the run's mask", mask_path)]
    refuse_overlap("--out", out_path, read)  # never one of the frames it reads, whatever --overwrite says
    images = run_frames.load(sources)
    mask = None
    if mask_outline:
        if mask_path is None:
            raise UserError("--mask-outline needs a run directory with mask.png among the inputs.")
        mask = run_frames.load_mask(mask_path, images)
    if caption is not None:
        export.caption_text(caption, 0, 0, "x")  # template errors before any work
    if suffix == ".gif" and duration_ms % 10:
        warn(
            f"GIF stores delays in 10 ms units: --duration-ms {duration_ms} plays as {duration_ms // 10 * 10} ms."
        )

    options = options_of(locals())
    picks, turn = export.sequence(len(images), every, bounce if suffix != ".png" else False)
    frames = export.compose(images, sources, picks, options, mask)
    if watermark:
        from pie_cli.imaging.annotate import watermark as burn

        frames = [burn(f) for f in frames]
    export.write(frames, out_path, options, turn, run_id=run_id_of(inputs))
    info(f"export: {len(frames)} frames, {frames[0].width}x{frames[0].height} -> {out_path}")
    result(str(out_path))


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (on the command line), rather than leaving its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _export_dicom(inputs: list[Path], out: Path, every: int, overwrite: bool) -> None:
    """One run's frames (every ``every``-th, and the last) as a DICOM series in the folder ``out``."""
    from pie_cli.imaging import animation as export
    from pie_cli.imaging.dicom_out import series_file, write_series
    from pie_cli.imaging.ownership import refuse_overlap
    from pie_cli.runs import frames as run_frames

    if out.suffix.lower() in (*export.FORMATS, *DICOM_SUFFIXES):
        raise UserError(
            f"--out {out} looks like a file name, but --format dicom writes a folder of frame_NNN.dcm files; "
            "name a folder."
        )
    if len(inputs) == 1 and Path(inputs[0]).is_dir() and run_frames.frame_groups(inputs[0]) is not None:
        raise UserError(
            f"{inputs[0]} holds several runs (trajectories or cohort cases); --format dicom exports one run's "
            "frames: give one of its run folders, e.g. traj_00."
        )
    for item in inputs:  # a series folder may lie inside a run folder (as a GIF may), never be one
        if Path(item).is_dir() and out.is_dir() and out.resolve() == Path(item).resolve():
            raise UserError(
                f"--out {out} is RUN_DIR_OR_FRAMES {item} itself; write the series into a folder of its own, "
                f"e.g. {Path(item) / 'dicom'}."
            )
    sources, mask_path = run_frames.collect(inputs)
    read = [("RUN_DIR_OR_FRAMES", source.path) for source in sources] + [("the run's mask", mask_path)]
    refuse_overlap("--out", out, read, series_file)  # never an input, whatever --overwrite says
    picks, _ = export.sequence(len(sources), every)
    series = write_series([sources[p].path for p in picks], out, overwrite)
    info(
        f"export: {len(series.files)} DICOM frames, {series.pixel_format.width}x{series.pixel_format.height} "
        f"{series.pixel_format} -> {out}"
    )
    result(str(out))


def options_of(given: dict):
    """The export options of the command's values (``locals()`` of :func:`export_gif`)."""
    from pie_cli.imaging import animation as export

    return export.ExportOptions(
        duration_ms=given["duration_ms"],
        hold_last_ms=given["hold_last_ms"],
        loop=given["loop"],
        bounce=given["bounce"],
        every=given["every"],
        resize=given["resize"],
        columns=given["columns"],
        caption=given["caption"],
        side_by_side=given["side_by_side"],
        diff=given["diff"],
        mask_outline=given["mask_outline"],
        lossless=given["lossless"],
    )


def _export_groups(groups, out_path: Path, inputs, suffix: str, options, mask_outline: bool, watermark: bool):
    """A trajectory run or a cohort: every member's frames as one tile each, labelled.

    An animation shows all tiles at each step (``--columns`` tiles per row, default up to 4); a
    .png is the K x N grid, one row per member, one column per frame.
    """
    from dataclasses import replace

    from pie_cli.imaging import animation as export
    from pie_cli.imaging.annotate import draw_caption
    from pie_cli.imaging.ownership import refuse_overlap
    from pie_cli.runs import frames as run_frames
    from pie_cli.runs.manifest import run_id_of

    loaded = []
    read = []
    for label, folder in groups:
        sources, mask_path = run_frames.collect([folder])
        read += [("RUN_DIR_OR_FRAMES", s.path) for s in sources] + [("the run's mask", mask_path)]
        loaded.append((label, folder, sources, mask_path))
    refuse_overlap("--out", out_path, read)
    counts = {len(s) for _, _, s, _ in loaded}
    if len(counts) != 1:
        raise UserError(
            f"{inputs[0]}: its runs have different numbers of frames ({', '.join(str(c) for c in sorted(counts))}); "
            "export them one by one."
        )
    if options.caption is not None:
        export.caption_text(options.caption, 0, 0, "x")
    tiles_per_member = []
    size = None
    picks, turn = export.sequence(counts.pop(), options.every, options.bounce if suffix != ".png" else False)
    for label, folder, sources, mask_path in loaded:
        images = run_frames.load(sources)
        if size is not None and images[0].size != size:
            raise UserError(
                f"{folder}'s frames are {images[0].width}x{images[0].height}, unlike the others'."
            )
        size = images[0].size
        mask = None
        if mask_outline:
            if mask_path is None:
                raise UserError(f"--mask-outline needs mask.png in {folder}.")
            mask = run_frames.load_mask(mask_path, images)
        frames = export.compose(images, sources, picks, replace(options, resize=None, caption=None), mask)
        last = sources[-1].index
        captioned = []
        for p, frame in zip(picks, frames, strict=True):
            text = label
            if options.caption:
                text = f"{label}: {export.caption_text(options.caption, sources[p].index, last, sources[p].path.name)}"
            captioned.append(draw_caption(frame, text))
        tiles_per_member.append(captioned)
    if suffix == ".png":
        rows = [export.tile(tiles, len(tiles)) for tiles in tiles_per_member]
        frames = [export.tile(rows, 1)]
    else:
        columns = options.columns or min(4, len(tiles_per_member))
        frames = [export.tile([m[i] for m in tiles_per_member], columns) for i in range(len(picks))]
    if options.resize:
        frames = [
            f.resize((options.resize, max(1, round(f.height * options.resize / f.width))), export.LANCZOS)
            for f in frames
        ]
    if watermark:
        from pie_cli.imaging.annotate import watermark as burn

        frames = [burn(f) for f in frames]
    turn = turn if suffix != ".png" else None  # a .png is one sheet: no timing
    export.write(frames, out_path, replace(options, columns=None), turn, run_id=run_id_of([groups[0][1]]))
    info(
        f"export: {len(tiles_per_member)} runs x {len(picks)} frames, {frames[0].width}x{frames[0].height} -> {out_path}"
    )
    result(str(out_path))
