"""Training throughput and peak memory of `pie finetune` (with and without --cache-latents) against a
loop in the manner of diffusers' train_text_to_image_lora.py, as ratios, in one command.

Three configurations, each run as its own process (so each peak RSS is that run's alone) on the same
data, model, seed, steps, resolution, batch size (4), LoRA rank (8, alpha = rank), learning rate
(1e-4, constant), precision and data-loader workers (0 for all):

- peer: benchmarks/peers/diffusers_lora_loop.py, the per-step work of diffusers'
  examples/text_to_image/train_text_to_image_lora.py (our own code; see its docstring);
- pie: `pie finetune` (every image through the VAE at every step, as the peer does);
- pie --cache-latents: each image encoded once.

They run interleaved (peer, pie, pie-cache, peer, pie, pie-cache, ... for --repeats rounds, 3 by
default), so a change in machine load hits all alike; each figure is the median over the rounds.
Steps/s is 1 / the median per-step time from each run's metrics.csv (same columns for pie and the peer; the first 3
steps, which warm up, are left out); peak RSS is the process's ru_maxrss; wall and CPU (user + system)
seconds are the whole process's (start-up, loading, training, saving; on a busy machine CPU time is
inflated too, by threads spinning while they wait). The load average before and after is recorded, and
each round's ratios beside the medians.

A training check follows (unless --no-check): the peer and pie once more, with --check-lr (1e-2: at
1e-4 neither loss moves visibly in 40 steps on this random model), and the mean loss of the first and
last quarter of the steps, so the comparison is of two loops that both train.

    python benchmarks/bench_finetune.py [--model DIR] [--resolution 64] [--steps 40] [--images 32] [--repeats 3]

Without --model a tiny random SD-shaped model is built (the CPU/CI default). Results go to
benchmarks/results/finetune.json and markdown tables on stdout.
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
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(__file__).parent / "results"
PEER = Path(__file__).parent / "peers" / "diffusers_lora_loop.py"
REPO = Path(__file__).resolve().parent.parent

BATCH_SIZE = 4
RANK = 8
LR = 1e-4
SEED = 0
NUM_WORKERS = 0
WARMUP_STEPS = 3  # left out of the median
CONFIGS = ("peer", "pie", "pie_cache_latents")
LABELS = {
    "peer": "diffusers train_text_to_image_lora.py-style loop (peer)",
    "pie": "pie finetune (encode every step)",
    "pie_cache_latents": "pie finetune --cache-latents",
}


def make_data(root: Path, count: int, size: int) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as fh:
        for i in range(count):
            arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(root / f"{i}.png")
            fh.write(json.dumps({"file_name": f"{i}.png", "text": f"pattern {i % 4}"}) + "\n")
    return root


def pie_command(
    model: Path, data: Path, out: Path, args: argparse.Namespace, lr: float, extra: list[str]
) -> list[str]:
    return [
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
        str(args.resolution),
        "--batch-size",
        str(BATCH_SIZE),
        "--max-steps",
        str(args.steps),
        "--rank",
        str(RANK),
        "--lr",
        str(lr),
        "--mixed-precision",
        args.mixed_precision,
        "--num-workers",
        str(NUM_WORKERS),
        "--checkpoint-every",
        str(10 * args.steps),
        "--seed",
        str(SEED),
        *extra,
    ]


def peer_command(model: Path, data: Path, out: Path, args: argparse.Namespace, lr: float) -> list[str]:
    return [
        sys.executable,
        str(PEER),
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--resolution",
        str(args.resolution),
        "--batch-size",
        str(BATCH_SIZE),
        "--max-steps",
        str(args.steps),
        "--rank",
        str(RANK),
        "--lr",
        str(lr),
        "--mixed-precision",
        args.mixed_precision,
        "--num-workers",
        str(NUM_WORKERS),
        "--seed",
        str(SEED),
    ]


def measure(cmd: list[str], out: Path) -> dict:
    """Run ``cmd`` as a child process; its steps/s, median step, peak RSS, wall time and losses."""
    log = out.parent / f"{out.name}.stderr"
    started = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read_text()[-4000:]}")
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    seconds = [float(row["seconds"]) for row in rows]
    losses = [float(row["loss"]) for row in rows]
    per_step = statistics.median(seconds[min(WARMUP_STEPS, len(seconds) - 1) :])
    quarter = max(1, len(losses) // 4)
    return {
        "steps_per_s": 1.0 / per_step,
        "median_step_s": per_step,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "loss_first_quarter_mean": statistics.mean(losses[:quarter]),
        "loss_last_quarter_mean": statistics.mean(losses[-quarter:]),
        "load_1min_after": os.getloadavg()[0],
    }


def medians(runs: list[dict]) -> dict:
    """The median over the rounds of each figure (steps/s from the median step time, so the two agree)."""
    keys = ("median_step_s", "peak_rss_mb", "wall_s", "cpu_s")
    result = {k: statistics.median(r[k] for r in runs) for k in keys}
    return {"steps_per_s": 1.0 / result["median_step_s"], **result}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def versions() -> dict[str, str]:
    found = {}
    for name in ("torch", "diffusers", "accelerate", "peft", "transformers"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved rounds of the three configurations"
    )
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--check-lr", type=float, default=1e-2, help="learning rate of the training check")
    parser.add_argument("--no-check", action="store_true", help="skip the training check")
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS or args.repeats < 1:
        parser.error(f"--steps must be over {WARMUP_STEPS} and --repeats at least 1")

    load_before, uptime_before = os.getloadavg(), uptime()
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    check: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model.resolve() if args.model else None
        if model is None:
            from pie_cli.demo.tiny import build_tiny_model

            model = build_tiny_model(tmp / "tiny-sd")
        data = make_data(tmp / "data", args.images, args.resolution)
        for r in range(args.repeats):
            for name in CONFIGS:
                out = tmp / f"{name}-{r}"
                if name == "peer":
                    cmd = peer_command(model, data, out, args, LR)
                else:
                    extra = ["--cache-latents"] if name == "pie_cache_latents" else []
                    cmd = pie_command(model, data, out, args, LR, extra)
                runs[name].append({"repeat": r + 1, **measure(cmd, out)})
                print(f"round {r + 1}: {name} {runs[name][-1]['steps_per_s']:.2f} steps/s", file=sys.stderr)
        if not args.no_check:
            check["peer"] = measure(
                peer_command(model, data, tmp / "check-peer", args, args.check_lr), tmp / "check-peer"
            )
            check["pie"] = measure(
                pie_command(model, data, tmp / "check-pie", args, args.check_lr, []), tmp / "check-pie"
            )
    load_after, uptime_after = os.getloadavg(), uptime()

    result = {name: medians(runs[name]) for name in CONFIGS}
    peer, baseline, cached = result["peer"], result["pie"], result["pie_cache_latents"]

    def versus(r: dict) -> dict:
        return {
            "steps_per_s_ratio": r["steps_per_s"] / peer["steps_per_s"],
            "peak_rss_ratio": r["peak_rss_mb"] / peer["peak_rss_mb"],
            "cpu_s_ratio": r["cpu_s"] / peer["cpu_s"],
        }

    def per_round(name: str) -> list[dict]:
        """This configuration against the peer of the same round (the pairs least apart in time)."""
        return [
            {
                "repeat": mine["repeat"],
                "steps_per_s_ratio": mine["steps_per_s"] / theirs["steps_per_s"],
                "peak_rss_ratio": mine["peak_rss_mb"] / theirs["peak_rss_mb"],
                "cpu_s_ratio": mine["cpu_s"] / theirs["cpu_s"],
            }
            for mine, theirs in zip(runs[name], runs["peer"], strict=True)
        ]

    def loss_summary(r: dict) -> dict:
        return {k: r[k] for k in ("loss_first_quarter_mean", "loss_last_quarter_mean")}

    report = {
        "benchmark": "finetune: pie with and without --cache-latents, and against a diffusers train_text_to_image_lora.py-style loop",
        "model": str(args.model or "tiny random SD-shaped model"),
        "resolution": args.resolution,
        "steps": args.steps,
        "images": args.images,
        "batch_size": BATCH_SIZE,
        "rank": RANK,
        "lr": LR,
        "seed": SEED,
        "mixed_precision": args.mixed_precision,
        "num_workers": NUM_WORKERS,
        "repeats": args.repeats,
        "order": "interleaved: " + ", ".join(CONFIGS) + f" x {args.repeats}; medians over the rounds",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "versions": versions(),
        "load": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in load_after],
            "uptime_before": uptime_before,
            "uptime_after": uptime_after,
        },
        "baseline": baseline,
        "cache_latents": cached,
        "speedup": cached["steps_per_s"] / baseline["steps_per_s"],
        "peak_rss_ratio": cached["peak_rss_mb"] / baseline["peak_rss_mb"],
        "peers": {
            "diffusers_lora_loop": {
                "script": "benchmarks/peers/diffusers_lora_loop.py",
                "approach": (
                    "per step as diffusers examples/text_to_image/train_text_to_image_lora.py: unet.add_adapter("
                    "LoraConfig gaussian, to_k/to_q/to_v/to_out.0), VAE and text encoder frozen, AdamW on the LoRA "
                    "params, DDPM noise + epsilon MSE, resize/center-crop/normalize per example, shuffling "
                    "DataLoader, accelerate Accelerator, clip_grad_norm_ 1.0; --report_to none"
                ),
                "result": peer,
                "pie_vs_peer": versus(baseline),
                "pie_cache_latents_vs_peer": versus(cached),
                "per_round": {"pie": per_round("pie"), "pie_cache_latents": per_round("pie_cache_latents")},
                "per_round_median": {
                    name: {
                        k: statistics.median(x[k] for x in per_round(name))
                        for k in ("steps_per_s_ratio", "peak_rss_ratio", "cpu_s_ratio")
                    }
                    for name in ("pie", "pie_cache_latents")
                },
            }
        },
        "runs": runs,
        "date": time.strftime("%Y-%m-%d"),
    }
    if check:
        report["training_check"] = {
            "lr": args.check_lr,
            "steps": args.steps,
            "window": "mean loss of the first and the last quarter of the steps",
            "peer": loss_summary(check["peer"]),
            "pie": loss_summary(check["pie"]),
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "finetune.json").write_text(json.dumps(report, indent=2) + "\n")

    print(
        "| configuration | steps/s | median step (s) | peak RSS (MB) | wall (s) | CPU (s) "
        "| steps/s vs peer | peak RSS vs peer | CPU vs peer | steps/s vs peer, each round |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    for name in CONFIGS:
        r = result[name]
        v = versus(r)
        rounds = " / ".join(f"{x['steps_per_s_ratio']:.2f}" for x in per_round(name))
        if len(runs[name]) > 1:
            rounds += f" (median {statistics.median(x['steps_per_s_ratio'] for x in per_round(name)):.2f})"
        print(
            f"| {LABELS[name]} | {r['steps_per_s']:.2f} | {r['median_step_s']:.4f} | {r['peak_rss_mb']:.0f} | "
            f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {v['steps_per_s_ratio']:.2f} | {v['peak_rss_ratio']:.2f} | "
            f"{v['cpu_s_ratio']:.2f} | {rounds} |"
        )
    print(
        f"\ncache-latents / baseline: {report['speedup']:.2f}x steps/s, {report['peak_rss_ratio']:.2f}x peak RSS "
        f"({report['machine']}, {args.resolution} px, {args.steps} steps, {args.repeats} interleaved rounds; "
        f"load average {report['load']['before'][0]:.2f} before, {report['load']['after'][0]:.2f} after)"
    )
    if check:
        print(
            f"\ntraining check (lr {args.check_lr:g}, {args.steps} steps): mean loss first / last quarter\n"
            "| loop | first | last |\n|---|---|---|"
        )
        for name in ("peer", "pie"):
            s = loss_summary(check[name])
            print(
                f"| {LABELS[name]} | {s['loss_first_quarter_mean']:.4f} | {s['loss_last_quarter_mean']:.4f} |"
            )


if __name__ == "__main__":
    main()
