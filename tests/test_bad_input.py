"""Bad input to every command, in one table, and the same contract under random input (hypothesis).

The contract (README, pie_cli/boundary.py):

- bad input: exit status 2 and one line on stderr, "Error: <one sentence naming the file or option>";
- environment faults (disk full, permission denied while writing, out of memory): exit status 1 and
  one such line naming the path;
- never a traceback, never "internal error", nothing on stdout, and no new, changed or removed file.

A bug found here that cannot be fixed at once gets ``marks=pytest.mark.xfail(strict=True, reason=...)``
on its row, so the fix is noticed (strict xfail fails when the row starts passing).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.helpers import finetune_argv, simulate_argv

# --------------------------------------------------------------------------- the inputs


@dataclass
class World:
    """Every file a row can point at, made fresh in each test's tmp_path."""

    tmp: Path
    model: Path
    image: Path  # 64 x 64 chest phantom
    mask: Path  # its left-lung mask
    missing: Path
    empty: Path  # 0 bytes
    truncated: Path  # the first 100 bytes of a PNG
    text: Path  # a text file named .png
    one_pixel: Path  # a 1 x 1 image
    black: Path  # 64 x 64, all black
    wide: Path  # 128 x 64, white: another size and aspect ratio than the image
    colour: Path  # 64 x 64, red
    run: Path  # a run directory: frame_000/001.png, mask.png, manifest.json
    data: Path  # a finetune image folder
    readonly: Path  # see deny_writes
    undo: list[Callable[[], None]] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.tmp / "out"


@pytest.fixture
def w(tmp_path, inputs, tiny_model) -> World:
    world = _world(tmp_path, inputs, tiny_model)
    yield world
    for undo in reversed(world.undo):
        undo()


def _world(root: Path, inputs: dict[str, Path], model: Path) -> World:
    image, mask = inputs["image"], inputs["mask"]
    (root / "empty.png").write_bytes(b"")
    (root / "truncated.png").write_bytes(image.read_bytes()[:100])
    (root / "text.png").write_text("this is not an image\n")
    Image.new("L", (1, 1), 255).save(root / "one-pixel.png")
    Image.new("L", (64, 64), 0).save(root / "black.png")
    Image.new("L", (128, 64), 255).save(root / "wide.png")
    Image.new("RGB", (64, 64), (200, 0, 0)).save(root / "colour.png")
    run = _run(root / "run", image, mask)
    data = root / "data"
    data.mkdir()
    for i in range(2):
        shutil.copy(image, data / f"{i}.png")
    (data / "metadata.jsonl").write_text(
        "".join(
            json.dumps({"file_name": f"{i}.png", "text": "left pleural effusion"}) + "\n" for i in range(2)
        )
    )
    return World(
        tmp=root,
        model=model,
        image=image,
        mask=mask,
        missing=root / "missing.png",
        empty=root / "empty.png",
        truncated=root / "truncated.png",
        text=root / "text.png",
        one_pixel=root / "one-pixel.png",
        black=root / "black.png",
        wide=root / "wide.png",
        colour=root / "colour.png",
        run=run,
        data=data,
        readonly=root / "readonly",
    )


def _run(path: Path, image: Path, mask: Path | None = None, **replace: Path) -> Path:
    """A `pie simulate` run directory; ``replace`` swaps a file (``frame_001=...``) for another."""
    path.mkdir(parents=True)
    shutil.copy(image, path / "frame_000.png")
    shutil.copy(image, path / "frame_001.png")
    if mask is not None:
        shutil.copy(mask, path / "mask.png")
    (path / "manifest.json").write_text(json.dumps({"parameters": {"prompt": "left pleural effusion"}}))
    for stem, source in replace.items():
        target = path / (stem if "." in stem else f"{stem}.png")
        if isinstance(source, Path):
            shutil.copy(source, target)
        else:
            target.write_text(source)
    return path


# --------------------------------------------------------------------------- faults


def deny_writes(w: World, monkeypatch) -> None:
    """Make w.readonly a directory nobody may write into (root ignores modes: then os.access says no)."""
    w.readonly.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        w.readonly.chmod(0o500)
        w.undo.append(lambda: w.readonly.chmod(0o700))
        return
    real = os.access
    denied = w.readonly.resolve()

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).resolve() == denied:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def readonly_run(w: World, monkeypatch) -> None:
    """w.readonly is a complete run directory that cannot be written to (for evaluate)."""
    _run(w.readonly, w.image, w.mask)
    deny_writes(w, monkeypatch)


def disk_full(w: World, monkeypatch) -> None:
    """Every file pie writes is written (tmp name) and then fsync says ENOSPC, as a full disk does.

    Like a real ``write``/``fsync`` failure, the OSError carries no file name.
    """

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)


def rename_denied(w: World, monkeypatch) -> None:
    """The final rename of an atomic write is refused (EACCES), as on an immutable or read-only target."""

    def replace(src, dst, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(src), str(dst))

    monkeypatch.setattr(os, "replace", replace)


# --------------------------------------------------------------------------- command lines


def sim(w: World, *extra, image: Path | None = None) -> list:
    """A valid, fast `pie simulate` (tiny model, 1 step at 64 px); later options win over these."""
    return simulate_argv(image or w.image, w.out, *extra, model=w.model)


def mask(w: World, *extra, image: Path | None = None) -> list:
    return [
        "mask",
        image or w.image,
        "--out",
        w.tmp / "m.png",
        "--box",
        "0.1,0.1,0.6,0.6",
        "-r",
        "64",
        *extra,
    ]


def gif(w: World, *extra, frames: tuple = ()) -> list:
    return ["export-gif", *(frames or (w.run,)), "--out", w.tmp / "a.gif", *extra]


def ft(w: World, *extra) -> list:
    return finetune_argv(w.data, w.model, w.tmp / "ft", *extra, batch_size=1, max_steps=1)


def touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Row:
    argv: Callable[[World], list]
    code: int
    culprits: Callable[[World], tuple]  # strings the Error line must contain
    setup: Callable[[World, object], None] | None = None


def row(id, argv, code, culprits, setup=None, marks=()):
    names = culprits if callable(culprits) else (lambda w, c=culprits: c if isinstance(c, tuple) else (c,))
    return pytest.param(Row(argv, code, names, setup), id=id, marks=marks)


FILES = {
    "missing": "missing.png",
    "empty": "empty.png",
    "truncated": "truncated.png",
    "text": "text.png",
}

TABLE = [
    # ---- simulate: image and mask files
    *[
        row(f"simulate image {kind}", lambda w, k=kind: sim(w, image=getattr(w, k)), 2, name)
        for kind, name in FILES.items()
    ],
    row(
        "simulate image 1x1",
        lambda w: sim(w, image=w.one_pixel),
        2,
        "one-pixel.png",
    ),
    *[
        row(f"simulate mask {kind}", lambda w, k=kind: sim(w, "--mask", getattr(w, k)), 2, name)
        for kind, name in FILES.items()
    ],
    row("simulate mask of another size", lambda w: sim(w, "--mask", w.wide), 2, "wide.png"),
    row("simulate mask all black", lambda w: sim(w, "--mask", w.black), 2, "black.png"),
    row("simulate mask colour", lambda w: sim(w, "--mask", w.colour), 2, "colour.png"),
    # ---- simulate: numbers
    row("simulate --steps 0", lambda w: sim(w, "--steps", "0"), 2, "--steps"),
    row("simulate --steps -1", lambda w: sim(w, "--steps", "-1"), 2, "--steps"),
    row(
        "simulate --steps 1e20",
        lambda w: sim(w, "--steps", str(10**20)),
        2,
        "--steps",
    ),
    row("simulate --steps 1.5", lambda w: sim(w, "--steps", "1.5"), 2, "--steps"),
    row("simulate --strength 1.5", lambda w: sim(w, "--strength", "1.5"), 2, "--strength"),
    row("simulate --strength 0", lambda w: sim(w, "--strength", "0"), 2, "--strength"),
    row("simulate --strength nan", lambda w: sim(w, "--strength", "nan"), 2, "--strength"),
    row("simulate --strength abc", lambda w: sim(w, "--strength", "abc"), 2, "--strength"),
    row("simulate --resolution 63", lambda w: sim(w, "--resolution", "63"), 2, "--resolution"),
    row("simulate --resolution 0", lambda w: sim(w, "--resolution", "0"), 2, "--resolution"),
    row(
        "simulate --resolution 99999992",
        lambda w: sim(w, "--resolution", "99999992"),
        2,
        "--resolution",
    ),
    row(
        "simulate --guidance-scale nan",
        lambda w: sim(w, "--guidance-scale", "nan"),
        2,
        "--guidance-scale",
    ),
    row("simulate --guidance-scale -1", lambda w: sim(w, "--guidance-scale", "-1"), 2, "--guidance-scale"),
    row("simulate --beta1 nan", lambda w: sim(w, "--beta1", "nan"), 2, "--beta1"),
    row("simulate --beta2 2", lambda w: sim(w, "--beta2", "2"), 2, "--beta2"),
    row("simulate --inference-steps 0", lambda w: sim(w, "--inference-steps", "0"), 2, "--inference-steps"),
    row(
        "simulate --inference-steps 1e20",
        lambda w: sim(w, "--inference-steps", str(10**20)),
        2,
        "--inference-steps",
    ),
    row("simulate --seed -1", lambda w: sim(w, "--seed", "-1"), 2, "--seed"),
    row("simulate --seed 2^64", lambda w: sim(w, "--seed", str(2**64)), 2, "--seed"),
    row("simulate --trajectories 0", lambda w: sim(w, "--trajectories", "0"), 2, "--trajectories"),
    row("simulate --trajectories 65", lambda w: sim(w, "--trajectories", "65"), 2, "--trajectories"),
    row(
        "simulate --strength-schedule abc",
        lambda w: sim(w, "--strength-schedule", "abc"),
        2,
        "--strength-schedule",
    ),
    row(
        "simulate --strength-schedule nan:1",
        lambda w: sim(w, "--steps", "2", "--strength-schedule", "nan:1"),
        2,
        "--strength-schedule",
    ),
    row(
        "simulate --guidance-schedule nan",
        lambda w: sim(w, "--guidance-schedule", "nan"),
        2,
        "--guidance-schedule",
    ),
    row(
        "simulate --prompt-schedule missing",
        lambda w: sim(w, "--prompt-schedule", w.tmp / "missing.txt"),
        2,
        "missing.txt",
    ),
    row("simulate --prompt empty", lambda w: sim(w, "--prompt", "  "), 2, "--prompt"),
    # ---- simulate: enums, model, output
    row("simulate --device tpu", lambda w: sim(w, "--device", "tpu"), 2, "--device"),
    row("simulate --dtype fp8", lambda w: sim(w, "--dtype", "fp8"), 2, "--dtype"),
    row("simulate --scheduler foo", lambda w: sim(w, "--scheduler", "foo"), 2, "--scheduler"),
    row("simulate --model missing dir", lambda w: sim(w, "--model", w.tmp / "nowhere"), 2, "nowhere"),
    row("simulate --model a text file", lambda w: sim(w, "--model", w.text), 2, "text.png"),
    row("simulate --lora missing", lambda w: sim(w, "--lora", w.tmp / "lora"), 2, "--lora"),
    row("simulate --unet missing", lambda w: sim(w, "--unet", w.tmp / "unet"), 2, "--unet"),
    row("simulate --out is a file", lambda w: sim(w, "--out", w.text), 2, ("--out", "text.png")),
    row("simulate --out not empty", lambda w: sim(w, "--out", w.run), 2, ("--out", "run")),
    row(
        "simulate --out unwritable",
        lambda w: sim(w, "--out", w.readonly / "run"),
        2,
        ("--out", "readonly"),
        setup=deny_writes,
    ),
    row(
        "simulate disk full",
        lambda w: sim(w),
        1,
        lambda w: ("no space left", str(w.out)),
        setup=disk_full,
    ),
    # ---- pie mask (make)
    *[
        row(f"mask image {kind}", lambda w, k=kind: mask(w, image=getattr(w, k)), 2, name)
        for kind, name in FILES.items()
    ],
    row("mask image 1x1", lambda w: mask(w, image=w.one_pixel), 2, "one-pixel.png"),
    *[
        row(f"mask --from {kind}", lambda w, k=kind: mask(w, "--from", getattr(w, k)), 2, name)
        for kind, name in FILES.items()
    ],
    row(
        "mask --from all black, nothing else",
        lambda w: ["mask", w.image, "--out", w.tmp / "m.png", "--from", w.black, "-r", "64"],
        2,
        "chest.png",
    ),
    row("mask --from colour", lambda w: mask(w, "--from", w.colour), 2, "colour.png"),
    row("mask --resolution 63", lambda w: mask(w, "-r", "63"), 2, "--resolution"),
    row("mask --resolution 0", lambda w: mask(w, "-r", "0"), 2, "--resolution"),
    row("mask --resolution 99999992", lambda w: mask(w, "-r", "99999992"), 2, "--resolution"),
    row("mask --resolution abc", lambda w: mask(w, "-r", "abc"), 2, "--resolution"),
    row("mask --dilate -1", lambda w: mask(w, "--dilate", "-1"), 2, "--dilate"),
    row("mask --feather -1", lambda w: mask(w, "--feather", "-1"), 2, "--feather"),
    row("mask --level nan", lambda w: mask(w, "--level", "nan"), 2, "--level"),
    row("mask --level 0", lambda w: mask(w, "--level", "0"), 2, "--level"),
    row("mask --keep-largest 0", lambda w: mask(w, "--otsu", "--keep-largest", "0"), 2, "--keep-largest"),
    row("mask --box nan", lambda w: mask(w, "--box", "nan,0,1,1"), 2, "--box"),
    row("mask --box malformed", lambda w: mask(w, "--box", "1,2,x,4"), 2, "--box"),
    row("mask --ellipse inf", lambda w: mask(w, "--ellipse", "0.5,0.5,inf,0.1"), 2, "--ellipse"),
    row("mask --polygon short", lambda w: mask(w, "--polygon", "0,0,1,1"), 2, "--polygon"),
    row("mask --threshold 10:nan", lambda w: mask(w, "--threshold", "10:nan"), 2, "--threshold"),
    row("mask --auto foo", lambda w: mask(w, "--auto", "foo"), 2, "--auto"),
    row("mask --out .jpg", lambda w: mask(w, "--out", w.tmp / "m.jpg"), 2, ("--out", "m.jpg")),
    row("mask --out exists", lambda w: mask(w, "--out", w.mask), 2, ("--out", "left-lung.png")),
    row(
        "mask --out is a directory",
        lambda w: mask(w, "--out", (w.tmp / "dir.png").mkdir() or w.tmp / "dir.png", "--overwrite"),
        2,
        ("--out", "dir.png"),
    ),
    row(
        "mask --preview same as --out",
        lambda w: mask(w, "--preview", w.tmp / "m.png"),
        2,
        "--preview",
    ),
    row(
        "mask --out unwritable",
        lambda w: mask(w, "--out", w.readonly / "m.png"),
        2,
        ("--out", "readonly"),
        setup=deny_writes,
    ),
    row(
        "mask disk full",
        lambda w: mask(w, "--preview", w.tmp / "p.png"),
        1,
        ("no space left", "m.png"),
        setup=disk_full,
    ),
    row(
        "mask rename denied",
        lambda w: mask(w, "--preview", w.tmp / "p.png"),
        1,
        ("permission denied", "m.png"),
        setup=rename_denied,
    ),
    row(
        "mask name with :abc:",
        lambda w: mask(w, image=w.tmp / "x:abc:y.png"),
        2,
        "x:abc:y.png",
    ),
    # ---- pie mask info
    *[
        row(f"mask info {kind}", lambda w, k=kind: ["mask", "info", getattr(w, k)], 2, name)
        for kind, name in FILES.items()
    ],
    row("mask info --image text", lambda w: ["mask", "info", w.mask, "--image", w.text], 2, "text.png"),
    row("mask info --resolution 63", lambda w: ["mask", "info", w.mask, "-r", "63"], 2, "--resolution"),
    # ---- export-gif
    *[
        row(f"export-gif frame {kind}", lambda w, k=kind: gif(w, frames=(w.image, getattr(w, k))), 2, name)
        for kind, name in FILES.items()
    ],
    row(
        "export-gif frames of two sizes",
        lambda w: gif(w, frames=(w.image, w.wide)),
        2,
        "wide.png",
    ),
    row(
        "export-gif --mask-outline, mask of another size",
        lambda w: gif(w, "--mask-outline", frames=(_run(w.tmp / "r", w.image, w.wide),)),
        2,
        "mask.png",
    ),
    row("export-gif --duration-ms 0", lambda w: gif(w, "--duration-ms", "0"), 2, "--duration-ms"),
    row("export-gif --duration-ms 1e12", lambda w: gif(w, "--duration-ms", str(10**12)), 2, "--duration-ms"),
    row(
        "export-gif --duration-ms abc",
        lambda w: gif(w, "--duration-ms", "abc"),
        2,
        "--duration-ms",
    ),
    row("export-gif --hold-last-ms -1", lambda w: gif(w, "--hold-last-ms", "-1"), 2, "--hold-last-ms"),
    row("export-gif --loop -1", lambda w: gif(w, "--loop", "-1"), 2, "--loop"),
    row("export-gif --loop 70000", lambda w: gif(w, "--loop", "70000"), 2, "--loop"),
    row("export-gif --every 0", lambda w: gif(w, "--every", "0"), 2, "--every"),
    row("export-gif --resize 0", lambda w: gif(w, "--resize", "0"), 2, "--resize"),
    row("export-gif --resize 1e8", lambda w: gif(w, "--resize", str(10**8)), 2, "--resize"),
    row(
        "export-gif --columns 0", lambda w: gif(w, "--out", w.tmp / "a.png", "--columns", "0"), 2, "--columns"
    ),
    row("export-gif --caption {i.x}", lambda w: gif(w, "--caption", "{i.x}"), 2, "--caption"),
    row("export-gif --caption {i:99999999}", lambda w: gif(w, "--caption", "{i:99999999}"), 2, "--caption"),
    row("export-gif --fps 0 (no such option)", lambda w: gif(w, "--fps", "0"), 2, "--fps"),
    row("export-gif --out .bmp", lambda w: gif(w, "--out", w.tmp / "a.bmp"), 2, ("--out", "a.bmp")),
    row("export-gif --out exists", lambda w: gif(w, "--out", touch(w.tmp / "b.gif")), 2, ("--out", "b.gif")),
    row(
        "export-gif --out unwritable",
        lambda w: gif(w, "--out", w.readonly / "a.gif"),
        2,
        ("--out", "readonly"),
        setup=deny_writes,
    ),
    row("export-gif disk full", lambda w: gif(w), 1, ("no space left", "a.gif"), setup=disk_full),
    row(
        "export-gif disk full (.webp)",
        lambda w: gif(w, "--out", w.tmp / "a.webp"),
        1,
        ("no space left", "a.webp"),
        setup=disk_full,
    ),
    row(
        "export-gif rename denied",
        lambda w: gif(w),
        1,
        ("permission denied", "a.gif"),
        setup=rename_denied,
    ),
    # ---- evaluate
    row("evaluate RUN_DIR missing", lambda w: ["evaluate", w.tmp / "nope"], 2, "nope"),
    row("evaluate RUN_DIR is a file", lambda w: ["evaluate", w.text], 2, "text.png"),
    *[
        row(
            f"evaluate frame {kind}",
            lambda w, k=kind: ["evaluate", _run(w.tmp / "r", w.image, w.mask, frame_001=getattr(w, k))],
            2,
            "frame_001.png",
        )
        for kind in ("empty", "truncated", "text")
    ],
    row(
        "evaluate mask.png truncated",
        lambda w: ["evaluate", _run(w.tmp / "r", w.image, w.truncated)],
        2,
        "mask.png",
    ),
    row(
        "evaluate mask.png of another size",
        lambda w: ["evaluate", _run(w.tmp / "r", w.image, w.wide)],
        2,
        "mask.png",
    ),
    row(
        "evaluate mask.png all black",
        lambda w: ["evaluate", _run(w.tmp / "r", w.image, w.black)],
        2,
        "mask.png",
    ),
    row(
        "evaluate manifest not JSON",
        lambda w: ["evaluate", _run(w.tmp / "r", w.image, w.mask, **{"manifest.json": "{oops"})],
        2,
        "manifest.json",
    ),
    row(
        "evaluate manifest a list",
        lambda w: ["evaluate", _run(w.tmp / "r", w.image, w.mask, **{"manifest.json": "[1, 2]"})],
        2,
        "manifest.json",
    ),
    row("evaluate --clip missing", lambda w: ["evaluate", w.run, "--clip", w.tmp / "clip"], 2, "--clip"),
    row(
        "evaluate --classifier text file",
        lambda w: ["evaluate", w.run, "--classifier", w.tmp / "nope.pt"],
        2,
        "--classifier",
    ),
    row("evaluate RUN_DIR unwritable", lambda w: ["evaluate", w.readonly], 2, "readonly", setup=readonly_run),
    row(
        "evaluate disk full",
        lambda w: ["evaluate", w.run],
        1,
        ("no space left", "metrics.json"),
        setup=disk_full,
    ),
    # ---- finetune
    row("finetune --method foo", lambda w: ft(w, "--method", "foo"), 2, "--method"),
    row("finetune --resolution 63", lambda w: ft(w, "--resolution", "63"), 2, "--resolution"),
    row("finetune --rank 0", lambda w: ft(w, "--rank", "0"), 2, "--rank"),
    row("finetune --rank abc", lambda w: ft(w, "--rank", "abc"), 2, "--rank"),
    row("finetune --lr nan", lambda w: ft(w, "--lr", "nan"), 2, "--lr"),
    row("finetune --lr inf", lambda w: ft(w, "--lr", "inf"), 2, "--lr"),
    row("finetune --seed -1", lambda w: ft(w, "--seed", "-1"), 2, "--seed"),
    row(
        "finetune --mixed-precision fp8", lambda w: ft(w, "--mixed-precision", "fp8"), 2, "--mixed-precision"
    ),
    row("finetune --data missing", lambda w: ft(w, "--data", w.tmp / "nope"), 2, "--data"),
    row(
        "finetune --data with a truncated image",
        lambda w: ft(w, "--data", shutil.copy(w.truncated, w.data / "1.png") and w.data),
        2,
        "1.png",
    ),
    row("finetune --config text", lambda w: ft(w, "--config", w.text), 2, "text.png"),
    row(
        "finetune --validation-image text",
        lambda w: ft(w, "--validation-image", w.text, "--validation-mask", w.mask),
        2,
        "text.png",
    ),
    row(
        "finetune --validation-mask all black",
        lambda w: ft(w, "--validation-image", w.image, "--validation-mask", w.black),
        2,
        "black.png",
    ),
    row(
        "finetune --validation-mask of another size",
        lambda w: ft(w, "--validation-image", w.image, "--validation-mask", w.wide),
        2,
        "wide.png",
    ),
    row("finetune --out is a file", lambda w: ft(w, "--out", w.text), 2, ("--out", "text.png")),
    row(
        "finetune --out unwritable",
        lambda w: ft(w, "--out", w.readonly / "ft"),
        2,
        ("--out", "readonly"),
        setup=deny_writes,
    ),
    row(
        "finetune disk full",
        lambda w: ft(w),
        1,
        ("no space left", "ft"),
        setup=disk_full,
    ),
    # ---- demo
    row("demo data -n 0", lambda w: ["demo", "data", "--out", w.out, "-n", "0"], 2, "-n"),
    row(
        "demo data --size 7",
        lambda w: ["demo", "data", "--out", w.out, "-n", "1", "--size", "7"],
        2,
        "--size",
    ),
    row(
        "demo data --size 99999992",
        lambda w: ["demo", "data", "--out", w.out, "-n", "1", "--size", "99999992"],
        2,
        "--size",
    ),
    row(
        "demo data --seed -1",
        lambda w: ["demo", "data", "--out", w.out, "-n", "1", "--seed", "-1"],
        2,
        "--seed",
    ),
    row(
        "demo data --findings foo",
        lambda w: ["demo", "data", "--out", w.out, "-n", "1", "--findings", "foo"],
        2,
        "--findings",
    ),
    row("demo data --out is a file", lambda w: ["demo", "data", "--out", w.text, "-n", "1"], 2, "--out"),
    row(
        "demo data --out unwritable",
        lambda w: ["demo", "data", "--out", w.readonly / "d", "-n", "1"],
        2,
        ("--out", "readonly"),
        setup=deny_writes,
    ),
    row(
        "demo data disk full",
        lambda w: ["demo", "data", "--out", w.out, "-n", "1"],
        1,
        lambda w: ("no space left", str(w.out)),
        setup=disk_full,
    ),
    row("demo case --seed -1", lambda w: ["demo", "case", "--out", w.out, "--seed", "-1"], 2, "--seed"),
    row("demo case --size 0", lambda w: ["demo", "case", "--out", w.out, "--size", "0"], 2, "--size"),
    row(
        "demo case disk full",
        lambda w: ["demo", "case", "--out", w.out],
        1,
        lambda w: ("no space left", str(w.out)),
        setup=disk_full,
    ),
    # ---- models
    row("models add bad alias", lambda w: ["models", "add", "bad name", w.model], 2, "bad name"),
    row("models add missing target", lambda w: ["models", "add", "x", w.tmp / "nope"], 2, "nope"),
    row("models add text file", lambda w: ["models", "add", "x", w.text], 2, "text.png"),
    row(
        "models add --weight nan", lambda w: ["models", "add", "x", w.model, "--weight", "nan"], 2, "--weight"
    ),
    row(
        "models add --weight abc",
        lambda w: ["models", "add", "x", w.model, "--weight", "abc"],
        2,
        "--weight",
    ),
    row(
        "models add disk full",
        lambda w: ["models", "add", "x", w.model],
        1,
        ("no space left", "models.json"),
        setup=disk_full,
    ),
    row("models remove unknown", lambda w: ["models", "remove", "nope"], 2, "nope"),
    row("models info unknown", lambda w: ["models", "info", "nope"], 2, "nope"),
    row("models info text file", lambda w: ["models", "info", w.text], 2, "text.png"),
    row("models pull unknown", lambda w: ["models", "pull", "nope"], 2, "nope"),
    # ---- doctor
    row(
        "doctor --self-test --device tpu",
        lambda w: ["doctor", "--self-test", "--device", "tpu"],
        2,
        "--device",
    ),
]


# --------------------------------------------------------------------------- checks


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and directory under ``roots``, with a digest of each file's bytes."""
    seen = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.name == "models.json.lock":
                continue  # the registry's lock file (filelock keeps it on purpose)
            seen[str(path)] = "dir" if path.is_dir() else hashlib.sha1(path.read_bytes()).hexdigest()
    return seen


def error_line(stderr: str) -> str:
    """The one "Error: ..." line of ``stderr``."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("Error: "), stderr
    return lines[0]


def check_clean_failure(result, code: int) -> str:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert "internal error" not in result.stderr, result.stderr
    assert result.exit_code == code, f"exit {result.exit_code}, expected {code}:\n{output}"
    assert result.stdout == "", result.stdout
    return error_line(result.stderr)


@pytest.mark.parametrize("case", TABLE)
def test_bad_input(case: Row, cli, w):
    home = Path(os.environ["PIE_HOME"])
    with pytest.MonkeyPatch.context() as faults:
        if case.setup is not None:
            case.setup(w, faults)
        argv = case.argv(w)
        before = snapshot(w.tmp, home)
        result = cli(*argv)
    line = check_clean_failure(result, case.code)
    for culprit in case.culprits(w):
        assert str(culprit) in line, f"{culprit!r} not named in {line!r}"
    assert snapshot(w.tmp, home) == before, "files were created, changed or removed"


def _raise(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc

    return fail


def _torch_oom() -> BaseException:
    import torch

    return torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 8 GiB"
    )


@pytest.mark.parametrize(
    ("argv", "target", "error", "advice"),
    [
        pytest.param(
            lambda w: sim(w),
            "pie_cli.core.progression.progress_batch",
            _torch_oom,
            "out of memory (tried to allocate 20.00 MiB); try a smaller --resolution or --trajectories, "
            "or --dtype fp16 on a GPU.",
            id="simulate, torch",
        ),
        pytest.param(
            lambda w: mask(w),
            "pie_cli.imaging.mask_regions.build_mask",
            lambda: MemoryError(
                "Unable to allocate 1.00 TiB for an array with shape (2, 2) and data type float64"
            ),
            "out of memory (tried to allocate 1.00 TiB); try a smaller --resolution.",
            id="mask, numpy",
        ),
        pytest.param(
            lambda w: gif(w),
            "pie_cli.imaging.animation.compose",
            MemoryError,
            "out of memory; try a smaller --resize.",
            id="export-gif, bare MemoryError",
        ),
    ],
)
def test_out_of_memory_is_one_sentence_with_advice(cli, w, monkeypatch, argv, target, error, advice):
    """Exit 1, the advice fits the command; a simulate run may leave its 'failed' manifest (by design)."""
    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(f"{module}.{name}", _raise(error()))
    line = check_clean_failure(cli(*argv(w)), 1)
    assert line == f"Error: {advice}"


def test_debug_shows_the_environment_fault_with_its_traceback(cli, w, monkeypatch):
    disk_full(w, monkeypatch)
    result = cli("--debug", *mask(w))
    assert result.exit_code != 0 and isinstance(result.exception, OSError)
    assert result.exception.errno == errno.ENOSPC
    assert not (w.tmp / "m.png").exists()


# --------------------------------------------------------------------------- random input

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI failures reproduce
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
JUNK = st.text(max_size=12)
FLOATS = st.floats(allow_nan=True, allow_infinity=True).map(repr)
HUGE = st.integers(min_value=-(10**20), max_value=10**20).map(str)
ANYTHING = HUGE | FLOATS | JUNK | st.integers(min_value=-3, max_value=3).map(str)
NOT_POSITIVE = st.integers(min_value=-(10**20), max_value=0).map(str) | FLOATS | JUNK


def ints(low: int, high: int) -> st.SearchStrategy[str]:
    return st.integers(min_value=low, max_value=high).map(str)


def floats(low: float, high: float) -> st.SearchStrategy[str]:
    return st.floats(min_value=low, max_value=high).map(repr)


def draw_options(data, table: dict[str, tuple]) -> list[str]:
    """``--name=value`` for every option: valid values, except for up to two drawn from their bad strategy.

    Mostly-valid command lines reach the checks of each value (and sometimes a successful run),
    rather than stopping at the first unparsable number.
    """
    count = data.draw(st.sampled_from([0, 1, 1, 2]), label="how many spoiled")
    spoiled = data.draw(
        st.sets(st.sampled_from(sorted(table)), min_size=count, max_size=count), label="spoiled"
    )
    return [
        f"{name}={data.draw(bad if name in spoiled else good, label=name)}"
        for name, (good, bad) in table.items()
    ]


def _png(size=(64, 64), mode="L") -> bytes:
    """A valid image's bytes (a grey gradient with a bright square), built without any fixture."""
    import io

    w, h = size
    arr = (np.add.outer(np.arange(h), np.arange(w)) * (255 / max(1, w + h - 2))).astype(np.uint8)
    arr[h // 4 : h // 2, w // 4 : w // 2] = 255
    buffer = io.BytesIO()
    Image.fromarray(arr, mode="L").convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD_PNG = _png()


def draw_image(data, good: bytes, label: str) -> bytes:
    """The image itself (half the time), random bytes, the image truncated, or with a few bytes changed."""
    kind = data.draw(st.sampled_from(["good", "good", "good", "random", "truncated", "changed"]), label=label)
    if kind == "random":
        return data.draw(st.binary(max_size=300))
    if kind == "truncated":
        return good[: data.draw(st.integers(min_value=0, max_value=len(good) - 1))]
    if kind == "changed":
        changed = bytearray(good)
        for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
            changed[data.draw(st.integers(min_value=0, max_value=len(good) - 1))] = data.draw(
                st.integers(min_value=0, max_value=255)
            )
        return bytes(changed)
    return good


def check_contract(result, where: Path, before: dict[str, str], argv: list) -> None:
    output = result.stdout + result.stderr
    assert result.exit_code in (0, 1, 2), output
    assert "Traceback" not in output, output
    assert "internal error" not in result.stderr, result.stderr
    if result.exit_code == 0:
        return
    line = error_line(result.stderr)
    if result.exit_code == 2:
        named = [a.split("=")[0] for a in map(str, argv) if a.startswith("-")] + [
            Path(a).name for a in map(str, argv) if "/" in a
        ]
        assert any(n and n in line for n in named), f"{line!r} names none of {named}"
        assert snapshot(where) == before, "a refused command changed files"


# Large valid --steps / --inference-steps / --resolution would only be slow, so the draws keep
# valid values small; the table has rows for the out-of-range giants.
SIMULATE_OPTIONS = {
    "--steps": (ints(1, 2), NOT_POSITIVE),
    "--strength": (floats(0.5, 1.0), ANYTHING),
    "--guidance-scale": (floats(0.0, 10.0), ANYTHING),
    "--beta1": (floats(0.0, 1.0), ANYTHING),
    "--beta2": (floats(0.0, 1.0), ANYTHING),
    "--inference-steps": (ints(2, 4).map(lambda s: str(int(s) * 2)), NOT_POSITIVE),
    "--seed": (ints(0, 2**63 - 1), ANYTHING),
    "--resolution": (st.sampled_from(["64", "8"]), st.sampled_from(["63", "0", "-8", "12"]) | FLOATS | JUNK),
    "--trajectories": (ints(1, 2), ANYTHING),
    "--device": (st.just("cpu"), JUNK),
}


@FUZZ
@given(data=st.data())
def test_simulate_random_options_and_image_bytes(cli, tiny_model, tmp_path_factory, data):
    where = tmp_path_factory.mktemp("simulate")
    image = where / "image.png"
    image.write_bytes(draw_image(data, GOOD_PNG, "image"))
    argv = [
        "simulate",
        image,
        "--prompt",
        "large left pleural effusion",
        "--model",
        tiny_model,
        "--out",
        where / "out",
        "--no-gif",
        *draw_options(data, SIMULATE_OPTIONS),
    ]
    before = snapshot(where)
    check_contract(cli(*argv), where, before, argv)


MASK_OPTIONS = {
    "--resolution": (st.sampled_from(["64", "32"]), ANYTHING),
    "--dilate": (ints(0, 3), ANYTHING),
    "--erode": (ints(0, 2), ANYTHING),
    "--feather": (ints(0, 3), ANYTHING),
    "--level": (floats(0.1, 1.0), ANYTHING),
    "--box": (st.just("0.1,0.1,0.7,0.7"), st.lists(FLOATS | JUNK, max_size=5).map(",".join)),
    "--ellipse": (st.just("30,30,10,12"), st.lists(FLOATS | JUNK, max_size=5).map(",".join)),
    "--threshold": (st.just("200:255"), JUNK | st.tuples(FLOATS, FLOATS).map(":".join)),
    "--keep-largest": (ints(1, 3), ANYTHING),
}


@FUZZ
@given(data=st.data())
def test_mask_random_options_and_image_bytes(cli, tmp_path_factory, data):
    where = tmp_path_factory.mktemp("mask")
    (where / "image.png").write_bytes(draw_image(data, GOOD_PNG, "image"))
    (where / "from.png").write_bytes(draw_image(data, _png((32, 32)), "--from"))
    argv = [
        "mask",
        where / "image.png",
        "--out",
        where / "m.png",
        "--preview",
        where / "p.png",
        "--from",
        where / "from.png",
        *draw_options(data, MASK_OPTIONS),
    ]
    before = snapshot(where)
    check_contract(cli(*argv), where, before, argv)


EXPORT_OPTIONS = {
    "--duration-ms": (ints(1, 1000), ANYTHING),
    "--hold-last-ms": (ints(0, 2000), ANYTHING),
    "--loop": (ints(0, 5), ANYTHING),
    "--every": (ints(1, 3), ANYTHING),
    "--resize": (ints(8, 96), NOT_POSITIVE | st.integers(min_value=16_385, max_value=10**20).map(str)),
    "--columns": (ints(1, 3), ANYTHING),
    "--caption": (st.sampled_from(["step {i}/{n}", "{name}", "x"]), JUNK),
}


@FUZZ
@given(data=st.data())
def test_export_gif_random_options_and_frame_bytes(cli, tmp_path_factory, data):
    where = tmp_path_factory.mktemp("export")
    (where / "frame_000.png").write_bytes(draw_image(data, GOOD_PNG, "frame 0"))
    (where / "frame_001.png").write_bytes(draw_image(data, GOOD_PNG, "frame 1"))
    suffix = data.draw(st.sampled_from([".gif", ".png", ".webp", ".bmp", ""]), label="suffix")
    argv = [
        "export-gif",
        where / "frame_000.png",
        where / "frame_001.png",
        "--out",
        where / f"a{suffix}",
        "--diff",
        *draw_options(data, EXPORT_OPTIONS),
    ]
    before = snapshot(where)
    check_contract(cli(*argv), where, before, argv)
