"""Training throughput and peak memory with and without --cache-latents, as a ratio.

Both configurations run in this one command, each as its own `pie finetune` process (so each
peak RSS is that run's alone), on the same data, model, seed and steps. Steps/s is the median
of the per-step times in metrics.csv (the first steps, which warm up, are left out).

    python benchmarks/bench_finetune.py [--model DIR] [--resolution 64] [--steps 40] [--images 32]

Without --model a tiny random SD-shaped model is built (the CPU/CI default). Results go to
benchmarks/results/finetune.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(__file__).parent / "results"


def make_data(root: Path, count: int, size: int) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as fh:
        for i in range(count):
            arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(root / f"{i}.png")
            fh.write(json.dumps({"file_name": f"{i}.png", "text": f"pattern {i % 4}"}) + "\n")
    return root


def run(model: Path, data: Path, out: Path, steps: int, resolution: int, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pie_cli",
        "-q",
        "finetune",
        "--data",
        str(data),
        "--model",
        str(model),
        "--out",
        str(out),
        "--resolution",
        str(resolution),
        "--batch-size",
        "4",
        "--max-steps",
        str(steps),
        "--num-workers",
        "0",
        "--checkpoint-every",
        str(10 * steps),
        "--seed",
        "0",
        *extra,
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()}")
    with open(out / "metrics.csv") as fh:
        seconds = [float(row["seconds"]) for row in csv.DictReader(fh)]
    steady = seconds[min(3, len(seconds) - 1) :]
    per_step = statistics.median(steady)
    return {
        "steps_per_s": 1.0 / per_step,
        "median_step_s": per_step,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--images", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            from pie_cli.demo.tiny import build_tiny_model

            model = build_tiny_model(tmp / "tiny-sd")
        data = make_data(tmp / "data", args.images, args.resolution)
        baseline = run(model, data, tmp / "plain", args.steps, args.resolution, [])
        cached = run(model, data, tmp / "cached", args.steps, args.resolution, ["--cache-latents"])
    report = {
        "benchmark": "finetune --cache-latents vs encoding every step",
        "model": str(args.model or "tiny random SD-shaped model"),
        "resolution": args.resolution,
        "steps": args.steps,
        "images": args.images,
        "batch_size": 4,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "baseline": baseline,
        "cache_latents": cached,
        "speedup": cached["steps_per_s"] / baseline["steps_per_s"],
        "peak_rss_ratio": cached["peak_rss_mb"] / baseline["peak_rss_mb"],
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "finetune.json").write_text(json.dumps(report, indent=2) + "\n")
    print("| configuration | steps/s | median step (s) | peak RSS (MB) |\n|---|---|---|---|")
    for name, r in (("encode every step", baseline), ("--cache-latents", cached)):
        print(f"| {name} | {r['steps_per_s']:.2f} | {r['median_step_s']:.4f} | {r['peak_rss_mb']:.0f} |")
    print(
        f"\ncache-latents / baseline: {report['speedup']:.2f}x steps/s, {report['peak_rss_ratio']:.2f}x peak RSS "
        f"({report['machine']}, {args.resolution} px, {args.steps} steps)"
    )


if __name__ == "__main__":
    main()
