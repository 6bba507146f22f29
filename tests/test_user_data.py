"""Defect class 1: pie deletes or replaces the user's files.

The rule pie must keep: **nothing of the user's is ever deleted or replaced.**

- An output that is also an input (the image, a mask, the model, a UNet or LoRA folder, the
  training data, an export's own frames, a cohort case's mask) is refused before anything runs,
  whatever ``--overwrite`` says.
- ``--overwrite`` removes or replaces only files pie can prove it wrote (a run's own manifest
  and frames as recorded there, PNGs and GIFs carrying pie's provenance, an earlier evaluation,
  an earlier demo case, an earlier training run); a user file with a name pie would write is
  refused with a sentence naming it, and every other user file is left byte for byte.
- ``--out ""`` (an unset shell variable) is refused, never read as the current directory; a
  cohort's ``out`` column never leaves ``--out``; two cases never share a folder; a complete case
  whose parameters changed is not silently skipped; and a run never writes into a folder that
  another run filled after this one checked it.

Every refusal row: exit 2, nothing on stdout, one ``Error:`` line with the row's key words, and
no file created, changed or removed anywhere under the test's tmp folder.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tests.helpers import colour_folder, finetune_argv, manifest, phantom_run, simulate_argv
from tests.refusals import assert_unchanged, check_ok, check_refused, snapshot

BOX = "0.1,0.1,0.6,0.6"


# --------------------------------------------------------------------------- the world of a row


@dataclass
class World:
    tmp: Path
    image: Path  # tmp/chest.png, the 64 x 64 phantom
    mask: Path  # tmp/left-lung.png
    tiny: Path  # the session's tiny model: never an output, rows copy it when they need to
    lora: Path  # the session's LoRA (copied likewise)
    unet: Path  # the session's fine-tuned UNet folder (copied likewise)
    template: Path  # a finished 2-step pie run (never written to: rows copy it)

    def copy(self, source: Path, *parts: str) -> Path:
        target = self.tmp.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(source).is_dir():
            return Path(shutil.copytree(source, target))
        return Path(shutil.copy(source, target))

    def run(self, name: str = "run") -> Path:
        """A fresh copy of a finished pie run: frame_000..002.png, mask.png, progression.gif, manifest."""
        return self.copy(self.template, name)

    def sim(self, image: Path, out: Path, *extra, model: Path | None = None, mask: Path | None = None):
        return simulate_argv(image, out, *extra, model=model or self.tiny, mask=mask)

    def data(self, *parts: str) -> Path:
        return colour_folder(self.tmp.joinpath(*parts), n=2)

    def ft(self, data: Path, model: Path, out: Path, *extra) -> list:
        return finetune_argv(data, model, out, *extra, batch_size=1, max_steps=1)


@pytest.fixture(scope="module")
def run_template(tmp_path_factory, tiny_model, phantom) -> Path:
    """A finished 2-step `pie simulate` run with a mask (built once per module)."""
    return phantom_run(tmp_path_factory.mktemp("user-data-run"), tiny_model, phantom)


@pytest.fixture
def w(tmp_path, inputs, tiny_model, tiny_lora, tiny_unet_variant, run_template) -> World:
    return World(
        tmp_path, inputs["image"], inputs["mask"], tiny_model, tiny_lora, tiny_unet_variant, run_template
    )


def user_png(path: Path, value: int = 90, size: int = 64) -> Path:
    """A PNG the user made (PIL, no pie provenance), with a pattern so it is not all one grey."""
    arr = np.full((size, size), value, dtype=np.uint8)
    arr[: size // 2, : size // 3] = 255 - value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="L").save(path)
    return path


def user_gif(path: Path) -> Path:
    frames = [Image.new("L", (32, 32), v) for v in (0, 128, 255)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def edit_png(path: Path, keep_metadata: bool = False) -> Path:
    """Change some pixels of a PNG and save it with PIL, as an image editor would.

    ``keep_metadata``: the text chunks (pie's provenance) are copied over, as many editors do;
    then only the pixels say the file is no longer what pie wrote.
    """
    with Image.open(path) as img:
        img.load()
        text = dict(getattr(img, "text", {}))
        arr = np.array(img)
        mode = img.mode
    arr[:4, :4] = 255 - arr[:4, :4]
    info = PngInfo()
    if keep_metadata:
        for key, value in text.items():
            info.add_text(key, value)
    Image.fromarray(arr, mode=mode).save(path, pnginfo=info)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def cohort_argv(w: World, csv_path: Path, out: Path, *extra) -> list:
    return simulate_argv(None, out, "--cohort", csv_path, *extra, model=w.tiny, prompt=None)


# =========================================================================== A. an output that is an input


@dataclass(frozen=True)
class Clash:
    argv: Callable[[World], list]  # builds the row's files under w.tmp, returns the command line
    keywords: Callable[[World], tuple]


def clash(id, argv, keywords):
    words = keywords if callable(keywords) else (lambda w, k=keywords: k)
    return pytest.param(Clash(argv, words), id=id)


def _model_inside_out(w: World) -> list:
    model = w.copy(w.tiny, "P", "model")
    return w.sim(w.image, model.parent, "--overwrite", model=model, mask=w.mask)


def _study(w: World) -> list:
    image = w.copy(w.image, "study", "chest.png")
    mask = w.copy(w.mask, "study", "mask.png")
    return w.sim(image, image.parent, "--overwrite", mask=mask)


def _frame_as_image(w: World) -> list:
    run = w.run()
    return w.sim(run / "frame_000.png", run, "--overwrite", mask=w.mask)


def _table_inside_out(w: World) -> list:
    images = w.data("P", "images")
    rows = [{"image": f"images/{i}.png", "text": "a red square"} for i in range(2)]
    table = write_csv(images.parent / "table.csv", rows)
    return w.ft(table, w.tiny, images.parent, "--overwrite")


def _cohort_mask_in_case(w: World, *extra) -> list:
    out = w.tmp / "out"
    user_mask = w.copy(w.mask, "out", "chest", "mask.png")  # where case "chest" writes its mask
    table = write_csv(
        w.tmp / "cases.csv",
        [{"image": "chest.png", "mask": str(user_mask), "prompt": "left pleural effusion"}],
    )
    return cohort_argv(w, table, out, *extra)


CLASHES = [
    clash(
        "mask --out IMAGE",
        lambda w: ["mask", w.image, "--out", w.image, "--box", BOX, "-r", "64"],
        lambda w: ("--out", str(w.image)),
    ),
    clash(
        "mask --out IMAGE --overwrite",
        lambda w: ["mask", w.image, "--out", w.image, "--box", BOX, "-r", "64", "--overwrite"],
        lambda w: ("--out", str(w.image)),
    ),
    clash(
        "mask --preview IMAGE",
        lambda w: ["mask", w.image, "--out", w.tmp / "m.png", "--preview", w.image, "--box", BOX, "-r", "64"],
        lambda w: ("--preview", str(w.image)),
    ),
    clash(
        "mask --preview IMAGE --overwrite",
        lambda w: [
            "mask",
            w.image,
            "--out",
            w.tmp / "m.png",
            "--preview",
            w.image,
            "--box",
            BOX,
            "-r",
            "64",
            "--overwrite",
        ],
        lambda w: ("--preview", str(w.image)),
    ),
    clash(
        "mask --out F --from F --overwrite",
        lambda w: [
            "mask",
            w.image,
            "--out",
            w.copy(w.mask, "F.png"),
            "--from",
            w.tmp / "F.png",
            "-r",
            "64",
            "--overwrite",
        ],
        lambda w: ("--from", str(w.tmp / "F.png")),
    ),
    clash("simulate --mask where the run writes its mask", _study, ("--mask", "mask.png")),
    clash("simulate IMAGE is OUT/frame_000.png", _frame_as_image, ("--out", "frame_000.png")),
    clash(
        "simulate --out = --model",
        lambda w: w.sim(w.image, w.copy(w.tiny, "M"), "--overwrite", model=w.tmp / "M", mask=w.mask),
        ("--model",),
    ),
    clash(
        "simulate --out inside --model",
        lambda w: w.sim(w.image, w.copy(w.tiny, "M") / "sub", "--overwrite", model=w.tmp / "M", mask=w.mask),
        ("--model",),
    ),
    clash("simulate --out contains --model", _model_inside_out, ("--model",)),
    clash(
        "simulate --out = --unet",
        lambda w: w.sim(w.image, w.copy(w.unet, "ft"), "--unet", w.tmp / "ft", "--overwrite", mask=w.mask),
        ("--unet",),
    ),
    clash(
        "simulate --out = --lora",
        lambda w: w.sim(
            w.image, w.copy(w.lora, "lora"), "--lora", w.tmp / "lora", "--overwrite", mask=w.mask
        ),
        ("--lora",),
    ),
    clash(
        "finetune --out = --model",
        lambda w: w.ft(w.data("data"), w.copy(w.tiny, "M"), w.tmp / "M", "--overwrite"),
        ("--model",),
    ),
    clash(
        "finetune --out = --data",
        lambda w: w.ft(w.data("data"), w.tiny, w.tmp / "data", "--overwrite"),
        ("--data",),
    ),
    clash(
        "finetune --out inside --data",
        lambda w: w.ft(w.data("data"), w.tiny, w.tmp / "data" / "ft", "--overwrite"),
        ("--data",),
    ),
    clash(
        "finetune --out contains --data",
        lambda w: w.ft(w.data("P", "data"), w.tiny, w.tmp / "P", "--overwrite"),
        ("--data",),
    ),
    clash("finetune --data table inside --out", _table_inside_out, ("--data",)),
    clash(
        "export-gif --out one of its frames",
        lambda w: ["export-gif", w.run(), "--out", w.tmp / "run" / "frame_001.png", "--overwrite"],
        ("--out", "frame_001.png"),
    ),
    clash("cohort mask where its case writes", _cohort_mask_in_case, ("row", "mask.png")),
    clash(
        "cohort mask where its case writes, --overwrite",
        lambda w: _cohort_mask_in_case(w, "--overwrite"),
        ("row", "mask.png"),
    ),
]


@pytest.mark.parametrize("case", CLASHES)
def test_an_output_that_is_an_input_is_refused(case: Clash, cli, w):
    argv = case.argv(w)
    before = snapshot(w.tmp)
    check_refused(cli(*argv), *case.keywords(w), before=before, roots=(w.tmp,))


# =========================================================================== B. --overwrite replaces only pie's files

# ---- B1: user files beside a run are kept


@pytest.mark.parametrize(
    "name",
    ["notes.txt", "metrics.csv", "report.png", "frame_099.png"],
)
def test_overwrite_keeps_the_users_files(name, cli, w):
    out = w.tmp / "D"
    out.mkdir()
    user = out / name
    if name.endswith(".png"):
        user_png(user)
    else:
        user.write_text("step,loss\n1,0.5\n" if name.endswith(".csv") else "my notes\n")
    before = snapshot(out)[str(user)]
    check_ok(cli(*w.sim(w.image, out, "--overwrite", mask=w.mask)))
    assert manifest(out)["status"] == "complete"
    assert user.is_file(), f"the user's {name} was removed"
    assert snapshot(out)[str(user)][1] == before[1], f"the user's {name} was changed"


# ---- B2: a user file with a name the run writes


def _users(name: str) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        path = folder / name
        if name == "manifest.json":
            path.write_text(json.dumps({"hello": 1}))
        elif name.endswith(".gif"):
            user_gif(path)
        else:
            user_png(path)

    return make


@pytest.mark.parametrize("name", ["mask.png", "progression.gif", "frame_000.png", "manifest.json"])
def test_overwrite_refuses_a_user_file_it_would_replace(name, cli, w):
    out = w.tmp / "D"
    out.mkdir()
    _users(name)(out)
    (out / "notes.txt").write_text("mine\n")
    argv = w.sim(w.image, out, "--overwrite", mask=w.mask)
    before = snapshot(w.tmp)
    check_refused(cli(*argv), name, before=before, roots=(w.tmp,))


# ---- B3: --overwrite over an earlier pie run


def test_overwrite_replaces_an_earlier_runs_files_and_keeps_the_users(cli, w):
    run = w.run("D")
    (run / "notes.txt").write_text("added by the user since\n")
    notes = snapshot(run)[str(run / "notes.txt")]
    check_ok(cli(*w.sim(w.image, run, "--overwrite", mask=w.mask)))  # 1 step now, 2 before
    assert manifest(run)["status"] == "complete" and manifest(run)["parameters"]["steps"] == 1
    assert sorted(p.name for p in run.glob("frame_*.png")) == ["frame_000.png", "frame_001.png"]
    assert snapshot(run)[str(run / "notes.txt")] == notes


@pytest.mark.parametrize("keep_metadata", [False, True], ids=["edited", "edited, pie's text chunks kept"])
def test_overwrite_refuses_a_run_frame_the_user_edited(keep_metadata, cli, w):
    run = w.run("D")
    edit_png(run / "frame_001.png", keep_metadata=keep_metadata)
    argv = w.sim(w.image, run, "--overwrite", mask=w.mask)
    before = snapshot(w.tmp)
    check_refused(cli(*argv), "frame_001.png", before=before, roots=(w.tmp,))


# ---- B4: pie mask --out / --preview


def _mask_argv(w: World, *extra, box: str = BOX) -> list:
    return ["mask", w.image, "--box", box, "-r", "64", *extra]


@pytest.mark.parametrize("option", ["--out", "--preview"])
def test_mask_overwrite_refuses_a_png_pie_did_not_write(option, cli, w):
    existing = user_png(w.tmp / "existing.png")
    other = ["--out", w.tmp / "m.png"] if option == "--preview" else []
    argv = _mask_argv(w, *other, option, existing, "--overwrite")
    before = snapshot(w.tmp)
    check_refused(cli(*argv), option, "not written by pie", before=before, roots=(w.tmp,))


@pytest.mark.parametrize("option", ["--out", "--preview"])
def test_mask_overwrite_replaces_its_own_earlier_png(option, cli, w):
    target = w.tmp / "existing.png"
    first = ["--out", w.tmp / "m1.png"] if option == "--preview" else []
    check_ok(cli(*_mask_argv(w, *first, option, target)))
    old = target.read_bytes()
    again = ["--out", w.tmp / "m2.png"] if option == "--preview" else []
    check_ok(cli(*_mask_argv(w, *again, option, target, "--overwrite", box="0.3,0.3,0.9,0.9")))
    assert target.read_bytes() != old, "the earlier pie file was not replaced"


@pytest.mark.parametrize("keep_metadata", [False, True], ids=["edited", "edited, pie's text chunks kept"])
@pytest.mark.parametrize("option", ["--out", "--preview"])
def test_mask_overwrite_refuses_its_own_png_edited_since(option, keep_metadata, cli, w):
    target = w.tmp / "existing.png"
    first = ["--out", w.tmp / "m1.png"] if option == "--preview" else []
    check_ok(cli(*_mask_argv(w, *first, option, target)))
    edit_png(target, keep_metadata=keep_metadata)
    again = ["--out", w.tmp / "m2.png"] if option == "--preview" else []
    argv = _mask_argv(w, *again, option, target, "--overwrite", box="0.3,0.3,0.9,0.9")
    before = snapshot(w.tmp)
    check_refused(cli(*argv), option, before=before, roots=(w.tmp,))


# ---- B5: pie export-gif --out


def test_export_gif_overwrite_refuses_a_users_gif(cli, w):
    run = w.run()
    gif = user_gif(w.tmp / "user.gif")
    before = snapshot(w.tmp)
    check_refused(
        cli("export-gif", run, "--out", gif, "--overwrite"),
        "--out",
        "user.gif",
        before=before,
        roots=(w.tmp,),
    )


def test_export_gif_overwrite_replaces_its_own_gif(cli, w):
    run = w.run()
    gif = w.tmp / "user.gif"
    check_ok(cli("export-gif", run, "--out", gif))
    old = gif.read_bytes()
    check_ok(cli("export-gif", run, "--out", gif, "--overwrite", "--duration-ms", "200"))
    assert gif.read_bytes() != old


# ---- B6: pie evaluate RUN


@pytest.mark.parametrize("name", ["metrics.csv", "report.png", "metrics.json"])
def test_evaluate_refuses_a_users_file_it_would_replace(name, cli, w):
    run = w.run()
    path = run / name
    if name.endswith(".png"):
        user_png(path)
    elif name.endswith(".json"):
        path.write_text(json.dumps({"my": "numbers"}))
    else:
        path.write_text("frame,score\n0,1\n")
    before = snapshot(w.tmp)
    check_refused(cli("evaluate", run), name, before=before, roots=(w.tmp,))


def test_evaluate_twice_replaces_its_own_files(cli, w):
    run = w.run()
    check_ok(cli("evaluate", run))
    first = snapshot(run)
    check_ok(cli("evaluate", run))
    after = snapshot(run)
    for name in ("metrics.csv", "metrics.json", "report.png"):
        assert after[str(run / name)][2] != first[str(run / name)][2], f"{name} was not rewritten"


# ---- B7: pie demo case


def test_demo_case_overwrite_refuses_a_users_chest_png(cli, w):
    out = w.tmp / "D"
    user_png(out / "chest.png")
    before = snapshot(w.tmp)
    check_refused(
        cli("demo", "case", "--out", out, "--overwrite"), "chest.png", before=before, roots=(w.tmp,)
    )


def test_demo_case_overwrite_replaces_an_earlier_demo_case(cli, w):
    out = w.tmp / "D"
    check_ok(cli("demo", "case", "--out", out))
    (out / "notes.txt").write_text("mine\n")
    check_ok(cli("demo", "case", "--out", out, "--overwrite", "--seed", "8"))
    assert (out / "notes.txt").read_text() == "mine\n"


# ---- B8: pie finetune --out


def test_finetune_overwrite_replaces_an_earlier_run_and_keeps_the_users(cli, w):
    data, out = w.data("data"), w.tmp / "D"
    check_ok(cli(*finetune_argv(data, w.tiny, out, "--checkpoint-every", "1", batch_size=1, max_steps=2)))
    assert (out / "checkpoints" / "step_000002").is_dir()
    (out / "notes.txt").write_text("mine\n")
    check_ok(cli(*w.ft(data, w.tiny, out, "--overwrite")))  # 1 step: its own final checkpoint only
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step_000001"], f"the earlier run's checkpoints were kept: {kept}"
    assert json.loads((out / "training_summary.json").read_text())["step"] == 1
    assert (out / "notes.txt").read_text() == "mine\n"


def _user_metrics(out: Path) -> None:
    (out / "metrics.csv").write_text("epoch,accuracy\n1,0.9\n")


def _user_unet(out: Path) -> None:
    (out / "unet").mkdir()
    (out / "unet" / "README.txt").write_text("my own UNet experiments\n")


@pytest.mark.parametrize(
    ("make", "name"), [(_user_metrics, "metrics.csv"), (_user_unet, "unet")], ids=["metrics.csv", "unet/"]
)
def test_finetune_overwrite_refuses_a_users_file_named_like_an_output(make, name, cli, w):
    data, out = w.data("data"), w.tmp / "D"
    out.mkdir()
    make(out)
    argv = w.ft(data, w.tiny, out, "--overwrite")
    before = snapshot(w.tmp)
    check_refused(cli(*argv), name, before=before, roots=(w.tmp,))


# =========================================================================== C. --out ""


def _empty_out(w: World, command: str) -> list:
    if command == "simulate":
        return w.sim(w.image, "", mask=w.mask)
    if command == "finetune":
        return w.ft(w.data("data"), w.tiny, "")
    if command == "mask":
        return _mask_argv(w, "--out", "")
    if command == "export-gif":
        return ["export-gif", w.run(), "--out", ""]
    if command == "demo case":
        return ["demo", "case", "--out", ""]
    return ["demo", "data", "--out", "", "-n", "1"]


@pytest.mark.parametrize("overwrite", [False, True], ids=["", "--overwrite"])
@pytest.mark.parametrize("command", ["simulate", "finetune", "mask", "export-gif", "demo case", "demo data"])
def test_an_empty_out_is_refused_never_the_current_directory(command, overwrite, cli, w, monkeypatch):
    cwd = w.tmp / "cwd"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("the user's\n")
    argv = _empty_out(w, command) + (["--overwrite"] if overwrite else [])
    monkeypatch.chdir(cwd)
    before = snapshot(w.tmp)
    check_refused(cli(*argv), "--out", before=before, roots=(w.tmp,))


# =========================================================================== D-F. cohorts


@pytest.mark.parametrize("where", ["../x", "/abs/x", "a/../../x"])
def test_a_cohort_out_column_never_leaves_out(where, cli, w):
    if where.startswith("/abs"):
        where = str(w.tmp / "abs" / "x")  # an absolute path, still inside the test's folder
    table = write_csv(
        w.tmp / "cases.csv",
        [{"image": "chest.png", "mask": "left-lung.png", "prompt": "left pleural effusion", "out": where}],
    )
    argv = cohort_argv(w, table, w.tmp / "cohort" / "out")
    before = snapshot(w.tmp)
    check_refused(cli(*argv), "row", "out", before=before, roots=(w.tmp,))


def test_two_cohort_images_with_one_stem_get_two_folders(cli, w):
    from pie_cli.runs.manifest import file_sha256

    a = w.copy(w.image, "a", "chest.png")
    b = w.tmp / "b" / "chest.png"
    b.parent.mkdir()
    Image.open(w.image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(b)
    table = write_csv(
        w.tmp / "cases.csv",
        [{"image": "a/chest.png", "prompt": "effusion"}, {"image": "b/chest.png", "prompt": "effusion"}],
    )
    out = w.tmp / "out"
    check_ok(cli(*cohort_argv(w, table, out)))
    for name, image in (("chest", a), ("chest-2", b)):
        m = manifest(out / name)
        assert m["status"] == "complete", name
        assert m["inputs"]["image_sha256"] == file_sha256(image), f"{name} holds the other row's case"


def _strength_cohort(w: World, strength: str) -> Path:
    return write_csv(
        w.tmp / "cases.csv",
        [
            {
                "image": "chest.png",
                "mask": "left-lung.png",
                "prompt": "left pleural effusion",
                "out": "case-a",
                "strength": strength,
            }
        ],
    )


def test_a_complete_case_whose_parameters_changed_is_not_skipped(cli, w):
    out = w.tmp / "out"
    check_ok(cli(*cohort_argv(w, _strength_cohort(w, "0.5"), out)))
    argv = cohort_argv(w, _strength_cohort(w, "0.6"), out)
    before = snapshot(w.tmp)
    check_refused(cli(*argv), "case-a", before=before, roots=(w.tmp,))


def test_a_changed_complete_case_is_rerun_with_overwrite(cli, w):
    out = w.tmp / "out"
    check_ok(cli(*cohort_argv(w, _strength_cohort(w, "0.5"), out)))
    check_ok(cli(*cohort_argv(w, _strength_cohort(w, "0.6"), out, "--overwrite")))
    assert manifest(out / "case-a")["parameters"]["strength"] == 0.6


def test_an_unchanged_complete_case_is_still_skipped(cli, w):
    out = w.tmp / "out"
    check_ok(cli(*cohort_argv(w, _strength_cohort(w, "0.5"), out)))
    case = snapshot(out / "case-a")
    result = check_ok(cli(*cohort_argv(w, _strength_cohort(w, "0.5"), out)))
    assert "1 skipped" in result.stderr
    assert_unchanged(case, out / "case-a")


# =========================================================================== G. the lock race


def test_a_run_never_writes_into_a_run_that_finished_after_its_checks(cli, w, monkeypatch):
    """The outer run checks --out (empty), then, while it loads its model, another run fills --out
    and finishes. The outer run must then refuse (the folder is no longer empty), not write into it."""
    from dataclasses import replace

    import pie_cli.simulate.run as run_module
    from pie_cli.core.parameters import DEFAULTS
    from pie_cli.simulate.spec import SimulateSpec

    out = w.tmp / "out"
    real_load = run_module.load_model
    first: dict = {}

    def load_model_while_another_run_finishes(spec, inputs, reporter):
        if not first:
            first["running"] = True
            other = SimulateSpec(
                image=w.image,
                prompt="left pleural effusion",
                mask=w.mask,
                model=str(w.tiny),
                out=out,
                params=replace(DEFAULTS, steps=1, inference_steps=4, resolution=64),
                seed=7,  # another run than the outer one: its files differ
                device="cpu",
            )
            run_module.run(other)
            first["files"] = snapshot(w.tmp)
        return real_load(spec, inputs, reporter)

    monkeypatch.setattr(run_module, "load_model", load_model_while_another_run_finishes)
    result = cli(*w.sim(w.image, out, mask=w.mask))
    assert "files" in first, "the other run did not happen (load_model was not called)"
    assert manifest(out)["status"] == "complete"
    check_refused(result, "--out", "not empty", before=first["files"], roots=(w.tmp,))
