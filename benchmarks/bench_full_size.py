"""Full size, end to end, on the CPU: an SD-1.5-shaped model in a real-shaped Hugging Face cache, used
through the CLI as a user would (issue 15, item 6). Not a CI test: it writes about 4 GB and takes minutes.

1. The model: the real SD 1.x configs pie ships (``pie_cli/core/configs/sd-v1``: UNet 860 M parameters,
   VAE 84 M, CLIP ViT-L/14 text encoder 123 M, the 49,408-token tokenizer) with random weights from a
   fixed seed, written as safetensors into ``HF_HUB_CACHE/models--bench--sd15-shaped`` the way
   huggingface_hub lays a download out: ``blobs/<sha256>``, ``snapshots/<commit>/...`` symlinks into
   them, ``refs/main``; plus an fp16 variant of the UNet beside it and a ``.bin`` copy of the VAE (which
   pie must not read).
2. As a user: ``pie models info bench/sd15-shaped``; ``pie simulate`` at 512 px (1 progression step,
   ``-T 4``, strength 0.5, with a mask); ``pie finetune --method lora`` (2 steps, 512 px, batch 1,
   ``--gradient-checkpointing``). Each is its own process: wall time and peak RSS are its own.
3. What each command read: the weight files the run loaded (its manifest's ``model.weights``) and every
   file it opened under the cache (``strace -f -e trace=openat`` when it exists; the resume fingerprint
   opens each weight file for its first and last 64 kB, unused variants included, and unpickles nothing).

    python benchmarks/bench_full_size.py [--work DIR] [--keep]

Results: ``benchmarks/results/full_size.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "pie_cli" / "core" / "configs" / "sd-v1"
REPO = "bench/sd15-shaped"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def build_model(folder: Path) -> dict:
    """Random weights in the real SD 1.x shapes, saved as a diffusers folder; returns parameter counts."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    shutil.copytree(CONFIGS, folder)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "vae"))
    text = CLIPTextModel(CLIPTextConfig.from_json_file(CONFIGS / "text_encoder" / "config.json"))
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    unet.half().save_pretrained(folder / "unet", safe_serialization=True, variant="fp16")
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    torch.save(vae.state_dict(), folder / "vae" / "diffusion_pytorch_model.bin")  # must stay unread
    text.save_pretrained(folder / "text_encoder", safe_serialization=True)
    PNDMScheduler.from_pretrained(CONFIGS / "scheduler").save_pretrained(folder / "scheduler")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"unet": count(unet), "vae": count(vae), "text_encoder": count(text)}


def as_hf_cache(folder: Path, cache: Path) -> Path:
    """``folder`` moved into ``cache`` as huggingface_hub caches a download; returns the snapshot."""
    repo = cache / ("models--" + REPO.replace("/", "--"))
    blobs, snapshot = repo / "blobs", repo / "snapshots" / COMMIT
    blobs.mkdir(parents=True)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        blob = blobs / digest
        if not blob.exists():
            shutil.move(str(path), blob)
        target = snapshot / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.path.relpath(blob, target.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def run(name: str, argv: list[str], env: dict, cache: Path, work: Path) -> dict:
    """One CLI command in its own process: wall time, peak RSS (of it and its children), files opened."""
    trace = work / f"{name}.strace"
    prefix = ["strace", "-f", "-qq", "-e", "trace=openat", "-o", str(trace)] if shutil.which("strace") else []
    probe = (
        "import resource, subprocess, sys; "
        "rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)"
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", probe, *prefix, sys.executable, "-m", "pie_cli", *argv],
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    lines = proc.stderr.strip().splitlines()
    peak_kb = int(lines[-1]) if lines and lines[-1].isdigit() else None
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    opened: set[str] = set()
    if trace.exists():
        snapshot = str(cache)
        for line in trace.read_text(errors="replace").splitlines():
            match = re.search(r'openat\([^,]+, "([^"]+)"', line)
            if match and match.group(1).startswith(snapshot) and "= -1" not in line:
                opened.add(os.path.relpath(match.group(1), snapshot))
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1) if peak_kb else None,  # strace's own RSS is tiny
        "files_opened": sorted(p for p in opened if p.startswith(("snapshots/", "blobs/"))),
        "stdout": proc.stdout.strip()[-2000:],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pie-full-size-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "hf-cache"
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "PIE_HOME": str(work / "pie-home"),
        "PYTHONPATH": str(ROOT),
    }
    try:
        started = time.perf_counter()
        params = build_model(work / "model")
        snapshot = as_hf_cache(work / "model", cache)
        build_seconds = round(time.perf_counter() - started, 1)
        from PIL import Image

        from pie_cli.demo.phantom import chest_phantom

        image, _, left = chest_phantom(512, seed=0)
        image.save(work / "chest.png")
        left.save(work / "left-lung.png")
        data = work / "data"
        data.mkdir()
        image.save(data / "0.png")
        Image.open(work / "chest.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(data / "1.png")
        (data / "metadata.jsonl").write_text(
            '{"file_name": "0.png", "text": "large left pleural effusion"}\n'
            '{"file_name": "1.png", "text": "no finding"}\n'
        )
        commands = {
            "models info": ["models", "info", REPO],
            "simulate 512 px, 1 step, T 4": [
                "simulate",
                str(work / "chest.png"),
                "--mask",
                str(work / "left-lung.png"),
                "--prompt",
                "large left pleural effusion",
                "--model",
                REPO,
                "--steps",
                "1",
                "--inference-steps",
                "4",
                "--resolution",
                "512",
                "--device",
                "cpu",
                "--out",
                str(work / "run"),
            ],  # fmt: skip
            "finetune lora 2 steps, 512 px, batch 1, grad ckpt": [
                "finetune",
                "--data",
                str(data),
                "--model",
                REPO,
                "--method",
                "lora",
                "--max-steps",
                "2",
                "--resolution",
                "512",
                "--batch-size",
                "1",
                "--gradient-checkpointing",
                "--num-workers",
                "0",
                "--out",
                str(work / "ft"),
            ],  # fmt: skip
        }
        results = {name: run(re.sub(r"\W+", "_", name), argv, env, snapshot.parent.parent, work)
                   for name, argv in commands.items()}  # fmt: skip
        manifest = json.loads((work / "run" / "manifest.json").read_text())
        results["simulate 512 px, 1 step, T 4"]["loaded"] = [w["file"] for w in manifest["model"]["weights"]]
        results["simulate 512 px, 1 step, T 4"]["progression_step_seconds"] = manifest["frames"][1]["seconds"]
        with open(work / "ft" / "metrics.csv") as fh:
            rows = list(csv.DictReader(fh))
        results["finetune lora 2 steps, 512 px, batch 1, grad ckpt"]["step_seconds"] = [
            round(float(r["seconds"]), 1)
            for r in rows  # metrics.csv: seconds of each step
        ]
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    import torch

    record = {
        "what": "SD-1.5-shaped model (real configs, random weights) in a real-shaped HF cache, through the CLI",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
        "parameters": params,
        "build_and_cache_seconds": build_seconds,
        "commands": {k: {kk: vv for kk, vv in v.items() if kk != "stdout"} for k, v in results.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "full_size.json").write_text(json.dumps(record, indent=2) + "\n")
    print("| command | wall (s) | peak RSS (MB) | weights loaded | weight files opened |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        opened = [f.split("/", 2)[-1] for f in r["files_opened"] if f.endswith((".safetensors", ".bin"))]
        loaded = ", ".join(r.get("loaded", [])) or "-"
        print(f"| {name} | {r['seconds']} | {r['peak_rss_mb']} | {loaded} | {', '.join(opened) or '-'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
