"""What a run records about how it ran (issue 18): dtype, intra-op threads and each part's layout and
weights, read back from the manifest of real `pie simulate` runs on the tiny model; --threads checked."""

from __future__ import annotations

import pytest
import torch

from pie_cli.core import devices
from tests.helpers import manifest, simulate_argv

PACKED = {"memory_format": "channels_last", "weights": "packed", "compiled": False}
RELEASED = {"released_after_use": True}  # the text encoder: its file pages handed back after the one encoding
needs_packing = pytest.mark.skipif(
    not devices._packing_works(torch.float32), reason="this torch has no working oneDNN packed kernels"
)


def run(cli, inputs, tiny_model, out, *extra):
    return cli(*simulate_argv(inputs["image"], out, *extra, model=tiny_model, mask=inputs["mask"], steps=1))


@needs_packing
def test_the_manifest_records_dtype_threads_and_layout(cli, inputs, tiny_model, tmp_path):
    before = torch.get_num_threads()
    out = tmp_path / "run"
    result = run(cli, inputs, tiny_model, out, "--threads", "1")
    assert result.exit_code == 0, result.output
    m = manifest(out)
    assert m["placement"] == {"device": "cpu", "dtype": "fp32", "vae_dtype": "fp32"}
    assert m["speed"] == {"unet": PACKED, "vae": PACKED, "text_encoder": RELEASED, "threads": 1}
    assert m["run"]["threads"] == 1 and m["run"]["dtype"] == "auto"
    assert torch.get_num_threads() == before  # the process's own thread count is back


@needs_packing
def test_default_threads_are_torchs_and_bf16_is_recorded_with_an_fp32_vae(cli, inputs, tiny_model, tmp_path):
    out = tmp_path / "run"
    result = run(cli, inputs, tiny_model, out, "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    m = manifest(out)
    assert m["placement"] == {"device": "cpu", "dtype": "bf16", "vae_dtype": "fp32"}
    unet = {"memory_format": "channels_last", "weights": "plain", "compiled": False}  # bf16: faster unpacked
    assert m["speed"] == {
        "unet": unet,
        "vae": PACKED,
        "text_encoder": RELEASED,
        "threads": torch.get_num_threads(),
    }
    assert m["run"]["threads"] is None and m["run"]["dtype"] == "bf16"


@pytest.mark.parametrize("value", ["0", "-2", "100000"])
def test_bad_threads_exit_2_naming_the_option_and_write_nothing(cli, inputs, tiny_model, tmp_path, value):
    out = tmp_path / "run"
    result = run(cli, inputs, tiny_model, out, "--threads", value)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"Error: --threads must be in 1..1024, got {value}."
    assert not out.exists()


def test_threads_from_the_environment(cli, inputs, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("PIE_THREADS", "1")
    out = tmp_path / "run"
    result = run(cli, inputs, tiny_model, out)
    assert result.exit_code == 0, result.output
    assert manifest(out)["speed"]["threads"] == 1 and manifest(out)["run"]["threads"] == 1


@needs_packing
def test_compile_on_the_cpu_is_not_applied_and_says_so(cli, inputs, tiny_model, tmp_path):
    out = tmp_path / "run"
    result = run(cli, inputs, tiny_model, out, "--compile")
    assert result.exit_code == 0, result.output
    assert "--compile is not applied on the CPU: torch.compile measured slower" in result.stderr
    m = manifest(out)
    assert m["speed"]["unet"] == PACKED and m["run"]["compile"] is True  # asked for, recorded; not compiled


def test_dtype_help_says_bf16_is_opt_in(cli):
    text = " ".join(cli("simulate", "--help").stdout.split())
    assert "bf16 on the CPU is opt-in" in text and "VAE kept in fp32" in text
