"""Model references: directories, repo ids and built-in aliases in the HF cache (offline), LoRA
references, and what an unresolvable reference says (`pie models` itself: cli/test_models.py)."""

from __future__ import annotations

import shutil

import pytest

from pie_cli.core.registry import Adapter, parse_lora, resolve
from pie_cli.errors import UserError
from tests.helpers import HF_COMMIT


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


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "NaN"])
def test_a_lora_weight_must_be_finite(tiny_lora, weight):
    """`--lora PATH:nan` is refused up front, like `pie models add --weight nan` (it used to fail a whole
    step later as a numerical error advising --dtype fp32)."""
    with pytest.raises(UserError) as caught:
        parse_lora(f"{tiny_lora}:{weight}")
    assert "the weight must be a finite number" in str(caught.value)


@pytest.mark.parametrize("weight", [1.0, 0.8, 0.123456789, 1e-9, -0.5])
def test_an_adapter_is_recorded_so_that_it_reads_back_exactly(tiny_lora, weight):
    """The manifest's `PATH:WEIGHT` reads back as the same adapter (--resume must not round the weight)."""
    adapter = parse_lora(f"{tiny_lora}:{weight!r}")
    assert adapter.file == tiny_lora.resolve() / "pytorch_lora_weights.safetensors"
    again = parse_lora(adapter.spec())
    assert again == adapter and again.weight == weight and again.file == adapter.file


def test_unet_and_loras_are_merged_into_the_source_once(tiny_model, tiny_lora, tiny_unet_variant, cli):
    """An alias's own LoRA comes first, --lora ones after it; --unet replaces the UNet; describe() records both."""
    from pie_cli.core.model_files import resolve_unet_path

    assert cli("models", "add", "fx", tiny_lora, "--base", str(tiny_model), "--weight", "0.5").exit_code == 0
    extra = parse_lora(f"{tiny_lora}:0.25")
    unet = resolve_unet_path(tiny_unet_variant)
    source = resolve("fx").with_overrides(unet=unet, loras=(extra,))
    assert [a.weight for a in source.loras] == [0.5, 0.25]
    assert source.unet == unet
    described = source.describe()
    assert described["loras"] == [f"{tiny_lora.resolve()}:0.5", f"{tiny_lora.resolve()}:0.25"]
    assert described["unet"] == str(unet)
    assert resolve("fx").with_overrides().loras == resolve("fx").loras  # nothing given, nothing changed


def test_an_uncached_repo_says_what_to_pull():
    from pie_cli.core.registry import ModelNotCached, status

    with pytest.raises(ModelNotCached) as caught:
        resolve("someorg/absent@v2")
    assert (caught.value.repo_id, caught.value.revision, caught.value.pull) == (
        "someorg/absent",
        "v2",
        "someorg/absent@v2",
    )
    found = status("sd-v1-5")
    assert found.status == "not cached" and "pie models pull sd-v1-5" in found.detail
