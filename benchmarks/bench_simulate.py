"""pie's progression core against a straightforward baseline, in one process.

The baseline does per step what the original PIE code does: the prompt is re-encoded, the
initial image is re-encoded and sampled three times, everything in fp32, one trajectory.
pie encodes the text once (one batch), the initial image once, and batches K trajectories
through one UNet call per denoising step.

    python benchmarks/bench_simulate.py                  # tiny model 64 px + SD-1.5-shaped 256 px (CPU)
    python benchmarks/bench_simulate.py --configs tiny   # quick
    python benchmarks/bench_simulate.py --device cuda    # on a GPU: SD-1.5-shaped at 512 px, fp16 too

Reports, per configuration: seconds per progression step (median of repeats), the ratio
pie/baseline, UNet / VAE-encode / VAE-decode / text-encoder calls per run, peak memory (RSS on
CPU, torch.cuda.max_memory_allocated on GPU) and K-trajectory throughput (frames/s) for
K = 1, 4, 8; and how long `pie --help` takes to start. Writes benchmarks/results/simulate.json
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pie_cli.core.parameters import PieConfig  # noqa: E402
from pie_cli.core.progression import (  # noqa: E402
    Components,
    decode_latents,
    encode_posterior,
    encode_text,
    fresh_scheduler,
    image_to_tensor,
    mask_to_latent,
    progress_batch,
    step_timesteps,
)
from pie_cli.demo.phantom import Findings, render  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


class Counter:
    """Counts calls of the model parts (and the batch each call had)."""

    def __init__(self, c: Components) -> None:
        self.counts = {"unet": 0, "vae_encode": 0, "vae_decode": 0, "text_encoder": 0}
        self._orig = []
        for name, obj, attr in (
            ("unet", c.unet, "forward"),
            ("vae_encode", c.vae, "encode"),
            ("vae_decode", c.vae, "decode"),
            ("text_encoder", c.text_encoder, "forward"),
        ):
            fn = getattr(obj, attr)
            self._orig.append((obj, attr, fn))
            setattr(obj, attr, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def wrapper(*a, **k):
            self.counts[name] += 1
            return fn(*a, **k)

        return wrapper

    def reset(self) -> None:
        self.counts = dict.fromkeys(self.counts, 0)

    def close(self) -> None:
        for obj, attr, _ in self._orig:
            delattr(obj, attr)


class PeakMemory:
    """Peak RSS (CPU, sampled) or max allocated CUDA memory while the block runs, in MB."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._stop = False
            self._proc = psutil.Process()
            self.peak = self._proc.memory_info().rss

            def sample():
                while not self._stop:
                    self.peak = max(self.peak, self._proc.memory_info().rss)
                    time.sleep(0.005)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop = True
            self._thread.join()
        self.peak /= 1e6


@torch.no_grad()
def baseline(c: Components, image, mask, config: PieConfig, seed: int) -> list[float]:
    """The original code's per-step work: text and initial image re-encoded every step, fp32."""
    g = torch.Generator("cpu").manual_seed(seed)
    device = c.device
    from pie_cli.imaging.media import prepare_image

    x0 = prepare_image(image, config.resolution)
    sf = c.vae.config.scaling_factor
    frame = x0
    times = []
    for _ in range(config.steps):
        start = time.perf_counter()
        emb = encode_text(c, [config.negative_prompt, config.prompt])
        z_inits = [
            sf * encode_posterior(c, image_to_tensor(x0, device)).sample(generator=g) for _ in range(3)
        ]
        z_init = z_inits[0]
        m = mask_to_latent(mask, tuple(z_init.shape[-2:]), z_init.shape[1], device)
        sched = fresh_scheduler(c)
        ts = step_timesteps(sched, config.inference_steps, config.strength, device)
        z = sf * encode_posterior(c, image_to_tensor(frame, device)).sample(generator=g)
        z_t = sched.add_noise(z, torch.randn(z.shape, generator=g), ts[:1])
        e2 = torch.randn(z.shape, generator=g)
        for i, t in enumerate(ts):
            if i > 0:
                z_t = sched.add_noise(z_inits[1], e2, t.reshape(1)) * (1 - m) + z_t * m
            eps_u, eps_c = c.unet(torch.cat([z_t, z_t]), t, encoder_hidden_states=emb).sample.chunk(2)
            z_t = sched.step(eps_u + config.guidance_scale * (eps_c - eps_u), t, z_t).prev_sample
        z_out = z_inits[2] + (z_t - z_inits[2]) * (config.beta1 * (1 - m) + config.beta2 * m)
        frame = decode_latents(c, z_out)[0]
        times.append(time.perf_counter() - start)
    return times


def pie_run(c: Components, image, mask, config: PieConfig, seeds: list[int]) -> list[float]:
    times = []
    start = time.perf_counter()
    for n, _ in enumerate(progress_batch(c, image, mask, config, seeds=seeds)):
        now = time.perf_counter()
        if n > 0:
            times.append(now - start)
        start = now
    return times


def sd15_shaped(directory: Path, device: torch.device, dtype: torch.dtype) -> Components:
    """A randomly initialised model with SD 1.5's UNet / VAE / text-encoder configuration."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pie_cli.demo.tiny import SD1_SCHEDULER, write_tokenizer

    size, vocab = write_tokenizer(directory / "tokenizer", max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=size,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer")
    scheduler = PNDMScheduler.from_config({k: v for k, v in SD1_SCHEDULER.items() if k != "_class_name"})
    for m in (unet, text):
        m.to(device, dtype=dtype).eval()
    vae.to(device, dtype=torch.float32 if dtype == torch.float16 else dtype).eval()
    return Components(unet, vae, text, tokenizer, scheduler)


def measure(
    name: str, c: Components, resolution: int, steps: int, inference_steps: int, repeats: int, ks: list[int]
) -> dict:
    ph = render(Findings(), seed=1, size=resolution, supersample=1)
    config = PieConfig(
        prompt="large left pleural effusion",
        steps=steps,
        inference_steps=inference_steps,
        resolution=resolution,
    )
    counter = Counter(c)
    report: dict = {
        "configuration": name,
        "resolution": resolution,
        "steps": steps,
        "inference_steps": inference_steps,
        "device": str(c.device),
        "dtype": str(c.unet.dtype).replace("torch.", ""),
    }
    with torch.no_grad():
        pie_run(c, ph.image, ph.left_lung, PieConfig(**{**config.__dict__, "steps": 1}), [0])  # warm-up
    runs = {
        "baseline": lambda: baseline(c, ph.image, ph.left_lung, config, 0),
        "pie": lambda: pie_run(c, ph.image, ph.left_lung, config, [0]),
    }
    per_step: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
        for label, fn in runs.items():
            counter.reset()
            with PeakMemory(c.device) as mem:
                per_step[label] += fn()
            report[label] = {
                "calls": dict(counter.counts),
                "peak_memory_mb": max(round(mem.peak, 1), report.get(label, {}).get("peak_memory_mb", 0.0)),
            }
    for label in runs:
        report[label]["seconds_per_step"] = statistics.median(per_step[label])
    report["ratio_pie_over_baseline"] = (
        report["pie"]["seconds_per_step"] / report["baseline"]["seconds_per_step"]
    )
    report["trajectories"] = {}
    for k in ks:
        start = time.perf_counter()
        pie_run(c, ph.image, ph.left_lung, config, list(range(k)))
        elapsed = time.perf_counter() - start
        report["trajectories"][str(k)] = {"frames_per_s": k * steps / elapsed, "seconds": elapsed}
    counter.close()
    return report


def _calls(report: dict) -> str:
    return "/".join(str(report["calls"][k]) for k in ("unet", "vae_encode", "vae_decode", "text_encoder"))


def help_startup() -> float:
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pie_cli", "--help"], capture_output=True, check=True)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,sd15", help="tiny, sd15 (comma list)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "tiny" in args.configs:
            from pie_cli.core.devices import choose_placement
            from pie_cli.core.loading import load
            from pie_cli.core.registry import resolve
            from pie_cli.demo.tiny import build_tiny_model

            comps = load(resolve(str(build_tiny_model(tmp / "tiny"))), choose_placement(args.device, "fp32"))
            reports.append(measure("tiny test model", comps, 64, 4, 50, args.repeats, [1, 4, 8]))
        if "sd15" in args.configs:
            resolution = 512 if device.type == "cuda" else 256
            dtypes = [torch.float32, torch.float16] if device.type == "cuda" else [torch.float32]
            for dtype in dtypes:
                comps = sd15_shaped(tmp / "sd15", device, dtype)
                steps, t = (10, 50) if device.type == "cuda" else (2, 10)
                reports.append(
                    measure(
                        f"SD-1.5-shaped ({str(dtype).replace('torch.', '')})",
                        comps,
                        resolution,
                        steps,
                        t,
                        1 if device.type == "cpu" else args.repeats,
                        [1, 4] if device.type == "cpu" else [1, 4, 8],
                    )
                )
                del comps
    data = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        + (torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"),
        "date": time.strftime("%Y-%m-%d"),
        "pie_help_seconds": round(help_startup(), 3),
        "results": reports,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "simulate.json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"machine: {data['machine']}; `pie --help`: {data['pie_help_seconds']:.2f} s\n")
    print(
        "| configuration | px | s/step baseline | s/step pie | pie/baseline | calls per run (UNet / enc / dec / text) "
        "baseline -> pie | peak MB baseline / pie | frames/s K=1 / 4 / 8 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in reports:
        b, p = r["baseline"], r["pie"]
        tput = " / ".join(f"{v['frames_per_s']:.2f}" for v in r["trajectories"].values())
        print(
            f"| {r['configuration']} | {r['resolution']} | {b['seconds_per_step']:.3f} | {p['seconds_per_step']:.3f} "
            f"| {r['ratio_pie_over_baseline']:.2f} | {_calls(b)} -> {_calls(p)} | {b['peak_memory_mb']:.0f} / "
            f"{p['peak_memory_mb']:.0f} | {tput} |"
        )


if __name__ == "__main__":
    main()
