"""benchmarks/bench_simulate.py on the tiny model (``--quick``): the script runs, and it measures the
work it claims to (each runner's model calls counted), so the committed figures cannot rot unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_simulate.py"


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    results = tmp_path_factory.mktemp("bench") / "simulate.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-memory", "--results", str(results)],
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return {"data": json.loads(results.read_text()), "stdout": done.stdout}


def test_each_runner_does_the_work_of_what_it_stands_for(quick):
    calls = quick["data"]["calls_per_run"]
    steps = quick["data"]["setup"]["progression_steps"]
    # The original code's per step: the prompt re-encoded, the initial image encoded three times
    # and the previous frame once; pie: text once per run, one encode per step after the first.
    assert calls["original"]["text_encoder"] == steps
    assert calls["original"]["vae_encode"] == 4 * steps
    assert calls["pie_fp32_mask"]["text_encoder"] == 1
    assert calls["pie_fp32_mask"]["vae_encode"] == steps
    # diffusers' img2img call encodes the prompt and the negative prompt (two calls) and the image
    # once per progression step.
    assert calls["diffusers_loop"]["text_encoder"] == 2 * steps
    assert calls["diffusers_loop"]["vae_encode"] == steps
    for name in ("original", "pie_fp32_mask", "pie_fp32_nomask", "diffusers_loop", "pie_bf16_mask"):
        assert calls[name]["unet_batch"] == [2], name  # guidance 7.5: both branches, K = 1
        assert calls[name]["unet"] == calls["original"]["unet"], name  # same denoising work
        assert calls[name]["vae_decode"] == steps, name


def test_the_results_give_every_ratio_and_goal_as_measured(quick):
    data = quick["data"]
    assert set(data["ratios"]) >= {"pie_fp32_nomask / diffusers_loop", "pie_fp32_mask / original"}
    for pair, goal in data["goals"].items():
        assert goal["met"] == (goal["measured"] <= goal["goal"]), pair
    assert data["setup"]["model"] == "tiny test model"
    assert data["pie_tuning"]["fp32"]["threads"] == data["setup"]["threads"]
    assert "| pie_fp32_mask |" in quick["stdout"]
