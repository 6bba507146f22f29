"""pie's CUDA path in one prepared command: correctness, speed and training on a lent GPU (issue 17).

    python3 benchmarks/gpu/check.py --wheels .cache/gpu-wheels       # on the GPU machine (README.md)
    python benchmarks/gpu/check.py --smoke --device cpu              # the CPU rehearsal (make bench-smoke)

With ``--wheels DIR`` the wheels there (``make gpu-wheels``) are installed first into a private
target (``--target``, default /tmp/pie-deps; pip with ``--no-index``, or plain unzipping when pip
fails) and the check runs again in a child process with that target first on ``PYTHONPATH``, so
the carried pins win over the machine's own packages. No weights are downloaded: the
SD-1.5-shaped model is built on the spot from pie's own SD 1.x configs (random weights, fixed seed,
on the device), written in diffusers layout and loaded through pie's registry and loader.

Sections, most important first; each is guarded (an exception is recorded as its error and the
next section runs), and one that would overrun the time budget is recorded as "skipped: budget":

    environment       machine, GPU, torch/CUDA/cuDNN, TF32 flags, the packages and where they came from
    correctness_tiny  the tiny test model: device fp32 frames vs CPU fp32 frames; K trajectories = K single runs
    nan_guard         a forced overflow in the VAE decoder and in the UNet raises pie's NumericalError
    sd_model          the SD-1.5-shaped model (859.5M-parameter UNet) built on the device and saved
    speed_fp32        (a) the original method's per-step work (benchmarks/bench_simulate.baseline), fp32;
                      (b) pie fp32; calls per run
    speed_half        (c) pie fp16 and bf16 (SDPA attention), their frames against fp32's; pie simulate's
                      default (tune_for_speed: channels-last on CUDA, eager) in the faster of the two
    training          `pie finetune --method lora` steps/s at 512 px, batch 8, bf16, gradient checkpointing
                      off and on; `--method full` peak memory (pie's training service on a generated dataset)
    speed_compiled    (d) (c) + channels-last + torch.compile (pie's tune_for_speed); frames against eager
    speed_cudagraphs  (e) (d) with CUDA graphs (torch.compile mode="reduce-overhead"); frames against eager
    trajectories      frames/s for K = 1, 4, 8, 16 in the fastest mode; K = 4 against 4 single runs
    cuda_tests        pytest tests/core/test_cuda.py (the tests that skip without a GPU)

Every progression of the SD-1.5-shaped model is 512 px, 10 steps, T = 50, strength 0.5, guidance
7.5, with a mask (the chest phantom's left lung); the tiny model's runs are the same at its own 64 px.
``--smoke`` shrinks everything (64 px, 2 steps, T = 4, K <= 2, 1-2 training steps, the SD configs at
the tiny model's widths). Timings exclude the warm-up (a 2-step run, reported as ``first_call_s``: for
compiled modes that is the compile) and synchronise the device around them; peak memory is
torch.cuda.max_memory_allocated, reset before each run (RSS on the CPU).

Writes gpu.json (every figure) and gpu.md (summary tables) into --out, default $OUT when set (the
device tool brings that folder back), else benchmarks/results/; ``--smoke`` writes gpu-smoke.*.
Both are rewritten after every section. Exit status: 0 when every check that ran passed and no
section failed, 1 otherwise, 2 for bad options.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "pie_cli" / "core" / "configs" / "sd-v1"
INSTALLED = "PIE_GPU_CHECK_INSTALLED"  # the child's marker: JSON of the parent's install record
STARTED = "PIE_GPU_CHECK_STARTED"  # the parent's start (the budget counts the install too)
PROMPT = "large left pleural effusion"
# The packages whose versions and origin (carried wheel or the machine's own) are recorded.
PACKAGES = (
    "diffusers",
    "transformers",
    "tokenizers",
    "accelerate",
    "peft",
    "huggingface-hub",
    "safetensors",
    "numpy",
    "pillow",
    "pydicom",
    "typer",
    "rich",
    "filelock",
    "pyyaml",
    "psutil",
    "pytest",
)
# Mean |difference| in 8-bit levels allowed between two runs' frames (every frame), by what differs.
# Every 8-bit round trip can turn a rounding difference into a level, and the next step carries it on;
# a wrong implementation (another noise, rows mixed up) differs by far more: each trajectory check
# records "independent", the mean difference between two trajectories of different seeds.
TOLERANCE = {
    "device_vs_cpu_fp32": 1.0,  # other kernels (cuDNN may use TF32 for fp32 convolutions)
    "fp32": 0.5,  # batched vs single in fp32: float reassociation only
    "half": 8.0,  # fp16/bf16: vs fp32, batched vs single, compiled vs eager (rounding at 8 or 11 bits)
}
DISTINCT = 10  # two trajectories' last frames differ by at least this many levels somewhere


class Skip(Exception):
    """A section or part that does not apply here; recorded as ``skipped: <reason>``."""


# --------------------------------------------------------------------------- sizes, budget, report


@dataclass(frozen=True)
class Sizes:
    model: str  # "sd15": SD 1.5's configs; "small": the same configs at the tiny model's widths
    resolution: int
    steps: int
    inference_steps: int
    ks: tuple[int, ...]
    equal_k: int  # the K whose trajectories are compared with single runs
    tiny_resolution: int
    tiny_steps: int
    tiny_inference_steps: int
    tiny_k: int
    train_resolution: int
    train_batch: int
    lora_steps: int
    full_steps: int
    train_images: int
    repeats: int  # timed runs of a mode that takes under ``repeat_below`` seconds
    repeat_below: float
    budget: float
    estimates: dict[str, float] = field(default_factory=dict)  # seconds a section needs to be started


FULL = Sizes(
    model="sd15",
    resolution=512,
    steps=10,
    inference_steps=50,
    ks=(1, 4, 8, 16),
    equal_k=4,
    tiny_resolution=64,
    tiny_steps=10,
    tiny_inference_steps=50,
    tiny_k=4,
    train_resolution=512,
    train_batch=8,
    lora_steps=8,
    full_steps=3,
    train_images=16,
    repeats=2,
    repeat_below=4.0,
    budget=450.0,
    # Guesses for an H100/H200 (nothing has run there yet); a section starts only if this much is left.
    estimates={
        "correctness_tiny": 30,
        "nan_guard": 10,
        "sd_model": 40,
        "speed_fp32": 45,
        "speed_half": 30,
        "speed_compiled": 90,
        "speed_cudagraphs": 70,
        "trajectories": 30,
        "training": 40,
        "cuda_tests": 60,
    },
)
SMOKE = Sizes(
    model="small",
    resolution=64,
    steps=2,
    inference_steps=4,
    ks=(1, 2),
    equal_k=2,
    tiny_resolution=64,
    tiny_steps=2,
    tiny_inference_steps=4,
    tiny_k=2,
    train_resolution=64,
    train_batch=2,
    lora_steps=2,
    full_steps=1,
    train_images=4,
    repeats=1,
    repeat_below=0.0,
    budget=110.0,
    estimates={
        "correctness_tiny": 5,
        "nan_guard": 2,
        "sd_model": 5,
        "speed_fp32": 5,
        "speed_half": 3,
        "speed_compiled": 8,
        "speed_cudagraphs": 8,
        "trajectories": 5,
        "training": 8,
        "cuda_tests": 5,
    },
)


class Clock:
    def __init__(self, budget: float, started: float) -> None:
        self.budget, self.started = budget, started

    def elapsed(self) -> float:
        return time.time() - self.started

    def left(self) -> float:
        return self.budget - self.elapsed()

    def fits(self, seconds: float) -> bool:
        return self.left() >= seconds


def say(clock: Clock | None, text: str) -> None:
    stamp = f"[{clock.elapsed():6.1f}s] " if clock else ""
    print(f"{stamp}{text}", flush=True)


class Report:
    """gpu.json and gpu.md, rewritten (atomically) after every section."""

    def __init__(self, out: Path, stem: str, meta: dict[str, Any]) -> None:
        self.out, self.stem = out, stem
        self.data: dict[str, Any] = {"meta": meta, "checks": {}, "sections": {}}

    def check(self, name: str, passed: bool, measured: Any, tolerance: Any, note: str | None = None) -> bool:
        entry = {"passed": bool(passed), "measured": measured, "tolerance": tolerance}
        if note:
            entry["note"] = note
        self.data["checks"][name] = entry
        return bool(passed)

    def failures(self) -> list[str]:
        failed = [f"check {n}" for n, c in self.data["checks"].items() if not c["passed"]]
        return failed + [
            f"section {n}" for n, s in self.data["sections"].items() if s.get("status") == "error"
        ]

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for suffix, text in (
            (".json", json.dumps(self.data, indent=2, default=str) + "\n"),
            (".md", markdown(self.data)),
        ):
            path = self.out / (self.stem + suffix)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)


@dataclass
class Ctx:
    """What the sections share."""

    device: str
    sizes: Sizes
    tmp: Path
    clock: Clock
    report: Report
    compile_backend: str
    tiny: Path | None = None
    sd: Path | None = None
    frames: dict[str, list[Any]] = field(default_factory=dict)  # mode -> frames (uint8 arrays) of seed 0
    modes: dict[str, dict[str, Any]] = field(default_factory=dict)  # mode -> its speed record
    half: tuple[str, Any, Any] | None = None  # (dtype, components, placement) of the faster eager half mode
    fastest: tuple[str, Any] | None = None  # (mode, components) of the fastest mode so far

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def offer(self, mode: str, components: Any) -> None:
        """Keep ``components`` as the fastest mode when its 10-step progression beat the one kept."""
        if self.fastest is None or self.modes[mode]["seconds"] < self.modes[self.fastest[0]]["seconds"]:
            self.fastest = (mode, components)


def run_section(ctx: Ctx, name: str, fn: Callable[[Ctx, dict], None], needs: tuple[str, ...] = ()) -> None:
    sections = ctx.report.data["sections"]
    record: dict[str, Any] = {}
    sections[name] = record
    missing = [n for n in needs if sections.get(n, {}).get("status") != "ok"]
    estimate = ctx.sizes.estimates.get(name, 0.0)  # none: always runs (the environment)
    if missing:
        record["status"] = f"skipped: needs {', '.join(missing)}"
    elif estimate and not ctx.clock.fits(estimate):
        record["status"] = "skipped: budget"
    else:
        say(ctx.clock, f"{name} ...")
        started, cpu = time.perf_counter(), time.process_time()
        try:
            fn(ctx, record)
            record["status"] = "ok"
        except Skip as why:
            record["status"] = f"skipped: {why}"
        except Exception as exc:
            record["status"] = "error"
            record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            record["traceback"] = traceback.format_exc()[-4000:]
            free(ctx)
        record["seconds"] = round(time.perf_counter() - started, 2)
        record["cpu_s"] = round(time.process_time() - cpu, 2)  # this process's CPU time (a busy machine)
    say(ctx.clock, f"{name}: {record['status']}" + (f" ({record['error']})" if "error" in record else ""))
    ctx.report.save()


# --------------------------------------------------------------------------- installing carried wheels


def install_wheels(wheels: Path, target: Path, use_pip: bool = True) -> dict[str, Any]:
    """Install every wheel in ``wheels`` into ``target`` without an index: pip, else unzip them."""
    files = sorted(wheels.glob("*.whl"))
    if not files:
        raise SystemExit(f"--wheels {wheels}: no .whl files there; run `make gpu-wheels` first.")
    target.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    record: dict[str, Any] = {
        "wheels": len(files),
        "target": str(target),
        "python": platform.python_version(),
    }
    ours = f"cp{sys.version_info.major}{sys.version_info.minor}"
    other = [f.name for f in files if f.stem.split("-")[-2] not in ("none", "abi3", ours)]
    if other:
        record["note"] = (
            f"wheels for another CPython than this {platform.python_version()}: {', '.join(other)}"
        )
    pip_error = None
    if use_pip:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index"]
        cmd += ["--no-deps", "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target)]
        proc = subprocess.run([*cmd, *map(str, files)], capture_output=True, text=True)
        if proc.returncode == 0:
            record["method"] = "pip"
        else:
            pip_error = (proc.stderr or proc.stdout).strip()[-1500:]
    if "method" not in record:
        for wheel in files:
            unzip_wheel(wheel, target)
        record["method"] = "unzip"
        if pip_error:
            record["pip_error"] = pip_error
    record["seconds"] = round(time.perf_counter() - started, 2)
    return record


def unzip_wheel(wheel: Path, target: Path) -> None:
    """A wheel is a zip of its import tree; ``NAME.data/purelib|platlib`` go beside it (what pip does)."""
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    for data in target.glob("*.data"):
        for scheme in ("purelib", "platlib"):
            for item in (data / scheme).glob("*") if (data / scheme).is_dir() else ():
                dest = target / item.name
                if dest.exists():
                    shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
                shutil.move(str(item), str(dest))
        shutil.rmtree(data)


def carried_packages(target: Path | None) -> dict[str, Any]:
    """{name: version} of the distributions in ``target``, and the modules of theirs that this
    interpreter would import from elsewhere (another copy earlier on ``sys.path``)."""
    if target is None or not target.is_dir():
        return {}
    import importlib.metadata as md

    root = target.resolve()
    carried, shadowed = {}, []
    for info in sorted(target.glob("*.dist-info")):
        dist = md.PathDistribution(info)
        name = dist.metadata["Name"]
        carried[name] = dist.version
        for top in top_level_modules(dist):
            try:
                spec = importlib.util.find_spec(top)
            except (ImportError, ValueError):
                spec = None
            where = (spec.origin or next(iter(spec.submodule_search_locations or []), None)) if spec else None
            if where is None or root not in Path(where).resolve().parents:
                shadowed.append(f"{name}: {top}")
    return {"carried": carried, "shadowed": shadowed}


def top_level_modules(dist) -> list[str]:
    """The importable top-level names a distribution's RECORD lists (``NAME.data/purelib`` included)."""
    names = set()
    for path in dist.files or []:
        parts = path.parts
        if parts and parts[0].endswith(".data") and len(parts) > 2 and parts[1] in ("purelib", "platlib"):
            parts = parts[2:]
        if not parts or parts[0].endswith((".dist-info", ".data")) or parts[0] in ("..", "__pycache__"):
            continue
        head = parts[0]
        if len(parts) == 1 and not head.endswith((".py", ".so")):
            continue
        names.add(head.split(".")[0])
    return sorted(names)


# --------------------------------------------------------------------------- helpers (torch from here on)


@functools.cache
def load_bench(name: str):
    """One of benchmarks/bench_*.py as a module (reused, never copied)."""
    spec = importlib.util.spec_from_file_location(f"pie_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def sync(ctx: Ctx) -> None:
    if ctx.cuda:
        import torch

        torch.cuda.synchronize()


def free(ctx: Ctx) -> None:
    gc.collect()
    if ctx.cuda:
        import torch

        torch.cuda.empty_cache()


def allocated_mb(ctx: Ctx) -> float | None:
    if not ctx.cuda:
        return None
    import torch

    return round(torch.cuda.memory_allocated() / 1e6, 1)


def phantom(resolution: int):
    """(image, mask): the chest phantom and its left lung, as bench_simulate uses them."""
    from pie_cli.demo.phantom import Findings, render

    ph = render(Findings(), seed=1, size=resolution, supersample=1)
    return ph.image, ph.left_lung


def pie_config(resolution: int, steps: int, inference_steps: int):
    from pie_cli.core.parameters import PieConfig

    return PieConfig(
        prompt=PROMPT,
        steps=steps,
        inference_steps=inference_steps,
        strength=0.5,
        guidance_scale=7.5,
        resolution=resolution,
    )


def load_model(folder: Path, device: str, dtype: str):
    """(components, placement) through pie's registry and loader, as `pie simulate` loads them."""
    from pie_cli.core.devices import choose_placement
    from pie_cli.core.loading import load
    from pie_cli.core.model_files import vae_force_upcast
    from pie_cli.core.registry import resolve

    source = resolve(str(folder))
    placement = choose_placement(device, dtype, vae_force_upcast(source.path))
    return load(source, placement), placement


def fresh_components(folder: Path, device: str, dtype: Any, vae_dtype: Any):
    """Components outside the loader's cache (their weights are about to be changed)."""
    from pie_cli.core.loading import load_parts, load_scheduler
    from pie_cli.core.progression import Components
    from pie_cli.core.registry import resolve

    source = resolve(str(folder))
    unet, vae, text, tok = load_parts(source, dtype=dtype, vae_dtype=vae_dtype)
    for module in (unet, vae, text):
        module.to(device).eval().requires_grad_(False)
    return Components(unet, vae, text, tok, load_scheduler(source))


@dataclass
class Run:
    seconds: float  # the whole progression, preparation included
    prep_s: float  # text, initial encode (frame 0)
    step_s: list[float]
    peak_mb: float
    frames: list[list[Any]]  # per trajectory, per frame (uint8 arrays); only the last frame unless kept

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 4),
            "prep_s": round(self.prep_s, 4),
            "per_step_s": round(statistics.median(self.step_s), 4) if self.step_s else None,
            "peak_mb": round(self.peak_mb, 1),
        }


def progression(ctx: Ctx, components, image, mask, config, seeds: list[int], keep: bool = True) -> Run:
    """One timed ``progress_batch`` run (device synchronised before and after)."""
    import numpy as np

    from pie_cli.core.progression import progress_batch

    bench = load_bench("bench_simulate")
    frames: list[list[Any]] = [[] for _ in seeds]
    times: list[float] = []
    sync(ctx)
    with bench.PeakMemory(components.device) as mem:
        started = last = time.perf_counter()
        for step in progress_batch(components, image, mask, config, seeds=seeds):
            now = time.perf_counter()
            times.append(now - last)
            last = now
            for k, frame in enumerate(step):
                if keep or step[0].index == config.steps:
                    frames[k].append(np.asarray(frame.image, dtype=np.uint8).copy())
        sync(ctx)
        seconds = time.perf_counter() - started
    return Run(seconds, times[0], times[1:], mem.peak, frames)


def timed(ctx: Ctx, components, image, mask, config, seeds: list[int], keep: bool = True) -> tuple[Run, list]:
    """The fastest of ``repeats`` runs (one when a run is slow), and every run's seconds."""
    runs = [progression(ctx, components, image, mask, config, seeds, keep)]
    while (
        len(runs) < ctx.sizes.repeats and runs[0].seconds < ctx.sizes.repeat_below and ctx.clock.left() > 60
    ):
        runs.append(progression(ctx, components, image, mask, config, seeds, keep))
    return min(runs, key=lambda r: r.seconds), [round(r.seconds, 4) for r in runs]


def warm_up(ctx: Ctx, components, image, mask, config, seeds: list[int]) -> float:
    """Seconds of a 2-step run (the first call: lazy initialisation, compilation, graph capture).

    Two steps, because from step 2 on K > 1 trajectories hand the UNet other strides than step 1
    (the previous frames are encoded as one channels-last batch), which a compiled UNet recompiles for.
    """
    import dataclasses

    short = dataclasses.replace(config, steps=min(2, config.steps))
    return round(progression(ctx, components, image, mask, short, seeds, keep=False).seconds, 3)


def frame_diff(a: list[Any], b: list[Any]) -> dict[str, Any]:
    """Per frame, mean and max |a - b| in 8-bit levels."""
    import numpy as np

    pairs = [
        (np.asarray(x, dtype=np.int16), np.asarray(y, dtype=np.int16)) for x, y in zip(a, b, strict=True)
    ]
    means = [round(float(np.abs(x - y).mean()), 4) for x, y in pairs]
    maxes = [int(np.abs(x - y).max()) for x, y in pairs]
    return {"mean": means, "max": maxes, "worst_mean": max(means), "worst_max": max(maxes)}


def measure_mode(
    ctx: Ctx, mode: str, components, placement, image, mask, config, counter=None, **extra: Any
) -> Run:
    """Warm up, time, and record mode ``mode`` (seed 0); its frames are kept for the comparisons.

    ``counter`` (bench_simulate.Counter) is reset after the warm-up: its counts are the timed runs'.
    """
    from pie_cli.core.devices import dtype_name

    weights = allocated_mb(ctx)
    first = warm_up(ctx, components, image, mask, config, [0])
    if counter is not None:
        counter.reset()
    run, runs = timed(ctx, components, image, mask, config, [0])
    ctx.modes[mode] = {
        **run.summary(),
        "runs": runs,
        "first_call_s": first,
        "resident_mb": weights,
        "dtype": dtype_name(placement.dtype),
        "vae_dtype": dtype_name(placement.vae_dtype),
        "channels_last": is_channels_last(components.unet),
        "compiled": hasattr(components.unet, "_orig_mod"),
        **extra,
    }
    if counter is not None:
        ctx.modes[mode]["calls"] = {k: v // len(runs) for k, v in counter.counts.items()}
    ctx.frames[mode] = run.frames[0]
    say(ctx.clock, f"  {mode}: {run.seconds:.3f} s per progression (first call {first:.2f} s)")
    return run


def is_channels_last(unet) -> bool:
    import torch

    module = getattr(unet, "_orig_mod", unet)
    weight = module.conv_in.weight
    return (
        weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last) and weight.shape[1] > 1
    )


def attention(unet) -> list[str]:
    module = getattr(unet, "_orig_mod", unet)
    return sorted({type(p).__name__ for p in module.attn_processors.values()})


@contextlib.contextmanager
def compile_backend(backend: str) -> Iterator[None]:
    """``torch.compile`` with another backend for the duration (the CPU rehearsal: dynamo's eager)."""
    import torch

    if backend == "inductor":
        yield
        return
    real = torch.compile
    torch.compile = functools.partial(real, backend=backend)
    try:
        yield
    finally:
        torch.compile = real


def dynamo_counters() -> dict[str, Any]:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {
        "stats": dict(counters.get("stats", {})),
        "graph_breaks": sum(counters.get("graph_break", {}).values()),
        "recompiles": dict(counters.get("recompiles", {})),
        "cudagraph_skips": dict(counters.get("inductor", {})).get("cudagraph_skips", 0),
    }


@contextlib.contextmanager
def cpu_noise_on(device) -> Iterator[None]:
    """``torch.randn(shape, generator=cpu_generator)`` lands on ``device`` (bench_simulate's baseline, CUDA)."""
    import torch

    real = torch.randn

    def randn(*args, **kwargs):
        out = real(*args, **kwargs)
        gen = kwargs.get("generator")
        if gen is not None and gen.device.type == "cpu" and "device" not in kwargs:
            out = out.to(device)
        return out

    torch.randn = randn
    try:
        yield
    finally:
        torch.randn = real


def _tol(dtype: str) -> float:
    return TOLERANCE["fp32"] if dtype == "fp32" else TOLERANCE["half"]


# --------------------------------------------------------------------------- sections


def environment(ctx: Ctx, rec: dict) -> None:
    import torch

    import pie_cli

    rec["python"] = platform.python_version()
    rec["executable"] = sys.executable
    rec["platform"] = platform.platform()
    rec["cpus"] = os.cpu_count()
    rec["torch"] = torch.__version__
    rec["cuda"] = torch.version.cuda
    rec["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    rec["tf32"] = {
        "matmul": torch.backends.cuda.matmul.allow_tf32,
        "cudnn": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        rec["gpu"] = torch.cuda.get_device_name(0)
        rec["capability"] = f"{props.major}.{props.minor}"
        rec["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        rec["multiprocessors"] = props.multi_processor_count
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            rec["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
    rec["pie"] = pie_cli.__version__
    rec["check_sha256"] = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        rec["commit"] = head.stdout.strip() or None
    install = json.loads(os.environ.get(INSTALLED) or "null")
    rec["install"] = install
    target = Path(install["target"]) if install else None
    rec["install_result"] = carried_packages(target)
    rec["packages"] = package_versions(target)
    meta = ctx.report.data["meta"]
    meta["gpu"] = rec.get("gpu", "no GPU")
    meta["torch"] = rec["torch"]
    meta["cuda"] = rec["cuda"]
    meta["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {rec['python']}, " + (
        f"{rec['gpu']} ({rec['gpu_memory_gib']} GiB), driver {rec.get('driver', '?')}"
        if ctx.cuda
        else "no GPU"
    )


def package_versions(target: Path | None) -> dict[str, Any]:
    import importlib.metadata as md

    wheels = load_wheels_module()
    pinned = wheels.pins()
    out = {}
    for name in PACKAGES:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            out[name] = None
            continue
        where = Path(str(dist.locate_file(""))).resolve()
        entry = {
            "version": dist.version,
            "from": "carried" if target and where == target.resolve() else "machine",
        }
        pin = pinned.get(wheels.canonical(name))
        if pin and pin != dist.version:
            entry["pinned"] = pin
        out[name] = entry
    return out


def load_wheels_module():
    spec = importlib.util.spec_from_file_location("pie_gpu_wheels", Path(__file__).with_name("wheels.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def correctness_tiny(ctx: Ctx, rec: dict) -> None:
    """The tiny model: device fp32 vs CPU fp32, and K batched trajectories vs K single runs on the device."""
    from pie_cli.demo.tiny import build_tiny_model

    s = ctx.sizes
    ctx.tiny = build_tiny_model(ctx.tmp / "tiny-sd", seed=0)
    image, mask = phantom(s.tiny_resolution)
    config = pie_config(s.tiny_resolution, s.tiny_steps, s.tiny_inference_steps)
    rec["settings"] = {"resolution": s.tiny_resolution, "steps": s.tiny_steps, "T": s.tiny_inference_steps}
    on_device, _ = load_model(ctx.tiny, ctx.device, "fp32")
    on_cpu, _ = load_model(ctx.tiny, "cpu", "fp32")
    dev = progression(ctx, on_device, image, mask, config, [0])
    cpu = progression(ctx, on_cpu, image, mask, config, [0])
    diff = frame_diff(dev.frames[0], cpu.frames[0])
    rec["device_vs_cpu"] = {**diff, "device_s": round(dev.seconds, 3), "cpu_s": round(cpu.seconds, 3)}
    note = None if ctx.cuda else "device is the CPU: two CPU runs of one seed (reproducibility)"
    ctx.report.check(
        "tiny fp32: device frames = CPU frames",
        diff["worst_mean"] <= TOLERANCE["device_vs_cpu_fp32"],
        diff["worst_mean"],
        f"mean abs. difference <= {TOLERANCE['device_vs_cpu_fp32']} levels on every frame",
        note,
    )
    k = s.tiny_k
    batched = progression(ctx, on_device, image, mask, config, list(range(k)))
    worst, apart_mean = diff_singles(ctx, rec, "trajectories", batched, on_device, image, mask, config, dev)
    ctx.report.check(
        f"tiny fp32: {k} batched trajectories = {k} single runs",
        worst <= TOLERANCE["fp32"],
        worst,
        f"mean abs. difference <= {TOLERANCE['fp32']} levels on every frame",
        f"independent trajectories differ by {apart_mean} on average",
    )
    apart = frame_diff(batched.frames[0][-1:], batched.frames[1][-1:])["worst_max"]
    ctx.report.check(
        "tiny: trajectories are independent",
        apart >= DISTINCT,
        apart,
        f"max abs. difference >= {DISTINCT} levels",
    )


def diff_singles(
    ctx: Ctx, rec: dict, key: str, batched: Run, components, image, mask, config, first: Run
) -> tuple[float, float]:
    """(worst mean |diff| between each batched trajectory and its single run (seed 0's is ``first``),
    mean |diff| between the last frames of batched trajectories 0 and 1)."""
    worst, per = 0.0, []
    for seed in range(len(batched.frames)):
        single = first if seed == 0 else progression(ctx, components, image, mask, config, [seed])
        d = frame_diff(batched.frames[seed], single.frames[0])
        per.append({"seed": seed, "worst_mean": d["worst_mean"], "worst_max": d["worst_max"]})
        worst = max(worst, d["worst_mean"])
    apart = frame_diff(batched.frames[0][-1:], batched.frames[1][-1:])["worst_mean"]
    rec[key] = {
        "k": len(batched.frames),
        "per_trajectory": per,
        "independent_mean": apart,
        "batched_s": round(batched.seconds, 3),
    }
    return worst, apart


def nan_guard(ctx: Ctx, rec: dict) -> None:
    """Forced overflows: pie must raise NumericalError for the step and yield no frame for it."""
    import torch

    from pie_cli.core.progression import progress_batch
    from pie_cli.errors import NumericalError

    if ctx.tiny is None:
        raise Skip("needs the tiny model (correctness_tiny)")
    dtype = torch.float16 if ctx.cuda else torch.float32  # the fp16 VAE is the overflow pie guards against
    image, mask = phantom(ctx.sizes.tiny_resolution)
    config = pie_config(ctx.sizes.tiny_resolution, 1, ctx.sizes.tiny_inference_steps)
    expected = {"vae": "the VAE decoded NaN or infinite pixels", "unet": "produced NaN or infinite latents"}
    for part, phrase in expected.items():
        comps = fresh_components(ctx.tiny, ctx.device, dtype, dtype)
        module = comps.vae.decoder.conv_in if part == "vae" else comps.unet.conv_out
        with torch.no_grad():
            module.weight.fill_(torch.finfo(module.weight.dtype).max)  # every product overflows
        yielded, error = 0, None
        try:
            for _ in progress_batch(comps, image, mask, config, seeds=[0]):
                yielded += 1
        except NumericalError as exc:
            error = str(exc)
        rec[part] = {"dtype": str(dtype).replace("torch.", ""), "error": error, "frames_yielded": yielded}
        ctx.report.check(
            f"NaN guard: a forced {part} overflow raises NumericalError",
            error is not None and phrase in error and "step 1" in error and yielded == 1,
            error,
            f"NumericalError naming step 1 and '{phrase}'; frame 0 only",
        )
        del comps
    free(ctx)


def build_model_folder(folder: Path, device: str, small: bool, seed: int = 0) -> dict[str, Any]:
    """SD 1.5's configs (pie_cli/core/configs/sd-v1) with random weights made on ``device``, saved as diffusers."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    shutil.copytree(CONFIGS, folder)
    cfg = {
        p: json.loads((folder / p / "config.json").read_text(encoding="utf-8"))
        for p in ("unet", "vae", "text_encoder")
    }
    if small:  # the tiny test model's widths, SD 1.5's everything else (tokenizer, scheduler, layout)
        cfg["unet"].update(
            block_out_channels=[32, 64],
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            layers_per_block=1,
            cross_attention_dim=32,
            sample_size=8,
        )
        cfg["vae"].update(
            block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=16, sample_size=64
        )
        cfg["text_encoder"].update(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=32,
        )
    started = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        text = CLIPTextModel(CLIPTextConfig.from_dict(cfg["text_encoder"]))
        with torch.no_grad():
            # A trained VAE has a narrow posterior; a random one's std ~1 would drown the image (as demo.tiny).
            vae.quant_conv.weight[4:].zero_()
            vae.quant_conv.bias[4:].fill_(-20.0)
    if device == "cuda":
        torch.cuda.synchronize()
    built = time.perf_counter() - started
    from pie_cli.core.loading import quiet_libraries

    with quiet_libraries():  # no "Writing model shards" bars
        for part, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
            module.save_pretrained(folder / part, safe_serialization=True)
    params = {
        p: sum(t.numel() for t in m.parameters())
        for p, m in (("unet", unet), ("vae", vae), ("text_encoder", text))
    }
    return {
        "build_s": round(built, 2),
        "save_s": round(time.perf_counter() - started - built, 2),
        "parameters": params,
    }


def sd_model(ctx: Ctx, rec: dict) -> None:
    folder = ctx.tmp / "sd15-shaped"
    rec.update(build_model_folder(folder, ctx.device, ctx.sizes.model == "small"))
    rec["configs"] = "SD 1.5's (pie_cli/core/configs/sd-v1)" + (
        " at the tiny model's widths" if ctx.sizes.model == "small" else ""
    )
    ctx.sd = folder
    free(ctx)


def forget_sd(ctx: Ctx) -> None:
    from pie_cli.core.loading import forget

    forget(ctx.sd)
    free(ctx)


def speed_fp32(ctx: Ctx, rec: dict) -> None:
    """(a) the original method's per-step work and (b) pie, both fp32, the same model and inputs."""
    s = ctx.sizes
    bench = load_bench("bench_simulate")
    image, mask = phantom(s.resolution)
    config = pie_config(s.resolution, s.steps, s.inference_steps)
    comps, placement = load_model(ctx.sd, ctx.device, "fp32")
    counter = bench.Counter(comps)
    try:
        attn = attention(comps.unet)
        measure_mode(ctx, "b_pie_fp32", comps, placement, image, mask, config, counter, attention=attn)
        counter.reset()
        times, shim = None, None
        with bench.PeakMemory(comps.device) as mem:
            try:
                times = bench.baseline(comps, image, mask, config, 0)
            except RuntimeError as exc:
                if "device" not in str(exc):
                    raise
                shim = f"bench_simulate.baseline on {ctx.device}: {str(exc).splitlines()[0]}"
        if times is None:  # its noise is drawn on the CPU and added to device latents
            counter.reset()
            with cpu_noise_on(comps.device), bench.PeakMemory(comps.device) as mem:
                times = bench.baseline(comps, image, mask, config, 0)
        ctx.modes["a_baseline_fp32"] = {
            "seconds": round(sum(times), 4),
            "per_step_s": round(statistics.median(times), 4),
            "peak_mb": round(mem.peak, 1),
            "calls": dict(counter.counts),
            "dtype": "fp32",
            "vae_dtype": "fp32",
        }
        if shim:
            ctx.modes["a_baseline_fp32"]["note"] = (
                f"{shim}; rerun with its CPU-generator noise moved to the device (a bug of bench_simulate on CUDA)"
            )
    finally:
        counter.close()
    rec["modes"] = ["a_baseline_fp32", "b_pie_fp32"]
    rec["pie_over_baseline"] = round(
        ctx.modes["b_pie_fp32"]["seconds"] / ctx.modes["a_baseline_fp32"]["seconds"], 3
    )
    del comps, counter  # fp32 is not kept for the later modes: its memory goes back
    forget_sd(ctx)


def speed_half(ctx: Ctx, rec: dict) -> None:
    """(c) fp16 and bf16 eager with SDPA, their frames against fp32's; then pie simulate's CUDA default."""
    from pie_cli.core.devices import tune_for_speed

    s = ctx.sizes
    image, mask = phantom(s.resolution)
    config = pie_config(s.resolution, s.steps, s.inference_steps)
    kept: dict[str, tuple[Any, Any]] = {}
    for dtype in ("fp16", "bf16"):
        mode = f"c_pie_{dtype}"
        if dtype == "fp16" and not ctx.cuda:
            rec[mode] = "skipped: cpu"
            continue
        comps, placement = load_model(ctx.sd, ctx.device, dtype)
        try:
            measure_mode(ctx, mode, comps, placement, image, mask, config, attention=attention(comps.unet))
        except Exception as exc:  # NumericalError (a NaN) or a CUDA fault: the other dtype still runs
            rec[mode] = f"{type(exc).__name__}: {exc}"[:2000]
            ctx.report.check(f"{dtype} progression runs (no NaN, no fault)", False, rec[mode], "no exception")
            del comps
            forget_sd(ctx)
            continue
        kept[dtype] = (comps, placement)
        if "b_pie_fp32" in ctx.frames:
            d = frame_diff(ctx.frames[mode], ctx.frames["b_pie_fp32"])
            ctx.modes[mode]["vs_fp32"] = d
            ctx.report.check(
                f"{dtype} frames close to fp32 frames",
                d["worst_mean"] <= TOLERANCE["half"],
                d["worst_mean"],
                f"mean abs. difference <= {TOLERANCE['half']} levels on every frame (the progression finished: no NaN)",
            )
        if dtype == "fp16":
            ctx.report.check(
                "fp16: the VAE is kept in fp32 (out of fp16 overflow)",
                ctx.modes[mode]["vae_dtype"] == "fp32",
                ctx.modes[mode]["vae_dtype"],
                "fp32",
            )
    if not kept:
        raise RuntimeError("no half-precision mode ran: " + "; ".join(str(v) for v in rec.values()))
    faster = min(kept, key=lambda d: ctx.modes[f"c_pie_{d}"]["seconds"])
    rec["faster"] = faster
    comps, placement = kept.pop(faster)
    kept.clear()
    forget_sd(ctx)  # the slower dtype's memory goes back; the faster one stays referenced here
    ctx.half = (faster, comps, placement)
    # What `pie simulate` runs without --compile: tune_for_speed (channels-last on CUDA), in place.
    tuned = tune_for_speed(comps, placement)
    mode = f"c_pie_{faster}_tuned"
    extra = {"note": "pie simulate's default: tune_for_speed without --compile", "speed": tuned}
    measure_mode(ctx, mode, comps, placement, image, mask, config, **extra)
    ctx.offer(mode, comps)


def speed_compiled(ctx: Ctx, rec: dict) -> None:
    """(d) the faster half mode + channels-last + torch.compile (pie's tune_for_speed, `--compile`)."""
    import dataclasses
    import warnings

    import torch

    from pie_cli.core.devices import tune_for_speed

    if ctx.half is None:
        raise Skip("needs speed_half")
    dtype, comps, placement = ctx.half
    s = ctx.sizes
    image, mask = phantom(s.resolution)
    config = pie_config(s.resolution, s.steps, s.inference_steps)
    torch._dynamo.reset()
    comps = dataclasses.replace(comps)  # tune_for_speed swaps .unet: the eager Components stay eager
    with compile_backend(ctx.compile_backend), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tune_for_speed(comps, placement, compile_unet=True)
        mode = f"d_{dtype}_compile"
        measure_mode(ctx, mode, comps, placement, image, mask, config, backend=ctx.compile_backend)
    rec["backend"] = ctx.compile_backend
    rec["dynamo"] = dynamo_counters()
    rec["warnings"] = sorted({str(w.message)[:300] for w in caught})[:10]
    compare_with_eager(ctx, mode, dtype)
    ctx.offer(mode, comps)


def compare_with_eager(ctx: Ctx, mode: str, dtype: str) -> None:
    eager = f"c_pie_{dtype}"
    if eager not in ctx.frames:
        return
    d = frame_diff(ctx.frames[mode], ctx.frames[eager])
    ctx.modes[mode]["vs_eager"] = d
    ctx.report.check(
        f"{mode} frames = eager {dtype} frames",
        d["worst_mean"] <= _tol(dtype),
        d["worst_mean"],
        f"mean abs. difference <= {_tol(dtype)} levels on every frame",
    )


def speed_cudagraphs(ctx: Ctx, rec: dict) -> None:
    """(e) (d) with CUDA graphs: torch.compile(mode="reduce-overhead") of the same UNet."""
    import warnings

    import torch

    from pie_cli.core.progression import Components

    if ctx.half is None:
        raise Skip("needs speed_half")
    dtype, comps, placement = ctx.half
    unet = getattr(comps.unet, "_orig_mod", comps.unet)
    if not is_channels_last(unet) and ctx.cuda:
        unet.to(memory_format=torch.channels_last)
    s = ctx.sizes
    image, mask = phantom(s.resolution)
    config = pie_config(s.resolution, s.steps, s.inference_steps)
    torch._dynamo.reset()
    if ctx.cuda and ctx.compile_backend == "inductor":
        compiled = torch.compile(unet, mode="reduce-overhead")
        rec["cudagraphs"] = True
    else:
        compiled = torch.compile(unet, backend=ctx.compile_backend)
        rec["cudagraphs"] = "skipped: cpu (the same code path, compiled without mode='reduce-overhead')"
    graphs = Components(compiled, comps.vae, comps.text_encoder, comps.tokenizer, comps.scheduler)
    mode = f"e_{dtype}_cudagraphs"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        measure_mode(ctx, mode, graphs, placement, image, mask, config, backend=ctx.compile_backend)
    rec["dynamo"] = dynamo_counters()
    rec["warnings"] = sorted({str(w.message)[:300] for w in caught})[:10]
    compare_with_eager(ctx, mode, dtype)
    ctx.offer(mode, graphs)


def trajectories(ctx: Ctx, rec: dict) -> None:
    """Frames/s for every K in the fastest mode; K = equal_k batched against single runs."""
    if ctx.fastest is None:
        raise Skip("needs a measured mode")
    mode, comps = ctx.fastest
    s = ctx.sizes
    image, mask = phantom(s.resolution)
    config = pie_config(s.resolution, s.steps, s.inference_steps)
    one = ctx.modes[mode]
    rec["mode"] = mode
    rec["k"] = {}
    for k in s.ks:
        if k == 1:
            rec["k"]["1"] = {
                "seconds": one["seconds"],
                "frames_per_s": round(s.steps / one["seconds"], 3),
                "peak_mb": one["peak_mb"],
                "first_call_s": one["first_call_s"],
                "from": mode,
            }
            continue
        if not ctx.clock.fits(3 * k * one["seconds"] + 15):
            rec["k"][str(k)] = "skipped: budget"
            continue
        first = warm_up(ctx, comps, image, mask, config, list(range(k)))
        keep = k == s.equal_k
        run = progression(ctx, comps, image, mask, config, list(range(k)), keep=keep)
        rec["k"][str(k)] = {
            "seconds": round(run.seconds, 4),
            "frames_per_s": round(k * s.steps / run.seconds, 3),
            "peak_mb": round(run.peak_mb, 1),
            "first_call_s": first,
            "x_time_of_k1": round(run.seconds / one["seconds"], 3),
        }
        say(ctx.clock, f"  K={k}: {run.seconds:.3f} s, {k * s.steps / run.seconds:.2f} frames/s")
        if keep:
            first_run = Run(one["seconds"], 0.0, [], 0.0, [ctx.frames[mode]])
            worst, apart = diff_singles(ctx, rec, "equal", run, comps, image, mask, config, first_run)
            dtype = one["dtype"]
            ctx.report.check(
                f"{mode}: {k} batched trajectories = {k} single runs",
                worst <= _tol(dtype),
                worst,
                f"mean abs. difference <= {_tol(dtype)} levels on every frame",
                f"independent trajectories differ by {apart} on average",
            )
    rec["dynamo"] = dynamo_counters()


def training(ctx: Ctx, rec: dict) -> None:
    """`pie finetune` through its service (plan, train): LoRA with and without checkpointing, full."""
    import csv

    s = ctx.sizes
    if ctx.sd is not None:
        forget_sd(ctx)  # the loader's cache; the faster half mode stays for the sections after this one
    bench_ft = load_bench("bench_finetune")
    bench = load_bench("bench_simulate")
    data = bench_ft.make_data(ctx.tmp / "train-data", s.train_images, s.train_resolution)
    runs = (
        ("lora", False, s.lora_steps),
        ("lora_gradient_checkpointing", True, s.lora_steps),
        ("full", False, s.full_steps),
    )
    rec["settings"] = {
        "resolution": s.train_resolution,
        "batch_size": s.train_batch,
        "mixed_precision": "bf16",
        "images": s.train_images,
    }
    estimate = 30.0 if ctx.cuda else 5.0
    for name, checkpointing, steps in runs:
        if not ctx.clock.fits(estimate * (2.5 if name == "full" else 1.0)):
            rec[name] = "skipped: budget"
            continue
        out = ctx.tmp / f"ft-{name}"
        flags = {
            "data": str(data),
            "model": str(ctx.sd),
            "out": str(out),
            "method": "full" if name == "full" else "lora",
            "resolution": s.train_resolution,
            "batch_size": s.train_batch,
            "max_steps": steps,
            "mixed_precision": "bf16",
            "gradient_checkpointing": checkpointing,
            "num_workers": 2 if ctx.cuda else 0,
            "checkpoint_every": 10 * steps,
            "seed": 0,
        }
        started = time.perf_counter()
        try:
            result, peak, resident = finetune(ctx, bench, flags)
        except Exception as exc:
            rec[name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000]}
            free(ctx)
            continue
        wall = time.perf_counter() - started
        estimate = wall
        with open(out / "metrics.csv", newline="") as fh:
            seconds = [float(row["seconds"]) for row in csv.DictReader(fh)]
        steady = seconds[min(2, len(seconds) - 1) :]
        rec[name] = {
            "steps": result.steps,
            "steps_per_s": round(1.0 / statistics.median(steady), 3),
            "median_step_s": round(statistics.median(steady), 4),
            "step_s": [round(x, 4) for x in seconds],
            "peak_mb": round(peak, 1),  # torch.cuda.max_memory_allocated (the process RSS on the CPU)
            "resident_before_mb": resident,  # CUDA: the half-precision model kept for later sections
            "training_peak_mb": round(peak - resident, 1) if resident is not None else None,
            "last_loss": result.last_loss,
            "wall_s": round(wall, 2),
            "method": flags["method"],
            "gradient_checkpointing": checkpointing,
        }
        say(ctx.clock, f"  {name}: {rec[name]['steps_per_s']} steps/s, peak {peak:.0f} MB")
        shutil.rmtree(out, ignore_errors=True)
    errors = [n for n, _, _ in runs if isinstance(rec.get(n), dict) and rec[n].get("status") == "error"]
    if errors:
        raise RuntimeError(f"training runs failed: {', '.join(errors)} ({rec[errors[0]]['error']})")


def finetune(ctx: Ctx, bench, flags: dict[str, Any]):
    from pie_cli.training.runner import plan, train

    reset_accelerate()
    free(ctx)
    resident = allocated_mb(ctx)
    checked = plan(flags, dict.fromkeys(flags, "command line"))
    import torch

    with bench.PeakMemory(torch.device(ctx.device)) as mem:
        result = train(checked)
    reset_accelerate()
    free(ctx)
    return result, mem.peak, resident


def reset_accelerate() -> None:
    """accelerate keeps one process-wide state; this process trains several times (as tests/conftest.py)."""
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def cuda_tests(ctx: Ctx, rec: dict) -> None:
    if not ctx.cuda:
        raise Skip("cpu")
    limit = max(30, int(ctx.clock.left()))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/core/test_cuda.py"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"pytest tests/core/test_cuda.py ran past {limit} s") from None
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    rec["returncode"] = proc.returncode
    rec["summary"] = tail[-1] if tail else ""
    rec["output_tail"] = "\n".join(tail[-30:])
    ctx.report.check(
        "tests/core/test_cuda.py pass on the GPU", proc.returncode == 0, rec["summary"], "exit status 0"
    )


SECTIONS: tuple[tuple[str, Callable[[Ctx, dict], None], tuple[str, ...]], ...] = (
    ("correctness_tiny", correctness_tiny, ()),
    ("nan_guard", nan_guard, ("correctness_tiny",)),
    ("sd_model", sd_model, ()),
    ("speed_fp32", speed_fp32, ("sd_model",)),
    ("speed_half", speed_half, ("sd_model",)),
    ("training", training, ("sd_model",)),  # before the compiles: they take the longest
    ("speed_compiled", speed_compiled, ("speed_half",)),
    ("speed_cudagraphs", speed_cudagraphs, ("speed_half",)),
    ("trajectories", trajectories, ("sd_model",)),
    ("cuda_tests", cuda_tests, ()),
)


# --------------------------------------------------------------------------- the summary


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def cell(value: Any, width: int = 300) -> str:
    """Text for one markdown table cell: one line, pipes escaped."""
    return str(value).replace("\n", " ").replace("|", "\\|")[:width]


def targets(data: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals for the numbers, as measured (never asserted)."""
    modes = data.get("modes", {})
    pie = {
        m: r for m, r in modes.items() if not m.startswith("a_") and isinstance(r, dict) and "seconds" in r
    }
    out: dict[str, Any] = {}
    if pie:
        best = min(pie, key=lambda m: pie[m]["seconds"])
        out["fastest_mode"] = best
        out["fastest_s"] = pie[best]["seconds"]
        out["fastest_le_1.2_s"] = pie[best]["seconds"] <= 1.2
        base = modes.get("a_baseline_fp32", {}).get("seconds")
        if base:
            out["speedup_vs_baseline"] = round(base / pie[best]["seconds"], 2)
            out["speedup_ge_5x"] = base / pie[best]["seconds"] >= 5
    k = data.get("sections", {}).get("trajectories", {}).get("k", {})
    if isinstance(k.get("8"), dict) and isinstance(k.get("1"), dict):
        ratio = k["8"]["seconds"] / k["1"]["seconds"]
        out["k8_x_time_of_k1"] = round(ratio, 2)
        out["k8_le_3x"] = ratio <= 3
    return out


def markdown(data: dict[str, Any]) -> str:
    meta = data["meta"]
    lines = [
        f"# pie GPU check: {meta.get('gpu', '?')}, {meta['date']}",
        "",
        f"{meta.get('machine', '?')}; torch {meta.get('torch', '?')}, CUDA {meta.get('cuda')}; "
        f"{'smoke (tiny sizes)' if meta['smoke'] else 'full'} run on {meta['device']}, "
        f"{meta['settings']}; budget {meta['budget_s']} s, took {_fmt(meta.get('elapsed_s'), 1)} s.",
        "",
        "## Checks",
        "",
        "| check | passed | measured | tolerance |",
        "|---|---|---|---|",
    ]
    for name, c in data["checks"].items():
        passed = "yes" if c["passed"] else "**NO**"
        lines.append(f"| {cell(name)} | {passed} | {cell(c['measured'], 120)} | {cell(c['tolerance'])} |")
    modes = data.get("modes", {})
    base = modes.get("a_baseline_fp32", {}).get("seconds")
    lines += [
        "",
        "## Speed: seconds per progression (SD-1.5-shaped unless smoke)",
        "",
        "| mode | dtype (VAE) | s / progression | s / step | first call s | peak MB | baseline / mode |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, r in modes.items():
        speedup = f"{base / r['seconds']:.2f}x" if base and r.get("seconds") else "-"
        lines.append(
            f"| {mode} | {r.get('dtype')} ({r.get('vae_dtype')}) | {_fmt(r.get('seconds'))} | {_fmt(r.get('per_step_s'))} "
            f"| {_fmt(r.get('first_call_s'), 2)} | {_fmt(r.get('peak_mb'), 0)} | {speedup} |"
        )
    traj = data["sections"].get("trajectories", {})
    if isinstance(traj.get("k"), dict):
        lines += [
            "",
            f"## Trajectories ({traj.get('mode')})",
            "",
            "| K | s | frames/s | first call s | peak MB |",
            "|---|---|---|---|---|",
        ]
        for k, r in traj["k"].items():
            if isinstance(r, dict):
                lines.append(
                    f"| {k} | {_fmt(r['seconds'])} | {_fmt(r['frames_per_s'], 2)} | {_fmt(r.get('first_call_s'), 2)} | {_fmt(r['peak_mb'], 0)} |"
                )
            else:
                lines.append(f"| {k} | {r} | | | |")
    train = data["sections"].get("training", {})
    if "settings" in train:
        lines += [
            "",
            f"## Training ({train['settings']})",
            "",
            "| run | steps/s | median step s | peak MB | of it training's (peak - resident before) |",
            "|---|---|---|---|---|",
        ]
        for name in ("lora", "lora_gradient_checkpointing", "full"):
            r = train.get(name)
            if isinstance(r, dict) and "steps_per_s" in r:
                lines.append(
                    f"| {name} | {_fmt(r['steps_per_s'])} | {_fmt(r['median_step_s'], 4)} | {_fmt(r['peak_mb'], 0)} "
                    f"| {_fmt(r.get('training_peak_mb'), 0)} |"
                )
            elif r is not None:
                lines.append(f"| {name} | {cell(r if isinstance(r, str) else r.get('error'), 200)} | | | |")
    goal = targets(data)
    if goal:
        lines += ["", "## Goals (measured, not asserted)", ""]
        if "fastest_s" in goal:
            lines.append(
                f"- fastest mode {goal['fastest_mode']}: {goal['fastest_s']:.3f} s per progression (goal <= 1.2 s)"
            )
        if "speedup_vs_baseline" in goal:
            lines.append(
                f"- {goal['speedup_vs_baseline']}x faster than the fp32 original-style baseline (goal >= 5x)"
            )
        if "k8_x_time_of_k1" in goal:
            lines.append(f"- K = 8 takes {goal['k8_x_time_of_k1']}x the time of K = 1 (goal <= 3x)")
    lines += ["", "## Sections", "", "| section | status | seconds |", "|---|---|---|"]
    for name, r in data["sections"].items():
        status = r.get("status", "?") + (f": {r['error']}" if "error" in r else "")
        lines.append(f"| {name} | {cell(status, 200)} | {_fmt(r.get('seconds'), 1)} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- entry point


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the CPU rehearsal")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when present")
    parser.add_argument("--budget", type=float, help="seconds for the whole check (default 450; smoke 110)")
    parser.add_argument("--out", type=Path, help="results folder (default $OUT, else benchmarks/results)")
    parser.add_argument(
        "--wheels", type=Path, help="install these wheels into --target first (make gpu-wheels)"
    )
    parser.add_argument("--target", type=Path, default=Path("/tmp/pie-deps"), help="where --wheels go")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch's CPU threads (default: torch's own; 1 for --smoke on the CPU, fastest at tiny sizes)",
    )
    parser.add_argument(
        "--compile-backend", help="torch.compile backend (default: inductor on CUDA, eager on the CPU)"
    )
    args = parser.parse_args(argv)
    if args.budget is not None and args.budget < 0:
        parser.error("--budget must be at least 0 seconds.")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1.")
    if args.wheels is not None and not args.wheels.is_dir():
        parser.error(f"--wheels {args.wheels} is not a folder.")
    if args.wheels is not None and not any(args.wheels.glob("*.whl")):
        parser.error(f"--wheels {args.wheels} holds no .whl files; run `make gpu-wheels` first.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = float(os.environ.get(STARTED) or time.time())
    if args.wheels is not None and INSTALLED not in os.environ:
        say(None, f"installing the wheels of {args.wheels} into {args.target} ...")
        record = install_wheels(args.wheels, args.target)
        say(None, f"installed {record['wheels']} wheels with {record['method']} in {record['seconds']} s")
        path = os.pathsep.join([str(args.target), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
        env = {**os.environ, "PYTHONPATH": path, INSTALLED: json.dumps(record), STARTED: str(started)}
        return subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:])],
            env=env,
        ).returncode
    return check(args, started)


def check(args: argparse.Namespace, started: float) -> int:
    sys.path.insert(1, str(ROOT))
    for var, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("TRANSFORMERS_OFFLINE", "1"),
        ("HF_HUB_DISABLE_TELEMETRY", "1"),
    ):
        os.environ.setdefault(var, value)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print(
            f"check.py: --device cuda, but this torch {torch.__version__} sees no CUDA device.",
            file=sys.stderr,
        )
        return 2
    sizes = SMOKE if args.smoke else FULL
    threads = args.threads or (1 if args.smoke and device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results")
    budget = args.budget if args.budget is not None else sizes.budget
    clock = Clock(budget, started)
    settings = f"{sizes.resolution} px, {sizes.steps} steps, T={sizes.inference_steps}, strength 0.5, guidance 7.5, mask"
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "smoke": args.smoke,
        "device": device,
        "budget_s": budget,
        "cpu_threads": torch.get_num_threads(),
        "settings": settings,
        "sizes": {k: v for k, v in asdict(sizes).items() if k != "estimates"},
        "tolerance_levels": TOLERANCE,
    }
    report = Report(out, "gpu-smoke" if args.smoke else "gpu", meta)
    report.data["modes"] = {}
    backend = args.compile_backend or ("inductor" if device == "cuda" else "eager")
    with tempfile.TemporaryDirectory(prefix="pie-gpu-check-") as tmp:
        home = Path(tmp) / "home"
        for var, sub in (("PIE_HOME", "pie"), ("HF_HOME", "hf")):
            os.environ[var] = str(home / sub)
        ctx = Ctx(device, sizes, Path(tmp), clock, report, backend)
        report.data["modes"] = ctx.modes
        say(
            clock,
            f"pie GPU check on {device} ({'smoke' if args.smoke else 'full'}), budget {budget:.0f} s -> {out}",
        )
        run_section(ctx, "environment", environment)
        for name, fn, needs in SECTIONS:
            run_section(ctx, name, fn, needs)
        ctx.half = ctx.fastest = None
        meta["elapsed_s"] = round(clock.elapsed(), 1)
        meta["targets"] = targets(report.data)
        report.save()
    print()
    print(markdown(report.data), flush=True)
    failed = report.failures()
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
