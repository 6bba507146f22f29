"""`pie models pull` against a stand-in for the Hub on 127.0.0.1 (tests/hub_stand_in.py).

The real huggingface_hub client runs end to end (model info, tree listing, HEAD and GET of
resolve/, the CDN redirect of LFS files, the cache it writes); nothing of pie's is mocked. The
repos are the tiny model laid out like stable-diffusion-v1-5 (tests/hf_cache.py): fp32 and fp16
safetensors with .bin beside them, safety_checker/, feature_extractor/, root-level single files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import simulate_argv
from tests.hf_cache import SINGLE_FILES, cache_tree, lay_out, repo_dir, repo_files
from tests.hub_stand_in import HubStandIn

COMMIT = "1" * 40
OTHER = "2" * 40
CONFIGS = {
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "scheduler/scheduler_config.json",
}
DEFAULT = {
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
}
FP16 = {
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/model.fp16.safetensors",
}
PICKLES = {
    "unet/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.bin",
    "text_encoder/pytorch_model.bin",
}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in Hub, with the environment a user would set to reach it (HF_ENDPOINT, online).

    huggingface_hub read HF_HUB_OFFLINE (1 in hermetic tests) and the telemetry switch when it was
    first imported, so those two constants are set here too; pie passes HF_ENDPOINT to the client
    itself, so the endpoint constant is left as it is (a request that missed it would go to
    huggingface.co and fail). The token file is pointed at nothing: no credential leaves for 127.0.0.1.
    """
    import huggingface_hub.constants as constants

    with HubStandIn() as stand_in:
        monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        yield stand_in


@pytest.fixture
def full(tiny_model) -> dict[str, bytes]:
    """fp32 + fp16 safetensors, fp32 .bin beside them, safety checker, feature extractor, single files."""
    return repo_files(tiny_model, ("safetensors", "fp16", "bin"))


def snapshot_files(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


def downloads(hub: HubStandIn) -> list[str]:
    """Every file fetched (resolve/ GETs and CDN GETs) or asked about (HEAD)."""
    return hub.paths("GET", "/org/") + hub.paths("GET", "/cdn/") + hub.paths("HEAD")


def one_error(result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_pull_gets_the_default_safetensors_and_configs_only(cli, hub, full, tmp_path):
    hub.add("org/full", full, COMMIT)
    result = cli("models", "pull", "org/full")
    assert result.exit_code == 0, result.output
    snapshot = Path(result.stdout.strip())
    assert snapshot == repo_dir("org/full") / "snapshots" / COMMIT
    assert snapshot_files(snapshot) == CONFIGS | DEFAULT  # no .bin, fp16, safety checker or single file
    fetched = hub.paths("GET", "/cdn/") + hub.paths("GET", "/org/")
    assert len(fetched) == len(CONFIGS | DEFAULT)
    assert not [p for p in downloads(hub) if p.endswith((".bin", ".ckpt")) or "safety_checker" in p]
    assert "pulled org/full@main: 12 files" in result.stderr
    # what the real client wrote is the cache tests/hf_cache.py lays out by hand
    made = lay_out(
        "org/full", {p: full[p] for p in CONFIGS | DEFAULT}, commit=COMMIT, cache_dir=tmp_path / "by-hand"
    )
    assert cache_tree(repo_dir("org/full")) == cache_tree(made.parent.parent)
    # and it resolves offline, loading the fp32 files
    info = json.loads(cli("models", "info", "org/full", "--json").stdout)
    assert {w["file"] for w in info["weights"]} == DEFAULT and info["revision"] == COMMIT


def test_variant_fp16_gets_the_fp16_weights_and_simulate_loads_them(cli, hub, full, inputs, tmp_path):
    hub.add("org/full", full, COMMIT)
    result = cli("models", "pull", "org/full", "--variant", "fp16")
    assert result.exit_code == 0, result.output
    snapshot = Path(result.stdout.strip())
    assert snapshot_files(snapshot) == CONFIGS | FP16
    half = sum(len(full[p]) for p in FP16)
    assert half < 0.6 * sum(len(full[p]) for p in DEFAULT)
    run = cli(*simulate_argv(inputs["image"], tmp_path / "run", model="org/full", mask=inputs["mask"]))
    assert run.exit_code == 0, run.output
    assert "loading the fp16 variant (diffusion_pytorch_model.fp16.safetensors)" in run.stderr
    recorded = json.loads((tmp_path / "run" / "manifest.json").read_text())["model"]["weights"]
    assert {(w["file"], w["variant"]) for w in recorded} == {(p, "fp16") for p in FP16}


def test_dry_run_lists_the_files_and_their_size_and_downloads_nothing(cli, hub, full):
    hub.add("org/full", full, COMMIT)
    result = cli("models", "pull", "org/full", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert {line.split()[-1] for line in lines[:-1]} == CONFIGS | DEFAULT
    assert lines[0].split() == ["576", "B", "model_index.json"]
    total = sum(len(full[p]) for p in CONFIGS | DEFAULT)
    assert lines[-1].split()[:5] == [f"{total / 1e6:.1f}", "MB", "total:", "12", "files"]
    assert "left out: v1-5-pruned-emaonly.safetensors (3.2 MB), v1-5-pruned.ckpt (3.2 MB)" in result.stderr
    data = json.loads(cli("models", "pull", "org/full", "--variant", "fp16", "--dry-run", "--json").stdout)
    assert {f["path"] for f in data["files"]} == CONFIGS | FP16 and data["commit"] == COMMIT
    assert data["total_bytes"] == sum(len(full[p]) for p in CONFIGS | FP16)
    assert not repo_dir("org/full").exists() and downloads(hub) == []


def test_pickle_only_repo_is_refused_then_pulled_with_allow_pickle(cli, hub, tiny_model):
    hub.add("org/pickled", repo_files(tiny_model, ("bin",), extras=False), COMMIT)
    result = cli("models", "pull", "org/pickled")
    assert result.exit_code == 2
    assert one_error(result) == (
        "Error: org/pickled has only pickle weights for unet, vae, text_encoder "
        "(unet/diffusion_pytorch_model.bin), which can run code when loaded, so nothing was downloaded; "
        "pass --allow-pickle to download them if you trust the repo, and turn them into safetensors with "
        "`pie models convert`."
    )
    assert not repo_dir("org/pickled").exists() and downloads(hub) == [] and result.stdout == ""

    result = cli("models", "pull", "org/pickled", "--allow-pickle")
    assert result.exit_code == 0, result.output
    assert snapshot_files(Path(result.stdout.strip())) == CONFIGS | PICKLES
    assert "downloading pickle weights unet/diffusion_pytorch_model.bin (--allow-pickle)" in result.stderr


def test_a_repo_without_weights_fails_and_says_no_success(cli, hub, tiny_model):
    hub.add("org/configs", repo_files(tiny_model, (), extras=False), COMMIT)
    result = cli("models", "pull", "org/configs")
    assert result.exit_code == 2 and result.stdout == ""
    assert one_error(result) == (
        "Error: org/configs is not a Stable Diffusion model in diffusers layout "
        "(no weights for unet, vae, text_encoder), so nothing was downloaded."
    )
    assert not repo_dir("org/configs").exists()


def test_weights_that_never_arrive_fail_the_pull(cli, hub, tiny_model, full):
    """The repo's main moves to a commit without weights between the listing and the download."""
    hub.add("org/moving", full, COMMIT)
    hub.add("org/moving", repo_files(tiny_model, (), extras=False), OTHER, refs=())

    def move(repo_id, revision):
        hub.repos["org/moving"].refs["main"] = OTHER

    hub.after_info.append(move)
    result = cli("models", "pull", "org/moving")
    assert result.exit_code == 1 and result.stdout == "" and "pulled" not in result.stderr
    assert (
        "Error: the download of org/moving@main ended without its weights (unet/diffusion_pytorch_model.safetensors, "
        "vae/diffusion_pytorch_model.safetensors, text_encoder/model.safetensors); org/moving@main moved from "
        f"{COMMIT[:12]} to {OTHER[:12]} during the pull; rerun `pie models pull org/moving`." in result.stderr
    )


def test_an_unknown_repo_or_revision_is_one_sentence(cli, hub, full):
    hub.add("org/full", full, COMMIT)
    result = cli("models", "pull", "org/nope")
    assert result.exit_code == 2
    assert (
        one_error(result)
        == f"Error: org/nope does not exist on {hub.url} or needs a login (`hf auth login`)."
    )
    result = cli("models", "pull", "org/full@nope")
    assert result.exit_code == 2
    assert (
        one_error(result) == f"Error: org/full has no revision nope (a branch, tag or commit) on {hub.url}."
    )
    result = cli("models", "pull", "org/full@v1", "--revision", "main")
    assert (
        result.exit_code == 2 and "names revision v1 and --revision says main; give it once." in result.stderr
    )


def test_revision_is_honoured(cli, hub, full, tiny_model):
    hub.add("org/full", full, COMMIT)
    hub.add("org/full", repo_files(tiny_model, ("fp16",), extras=False), OTHER, refs=("v1",))
    for argv, ref in (
        (["org/full@v1"], "v1"),
        (["org/full", "--revision", "v1"], "v1"),
        ([f"org/full@{OTHER}"], None),
    ):
        result = cli("models", "pull", *argv)
        assert result.exit_code == 0, result.output
        assert Path(result.stdout.strip()) == repo_dir("org/full") / "snapshots" / OTHER
        refs = repo_dir("org/full") / "refs"
        assert (refs / "v1").read_text() == OTHER and not (refs / "main").exists()
        if ref:
            assert (
                "unet, vae, text_encoder have no default safetensors weights in org/full@v1: "
                "their fp16 variant is downloaded (pie loads it)." in result.stderr
            )
    info = json.loads(cli("models", "info", "org/full@v1", "--json").stdout)
    assert info["revision"] == OTHER and {w["file"] for w in info["weights"]} == FP16
    assert cli("models", "info", "org/full").exit_code == 2  # main was never pulled


def test_variant_the_repo_lacks_is_refused(cli, hub, tiny_model):
    hub.add("org/fp32", repo_files(tiny_model, ("safetensors", "fp16.bin"), extras=False), COMMIT)
    result = cli("models", "pull", "org/fp32", "--variant", "fp16")
    assert result.exit_code == 2
    assert one_error(result) == (
        "Error: org/fp32 has no fp16 variant (in safetensors; only the pickle "
        "unet/diffusion_pytorch_model.fp16.bin); pull it without --variant fp16."
    )
    result = cli("models", "pull", "org/fp32", "--variant", "bf16")
    assert one_error(result) == (
        "Error: org/fp32 has no bf16 variant (no file like unet/diffusion_pytorch_model.bf16.safetensors); "
        "pull it without --variant bf16."
    )
    result = cli("models", "pull", "org/fp32", "--variant", "../fp16")
    assert one_error(result) == "Error: --variant must be a name such as fp16, got '../fp16'."
    assert not repo_dir("org/fp32").exists()


def test_single_files_come_only_when_named(cli, hub, full):
    hub.add("org/full", full, COMMIT)
    result = cli("models", "pull", "org/full", "--single-file", "*emaonly.safetensors")
    assert result.exit_code == 0, result.output
    assert snapshot_files(Path(result.stdout.strip())) == CONFIGS | DEFAULT | {SINGLE_FILES[0]}
    result = cli("models", "pull", "org/full", "--single-file", "v1-5-pruned.ckpt")
    assert (
        result.exit_code == 2
        and "is a pickle file, which can run code when loaded; add --allow-pickle" in result.stderr
    )
    result = cli("models", "pull", "org/full", "--single-file", "sd-v2*")
    assert one_error(result) == (
        "Error: --single-file sd-v2* matches no file at the top of org/full (its single-file checkpoints "
        "are v1-5-pruned-emaonly.safetensors, v1-5-pruned.ckpt)."
    )


def test_a_fresh_process_reaches_hf_endpoint_and_draws_progress_on_stderr(hub, full, tmp_path):
    """No monkeypatching: a user's `HF_ENDPOINT=... pie models pull` reaches the endpoint, files go into
    $HF_HUB_CACHE, the snapshot's path is all of stdout and the progress is on stderr."""
    hub.add("org/full", full, COMMIT)
    # online, and with the default progress (not conftest's PIE_PROGRESS=off): the bars are checked
    unset = ("HF_HUB_OFFLINE", "HF_TOKEN", "PIE_PROGRESS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(unset)}
    env.update(HF_HUB_DISABLE_TELEMETRY="1", HF_TOKEN_PATH=str(tmp_path / "no-token"))
    done = subprocess.run(
        [sys.executable, "-m", "pie_cli", "models", "pull", "org/full", "--variant", "fp16"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == str(repo_dir("org/full") / "snapshots" / COMMIT) + "\n"
    assert "Fetching 12 files" in done.stderr and "pulled org/full@main: 12 files" in done.stderr
    assert snapshot_files(Path(done.stdout.strip())) == CONFIGS | FP16
