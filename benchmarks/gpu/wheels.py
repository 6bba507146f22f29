"""The wheels a lent GPU machine lacks for pie, pinned to requirements/dev.txt (`make gpu-wheels`).

The machine has CPython 3.12 with a CUDA torch, numpy and many other packages, but not pie's
pinned diffusers, transformers, peft, pydicom..., and it cannot reach a registry. This script
lists pie's runtime dependencies (pyproject.toml's ``dependencies``, no extras) and everything
they need, transitively, at the versions requirements/dev.txt pins, leaves out torch and what
only torch needs (the machine's CUDA build stays) and numpy (binary, built against the
machine's torch and SciPy), and downloads them as CPython 3.12 manylinux x86_64 wheels:

    python benchmarks/gpu/wheels.py --out .cache/gpu-wheels        # download, print the sizes
    python benchmarks/gpu/wheels.py --list                         # only print the pinned list

The requirements are read from the installed distributions' metadata (the venv `make install`
builds from the same pins), so run it with the project's venv. pie itself is not a wheel: the
working tree travels to the machine anyway. The run tool carries at most 64 MiB (working tree
and carried folders together); the script prints the total and fails when it is over.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CARRY_LIMIT = 64 * 2**20
PYTHON = "3.12"
# Newest first: a machine with glibc 2.39 (CPython 3.12.3's Ubuntu) takes any of these.
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
# The machine's own: torch (its CUDA build) and what only torch needs; numpy, compiled against it.
EXCLUDE = {
    "torch",
    "numpy",
    "sympy",
    "mpmath",
    "networkx",
    "jinja2",
    "markupsafe",
    "setuptools",
    "typing-extensions",
}
EXCLUDE_PREFIXES = ("nvidia-", "cuda-", "triton")
# Needed by a dependency's metadata but never imported by an offline run: left behind to save room.
SKIP = {"hf-xet": "huggingface_hub's Xet transfer backend (downloads only; the machine is offline)"}
# Environment markers as CPython 3.12 on x86-64 Linux evaluates them.
MARKERS = {
    "python_version": PYTHON,
    "python_full_version": PYTHON + ".3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "os_name": "posix",
    "extra": "",
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path = ROOT / "requirements" / "dev.txt") -> dict[str, str]:
    """{canonical name: version} of every ``name==version`` line."""
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            found[canonical(name)] = version.strip()
    return found


def excluded(name: str) -> bool:
    return name in EXCLUDE or name in SKIP or name.startswith(EXCLUDE_PREFIXES)


def closure(roots: list[str], pinned: dict[str, str]) -> dict[str, str]:
    """{name: pinned version} of ``roots`` and all they require (markers for CPython 3.12 Linux)."""
    from packaging.requirements import Requirement

    todo = [Requirement(r) for r in roots]
    chosen: dict[str, str] = {}
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if (req.marker and not req.marker.evaluate(MARKERS)) or name in chosen or excluded(name):
            continue
        if name not in pinned:
            raise SystemExit(
                f"{req.name} is needed (by {req}) but requirements/dev.txt pins no version of it."
            )
        chosen[name] = pinned[name]
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed here; run `make install` first.") from None
        todo += [Requirement(r) for r in requires]
    return dict(sorted(chosen.items()))


def wanted() -> dict[str, str]:
    import tomllib  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return closure(project["dependencies"], pins())


def tree_bytes() -> int:
    """Bytes of what the run tool sends besides carried folders: tracked and untracked-not-ignored files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum((ROOT / p.decode()).stat().st_size for p in listed if p and (ROOT / p.decode()).is_file())


def _pinned_wheel(wheel: Path, names: dict[str, str]) -> bool:
    from packaging.version import Version

    name, version = wheel.name.split("-")[:2]
    pin = names.get(canonical(name))
    return pin is not None and Version(pin) == Version(version)


def download(names: dict[str, str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    listing = out / "requirements.txt"
    listing.write_text("".join(f"{n}=={v}\n" for n, v in names.items()), encoding="utf-8")
    # One version of each: pip refuses two, and a pin that moved leaves the old wheel behind.
    stale = [
        w for w in out.glob("*.whl") if names.get(canonical(w.name.split("-")[0])) != w.name.split("-")[1]
    ]
    for w in stale:
        w.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps"]
    cmd += ["--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp"]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run([*cmd, "-d", str(out), "-r", str(listing)], check=True)


def report(out: Path) -> int:
    wheels = sorted(out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    tree = tree_bytes()
    print(
        f"{len(wheels)} wheels, {total / 2**20:.1f} MiB; working tree {tree / 2**20:.1f} MiB; "
        f"together {(total + tree) / 2**20:.1f} of the run tool's {CARRY_LIMIT / 2**20:.0f} MiB"
    )
    if total + tree > CARRY_LIMIT:
        print("too large for one run: carry fewer wheels", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "gpu-wheels")
    parser.add_argument("--list", action="store_true", help="print the pinned list and exit")
    args = parser.parse_args()
    names = wanted()
    if args.list:
        print("".join(f"{n}=={v}\n" for n, v in names.items()), end="")
        return 0
    download(names, args.out)
    got = {canonical(w.name.split("-")[0]) for w in args.out.glob("*.whl")}
    missing = sorted(set(names) - got)
    if missing:
        print(f"no wheel downloaded for: {', '.join(missing)}", file=sys.stderr)
        return 1
    return report(args.out)


if __name__ == "__main__":
    sys.exit(main())
