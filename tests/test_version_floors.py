"""The lower bounds in pyproject.toml are true (issue 15, item 7): `make test-min` runs the fast tests
against exactly these floors; here, the pieces that make that so, and what protects users in between."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_lowest_pins_every_dependency_at_its_declared_floor():
    out = subprocess.run(
        [sys.executable, str(ROOT / "requirements" / "lowest.py")], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    pins = dict(line.split("==", 1) for line in out)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        name, _, rest = text.partition(">=")
        name = name.strip()
        if name == "torch":
            continue
        assert pins[name] == rest.split(",")[0].strip(), name
    assert pins["torch"] == "2.13.0"  # the CPU build on disk, never a CUDA download
    for name, floor in (
        ("diffusers", "0.34"),
        ("pydicom", "3.0"),
        ("accelerate", "1.1"),
        ("filelock", "4.2.1"),
    ):
        assert (
            pins[name] == floor
        )  # the floors make test-min found (save_lora_weights metadata, pydicom.pixels)


def test_make_test_min_is_wired():
    makefile = (ROOT / "Makefile").read_text()
    assert "test-min:" in makefile and "requirements/lowest.py" in makefile
    assert '-m "not slow"' in makefile


def test_a_text_encoder_whose_weights_do_not_match_is_refused(tiny_model, tmp_path, cli, inputs):
    """transformers 4.x reads a 5.x text encoder (keys without `text_model.`) as random weights,
    silently; pie refuses any text encoder with missing weights instead."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = next((model / "text_encoder").glob("*.safetensors"))
    state = load_file(str(weights))
    save_file({f"renamed.{k}": v for k, v in state.items()}, str(weights), metadata={"format": "pt"})
    from tests.helpers import simulate_argv

    result = cli(*simulate_argv(inputs["image"], tmp_path / "run", model=model, mask=inputs["mask"]))
    assert result.exit_code == 2, result.output
    assert "the text encoder's weights do not match its config" in result.stderr
    assert "Traceback" not in result.output


def test_the_demo_text_encoder_is_stored_in_the_layout_every_transformers_reads():
    from safetensors import safe_open

    path = ROOT / "pie_cli" / "demo" / "model" / "text_encoder" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())  # noqa: SIM118 (a safe_open, not a dict)
