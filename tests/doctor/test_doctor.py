"""`pie doctor`: versions, devices, cache, models, the self-test, and the problems that make it fail."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from pie_cli.doctor import checks as doctor_module
from tests.helpers import HF_COMMIT


def report(cli, *args):
    result = cli("doctor", "--json", *args)
    return result, json.loads(result.stdout)


def model_row(data, name):
    rows = [r for r in data["models"] if r["name"] == name]
    assert len(rows) == 1, data["models"]
    return rows[0]


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """Make tempfile use a folder of our own, to check the self-test leaves nothing of its own behind
    (importing torch._dynamo may put its torchinductor cache folder there; that is not ours)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_healthy_installation_exits_0_and_names_what_it_checked(cli):
    result = cli("doctor")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for name in ("python", "torch", "diffusers", "transformers", "peft", "pydicom"):
        assert f"\n  {name} " in out, name
    assert "no CUDA device (CPU only)" in out or "cuda:0" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert lines["demo"].split()[1] == "ok"
    # an SD checkpoint that was never downloaded is normal, not a problem
    assert "not cached" in lines["sd-v1-5"] and "pie models pull sd-v1-5" in lines["sd-v1-5"]
    assert os.environ["HF_HUB_CACHE"] in out
    assert "no problems found" in out
    assert "Traceback" not in result.output


def test_json_report(cli):
    result, data = report(cli)
    assert result.exit_code == 0, result.output
    assert set(data) >= {
        "pie",
        "healthy",
        "versions",
        "devices",
        "storage",
        "models",
        "problems",
        "self_test",
    }
    assert data["healthy"] is True and data["problems"] == [] and data["self_test"] is None
    for dist, _module in doctor_module.REQUIRED_PACKAGES:
        assert data["versions"][dist], dist
    import torch

    assert data["versions"]["torch"] == str(torch.__version__)
    devices = data["devices"]
    assert devices["torch_build"] == (f"CUDA {torch.version.cuda}" if torch.version.cuda else "cpu build")
    assert len(devices["cuda"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert devices["cpu"]["cores"] == os.cpu_count() and devices["cpu"]["ram_total_bytes"] > 0
    storage = data["storage"]
    assert storage["hf_cache"] == os.environ["HF_HUB_CACHE"]
    assert storage["pie_home"] == os.environ["PIE_HOME"]
    assert storage["hf_cache_writable"] is True and storage["hf_offline"] is True
    assert [r["name"] for r in data["models"]][:4] == ["demo", "sd-v1-4", "sd-v1-5", "mimic-cxr"]
    assert model_row(data, "demo")["status"] == "ok"
    assert {model_row(data, n)["status"] for n in ("sd-v1-4", "sd-v1-5", "mimic-cxr")} == {"not cached"}


def test_cached_model_resolves_and_cache_size_counts_blobs_once(cli, tiny_model, hf_snapshot):
    snapshot = hf_snapshot(tiny_model, "stable-diffusion-v1-5/stable-diffusion-v1-5")
    expected = sum(p.stat().st_size for p in snapshot.rglob("*") if p.is_file()) + len(HF_COMMIT)
    # a snapshot symlink (as huggingface_hub makes them) must not be counted twice
    (snapshot.parent / "alias").symlink_to(snapshot, target_is_directory=True)
    result, data = report(cli)
    assert result.exit_code == 0, result.output
    row = model_row(data, "sd-v1-5")
    assert row["status"] == "ok" and row["detail"] == str(snapshot)
    assert data["storage"]["hf_cache_bytes"] == expected
    assert data["storage"]["hf_cache_size_complete"] is True


def test_cache_walk_is_capped(cli, monkeypatch):
    hub = Path(os.environ["HF_HUB_CACHE"])
    (hub / "blobs").mkdir(parents=True)
    for k in range(5):
        (hub / "blobs" / f"b{k}").write_bytes(b"x" * 1000)
    monkeypatch.setattr(doctor_module, "MAX_CACHE_FILES", 3)
    result, data = report(cli)
    assert data["storage"]["hf_cache_files"] == 3 and data["storage"]["hf_cache_bytes"] == 3000
    assert data["storage"]["hf_cache_size_complete"] is False
    text = cli("doctor").stdout
    assert ">= 3.0 kB in >= 3 files" in text


def test_deleted_alias_folder_is_a_problem(cli, tiny_model, tmp_path):
    folder = tmp_path / "ft-cxr"
    shutil.copytree(tiny_model, folder)
    assert cli("models", "add", "cxr-ft", folder).exit_code == 0
    result, data = report(cli)
    assert result.exit_code == 0, result.output
    assert model_row(data, "cxr-ft")["status"] == "ok"

    shutil.rmtree(folder)
    result = cli("doctor")
    assert result.exit_code == 1, result.output
    assert "1 problem(s):" in result.stdout
    problem = [line for line in result.stdout.splitlines() if line.startswith("  - ")]
    assert len(problem) == 1 and "model alias cxr-ft is broken" in problem[0] and str(folder) in problem[0]

    result, data = report(cli)
    assert result.exit_code == 1
    assert data["healthy"] is False and model_row(data, "cxr-ft")["status"] == "broken"
    assert len(data["problems"]) == 1 and "cxr-ft" in data["problems"][0]
    assert "cxr-ft" in result.stderr  # --json keeps stdout parseable; problems also go to stderr


def test_deleted_lora_is_named_even_when_its_base_is_not_cached(cli, tiny_lora, tmp_path):
    lora = tmp_path / "lora"
    shutil.copytree(tiny_lora, lora)
    assert cli("models", "add", "effusion", lora, "--base", "demo").exit_code == 0
    assert model_row(report(cli)[1], "effusion")["status"] == "ok"
    registry = Path(os.environ["PIE_HOME"]) / "models.json"
    data = json.loads(registry.read_text())
    data["models"]["effusion"]["base"] = "sd-v1-5"  # a base that is simply not downloaded
    registry.write_text(json.dumps(data))
    result, data = report(cli)
    assert result.exit_code == 0, data["problems"]
    assert model_row(data, "effusion")["status"] == "not cached"

    shutil.rmtree(lora)
    result, data = report(cli)
    assert result.exit_code == 1
    assert model_row(data, "effusion")["status"] == "broken"
    assert data["problems"] == [f"model alias effusion is broken: its lora {lora} no longer exists."]


def test_alias_of_an_uncached_repo_is_not_a_problem(cli):
    assert cli("models", "add", "remote", "someorg/absent").exit_code == 0
    result, data = report(cli)
    assert result.exit_code == 0, data["problems"]
    row = model_row(data, "remote")
    assert row["status"] == "not cached" and "pie models pull someorg/absent" in row["detail"]


def test_missing_demo_model_is_a_problem(cli, monkeypatch, tmp_path):
    from pie_cli.core import registry

    monkeypatch.setitem(registry.BUILTIN_LOCAL, "demo", tmp_path / "gone")
    result, data = report(cli)
    assert result.exit_code == 1
    assert model_row(data, "demo")["status"] == "broken"
    assert data["problems"][0].startswith("the built-in demo model does not resolve")


def test_corrupt_registry_is_one_problem(cli):
    (Path(os.environ["PIE_HOME"]) / "models.json").write_text("{not json")
    result, data = report(cli)
    assert result.exit_code == 1
    assert len(data["problems"]) == 1 and "models.json is not valid" in data["problems"][0]
    assert model_row(data, "demo")["status"] == "ok"  # built-in names do not depend on the registry


def test_missing_package_is_a_problem(cli, monkeypatch):
    monkeypatch.setattr(
        doctor_module,
        "REQUIRED_PACKAGES",
        (*doctor_module.REQUIRED_PACKAGES, ("pie-no-such-package", "pie_no_such_package")),
    )
    result = cli("doctor")
    assert result.exit_code == 1
    assert "pie-no-such-package" in result.stdout and "missing" in result.stdout
    assert "  - pie-no-such-package is not installed" in result.stdout


def test_old_torch_is_a_problem(cli, monkeypatch):
    import torch

    monkeypatch.setattr(torch, "__version__", "2.3.1+cu121")
    result, data = report(cli)
    assert result.exit_code == 1
    assert data["problems"] == ["torch 2.3.1+cu121 is older than 2.4, the oldest pie supports."]


@pytest.mark.parametrize(
    ("text", "release"), [("2.4.1+cu121", (2, 4, 1)), ("2.10.0a0", (2, 10, 0)), ("x", ())]
)
def test_release_parsing(text, release):
    assert doctor_module._release(text) == release
    assert (doctor_module._release(text) < doctor_module.MIN_TORCH) == (release < (2, 4))


def test_unwritable_hf_cache_is_a_problem(cli, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("HF_HUB_CACHE", str(blocker / "hub"))
    result, data = report(cli)
    assert result.exit_code == 1
    assert data["storage"]["hf_cache_writable"] is False
    assert len(data["problems"]) == 1 and "is not writable" in data["problems"][0]


def test_cuda_allocation_failure_is_a_problem(cli, monkeypatch):
    """A visible CUDA device on which a small allocation fails (driver or memory trouble)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    props = SimpleNamespace(name="Fake GPU", major=9, minor=0, total_memory=80 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (10 * 2**30, 80 * 2**30))

    def probe(index):
        raise RuntimeError("CUDA error: out of memory\nmore detail")

    monkeypatch.setattr(doctor_module, "_allocation_probe", probe)
    result, data = report(cli)
    assert result.exit_code == 1
    assert data["devices"]["cuda"][0]["name"] == "Fake GPU"
    assert data["devices"]["cuda"][0]["free_bytes"] == 10 * 2**30
    assert data["problems"] == [
        "cuda:0 is visible but a test allocation on it failed: RuntimeError: CUDA error: out of memory"
    ]
    text = cli("doctor").stdout
    assert "cuda:0  Fake GPU, 85.9 GB total, 10.7 GB free, allocation failed" in text


def test_self_test_runs_a_two_step_progression(cli, private_tmp, monkeypatch):
    from pie_cli.core import loading

    loaded = []
    real_load = loading.load

    def spy(source, *args, **kwargs):
        loaded.append(str(source.path))
        return real_load(source, *args, **kwargs)

    monkeypatch.setattr(loading, "load", spy)
    result = cli("doctor", "--self-test")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "self-test" in out and "2-step progression at 64x64" in out and "3 frames" in out
    assert "no problems found" in out
    # the tiny model was built under the temporary folder, which is gone, and the loader forgot it
    assert len(loaded) == 1 and loaded[0].startswith(str(private_tmp.resolve()))
    assert not list(private_tmp.glob("pie-doctor-*"))
    assert not any(loaded[0] in str(key) for key in loading._CACHE)


def test_self_test_json_and_failure(cli, monkeypatch, private_tmp):
    import pie_cli.core.progression

    def broken(*args, **kwargs):
        raise RuntimeError("simulated UNet failure\nsecond line")

    monkeypatch.setattr(pie_cli.core.progression, "progress", broken)
    result = cli("doctor", "--self-test")
    assert result.exit_code == 1, result.output
    assert "failed" in result.stdout
    assert "  - self-test failed: RuntimeError: simulated UNet failure" in result.stdout
    assert "second line" not in result.stdout
    assert not list(private_tmp.glob("pie-doctor-*"))

    result, data = report(cli, "--self-test")
    assert result.exit_code == 1
    test = data["self_test"]
    assert test["ok"] is False and test["error"] == "RuntimeError: simulated UNet failure"
    assert data["problems"] == ["self-test failed: RuntimeError: simulated UNet failure"]


def _noise(size: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([_noise(64, 0)] * 2, "the progression gave 2 frames, expected 3"),
        ([_noise(64, 0), _noise(32, 1), _noise(32, 2)], "frame 1 is 32x32, expected 64x64"),
        ([_noise(64, 0)] * 3, "the masked region did not change"),
        ([_noise(64, k) for k in range(3)], "pixels outside the mask changed too much"),
    ],
    ids=["count", "size", "unchanged", "outside"],
)
def test_self_test_checks_the_frames(cli, monkeypatch, frames, message):
    """Wrong frames fail the self-test: it checks what the progression made, not just that it ran."""
    import pie_cli.core.progression
    from pie_cli.core.progression import Frame

    monkeypatch.setattr(
        pie_cli.core.progression, "progress", lambda *a, **k: (Frame(i, f, 0.0) for i, f in enumerate(frames))
    )
    result, data = report(cli, "--self-test")
    assert result.exit_code == 1
    assert len(data["problems"]) == 1
    assert data["problems"][0].startswith(f"self-test failed: RuntimeError: {message}"), data["problems"]


def test_self_test_rejects_an_unusable_device(cli):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = cli("doctor", "--self-test", "--device", "cuda")
    assert result.exit_code == 2
    assert "--device cuda was asked for" in result.stderr
