"""What pie runs on here, as data: library versions, devices, storage and the model registry.

:func:`collect` returns the report ``pie doctor`` renders (``--json`` prints it as it is) and
appends one sentence per problem to its ``problems``. A model that is simply not downloaded
(``sd-v1-5`` on a laptop) is "not cached", not a problem. torch is imported only here, when
the checks run.
"""

from __future__ import annotations

import importlib
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from pie_cli.errors import UserError, one_line
from pie_cli.imaging.files import nearest_existing
from pie_cli.reporting import SILENT, Reporter

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


def collect(self_test: bool = False, device: str = "cpu", reporter: Reporter = SILENT) -> dict[str, Any]:
    """The whole report; ``healthy`` is true when ``problems`` is empty."""
    problems: list[str] = []
    found_versions = versions(problems)
    torch_ok = found_versions.get("torch") is not None
    found_devices = devices(problems) if torch_ok else {"torch_build": None, "cuda": [], "cpu": _cpu()}
    report: dict[str, Any] = {
        "pie": found_versions["pie"],
        "healthy": True,
        "versions": found_versions,
        "devices": found_devices,
        "storage": storage(problems),
        "models": models(problems),
        "self_test": None,
        "problems": problems,
    }
    if self_test:
        if not torch_ok:
            problems.append("self-test skipped: torch cannot be imported.")
        else:
            from pie_cli.core.devices import choose_device
            from pie_cli.doctor.self_test import self_test as run_self_test

            choose_device(device)  # an unusable --device is the user's mistake (exit 2), not a problem
            report["self_test"] = run_self_test(device, problems, reporter)
    report["healthy"] = not problems
    return report


# --------------------------------------------------------------------------- versions


def versions(problems: list[str]) -> dict[str, Any]:
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
                problems.append(f"{dist} {installed} is installed but cannot be imported: {one_line(exc)}")
            continue
        versions[dist] = str(getattr(module, "__version__", None) or installed)
    torch_version = versions.get("torch")
    if torch_version and _release(torch_version) < MIN_TORCH:
        problems.append(
            f"torch {torch_version} is older than {'.'.join(map(str, MIN_TORCH))}, the oldest pie supports."
        )
    problems.extend(requirement_problems(versions))
    return versions


def requirement_problems(versions: dict[str, Any]) -> list[str]:
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


def devices(problems: list[str]) -> dict[str, Any]:
    import torch

    from pie_cli.core.devices import mps_available

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
    devices["notes"] += [one_line(w.message) for w in caught]
    if available:
        for index in range(torch.cuda.device_count()):
            devices["cuda"].append(_cuda_device(torch, index, problems))
    elif os.environ.get("CUDA_VISIBLE_DEVICES") is not None and build != "cpu build":
        devices["notes"].append(f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}")
    devices["mps"] = mps_available()
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
        entry["name"] = f"(unreadable: {one_line(exc)})"
    try:
        free, total = torch.cuda.mem_get_info(index)
        entry["free_bytes"], entry["total_bytes"] = int(free), int(total)
    except Exception as exc:
        entry["free_bytes"] = None
        entry.setdefault("total_bytes", None)
        entry["memory_error"] = one_line(exc)
    try:
        _allocation_probe(index)
        entry["allocation"] = "ok"
    except Exception as exc:
        entry["allocation"] = one_line(exc)
        problems.append(f"cuda:{index} is visible but a test allocation on it failed: {one_line(exc)}")
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


def storage(problems: list[str]) -> dict[str, Any]:
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
    probe = nearest_existing(path)
    if not probe.is_dir():
        return False, f"{probe} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".pie-doctor-"):
            pass
    except OSError as exc:
        return False, one_line(exc)
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


def models(problems: list[str]) -> list[dict[str, Any]]:
    """Every built-in and user alias, as `pie models list` enumerates them, and whether it resolves."""
    from pie_cli.core.registry import entries, load_user_models, status

    registry_error = None
    try:
        users = load_user_models()
    except UserError as exc:  # every resolution fails with this message; report it once
        registry_error = exc.message
        problems.append(registry_error)
        users = {}
    rows: list[dict[str, Any]] = []
    for entry in entries(users):
        row = {k: entry[k] for k in ("name", "source", "kind", "target")}
        found = status(row["name"], users)
        row.update(status=found.status, detail=found.detail, reason=found.reason)
        rows.append(row)
        if found.status != "broken" or found.detail == registry_error:
            continue
        if row["source"] == "user":
            problems.append(f"model alias {row['name']} is broken: {found.detail}")
        else:
            problems.append(f"the built-in {row['name']} model does not resolve: {found.detail}")
    return rows
