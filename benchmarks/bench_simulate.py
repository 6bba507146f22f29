"""pie's `simulate` core against the peers a user would otherwise run, in one process, interleaved.

Peers, on the same randomly initialised SD-1.5-shaped parts (UNet, VAE, CLIP text encoder):

- ``diffusers_loop`` (no mask): the loop a user writes over diffusers' ``StableDiffusionImg2ImgPipeline``:
  each progression step is one img2img call on the previous frame (same strength, T and guidance).
- ``original`` (mask): the original PIE code's per-step work: the prompt re-encoded and the initial
  image encoded and sampled three times at every step, then the masked denoising, fp32.

pie runs the same work with its defaults (``tune_for_speed``: on the CPU channels-last with weights
packed for oneDNN), without and with the mask, in fp32 and in bf16. Every round runs each
configuration once, in turn, so a change of machine load hits all of them alike; each ratio
pie/peer is the median of the rounds' ratios. Peak memory is measured per configuration in a
child process of its own (the high-water mark of its RSS, ``ru_maxrss``; CUDA: max allocated),
model loading included (VmHWM on Linux), since one process holding every model says nothing about one.

    python benchmarks/bench_simulate.py               # SD-1.5-shaped, 256 px, T=10, 2 steps, 2 threads (CPU)
    python benchmarks/bench_simulate.py --quick       # the tiny test model at 64 px, one round: checks the script
    python benchmarks/bench_simulate.py --compile     # also: torch.compile (inductor, freezing) of the UNet
    python benchmarks/bench_simulate.py --trajectories 4   # also: K=4 batched vs 4 single pie runs

Writes benchmarks/results/simulate.json (``--results PATH`` elsewhere; with --quick only there) and prints a
markdown table. The goals of
issue 18 are reported as measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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
PROMPT = "large left pleural effusion"
# Issue 18's goals: pie's seconds over the peer's (measured, not asserted), and peak RSS.
GOALS = {
    "pie_fp32_nomask / diffusers_loop": 0.95,
    "pie_fp32_mask / original": 0.85,
    "pie_bf16_mask / original": 0.6,
}


class Counter:
    """Counts calls of the model parts (and the batch each call had)."""

    def __init__(self, c: Components) -> None:
        self.counts = {"unet": 0, "vae_encode": 0, "vae_decode": 0, "text_encoder": 0}
        self.batches: dict[str, list[int]] = {k: [] for k in self.counts}
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
            first = a[0] if a else next(iter(k.values()), None)
            if isinstance(first, torch.Tensor):
                self.batches[name].append(first.shape[0])
            return fn(*a, **k)

        return wrapper

    def reset(self) -> None:
        self.counts = dict.fromkeys(self.counts, 0)
        self.batches = {k: [] for k in self.counts}

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


# --------------------------------------------------------------------------- the runners (one whole run each)


@torch.no_grad()
def baseline(c: Components, image, mask, config: PieConfig, seed: int) -> list[float]:
    """The original code's per-step work: text and initial image re-encoded every step, fp32. Seconds per step."""
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
        # Noise drawn on the CPU generator (as the authors' code seeds it), then moved to the latents' device.
        z_t = sched.add_noise(z, torch.randn(z.shape, generator=g).to(device), ts[:1])
        e2 = torch.randn(z.shape, generator=g).to(device)
        for i, t in enumerate(ts):
            if i > 0:
                z_t = sched.add_noise(z_inits[1], e2, t.reshape(1)) * (1 - m) + z_t * m
            eps_u, eps_c = c.unet(torch.cat([z_t, z_t]), t, encoder_hidden_states=emb).sample.chunk(2)
            z_t = sched.step(eps_u + config.guidance_scale * (eps_c - eps_u), t, z_t).prev_sample
        z_out = z_inits[2] + (z_t - z_inits[2]) * (config.beta1 * (1 - m) + config.beta2 * m)
        frame = decode_latents(c, z_out)[0]
        times.append(time.perf_counter() - start)
    return times


def original(c: Components, image, mask, config: PieConfig, seed: int) -> float:
    return sum(baseline(c, image, mask, config, seed))


def img2img_pipeline(c: Components):
    """diffusers' StableDiffusionImg2ImgPipeline on the parts of ``c``, with a scheduler of its own."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from pie_cli.core.loading import as_pipeline

    return as_pipeline(
        Components(**{**c.__dict__, "scheduler": fresh_scheduler(c)}), StableDiffusionImg2ImgPipeline
    )


def diffusers_loop(pipe, image, config: PieConfig, seed: int) -> float:
    """What a user writes over diffusers: one img2img call per progression step, on the previous frame."""
    from pie_cli.imaging.media import prepare_image

    start = time.perf_counter()
    generator = torch.Generator("cpu").manual_seed(seed)
    frame = prepare_image(image, config.resolution)
    for _ in range(config.steps):
        frame = pipe(
            config.prompt,
            image=frame,
            strength=config.strength,
            num_inference_steps=config.inference_steps,
            guidance_scale=config.guidance_scale,
            generator=generator,
        ).images[0]
    return time.perf_counter() - start


def pie(c: Components, image, mask, config: PieConfig, seeds: list[int]) -> float:
    """One whole pie run (preparation, text encoding and every step), K = len(seeds) trajectories."""
    start = time.perf_counter()
    for _ in progress_batch(c, image, mask, config, seeds=seeds):
        pass
    return time.perf_counter() - start


# --------------------------------------------------------------------------- models


def build_sd15(directory: Path) -> Path:
    """A randomly initialised model with SD 1.5's UNet / VAE / text-encoder configuration, saved in diffusers layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pie_cli.demo.tiny import write_pipeline_files, write_tokenizer

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
    unet.save_pretrained(directory / "unet", safe_serialization=True)
    del unet
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
    vae.save_pretrained(directory / "vae", safe_serialization=True)
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
    text.save_pretrained(directory / "text_encoder", safe_serialization=True)
    write_pipeline_files(directory)  # SD 1.x's PNDM scheduler config and model_index.json
    return directory


def build_tiny(directory: Path) -> Path:
    from pie_cli.demo.tiny import build_tiny_model

    return build_tiny_model(directory, seed=0)


def parts(model: Path, device: str, dtype: str) -> tuple[Components, object]:
    """A fresh copy of the model's parts (never the loader's cached one: tuning changes modules in place)."""
    from pie_cli.core.devices import choose_placement
    from pie_cli.core.loading import load_parts, load_scheduler, quiet_libraries
    from pie_cli.core.registry import resolve

    placement = choose_placement(device, dtype)
    source = resolve(str(model))
    with quiet_libraries(False):
        unet, vae, text, tokenizer = load_parts(source, dtype=placement.dtype, vae_dtype=placement.vae_dtype)
    for module in (unet, vae, text):
        module.eval().requires_grad_(False).to(placement.device)
    return Components(unet, vae, text, tokenizer, load_scheduler(source)), placement


def tuned(model: Path, device: str, dtype: str, **tuning) -> tuple[Components, dict]:
    """pie's model as `pie simulate` runs it (core.devices.tune_for_speed)."""
    from pie_cli.core.devices import tune_for_speed

    c, placement = parts(model, device, dtype)
    return c, tune_for_speed(c, placement, **tuning)


# --------------------------------------------------------------------------- one configuration, one child


CONFIGS = (
    "diffusers_loop",
    "pie_fp32_nomask",
    "original",
    "pie_fp32_mask",
    "pie_bf16_mask",
    "pie_bf16_nomask",
)


def inputs(resolution: int):
    ph = render(Findings(), seed=1, size=resolution, supersample=1)
    return ph.image, ph.left_lung


def run_config(name: str, comps: dict, image, mask, config: PieConfig, seed: int = 0) -> float:
    """Seconds of one whole run of configuration ``name`` (``comps``: "plain", "pipe", "fp32", "bf16")."""
    if name == "diffusers_loop":
        return diffusers_loop(comps["pipe"], image, config, seed)
    if name == "original":
        return original(comps["plain"], image, mask, config, seed)
    dtype, masked = name.split("_")[1:]
    return pie(comps[dtype], image, mask if masked == "mask" else None, config, [seed])


def child(args) -> None:
    """One configuration alone in this process: load, one run; print its peak memory (JSON)."""
    torch.set_num_threads(args.threads)
    image, mask = inputs(args.resolution)
    config = bench_config(args)
    name = args.child
    comps: dict = {}
    started = time.perf_counter()
    if name in ("diffusers_loop", "original"):
        comps["plain"] = parts(args.model, args.device, "fp32")[0]
        comps["pipe"] = img2img_pipeline(comps["plain"])
    else:
        dtype = name.split("_")[1]
        comps[dtype] = tuned(args.model, args.device, dtype)[0]
    loaded = time.perf_counter() - started
    device = torch.device(args.device)
    if device.type == "cuda":
        load_peak = torch.cuda.max_memory_allocated(device) / 1e6
        torch.cuda.reset_peak_memory_stats(device)
    else:
        load_peak = peak_rss_mb()
        reset_peak_rss()
    seconds = run_config(name, comps, image, mask, config)
    run_peak = torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else peak_rss_mb()
    print(
        json.dumps(
            {
                "config": name,
                "peak_mb": round(max(load_peak, run_peak), 1),  # the process's: loading included
                "load_peak_mb": round(load_peak, 1),
                "run_peak_mb": round(run_peak, 1),  # from the loaded model on (the model included)
                "load_s": round(loaded, 2),
                "run_s": round(seconds, 2),
            }
        )
    )


def peak_rss_mb() -> float:
    """This process's RSS high-water mark, in MB.

    Linux: ``VmHWM``, which belongs to the process's own memory map. (``ru_maxrss`` would not do:
    it keeps the high-water mark of the parent that forked the child, carried across exec.)
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e3  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    refs = Path("/proc/self/clear_refs")
    if refs.exists():
        refs.write_text("5")


def in_child(args, *extra: str) -> dict:
    """Run this script again in a child process with the run's settings and ``extra``; its last line's JSON."""
    argv = [sys.executable, __file__, "--model", str(args.model), "--device", args.device]
    for option in ("threads", "resolution", "steps", "inference_steps", "rounds"):
        argv += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    done = subprocess.run([*argv, *extra], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_in_child(name: str, args) -> dict:
    return in_child(args, "--child", name)


# --------------------------------------------------------------------------- torch.compile on the CPU


def compile_child(args) -> None:
    """UNet calls (batch 2) three ways, interleaved after the compile: plain eager, pie's packed eager
    (tune_for_speed) and torch.compile (inductor, freezing) of the plain UNet; compile seconds, s/call."""
    torch.set_num_threads(args.threads)
    plain = parts(args.model, args.device, "fp32")[0].unet
    packed = tuned(args.model, args.device, "fp32")[0].unet
    latent = args.resolution // 8
    z = torch.randn(2, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(2, 77, plain.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    ts = [torch.tensor(t) for t in (901, 801, 701, 601, 501, 401)]

    def call(unet, i: int) -> float:
        start = time.perf_counter()
        unet(z, ts[i % len(ts)], encoder_hidden_states=emb)
        return time.perf_counter() - start

    with torch.no_grad():
        call(plain, 0), call(packed, 0)
        compiled = torch.compile(plain, options={"freezing": True})
        first = call(compiled, 0)
        call(compiled, 1)  # a second timestep: any recompilation happens here, not in the rounds
        times: dict[str, list[float]] = {"plain": [], "packed": [], "compiled": []}
        for i in range(2, 2 + args.rounds):
            for name, unet in (("plain", plain), ("packed", packed), ("compiled", compiled)):
                times[name].append(call(unet, i))
    out: dict = {f"{k}_s_per_call": round(statistics.median(v), 3) for k, v in times.items()}
    out["compile_s"] = round(first - out["compiled_s_per_call"], 1)
    gain = out["packed_s_per_call"] - out["compiled_s_per_call"]
    out["break_even_unet_calls"] = round(out["compile_s"] / gain) if gain > 0 else None  # vs packed eager
    out["rounds"] = {k: [round(x, 3) for x in v] for k, v in times.items()}
    print(json.dumps(out))


def compile_in_child(args) -> dict:
    return in_child(args, "--compile-child")


# --------------------------------------------------------------------------- the interleaved rounds


def bench_config(args) -> PieConfig:
    return PieConfig(
        prompt=PROMPT,
        steps=args.steps,
        inference_steps=args.inference_steps,
        resolution=args.resolution,
        strength=0.5,
        guidance_scale=7.5,
    )


def interleaved(args, names: list[str]) -> dict:
    image, mask = inputs(args.resolution)
    config = bench_config(args)
    comps: dict = {}
    comps["plain"] = parts(args.model, args.device, "fp32")[0]
    comps["pipe"] = img2img_pipeline(comps["plain"])
    tuning = {}
    for dtype in ("fp32", "bf16"):
        if any(n.startswith(f"pie_{dtype}") for n in names):
            comps[dtype], tuning[dtype] = tuned(args.model, args.device, dtype)
    counters = {key: Counter(comps[key]) for key in ("plain", "fp32", "bf16") if key in comps}
    calls = {}
    warm = PieConfig(**{**config.__dict__, "steps": 1, "inference_steps": 2})
    for name in names:  # first calls create oneDNN's kernels and caches: not timed
        run_config(name, comps, image, mask, warm)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names:
            key = "plain" if name in ("diffusers_loop", "original") else name.split("_")[1]
            counters[key].reset()
            seconds[name].append(run_config(name, comps, image, mask, config))
            calls[name] = {**counters[key].counts, "unet_batch": sorted(set(counters[key].batches["unet"]))}
        print(f"  round {r + 1}: " + ", ".join(f"{n} {seconds[n][-1]:.1f} s" for n in names), flush=True)
    trajectories = None
    if args.trajectories > 1 and "fp32" in comps:
        k = args.trajectories
        batched = pie(comps["fp32"], image, mask, config, list(range(k)))
        singles = sum(pie(comps["fp32"], image, mask, config, [s]) for s in range(k))
        trajectories = {
            "k": k,
            "batched_s": round(batched, 2),
            "singles_s": round(singles, 2),
            "ratio": round(batched / singles, 3),
        }
    for counter in counters.values():
        counter.close()
    return {"seconds": seconds, "calls": calls, "tuning": tuning, "trajectories": trajectories}


def ratios(seconds: dict[str, list[float]], a: str, b: str) -> dict | None:
    if a not in seconds or b not in seconds:
        return None
    per_round = [x / y for x, y in zip(seconds[a], seconds[b], strict=True)]
    return {
        "median": round(statistics.median(per_round), 3),
        "rounds": [round(r, 3) for r in per_round],
    }


def help_startup() -> float:
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pie_cli", "--help"], capture_output=True, check=True)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--inference-steps", type=int, default=10)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma list of " + ", ".join(CONFIGS))
    parser.add_argument(
        "--quick", action="store_true", help="the tiny model at 64 px, one round, no results file"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile of the UNet")
    parser.add_argument("--trajectories", type=int, default=1, help="also time K batched vs K single runs")
    parser.add_argument(
        "--results",
        type=Path,
        help="where to write the JSON (default benchmarks/results/simulate.json; --quick: none)",
    )
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.compile_child:
        return compile_child(args)
    torch.set_num_threads(args.threads)
    names = [n for n in args.configs.split(",") if n]
    if args.quick:
        args.resolution, args.rounds = 64, 1
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        args.model = (build_tiny if args.quick else build_sd15)(Path(tmp) / "model")
        print(f"model built in {time.perf_counter() - started:.0f} s; rounds:", flush=True)
        measured = interleaved(args, names)
        memory = {} if args.no_memory else {name: peak_in_child(name, args) for name in names}
        compiled = compile_in_child(args) if args.compile else None
    seconds = measured["seconds"]
    pairs = {
        "pie_fp32_nomask / diffusers_loop": ratios(seconds, "pie_fp32_nomask", "diffusers_loop"),
        "pie_fp32_mask / original": ratios(seconds, "pie_fp32_mask", "original"),
        "pie_bf16_mask / original": ratios(seconds, "pie_bf16_mask", "original"),
        "pie_bf16_nomask / diffusers_loop": ratios(seconds, "pie_bf16_nomask", "diffusers_loop"),
    }
    goals = {
        pair: {"measured": pairs[pair]["median"], "goal": goal, "met": pairs[pair]["median"] <= goal}
        for pair, goal in GOALS.items()
        if pairs.get(pair)
    }
    if memory.get("diffusers_loop"):
        limit = memory["diffusers_loop"]
        goals["peak RSS <= diffusers_loop's"] = {
            name: {
                "peak_mb": m["peak_mb"],
                "met": m["peak_mb"] <= limit["peak_mb"],
                "run_peak_mb": m["run_peak_mb"],
                "run_met": m["run_peak_mb"] <= limit["run_peak_mb"],
            }
            for name, m in memory.items()
            if name.startswith("pie_")
        }
    data = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        + (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "no GPU"),
        "date": time.strftime("%Y-%m-%d"),
        "setup": {
            "model": "tiny test model" if args.quick else "SD-1.5-shaped, random weights",
            "resolution": args.resolution,
            "inference_steps": args.inference_steps,
            "strength": 0.5,
            "guidance_scale": 7.5,
            "progression_steps": args.steps,
            "threads": args.threads,
            "rounds": args.rounds,
            "device": args.device,
        },
        "pie_tuning": measured["tuning"],
        "seconds_per_run": {n: [round(s, 2) for s in v] for n, v in seconds.items()},
        "median_seconds_per_run": {n: round(statistics.median(v), 2) for n, v in seconds.items()},
        "ratios": {k: v for k, v in pairs.items() if v},
        "goals": goals,
        "calls_per_run": measured["calls"],
        "peak_memory_mb": memory,
        "trajectories": measured["trajectories"],
        "compile": compiled,
        "pie_help_seconds": round(help_startup(), 3),
    }
    results = args.results or (None if args.quick else RESULTS / "simulate.json")
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nmachine: {data['machine']}; `pie --help`: {data['pie_help_seconds']:.2f} s")
    print(
        "\n| configuration | s per run (median) | calls per run (UNet / enc / dec / text), UNet batch "
        "| peak RSS MB (process / from the loaded model on) |"
    )
    print("|---|---|---|---|")
    for n in names:
        c = measured["calls"][n]
        m = memory.get(n)
        peak = f"{m['peak_mb']:.0f} / {m['run_peak_mb']:.0f}" if m else "-"
        print(
            f"| {n} | {data['median_seconds_per_run'][n]:.2f} | {c['unet']}/{c['vae_encode']}/{c['vae_decode']}/"
            f"{c['text_encoder']}, {c['unet_batch']} | {peak} |"
        )
    print("\n| ratio | median | per round | goal |")
    print("|---|---|---|---|")
    for pair, r in data["ratios"].items():
        goal = GOALS.get(pair)
        verdict = f"<= {goal}: {'met' if r['median'] <= goal else 'missed'}" if goal else ""
        print(f"| {pair} | {r['median']:.3f} | {' / '.join(f'{x:.3f}' for x in r['rounds'])} | {verdict} |")
    if measured["trajectories"]:
        t = measured["trajectories"]
        print(
            f"\nK={t['k']} batched: {t['batched_s']} s vs {t['k']} single runs {t['singles_s']} s: {t['ratio']}x"
        )
    if compiled:
        print(f"\ntorch.compile (inductor, freezing): {compiled}")


if __name__ == "__main__":
    main()
