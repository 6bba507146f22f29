"""`pie doctor`: what pie runs on here, and whether it works.

Reports library versions, devices, the Hugging Face cache and the model registry, and
with ``--self-test`` runs a 2-step progression on a freshly built tiny model. Exit 0 when
healthy, 1 with one line per problem otherwise. A model that is simply not downloaded
(``sd-v1-5`` on a laptop) is reported as "not cached", not as a problem.

Module level imports nothing heavy (``pie --help`` stays instant); torch and friends are
imported when the command runs.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from pie_cli.cli.console import err, error, info, out, result, ui
from pie_cli.cli.options import DebugOpt, JsonOpt
from pie_cli.errors import PieError, UserError

# (distribution name, import name): pie cannot run without any of these.
REQUIRED_PACKAGES: tuple[tuple[str, str], ...] = (
    ("torch", "torch"),
    ("diffusers", "diffusers"),
    ("transformers", "transformers"),
    ("peft", "peft"),
    ("accelerate", "accelerate"),
    ("safetensors", "safetensors"),
    ("pillow", "PIL"),
    ("numpy", "numpy"),
    ("pydicom", "pydicom"),
)
MIN_TORCH = (2, 4)
# The cache walk stops after this many files or seconds and reports a lower bound.
MAX_CACHE_FILES = 200_000
MAX_CACHE_SECONDS = 20.0
SELF_TEST_PROMPT = "large left pleural effusion"
SELF_TEST_SIZE = 64
SELF_TEST_STEPS = 2
# Pixels at least this far from the mask count as "outside" in the self-test check.
SELF_TEST_MARGIN = 8


def doctor(
    self_test: Annotated[
        bool,
        typer.Option(
            "--self-test", help="Also build a tiny model and run a 2-step progression with it (~10 s on CPU)."
        ),
    ] = False,
    device: Annotated[
        str, typer.Option("--device", help="Device of the self-test: cpu, cuda, cuda:N, mps or auto.")
    ] = "cpu",
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Check the installation: versions, devices, the Hugging Face cache, registered models.

    Exits 1 and lists the problems when something pie needs is missing or broken.
    """
    problems: list[str] = []
    versions = _versions(problems)
    torch_ok = versions.get("torch") is not None
    devices = _devices(problems) if torch_ok else {"torch_build": None, "cuda": [], "cpu": _cpu()}
    storage = _storage(problems)
    models = _models(problems)
    report: dict[str, Any] = {
        "pie": versions["pie"],
        "healthy": True,
        "versions": versions,
        "devices": devices,
        "storage": storage,
        "models": models,
        "self_test": None,
        "problems": problems,
    }
    if self_test:
        if not torch_ok:
            problems.append("self-test skipped: torch cannot be imported.")
        else:
            from pie_cli.core.devices import choose_device

            choose_device(device)  # an unusable --device is the user's mistake (exit 2), not a problem
            report["self_test"] = _self_test(device, problems)
    report["healthy"] = not problems

    if as_json:
        result(json.dumps(report, indent=2))
        for problem in problems:
            error(problem)
    else:
        _render(report)
    if problems:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- versions


def _versions(problems: list[str]) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    from pie_cli import __version__

    versions: dict[str, Any] = {
        "python": f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
        "platform": platform.platform(),
        "pie": __version__,
    }
    for dist, module_name in REQUIRED_PACKAGES:
        try:
            installed = version(dist)
        except PackageNotFoundError:
            installed = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(module_name)
        except Exception as exc:
            versions[dist] = None
            if installed is None:
                problems.append(f"{dist} is not installed; pie needs it (pip install -e . installs it).")
            else:
                problems.append(f"{dist} {installed} is installed but cannot be imported: {_one_line(exc)}")
            continue
        versions[dist] = str(getattr(module, "__version__", None) or installed)
    torch_version = versions.get("torch")
    if torch_version and _release(torch_version) < MIN_TORCH:
        problems.append(
            f"torch {torch_version} is older than {'.'.join(map(str, MIN_TORCH))}, the oldest pie supports."
        )
    problems.extend(_requirement_problems(versions))
    return versions


def _requirement_problems(versions: dict[str, Any]) -> list[str]:
    """Installed versions outside the ranges pie declares (from its installed metadata)."""
    try:
        from importlib.metadata import PackageNotFoundError, requires, version

        from packaging.requirements import Requirement
    except ImportError:
        return []
    try:
        declared = requires("pie-cli") or []
    except PackageNotFoundError:  # running from a source tree that was never installed
        return []
    found = []
    for text in declared:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.lower().replace("_", "-")
        if name == "torch" or (name in versions and versions[name] is None):
            continue  # torch has its own check; missing required packages are reported already
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            found.append(f"{req.name} is not installed; pie needs {req}.")
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            found.append(f"{req.name} {installed} is outside the versions pie supports ({req}).")
    return found


def _release(text: str) -> tuple[int, ...]:
    """Leading numeric release of a version string: "2.4.1+cu121" -> (2, 4, 1)."""
    match = re.match(r"\d+(?:\.\d+)*", text.strip())
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


# --------------------------------------------------------------------------- devices


def _devices(problems: list[str]) -> dict[str, Any]:
    import torch

    from pie_cli.core.devices import _mps_available

    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda}"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip}"
    else:
        build = "cpu build"
    devices: dict[str, Any] = {"torch_build": build, "cuda": [], "notes": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    devices["notes"] += [_one_line(w.message) for w in caught]
    if available:
        for index in range(torch.cuda.device_count()):
            devices["cuda"].append(_cuda_device(torch, index, problems))
    elif os.environ.get("CUDA_VISIBLE_DEVICES") is not None and build != "cpu build":
        devices["notes"].append(f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}")
    devices["mps"] = _mps_available()
    devices["cpu"] = {**_cpu(), "torch_threads": torch.get_num_threads()}
    return devices


def _cuda_device(torch: Any, index: int, problems: list[str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"index": index}
    try:
        props = torch.cuda.get_device_properties(index)
        entry["name"] = props.name
        entry["capability"] = f"{props.major}.{props.minor}"
        entry["total_bytes"] = int(props.total_memory)
    except Exception as exc:
        entry["name"] = f"(unreadable: {_one_line(exc)})"
    try:
        free, total = torch.cuda.mem_get_info(index)
        entry["free_bytes"], entry["total_bytes"] = int(free), int(total)
    except Exception as exc:
        entry["free_bytes"] = None
        entry.setdefault("total_bytes", None)
        entry["memory_error"] = _one_line(exc)
    try:
        _allocation_probe(index)
        entry["allocation"] = "ok"
    except Exception as exc:
        entry["allocation"] = _one_line(exc)
        problems.append(f"cuda:{index} is visible but a test allocation on it failed: {_one_line(exc)}")
    return entry


def _allocation_probe(index: int) -> None:
    """Allocate, compute and read back a small tensor on ``cuda:index``."""
    import torch

    x = torch.ones(1 << 20, device=f"cuda:{index}")
    total = float(x.sum().item())
    torch.cuda.synchronize(index)
    if total != float(1 << 20):
        raise RuntimeError(f"a sum of ones on the device gave {total}")


def _cpu() -> dict[str, Any]:
    cores = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = cores
    total = available = None
    try:
        import psutil

        memory = psutil.virtual_memory()
        total, available = int(memory.total), int(memory.available)
    except ImportError:
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            total = page * os.sysconf("SC_PHYS_PAGES")
            available = page * os.sysconf("SC_AVPHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            pass
    return {
        "cores": cores,
        "usable_cores": usable,
        "ram_total_bytes": total,
        "ram_available_bytes": available,
    }


# --------------------------------------------------------------------------- storage


def _storage(problems: list[str]) -> dict[str, Any]:
    from pie_cli.paths import hf_hub_cache, hf_offline, pie_home

    cache = hf_hub_cache()
    writable, why = _writable(cache)
    if not writable:
        problems.append(
            f"the Hugging Face cache {cache} is not writable ({why}); "
            "point HF_HOME or HF_HUB_CACHE at a writable directory."
        )
    size, files, complete = _tree_size(cache) if cache.is_dir() else (0, 0, True)
    return {
        "pie_home": str(pie_home()),
        "hf_cache": str(cache),
        "hf_cache_exists": cache.is_dir(),
        "hf_cache_writable": writable,
        "hf_cache_bytes": size,
        "hf_cache_files": files,
        "hf_cache_size_complete": complete,
        "hf_offline": hf_offline(),
    }


def _writable(path: Path) -> tuple[bool, str | None]:
    """Whether files can be created in ``path`` (or, if it does not exist yet, where it would be made)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return False, f"{probe} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".pie-doctor-"):
            pass
    except OSError as exc:
        return False, _one_line(exc)
    return True, None


def _tree_size(root: Path) -> tuple[int, int, bool]:
    """(bytes, files, complete) of the regular files under ``root``; symlinks (HF snapshots) not followed.

    Stops after ``MAX_CACHE_FILES`` files or ``MAX_CACHE_SECONDS`` seconds (complete = False).
    """
    deadline = time.monotonic() + MAX_CACHE_SECONDS
    size = files = 0
    stack = [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False):
                            size += entry.stat(follow_symlinks=False).st_size
                            files += 1
                    except OSError:
                        continue
                    if files >= MAX_CACHE_FILES or time.monotonic() > deadline:
                        return size, files, False
        except OSError:
            continue
    return size, files, True


# --------------------------------------------------------------------------- models


def _models(problems: list[str]) -> list[dict[str, Any]]:
    """Every built-in and user alias, as `pie models list` enumerates them, and whether it resolves."""
    from pie_cli.cli.commands.models import _status
    from pie_cli.core.registry import BUILTIN_ALIASES, BUILTIN_LOCAL, load_user_models

    registry_error = None
    try:
        users = load_user_models()
    except UserError as exc:  # every resolution fails with this message; report it once
        registry_error = exc.message
        problems.append(registry_error)
        users = {}
    rows: list[dict[str, Any]] = []
    for name in BUILTIN_LOCAL:
        rows.append({"name": name, "source": "built-in", "kind": "model", "target": "(shipped with pie)"})
    for name, repo in BUILTIN_ALIASES.items():
        rows.append({"name": name, "source": "built-in", "kind": "model", "target": repo})
    for name, entry in users.items():
        rows.append({"name": name, "source": "user", "kind": entry.kind, "target": entry.target})
    for row in rows:
        name = row["name"]
        status, where = _status(name)
        if status == "ok":
            row.update(status="ok", detail=where, reason=None)
            continue
        entry = users.get(name) if row["source"] == "user" else None
        if entry is not None and entry.kind != "model" and not Path(entry.target).exists():
            where = f"its {entry.kind} {entry.target} no longer exists."
        else:
            missing = _uncached_repo(name, users)
            if missing is not None:
                repo, pull = missing
                row.update(
                    status="not cached",
                    detail=f"{repo} is not in the Hugging Face cache (`pie models pull {pull}`)",
                    reason=where,
                )
                continue
        row.update(status="broken", detail=where, reason=where)
        if where == registry_error:
            continue
        if row["source"] == "user":
            problems.append(f"model alias {name} is broken: {where}")
        else:
            problems.append(f"the built-in {name} model does not resolve: {where}")
    return rows


def _uncached_repo(reference: str, users: dict, seen: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """(repo id, reference to pull) when ``reference`` fails only because a repo is not downloaded."""
    from pie_cli.core.registry import BUILTIN_ALIASES, REPO_ID, hf_snapshot

    if reference in seen:
        return None
    if "/" not in reference and reference in users:
        entry = users[reference]
        if entry.kind == "model":
            return _uncached_repo(entry.target, users, (*seen, reference))
        return _uncached_repo(entry.base, users, (*seen, reference)) if entry.base else None
    if reference in BUILTIN_ALIASES:
        repo, revision = BUILTIN_ALIASES[reference], None
    else:
        match = REPO_ID.match(reference)
        if not match or Path(reference).expanduser().exists():
            return None
        repo, revision = match["repo"], match["rev"]
    return (repo, reference) if hf_snapshot(repo, revision) is None else None


# --------------------------------------------------------------------------- self-test


def _self_test(device: str, problems: list[str]) -> dict[str, Any]:
    """Build a tiny model, load it like the CLI does, run a short progression and check its frames."""
    report: dict[str, Any] = {"ok": False, "device": device, "steps": SELF_TEST_STEPS, "error": None}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pie-doctor-", ignore_cleanup_errors=True) as tmp:
        try:
            report.update(_run_self_test(Path(tmp), device))
            report["ok"] = True
        except Exception as exc:
            report["error"] = _one_line(exc)
            problems.append(f"self-test failed: {report['error']}")
            if ui.debug:
                import traceback

                err().print(traceback.format_exc(), markup=False)
        finally:
            _forget_loaded(tmp)
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def _run_self_test(tmp: Path, device: str) -> dict[str, Any]:
    import numpy as np

    from pie_cli.core.devices import choose_placement, dtype_name
    from pie_cli.core.loading import load
    from pie_cli.core.progression import progress
    from pie_cli.core.registry import resolve, vae_force_upcast
    from pie_cli.demo.phantom import chest_phantom
    from pie_cli.demo.tiny import build_tiny_model
    from pie_cli.imaging.morphology import dilate

    info("self-test: building a tiny model ...")
    t0 = time.perf_counter()
    path = build_tiny_model(tmp / "tiny-sd", seed=0)
    source = resolve(str(path))
    placement = choose_placement(device, "auto", vae_force_upcast(source.path))
    components = load(source, placement)
    t1 = time.perf_counter()
    info(f"self-test: {SELF_TEST_STEPS}-step progression on {placement.device} ...")
    image, _right, left = chest_phantom(SELF_TEST_SIZE, seed=0)
    frames = [
        f.image
        for f in progress(
            components,
            image,
            left,
            prompt=SELF_TEST_PROMPT,
            steps=SELF_TEST_STEPS,
            inference_steps=4,
            resolution=SELF_TEST_SIZE,
            seed=0,
        )
    ]
    t2 = time.perf_counter()
    if len(frames) != SELF_TEST_STEPS + 1:
        raise RuntimeError(f"the progression gave {len(frames)} frames, expected {SELF_TEST_STEPS + 1}")
    arrays = []
    for k, frame in enumerate(frames):
        if frame.size != (SELF_TEST_SIZE, SELF_TEST_SIZE):
            raise RuntimeError(f"frame {k} is {frame.size[0]}x{frame.size[1]}, expected 64x64")
        arr = np.asarray(frame.convert("RGB"), dtype=np.float32)
        if not np.isfinite(arr).all() or arr.max() == arr.min():
            raise RuntimeError(f"frame {k} is blank or not finite")
        arrays.append(arr)
    # The tiny model's VAE is random, so frame 0 -> 1 changes everywhere (its round trip is not
    # the identity); the mask's effect shows between progression steps: far from the mask the
    # image must change much less than inside it.
    mask = np.asarray(left) > 0
    far = ~dilate(mask, SELF_TEST_MARGIN)
    change = np.abs(arrays[-1] - arrays[1]).mean(axis=2)
    inside, outside = float(change[mask].mean()), float(change[far].mean())
    if not inside > 1.0:
        raise RuntimeError(f"the masked region did not change (mean change {inside:.2f} grey levels)")
    if not outside < 0.5 * inside:
        raise RuntimeError(
            f"pixels outside the mask changed too much ({outside:.1f} vs {inside:.1f} grey levels inside)"
        )
    return {
        "device": str(placement.device),
        "dtype": dtype_name(placement.dtype),
        "frames": len(frames),
        "size": [SELF_TEST_SIZE, SELF_TEST_SIZE],
        "change_inside": round(inside, 2),
        "change_outside": round(outside, 2),
        "build_load_seconds": round(t1 - t0, 2),
        "progression_seconds": round(t2 - t1, 2),
    }


def _forget_loaded(tmp: str) -> None:
    """Drop the self-test model from the loader's in-process cache (its files are about to go)."""
    loading = sys.modules.get("pie_cli.core.loading")
    cache = getattr(loading, "_CACHE", None)
    if isinstance(cache, dict):
        prefix = str(Path(tmp).resolve())
        for key in [k for k in cache if any(str(part).startswith(prefix) for part in k)]:
            del cache[key]


# --------------------------------------------------------------------------- output


def _one_line(exc: BaseException | Warning) -> str:
    """First line of an exception's message; pie's own errors without their class name."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, (PieError, Warning)):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _render(report: dict[str, Any]) -> None:
    """The report as aligned lines on stdout (rich markup in values; labels are plain)."""
    console = out()

    def section(title: str, rows: list[tuple[str, str]]) -> None:
        console.print(title, style="bold", markup=False)
        width = max(len(label) for label, _ in rows)
        for label, value in rows:
            console.print(f"  {_escape(label.ljust(width))}  {value}")

    versions, devices, storage = report["versions"], report["devices"], report["storage"]
    missing = "[red]missing[/red]"
    rows = [("python", versions["python"]), ("platform", versions["platform"]), ("pie", versions["pie"])]
    for dist, _module in REQUIRED_PACKAGES:
        value = versions.get(dist)
        if dist == "torch" and value:
            value = f"{value} ({devices['torch_build']})"
        rows.append((dist, _escape(value) if value else missing))
    section("versions", rows)

    rows = []
    if devices["cuda"]:
        for dev in devices["cuda"]:
            memory = f"{_bytes(dev.get('total_bytes'))} total, {_bytes(dev.get('free_bytes'))} free"
            alloc = (
                ""
                if dev["allocation"] == "ok"
                else f", [red]allocation failed: {_escape(dev['allocation'])}[/red]"
            )
            rows.append((f"cuda:{dev['index']}", f"{_escape(dev['name'])}, {memory}{alloc}"))
    elif devices.get("torch_build") is not None:
        rows.append(("cuda", "no CUDA device (CPU only)"))
    if devices.get("mps"):
        rows.append(("mps", "available"))
    cpu = devices["cpu"]
    cores = f"{cpu['cores']} cores" + (
        f" ({cpu['usable_cores']} usable)" if cpu["usable_cores"] != cpu["cores"] else ""
    )
    if cpu.get("torch_threads"):
        cores += f", torch uses {cpu['torch_threads']} threads"
    rows.append(("cpu", cores))
    rows.append(
        ("ram", f"{_bytes(cpu['ram_total_bytes'])} total, {_bytes(cpu['ram_available_bytes'])} available")
    )
    for note in devices.get("notes", []):
        rows.append(("note", _escape(note)))
    section("devices", rows)

    if storage["hf_cache_exists"]:
        bound = "" if storage["hf_cache_size_complete"] else ">= "
        size = f"{bound}{_bytes(storage['hf_cache_bytes'])} in {bound}{storage['hf_cache_files']} files"
    else:
        size = "does not exist yet"
    writable = "writable" if storage["hf_cache_writable"] else "[red]not writable[/red]"
    rows = [
        ("pie home", _escape(storage["pie_home"])),
        ("hf cache", f"{_escape(storage['hf_cache'])} ({size}, {writable})"),
        ("offline", "yes (HF_HUB_OFFLINE)" if storage["hf_offline"] else "no"),
    ]
    section("storage", rows)

    styles = {"ok": "green", "not cached": "yellow", "broken": "red"}
    width = max(len(status) for status in styles)
    rows = []
    for r in report["models"]:
        style = styles[r["status"]]
        rows.append((r["name"], f"[{style}]{r['status'].ljust(width)}[/{style}]  {_escape(r['detail'])}"))
    section("models", rows)

    test = report["self_test"]
    if test is not None:
        if test["ok"]:
            rows = [
                ("status", f"[green]ok[/green] in {test['seconds']:.1f} s"),
                (
                    "model",
                    f"tiny model built and loaded in {test['build_load_seconds']:.1f} s "
                    f"({test['device']}, {test['dtype']})",
                ),
                (
                    "run",
                    f"{test['steps']}-step progression at {test['size'][0]}x{test['size'][1]} "
                    f"in {test['progression_seconds']:.1f} s, {test['frames']} frames",
                ),
                (
                    "mask",
                    f"mean change {test['change_inside']:.1f} grey levels inside, "
                    f"{test['change_outside']:.1f} outside (>= {SELF_TEST_MARGIN} px away)",
                ),
            ]
        else:
            rows = [("status", f"[red]failed[/red] after {test['seconds']:.1f} s: {_escape(test['error'])}")]
        section("self-test", rows)

    if report["problems"]:
        console.print(f"{len(report['problems'])} problem(s):", style="red bold", markup=False)
        for problem in report["problems"]:
            console.print(f"  - {problem}", markup=False)
    else:
        console.print("no problems found", style="green", markup=False)


def _escape(text: Any) -> str:
    from rich.markup import escape

    return escape(str(text))
