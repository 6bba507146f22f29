"""A Hugging Face cache laid out as huggingface_hub lays it out, and the files pie picks from it.

Every repo here is the tiny model written like stable-diffusion-v1-5 (tests/hf_cache.py): blobs
named by their ETag, snapshot files symlinked into them, refs naming commits, ``model_index.json``
naming the safety checker and feature extractor, fp16 variants beside the default weights,
``.bin`` beside ``.safetensors``, root-level single-file checkpoints. ``pie models info``/``list``,
loading and the run manifest must agree on which files a model is (tests/core/test_hub_pull.py
checks that the real client writes this same layout).
"""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest

from pie_cli.cli.console import human_bytes
from pie_cli.core.registry import ModelNotCached, resolve
from tests.helpers import HF_COMMIT, manifest, simulate_argv
from tests.hf_cache import SINGLE_FILES, WEIGHTS, lay_out, repo_dir, repo_files, variant_name

V1 = "3" * 40
EVERYTHING = ("safetensors", "fp16", "bin", "fp16.bin")


def cached(tiny_model, repo_id: str, weights: tuple[str, ...], commit: str = HF_COMMIT, refs=("main",)):
    """(snapshot, files) of the tiny model cached as ``repo_id`` with ``weights`` (see repo_files)."""
    files = repo_files(tiny_model, weights)
    return lay_out(repo_id, files, commit=commit, refs=refs), files


def expected_rows(files: dict[str, bytes], kind: str) -> list[dict]:
    """The manifest/info rows of the default (``safetensors``), ``fp16`` or ``bin`` weights of a repo."""
    rows = []
    for part, (safe, pickled) in WEIGHTS.items():
        name = {"safetensors": safe, "fp16": variant_name(safe, "fp16"), "bin": pickled}[kind]
        data = files[f"{part}/{name}"]
        rows.append(
            {
                "part": part,
                "file": f"{part}/{name}",
                "bytes": len(data),
                "format": "pickle" if kind == "bin" else "safetensors",
                "variant": "fp16" if kind == "fp16" else None,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    return rows


def info_json(cli, reference: str) -> dict:
    result = cli("models", "info", reference, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def list_row(cli, name: str) -> dict:
    result = cli("models", "list", "--json")
    assert result.exit_code == 0, result.output
    return next(r for r in json.loads(result.stdout) if r["name"] == name)


@pytest.fixture
def no_pickle(monkeypatch):
    """Opening a pickle fails the test: torch.load and pickle.load(s) raise."""
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError(f"a pickle was opened: {args[:1]}")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, refuse)


def test_the_layout_is_huggingface_hubs(tiny_model):
    snapshot, files = cached(tiny_model, "org/full", EVERYTHING)
    repo = repo_dir("org/full")
    assert (repo / "refs" / "main").read_text() == HF_COMMIT
    weights = snapshot / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_symlink() and weights.readlink().as_posix().startswith("../../../blobs/")
    assert (
        weights.resolve().name
        == hashlib.sha256(files["unet/diffusion_pytorch_model.safetensors"]).hexdigest()
    )
    config = (snapshot / "model_index.json").resolve()
    assert config.parent == repo / "blobs" and len(config.name) == 40  # a git blob SHA-1
    index = json.loads((snapshot / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert (snapshot / SINGLE_FILES[0]).is_file() and (
        snapshot / "safety_checker" / "model.safetensors"
    ).is_file()


def test_the_default_safetensors_are_picked_among_fp16_bin_and_single_files(cli, tiny_model, no_pickle):
    _, files = cached(tiny_model, "org/full", EVERYTHING)
    data = info_json(cli, "org/full")
    assert data["weights"] == expected_rows(files, "safetensors")
    assert data["components"]["unet"]["files"] == {
        "diffusion_pytorch_model.safetensors": len(files["unet/diffusion_pytorch_model.safetensors"])
    }
    text = cli("models", "info", "org/full").stdout
    lines = [line.split() for line in text.splitlines()]
    assert ["unet", "UNet2DConditionModel"] in lines and ["text_encoder", "CLIPTextModel"] in lines
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert [name, *human_bytes(len(files[name])).split()] in lines  # e.g. "3.2 MB", "166.1 kB"
    assert not any(word in text for word in (".bin", "fp16", "safety_checker", "v1-5-pruned"))
    assert cli("models", "add", "full", "org/full").exit_code == 0
    row = list_row(cli, "full")
    assert (row["status"], row["weights"], row["path"]) == (
        "ok",
        "safetensors",
        str(resolve("org/full").path),
    )


def test_bin_beside_safetensors_loads_the_safetensors(tiny_model, no_pickle):
    from pie_cli.core.loading import load_parts

    cached(tiny_model, "org/both", ("safetensors", "bin"))
    unet, vae, text_encoder, _ = load_parts(resolve("org/both"))  # no pickle opened (no_pickle)
    assert unet.dtype == vae.dtype == text_encoder.dtype


def test_an_fp16_only_model_loads_its_variant_and_says_so(cli, tiny_model, inputs, tmp_path):
    import torch

    from pie_cli.core.loading import load_parts
    from tests.hf_cache import _tensors

    _, files = cached(tiny_model, "org/half", ("fp16",))
    text = cli("models", "info", "org/half").stdout
    assert "unet/diffusion_pytorch_model.fp16.safetensors  1.6 MB  (fp16 variant)" in text
    warnings: list[str] = []
    unet, *_ = load_parts(resolve("org/half"), warn=warnings.append)
    name, fp32 = next(iter(_tensors(tiny_model, "unet").items()))
    assert unet.dtype == torch.float32  # fp16 files, upcast to the dtype asked for
    assert torch.equal(unet.state_dict()[name], fp32.half().float())  # the fp16 values: the variant was read
    assert len(warnings) == 3 and "model org/half: unet: loading the fp16 variant" in warnings[0]

    result = cli(*simulate_argv(inputs["image"], tmp_path / "run", model="org/half", mask=inputs["mask"]))
    assert result.exit_code == 0, result.output
    assert "loading the fp16 variant (diffusion_pytorch_model.fp16.safetensors)" in result.stderr
    assert manifest(tmp_path / "run")["model"]["weights"] == expected_rows(files, "fp16")
    assert cli("models", "add", "half", "org/half").exit_code == 0
    assert list_row(cli, "half")["weights"] == "safetensors, fp16 variant (unet, vae, text_encoder)"


def test_a_pickle_only_model_is_refused_without_allow_pickle(cli, tiny_model, inputs, tmp_path):
    _, files = cached(tiny_model, "org/pickled", ("bin", "fp16.bin"))
    argv = simulate_argv(inputs["image"], tmp_path / "run", model="org/pickled", mask=inputs["mask"])
    result = cli(*argv)
    assert result.exit_code == 2 and not (tmp_path / "run").exists()
    assert (
        "unet (" in result.stderr and "has only pickle weights (diffusion_pytorch_model.bin)" in result.stderr
    )
    assert "(pickle: needs --allow-pickle)" in cli("models", "info", "org/pickled").stdout
    assert cli("models", "add", "pickled", "org/pickled").exit_code == 0
    row = list_row(cli, "pickled")
    assert (row["status"], row["weights"]) == (
        "ok",
        "pickle only (unet, vae, text_encoder): needs --allow-pickle",
    )

    result = cli(*argv, "--allow-pickle")
    assert result.exit_code == 0, result.output
    assert manifest(tmp_path / "run")["model"]["weights"] == expected_rows(files, "bin")


def test_a_model_without_weights_is_broken(cli, tiny_model):
    snapshot, _ = cached(tiny_model, "org/configs", ())
    result = cli("models", "add", "configs", "org/configs")
    assert (
        result.exit_code == 0
        and f"model org/configs: unet ({snapshot / 'unet'}) has no weights file." in result.stderr
    )
    row = list_row(cli, "configs")
    assert row["status"] == "broken" and "has no weights file" in row["note"]


def test_a_pinned_revision_resolves_to_its_own_snapshot(cli, tiny_model):
    main, _ = cached(tiny_model, "org/pinned", ("safetensors",))
    v1, _ = cached(tiny_model, "org/pinned", ("fp16",), commit=V1, refs=("v1", "refs/pr/1"))
    assert (resolve("org/pinned").path, resolve("org/pinned").revision) == (main, HF_COMMIT)
    for reference in ("org/pinned@v1", "org/pinned@refs/pr/1", f"org/pinned@{V1}"):
        source = resolve(reference)
        assert (source.path, source.revision) == (v1, V1), reference
    assert {w["variant"] for w in info_json(cli, "org/pinned@v1")["weights"]} == {"fp16"}
    assert {w["variant"] for w in info_json(cli, f"org/pinned@{HF_COMMIT}")["weights"]} == {None}
    for absent in ("org/pinned@v2", "org/pinned@../../../models--org--pinned/refs/v1"):
        with pytest.raises(ModelNotCached) as caught:
            resolve(absent)
        assert caught.value.pull == absent


def test_the_manifest_records_the_files_loaded_and_their_hashes(cli, tiny_model, inputs, tmp_path):
    _, files = cached(tiny_model, "org/full", EVERYTHING)
    result = cli(*simulate_argv(inputs["image"], tmp_path / "run", model="org/full", mask=inputs["mask"]))
    assert result.exit_code == 0, result.output
    model = manifest(tmp_path / "run")["model"]
    assert (model["repo_id"], model["revision"]) == ("org/full", HF_COMMIT)
    assert model["weights"] == expected_rows(files, "safetensors")
    # a plain folder: the same record, its hashes computed from the files
    result = cli(*simulate_argv(inputs["image"], tmp_path / "local", model=tiny_model, mask=inputs["mask"]))
    assert result.exit_code == 0, result.output
    local = {w["file"]: w["sha256"] for w in manifest(tmp_path / "local")["model"]["weights"]}
    assert local == {w["file"]: w["sha256"] for w in expected_rows(files, "safetensors")}


def test_the_hf_snapshot_fixture_can_lay_out_like_the_hub(tiny_model, hf_snapshot):
    snapshot = hf_snapshot(tiny_model, "org/tiny", like_hub=True, refs=("main", "v1"))
    assert (snapshot / "unet" / "config.json").is_symlink()
    assert resolve("org/tiny@v1").path == resolve("org/tiny").path == snapshot
