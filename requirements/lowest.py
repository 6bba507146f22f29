"""Print pie's dependencies pinned at their declared lower bounds (``make test-min``).

Every ``name>=X`` of ``pyproject.toml``'s ``dependencies`` (and of the extras in ``EXTRAS``) becomes
``name==X``, except torch,
which stays at the CPU build pinned in ``requirements/dev.txt`` (a lower torch would pull a
CUDA build of several GB); the test tools come from ``requirements/dev.txt`` as pinned there.
So the fast tests run against the oldest versions pie says it supports.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
TEST_TOOLS = ("pytest", "hypothesis", "pluggy", "iniconfig", "sortedcontainers", "packaging")
# Extras tested at their floors too (xrv needs torchvision, whose PyPI build does not match this torch).
EXTRAS = ("video", "report", "hf")
# Packages pie does not depend on directly, held where their newest release refuses the floors above:
# pyarrow >= 21 needs NumPy 2 (the floor is 1.26) and dropped PyExtensionType, which datasets 2.14 uses.
TRANSITIVE = ("pyarrow==20.0.0",)


def pinned(name: str) -> str:
    for line in (ROOT / "requirements" / "dev.txt").read_text().splitlines():
        if line.split("==")[0].strip().lower() == name:
            return line.strip()
    raise SystemExit(f"requirements/dev.txt pins no {name}")


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [pinned("torch")]
    extras = [t for name in EXTRAS for t in project["optional-dependencies"][name]]
    for text in [*project["dependencies"], *extras]:
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*(.*)$", text)
        name, spec = match.group(1), match.group(2)
        if name.lower() == "torch":
            continue
        floor = re.search(r">=\s*([0-9][^,;\s]*)", spec)
        if floor is None:
            raise SystemExit(f"pyproject.toml: {text!r} declares no lower bound")
        lines.append(f"{name}=={floor.group(1)}")
    lines += [*TRANSITIVE, *(pinned(tool) for tool in TEST_TOOLS)]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
