"""More of issue 12's four kinds, beyond the first tables: inputs that would be read wrongly or
trusted blindly, each refused with one sentence (or handled), nothing written.

- an image of several pages or frames, an image with transparent pixels;
- a recipe whose YAML aliases would expand without bound;
- an unreadable `.pie.lock` left behind (taken over once it is old) and a Hugging Face cache
  ref that points outside its snapshots;
- a training checkpoint whose marker or files are damaged;
- a trajectory folder that is a symbolic link into someone else's folder.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import colour_folder, finetune_argv, manifest, simulate_argv
from tests.refusals import check_ok, check_refused, snapshot


def _simulate(cli, image: Path, out: Path, tiny_model, *extra):
    return cli(*simulate_argv(image, out, *extra, model=tiny_model))


def test_an_image_of_several_pages_is_refused(cli, tiny_model, phantom, tmp_path):
    pages = tmp_path / "stack.tif"
    phantom[0].save(pages, save_all=True, append_images=[phantom[0].rotate(90)])
    before = snapshot(tmp_path)
    check_refused(
        _simulate(cli, pages, tmp_path / "run", tiny_model),
        "stack.tif",
        "2 images",
        before=before,
        roots=(tmp_path,),
    )
    check_refused(
        cli("mask", pages, "--out", tmp_path / "m.png", "--box", "0,0,9,9"),
        "2 images",
        before=before,
        roots=(tmp_path,),
    )


@pytest.mark.parametrize("alpha", [0, 128], ids=["transparent", "half-transparent"])
def test_an_image_with_transparent_pixels_is_refused_an_opaque_one_works(
    cli, tiny_model, phantom, tmp_path, alpha
):
    rgba = np.dstack([np.asarray(phantom[0].convert("RGB")), np.full((64, 64), 255, np.uint8)])
    opaque = tmp_path / "opaque.png"
    Image.fromarray(rgba, "RGBA").save(opaque)
    rgba[:8, :8, 3] = alpha
    holes = tmp_path / "holes.png"
    Image.fromarray(rgba, "RGBA").save(holes)
    before = snapshot(tmp_path)
    check_refused(
        _simulate(cli, holes, tmp_path / "run", tiny_model),
        "holes.png",
        "transparent",
        before=before,
        roots=(tmp_path,),
    )
    check_ok(_simulate(cli, opaque, tmp_path / "run2", tiny_model))


def test_yaml_aliases_in_a_recipe_are_refused(cli, tiny_model, tmp_path):
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefg", "bcdefgh", strict=True)
    )
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(laughs + "rank: *h\n")
    data = colour_folder(tmp_path / "data")
    before = snapshot(tmp_path)
    result = cli(*finetune_argv(data, tiny_model, tmp_path / "run", "--config", recipe, max_steps=1))
    check_refused(result, "bomb.yaml", "aliases", before=before, roots=(tmp_path,))


def test_an_unreadable_lock_is_taken_over_once_it_is_old(cli, tiny_model, phantom, tmp_path):
    image = tmp_path / "chest.png"
    phantom[0].save(image)
    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".pie.lock"
    lock.write_bytes(b"\x00garbage")
    old = time.time() - 60
    os.utime(lock, (old, old))
    result = _simulate(cli, image, out, tiny_model)
    check_ok(result)
    assert "taking over an unreadable lock file" in result.stderr
    assert not lock.exists() and manifest(out)["status"] == "complete"


def test_a_cache_ref_outside_its_snapshots_never_resolves(cli, tiny_model, hf_snapshot, tmp_path):
    hf_snapshot(tiny_model, "someorg/tiny-sd")
    from pie_cli.paths import hf_hub_cache

    ref = hf_hub_cache() / "models--someorg--tiny-sd" / "refs" / "main"
    ref.write_text("../../models--someorg--tiny-sd")
    result = cli("models", "info", "someorg/tiny-sd")
    check_refused(result, "someorg/tiny-sd", "not in the local Hugging Face cache")


def _trained(cli, tiny_model, tmp_path) -> Path:
    out = tmp_path / "ft"
    data = colour_folder(tmp_path / "data")
    check_ok(cli(*finetune_argv(data, tiny_model, out, "--checkpoint-every", "1", max_steps=2)))
    return out


def test_a_checkpoint_with_a_damaged_marker_is_not_complete(cli, tiny_model, tmp_path):
    out = _trained(cli, tiny_model, tmp_path)
    for step in (1, 2):
        (out / "checkpoints" / f"step_{step:06d}" / "checkpoint_complete.json").write_text("{not json")
    before = snapshot(tmp_path)
    check_refused(
        cli("finetune", "--out", out, "--resume", "latest"),
        "no complete checkpoint",
        before=before,
        roots=(tmp_path,),
    )


def test_a_checkpoint_with_damaged_files_is_one_sentence(cli, tiny_model, tmp_path):
    out = _trained(cli, tiny_model, tmp_path)
    checkpoint = out / "checkpoints" / "step_000002"
    for path in checkpoint.iterdir():
        if path.suffix in (".bin", ".safetensors") or path.name.startswith("random_states"):
            path.write_bytes(path.read_bytes()[:40])  # truncated
    result = cli(
        "finetune", "--out", out, "--resume", "latest", "--max-steps", "3", "--allow-schedule-change"
    )
    check_refused(result, "checkpoint", "cannot be loaded")


def test_a_trajectory_folder_that_is_a_link_is_refused(cli, tiny_model, phantom, tmp_path):
    image = tmp_path / "chest.png"
    phantom[0].save(image)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("theirs")
    out = tmp_path / "run"
    out.mkdir()
    (out / "traj_00").symlink_to(theirs, target_is_directory=True)
    result = _simulate(cli, image, out, tiny_model, "--trajectories", "2", "--overwrite")
    assert result.exit_code == 2 and "symbolic link" in result.stderr, result.output
    assert sorted(p.name for p in theirs.iterdir()) == ["keep.txt"]


def test_relative_output_paths_are_recorded_and_replaced(cli, tiny_model, tmp_path, monkeypatch):
    """As `make demo` runs it: folders named from the working directory, written twice with --overwrite."""
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        check_ok(cli("demo", "case", "--out", ".cache/demo", "--overwrite"))
        argv = simulate_argv(
            Path(".cache/demo/chest.png"),
            Path("runs/demo"),
            "--overwrite",
            mask=Path(".cache/demo/left-lung.png"),
            model=tiny_model,
        )
        check_ok(cli(*argv))
        check_ok(cli("evaluate", "runs/demo"))
    from pie_cli.imaging.ownership import Ledger

    recorded = set(Ledger(tmp_path / "runs" / "demo").files)
    assert {"frame_000.png", "mask.png", "manifest.json", "metrics.json", "report.png"} <= recorded
    assert set(Ledger(tmp_path / ".cache" / "demo").files) == {
        "chest.png",
        "left-lung.png",
        "right-lung.png",
        "truth.json",
    }


def test_training_images_with_transparency_or_pages_are_refused_before_training(cli, tiny_model, tmp_path):
    data = colour_folder(tmp_path / "data")
    first = sorted(data.glob("*.png"))[0]
    rgba = np.dstack([np.asarray(Image.open(first).convert("RGB")), np.full((32, 32), 255, np.uint8)])
    rgba[:4, :4, 3] = 0
    Image.fromarray(rgba, "RGBA").save(first)
    result = cli(*finetune_argv(data, tiny_model, tmp_path / "run", max_steps=1))
    check_refused(result, first.name, "transparent")
    assert not (tmp_path / "run").exists()
