"""`pie mask IMAGE --out MASK.png [regions]` and `pie mask info MASK`. Never imports torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from pie_cli.cli.boundary import guarded
from pie_cli.cli.console import info, out, result, warn
from pie_cli.cli.options import (
    DebugOpt,
    FitOpt,
    JsonOpt,
    OverwriteOpt,
    ResolutionOpt,
    check_fit,
    check_resolution,
    out_option,
)
from pie_cli.errors import UserError


class _MakeByDefault(TyperGroup):
    """`pie mask IMAGE ...` means `pie mask make IMAGE ...`; `pie mask info ...` stays a subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["make", *args]
        return super().parse_args(ctx, args)


mask_app = typer.Typer(
    cls=_MakeByDefault,
    help=(
        "Make, inspect and adjust edit masks (white = edit). `pie mask IMAGE --out MASK.png [regions]` makes one "
        "in the exact geometry `pie simulate` uses; `pie mask info MASK` describes one."
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

MaskOut = out_option("Mask PNG to write (8-bit grey, 255 = edit).")
_COORDS = "coordinates in original-image pixels, or fractions 0..1 when all values are <= 1"


@mask_app.command("make", no_args_is_help=True)
@guarded
def make(
    image: Annotated[
        Path, typer.Argument(metavar="IMAGE", help="The image the mask is for.", show_default=False)
    ],
    out_path: MaskOut,
    box: Annotated[
        list[str] | None,
        typer.Option("--box", metavar="X0,Y0,X1,Y1", help=f"Rectangle; {_COORDS}. Repeatable."),
    ] = None,
    ellipse: Annotated[
        list[str] | None,
        typer.Option("--ellipse", metavar="CX,CY,RX,RY", help=f"Ellipse; {_COORDS}. Repeatable."),
    ] = None,
    polygon: Annotated[
        list[str] | None,
        typer.Option(
            "--polygon", metavar="X1,Y1,X2,Y2,...", help=f"Polygon (even-odd rule); {_COORDS}. Repeatable."
        ),
    ] = None,
    from_mask: Annotated[
        list[Path] | None,
        typer.Option("--from", metavar="MASK", help="An existing mask of any mode and size. Repeatable."),
    ] = None,
    level: Annotated[float, typer.Option("--level", help="Binarisation level for --from, in (0, 1].")] = 0.5,
    label: Annotated[
        int | None,
        typer.Option(
            "--label",
            metavar="K",
            help="--from is a label map (a segmentation's ids): take the pixels of label K.",
            show_default=False,
        ),
    ] = None,
    threshold: Annotated[
        list[str] | None,
        typer.Option(
            "--threshold", metavar="LOW[:HIGH]", help="Pixels whose 8-bit intensity is in [LOW, HIGH]."
        ),
    ] = None,
    otsu: Annotated[
        bool, typer.Option("--otsu", help="Pixels brighter than the image's Otsu threshold.")
    ] = False,
    otsu_dark: Annotated[
        bool, typer.Option("--otsu-dark", help="Pixels at or below the Otsu threshold.")
    ] = False,
    keep_largest: Annotated[
        int | None,
        typer.Option(
            "--keep-largest", metavar="K", help="Keep the K largest components of --threshold/--otsu."
        ),
    ] = None,
    auto: Annotated[
        list[str] | None,
        typer.Option(
            "--auto",
            metavar="lungs|left-lung|right-lung|foreground",
            help="Heuristic region (check it with --preview).",
        ),
    ] = None,
    dilate: Annotated[int, typer.Option("--dilate", metavar="PX", help="Grow by PX pixels (Euclidean).")] = 0,
    erode: Annotated[int, typer.Option("--erode", metavar="PX", help="Shrink by PX pixels (Euclidean).")] = 0,
    fill_holes: Annotated[bool, typer.Option("--fill-holes", help="Fill enclosed holes.")] = False,
    feather: Annotated[
        int,
        typer.Option(
            "--feather",
            metavar="PX",
            help="Soft inner edge: grey ramp over PX pixels (partial edit strength).",
        ),
    ] = 0,
    invert: Annotated[bool, typer.Option("--invert", help="Swap edit and keep (last).")] = False,
    preview: Annotated[
        Path | None,
        typer.Option(
            "--preview",
            metavar="PATH",
            help="Also write the image with the mask tinted and outlined.",
            show_default=False,
        ),
    ] = None,
    resolution: ResolutionOpt = 512,
    fit: FitOpt = "crop",
    full_res: Annotated[
        bool,
        typer.Option(
            "--full-res",
            help="Write the mask at the image's own size (for `pie simulate --full-res`); pixel options are "
            "then in image pixels.",
        ),
    ] = False,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Make a mask for IMAGE in `pie simulate`'s geometry: regions are united, then dilate, erode, fill, feather, invert.

    Examples:

    \b
      pie mask cxr.png --auto left-lung --preview check.png --out lung.png
      pie mask cxr.png --box 0.5,0.4,0.95,0.9 --fit pad --out lung.png      # for simulate --fit pad
      pie mask film.dcm --auto left-lung --full-res --out lung-full.png     # for simulate --full-res
    """
    from pie_cli.imaging.files import check_out_file
    from pie_cli.imaging.mask_regions import MaskSpec, build_mask
    from pie_cli.imaging.masks import mask_to_grey, require_image_size
    from pie_cli.imaging.media import open_image, require_opaque
    from pie_cli.imaging.ownership import refuse_overlap

    spec = MaskSpec(
        resolution=resolution,
        boxes=tuple(box or ()),
        ellipses=tuple(ellipse or ()),
        polygons=tuple(polygon or ()),
        from_masks=tuple(from_mask or ()),
        level=level,
        label=label,
        thresholds=tuple(threshold or ()),
        otsu=otsu,
        otsu_dark=otsu_dark,
        keep_largest=keep_largest,
        auto=tuple(auto or ()),
        dilate=dilate,
        erode=erode,
        fill_holes=fill_holes,
        feather=feather,
        invert=invert,
        fit=check_fit(fit),
        full_res=full_res,
    )
    spec.check()
    if preview is not None and preview.resolve() == out_path.resolve():
        raise UserError(f"--preview {preview} is the same file as --out; give it another name.")
    inputs = [("IMAGE", image), *[("--from", p) for p in spec.from_masks]]
    for path, what in ((out_path, "--out"), (preview, "--preview")):
        if path is not None:
            refuse_overlap(what, path, inputs)  # never the image or a --from mask, whatever --overwrite says
    for path, what in ((out_path, "--out"), (preview, "--preview")):
        if path is None:
            continue
        if path.suffix.lower() != ".png":
            raise UserError(f"{what} {path} must be a .png file (masks are stored losslessly).")
        check_out_file(path, what, overwrite)

    img = open_image(image, "image")
    require_image_size(img, image)
    require_opaque(img, image)
    from_images = {p: open_image(p, "--from mask") for p in spec.from_masks}
    for p, m in from_images.items():
        mask_to_grey(m, p, spec.label)  # mode errors now, before any work
    mask, notes = build_mask(img, spec, from_images)
    for note in notes:
        warn(note)
    geometry = spec.geometry(img.size)
    if not mask.any():
        where = "" if full_res else f" at --resolution {resolution}"
        hint = " (the centre crop removes the long side's margins)" if geometry.fit == "crop" else ""
        raise UserError(
            f"the mask for {image} would be empty (no white pixel{where}); check the regions{hint} or use --preview."
        )
    from pie_cli.imaging.mask_regions import lost_to_crop
    from pie_cli.imaging.masks import crop_warning

    cut = crop_warning(geometry, f"image {image}", lost_to_crop(img, spec, from_images))
    if cut is not None:
        warn(cut)
    from PIL import Image

    from pie_cli.imaging.files import png_writer, write_together
    from pie_cli.imaging.mask_regions import preview as render_preview

    pictures = [(out_path, Image.fromarray(mask, mode="L"))]
    if preview is not None:
        pictures.append((preview, render_preview(img, mask, geometry)))
    # Both files or neither: a failure writing the preview must not leave a new mask behind.
    write_together([(path, png_writer(picture)) for path, picture in pictures])
    coverage = 100.0 * (mask > 0).mean()
    h, w = mask.shape
    info(f"mask: {w}x{h}, {coverage:.1f}% of pixels{', soft edge' if feather else ''} -> {out_path}")
    result(str(out_path))


@mask_app.command("info", no_args_is_help=True)
@guarded
def mask_info(
    mask: Annotated[Path, typer.Argument(metavar="MASK", help="Mask to describe.", show_default=False)],
    image: Annotated[
        Path | None, typer.Option("--image", help="Check the mask fits this image.", show_default=False)
    ] = None,
    resolution: ResolutionOpt = 512,
    fit: FitOpt = "crop",
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Coverage (pixels and latent cells), bounding box, components, binary or soft; warns about likely mistakes."""
    from pie_cli.imaging.mask_regions import describe
    from pie_cli.imaging.media import open_image

    check_resolution(resolution)
    check_fit(fit)
    img = open_image(image, "image") if image is not None else None
    data = describe(open_image(mask, "mask"), mask, img, resolution, fit=fit)
    if as_json:
        result(json.dumps(data, indent=2))
    else:
        console = out()
        w, h = data["size"]
        console.print(
            f"mask              {mask} ({w}x{h}, {'binary' if data['binary'] else 'soft'})", markup=False
        )
        console.print(
            f"coverage          {data['coverage_percent']:.2f}% of pixels "
            f"(mean strength {data['mean_strength_percent']:.2f}%)",
            markup=False,
        )
        if data["latent_cells_percent"] is not None:
            gw, gh = data["latent_grid"]
            console.print(
                f"latent cells      {data['latent_cells_percent']:.2f}% of the {gw}x{gh} grid", markup=False
            )
        console.print(
            f"bounding box      {data['bbox'] if data['bbox'] else '-'} (x0, y0, x1, y1)", markup=False
        )
        console.print(f"components        {data['components']}", markup=False)
        console.print(f"read as           {data['interpretation']}", markup=False)
        if data.get("exif_orientation"):
            console.print(f"exif orientation  {data['exif_orientation']} (applied)", markup=False)
    for message in data["warnings"]:
        warn(message)
