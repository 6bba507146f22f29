"""`pie models`: user aliases (add, list, info, remove), pull, a corrupt registry, concurrent adds."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pie_cli.core.registry import Adapter, resolve
from tests.helpers import simulate_argv


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


# What `pie models pull` downloads, against a stand-in Hub: tests/core/test_hub_pull.py.


def test_pull_refuses_when_offline_or_not_a_repo(cli):
    result = cli("models", "pull", "sd-v1-4")
    assert result.exit_code == 2 and "HF_HUB_OFFLINE is set" in result.stderr
    result = cli("models", "pull", "not-a-repo")
    assert result.exit_code == 2 and "is not a built-in alias or a Hugging Face repo id" in result.stderr


# --------------------------------------------------------------------------- concurrency


def test_concurrent_models_add_keeps_every_alias(tiny_model, child):
    """Six `pie models add` at once really contend: the test holds the registry's lock until every
    child has reached it (each parks on entering edit_user_models and says so), then lets go."""
    from filelock import FileLock

    from pie_cli.core.registry import load_user_models, user_models_file

    with FileLock(str(user_models_file()) + ".lock"):
        procs = [child(["models", "add", f"cxr{i}", tiny_model], park="registry") for i in range(6)]
        for p in procs:
            p.wait_parked()  # at the lock, which the test holds: nobody has written yet
        assert not user_models_file().exists()
    results = [(p.wait(timeout=120), p.stderr) for p in procs]
    assert all(code == 0 for code, _ in results), results
    assert sorted(load_user_models()) == [f"cxr{i}" for i in range(6)]
    assert json.loads(user_models_file().read_text())["version"] == 1
    leftovers = [p.name for p in user_models_file().parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
