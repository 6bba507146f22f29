"""The model registry: references, aliases, the HF cache (offline), and `pie models`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pie_cli.core.registry import Adapter, parse_lora, resolve
from pie_cli.errors import UserError
from tests.helpers import HF_COMMIT, simulate_argv


def test_local_directory(tiny_model):
    source = resolve(str(tiny_model))
    assert source.origin == "directory" and source.path == tiny_model.resolve()


def test_repo_id_from_the_local_cache(tiny_model, hf_snapshot):
    snapshot = hf_snapshot(tiny_model, "someorg/tiny-sd")
    source = resolve("someorg/tiny-sd")
    assert (source.origin, source.path, source.repo_id, source.revision) == (
        "hf-cache",
        snapshot,
        "someorg/tiny-sd",
        HF_COMMIT,
    )
    assert resolve(f"someorg/tiny-sd@{HF_COMMIT}").path == snapshot


def test_builtin_alias_from_the_local_cache(tiny_model, hf_snapshot):
    snapshot = hf_snapshot(tiny_model, "stable-diffusion-v1-5/stable-diffusion-v1-5")
    source = resolve("sd-v1-5")
    assert (
        source.path == snapshot
        and source.alias == "sd-v1-5"
        and source.repo_id.endswith("stable-diffusion-v1-5")
    )


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("sd-v1-4", "model sd-v1-4 (CompVis/stable-diffusion-v1-4) is not in the local Hugging Face cache"),
        ("mimic-cxr", "download it once with `pie models pull mimic-cxr`"),
        ("someorg/absent", "model someorg/absent (someorg/absent) is not in the local Hugging Face cache"),
        ("someorg/absent@v2", "(someorg/absent@v2)"),
        ("no_such_thing", "unknown model 'no_such_thing'"),
        ("./missing/dir", "model directory ./missing/dir does not exist."),
        ("", "--model is empty"),
    ],
)
def test_unresolvable_references_say_what_to_do(reference, message):
    with pytest.raises(UserError) as info:
        resolve(reference)
    assert message in info.value.message


def test_incomplete_directory_names_what_is_missing(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(UserError, match="missing tokenizer/"):
        resolve(str(broken))


def test_lora_or_unet_as_model_is_explained(tiny_lora, tiny_unet_variant):
    with pytest.raises(UserError, match="is a LoRA adapter, not a model; pass it with --lora"):
        resolve(str(tiny_lora))
    with pytest.raises(UserError, match="is a UNet alone; pass it with --unet"):
        resolve(str(tiny_unet_variant / "unet"))


def test_parse_lora(tiny_lora):
    assert parse_lora(str(tiny_lora)) == Adapter(tiny_lora.resolve(), 1.0)
    assert parse_lora(f"{tiny_lora}:0.3") == Adapter(tiny_lora.resolve(), 0.3)
    file = tiny_lora / "pytorch_lora_weights.safetensors"
    assert parse_lora(f"{file}:-1") == Adapter(file.resolve(), -1.0)


def test_user_aliases_through_the_cli(cli, tiny_model, tiny_lora):
    assert cli("models", "add", "tiny", tiny_model).exit_code == 0
    result = cli("models", "add", "tiny", tiny_model)
    assert result.exit_code == 2 and "alias tiny already exists" in result.stderr
    assert cli("models", "add", "tiny", tiny_model, "--force").exit_code == 0

    rows = json.loads(cli("models", "list", "--json").stdout)
    mine = [r for r in rows if r["name"] == "tiny"][0]
    assert mine["status"] == "ok" and mine["path"] == str(tiny_model.resolve()) and mine["source"] == "user"
    assert {r["name"] for r in rows if r["source"] == "built-in"} == {
        "demo",
        "sd-v1-4",
        "sd-v1-5",
        "mimic-cxr",
    }

    result = cli("models", "add", "fx", tiny_lora)
    assert result.exit_code == 2 and "is a lora; say which model it applies to with --base" in result.stderr
    assert cli("models", "add", "fx", tiny_lora, "--base", "tiny", "--weight", "0.5").exit_code == 0
    source = resolve("fx")
    assert source.path == tiny_model.resolve() and source.loras == (Adapter(tiny_lora.resolve(), 0.5),)

    info = json.loads(cli("models", "info", "fx", "--json").stdout)
    assert info["alias"] == "fx" and info["loras"] == [f"{tiny_lora.resolve()}:0.5"]
    assert info["vae_scale_factor"] == 8 and info["components"]["unet"]["weights"] == "safetensors"

    registry = json.loads((Path(os.environ["PIE_HOME"]) / "models.json").read_text())
    assert set(registry["models"]) == {"tiny", "fx"}

    assert cli("models", "remove", "fx").exit_code == 0
    result = cli("models", "remove", "fx")
    assert result.exit_code == 2 and "no user alias named fx" in result.stderr
    assert tiny_lora.exists()  # removing an alias never touches files


def test_alias_names_and_builtins_are_protected(cli, tiny_model):
    for args, message in (
        (("models", "add", "sd-v1-5", tiny_model), "alias sd-v1-5 is built in"),
        (("models", "add", "bad/name", tiny_model), "alias 'bad/name' must start with"),
        (("models", "remove", "sd-v1-4"), "built in and cannot be removed"),
        (("models", "add", "x", "/does/not/exist"), "/does/not/exist does not exist"),
    ):
        result = cli(*args)
        assert result.exit_code == 2, args
        assert message in result.stderr


def test_simulate_with_a_user_alias(cli, tiny_model, inputs, tmp_path):
    assert cli("models", "add", "tiny", tiny_model).exit_code == 0
    out = tmp_path / "run"
    result = cli(*simulate_argv(inputs["image"], out, model="tiny", prompt="effusion"))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["alias"] == "tiny" and manifest["model"]["path"] == str(tiny_model.resolve())


def test_corrupt_registry_file_is_named(cli):
    path = Path(os.environ["PIE_HOME"]) / "models.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    result = cli("models", "list")
    assert result.exit_code == 2
    assert f"model registry {path} is not valid" in result.stderr


def test_pickle_only_weights_are_refused(cli, tiny_model, inputs, tmp_path):
    model = tmp_path / "pickled"
    shutil.copytree(tiny_model, model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").rename(
        model / "unet" / "diffusion_pytorch_model.bin"
    )
    argv = simulate_argv(
        inputs["image"], tmp_path / "o", model=model, prompt="x", steps=None, inference_steps=None
    )
    result = cli(*argv)
    assert result.exit_code == 2
    assert (
        "has only pickle weights (diffusion_pytorch_model.bin), which can run code when opened; "
        "convert them to .safetensors, or pass --allow-pickle if you trust the file." in result.stderr
    )
    assert not (tmp_path / "o").exists()


def test_pull_downloads_only_what_pie_needs(cli, tiny_model, monkeypatch, hf_snapshot):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    seen = {}

    def fake_snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, **kwargs):
        seen.update(repo_id=repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns)
        return str(hf_snapshot(tiny_model, repo_id))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    result = cli("models", "pull", "sd-v1-5")
    assert result.exit_code == 0, result.output
    assert seen["repo_id"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert seen["cache_dir"] == os.environ["HF_HUB_CACHE"]
    assert all(not p.endswith((".bin", ".ckpt")) for p in seen["allow_patterns"])
    assert "unet/diffusion_pytorch_model.safetensors" in seen["allow_patterns"]
    assert resolve("sd-v1-5").revision == HF_COMMIT  # now resolvable offline


def test_pull_refuses_when_offline_or_not_a_repo(cli):
    result = cli("models", "pull", "sd-v1-4")
    assert result.exit_code == 2 and "HF_HUB_OFFLINE is set" in result.stderr
    result = cli("models", "pull", "not-a-repo")
    assert result.exit_code == 2 and "is not a built-in alias or a Hugging Face repo id" in result.stderr
