"""Does `pie finetune --method lora` teach the demo model a finding it never saw? (cardiomegaly)

The built-in demo model was trained on healthy and pleural-effusion phantoms only. This script
writes cardiomegaly phantoms with `pie demo data`, trains a LoRA on them with `pie finetune`,
then compares base and LoRA on the same seeds, scored by the demo classifier's P(cardiomegaly):

- text-to-image samples for "severe cardiomegaly";
- PIE progressions of healthy phantoms with "severe cardiomegaly" in a mask around the heart.

    python benchmarks/bench_demo_lora.py [--steps 300] [--images 128] [--samples 16]

Writes benchmarks/results/demo_lora.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

RESULTS = Path(__file__).parent / "results"
PROMPT = "severe cardiomegaly"


def heart_mask(params: dict, size: int = 64) -> Image.Image:
    """A generous ellipse around the phantom's heart (where cardiomegaly may grow)."""
    img = Image.new("L", (size, size), 0)
    cx, cy = params["heart_cx"] * size, params["heart_cy"] * size
    rx, ry = params["heart_rx"] * size * 1.5, params["heart_ry"] * size * 1.3
    ImageDraw.Draw(img).ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    return img


def score(components, classifier, samples: int, pie_cases: int) -> dict:
    from pie_cli.core.loading import as_pipeline
    from pie_cli.core.progression import progress
    from pie_cli.demo import classifier as clf
    from pie_cli.demo.phantom import Findings, render

    label = classifier.labels.index("cardiomegaly")
    pipe = as_pipeline(components)
    images = []
    for seed in range(samples):
        gen = torch.Generator().manual_seed(seed)
        images.append(
            pipe(
                PROMPT, height=64, width=64, num_inference_steps=25, guidance_scale=7.5, generator=gen
            ).images[0]
        )
    t2i = clf.predict(classifier, images)[:, label]
    first, last = [], []
    for seed in range(pie_cases):
        ph = render(Findings(), seed=500 + seed)
        frames = [
            f.image
            for f in progress(
                components, ph.image, heart_mask(ph.params), prompt=PROMPT, steps=6, resolution=64, seed=seed
            )
        ]
        p = clf.predict(classifier, frames)[:, label]
        first.append(float(p[0]))
        last.append(float(p[-1]))
    return {
        "text_to_image_mean": float(t2i.mean()),
        "text_to_image_share_above_0.5": float((t2i > 0.5).mean()),
        "pie_first_mean": float(np.mean(first)),
        "pie_last_mean": float(np.mean(last)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--pie-cases", type=int, default=6)
    args = parser.parse_args()

    from pie_cli.core.devices import choose_placement
    from pie_cli.core.loading import load
    from pie_cli.core.registry import Adapter, resolve
    from pie_cli.demo import classifier as clf

    pie = [sys.executable, "-m", "pie_cli", "-q"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(
            [
                *pie,
                "demo",
                "data",
                "--out",
                str(tmp / "cardio"),
                "-n",
                str(args.images),
                "--findings",
                "cardiomegaly",
                "--seed",
                "5",
            ],
            check=True,
        )
        started = time.perf_counter()
        subprocess.run(
            [
                *pie,
                "finetune",
                "--data",
                str(tmp / "cardio"),
                "--model",
                "demo",
                "--out",
                str(tmp / "lora"),
                "--method",
                "lora",
                "--rank",
                "8",
                "--lr",
                "1e-3",
                "--max-steps",
                str(args.steps),
                "--batch-size",
                "16",
                "--cache-latents",
                "--resolution",
                "64",
                "--num-workers",
                "0",
                "--checkpoint-every",
                str(10 * args.steps),
            ],
            check=True,
        )
        train_s = time.perf_counter() - started
        classifier = clf.load(clf.builtin_dir())
        placement = choose_placement("cpu", "fp32")
        base = score(load(resolve("demo"), placement), classifier, args.samples, args.pie_cases)
        tuned = score(
            load(resolve("demo"), placement, loras=(Adapter(tmp / "lora", 1.0),)),
            classifier,
            args.samples,
            args.pie_cases,
        )
    report = {
        "benchmark": "LoRA on cardiomegaly phantoms, demo model (trained without cardiomegaly)",
        "prompt": PROMPT,
        "lora_steps": args.steps,
        "images": args.images,
        "train_seconds": round(train_s, 1),
        "base": base,
        "lora": tuned,
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo_lora.json").write_text(json.dumps(report, indent=2) + "\n")
    print("| P(cardiomegaly) | base demo model | + LoRA |\n|---|---|---|")
    for key in base:
        print(f"| {key} | {base[key]:.3f} | {tuned[key]:.3f} |")
    print(f"\nLoRA: {args.steps} steps on {args.images} phantoms in {train_s:.0f} s")


if __name__ == "__main__":
    main()
