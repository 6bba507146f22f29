"""The layers of docs/ARCHITECTURE.md, checked on the import graph (module-level and function-level imports).

Every ``import`` and ``from ... import`` anywhere in a module counts, including those inside
functions and under ``TYPE_CHECKING``. The rules:

1. only ``pie_cli.cli`` (and ``pie_cli.__main__``) import ``pie_cli.cli``;
2. a command module never imports another command module;
3. ``pie_cli.imaging`` never imports torch or the libraries built on it;
4. a layer imports only from its own package or the layers below it, and the packages of one
   layer do not import each other.

The layers, bottom up: shared modules (errors, paths, signals, reporting) < imaging < core,
runs, demo < simulate, training, evaluation, doctor < cli. The root package (``pie_cli``,
``__version__`` and the lazy API) and the compatibility modules ``pie_cli.progression`` and
``pie_cli.loading`` sit on top.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "pie_cli"
HEAVY = (
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "safetensors",
    "huggingface_hub",
)
LAYERS = {
    **dict.fromkeys(("errors", "paths", "signals", "reporting"), 0),
    "imaging": 1,
    **dict.fromkeys(("core", "runs", "demo"), 2),
    **dict.fromkeys(("simulate", "training", "evaluation", "doctor"), 3),
    "cli": 4,
    **dict.fromkeys(("__init__", "__main__", "progression", "loading"), 5),  # the root and the API shims
}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, dotted
    target: str  # imported module (or module.name), dotted
    where: str  # pie_cli/path.py:line


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path) -> list[Edge]:
    """Every import in ``path``, absolute (relative imports resolved), at any depth."""
    source = module_name(path, root)
    where = path.relative_to(root.parent).as_posix()
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    edges = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            edges += [Edge(source, alias.name, f"{where}:{node.lineno}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            edges += [Edge(source, f"{base}.{alias.name}", f"{where}:{node.lineno}") for alias in node.names]
    return edges


def top(name: str) -> str:
    """The layer key of a pie_cli module: its first package below pie_cli ("core", "errors", ...)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def problems(root: Path = ROOT) -> list[str]:
    """Every import that breaks a rule, as "file:line imports X: rule"."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for edge in imports(path, root):
            src, dst = edge.source, edge.target
            src_key = "__main__" if src == "pie_cli.__main__" else top(src)
            if dst.split(".")[0] in HEAVY and src_key == "imaging":
                found.append(f"{edge.where} imports {dst}: imaging/ stays numpy/PIL only, never torch")
            if not dst.startswith("pie_cli.") or dst == "pie_cli.__version__":
                continue
            dst_key = top(dst)
            if dst_key == "cli" and src_key not in ("cli", "__main__"):
                found.append(f"{edge.where} imports {dst}: only pie_cli.cli imports the shell")
                continue
            if src.startswith("pie_cli.cli.commands.") and dst.startswith("pie_cli.cli.commands."):
                src_cmd, dst_cmd = src.split(".")[3], dst.split(".")[3]
                if src_cmd != dst_cmd:
                    found.append(f"{edge.where} imports {dst}: a command never imports another command")
            if src_key == dst_key or src_key not in LAYERS or dst_key not in LAYERS:
                continue
            if LAYERS[dst_key] > LAYERS[src_key]:
                found.append(
                    f"{edge.where} imports {dst}: {src_key}/ may not import the layer above it ({dst_key}/)"
                )
            elif LAYERS[dst_key] == LAYERS[src_key] and LAYERS[src_key] in (2, 3):
                found.append(
                    f"{edge.where} imports {dst}: {src_key}/ and {dst_key}/ are one layer and independent"
                )
    return found


def test_the_package_keeps_its_layers():
    found = problems()
    assert not found, "imports that break docs/ARCHITECTURE.md's layers:\n" + "\n".join(found)


def test_every_package_has_a_layer():
    """A new top-level package or module must be placed in a layer (and so in this test)."""
    keys = {p.stem if p.is_file() else p.name for p in ROOT.iterdir() if not p.name.startswith((".", "_"))}
    keys = {k for k in keys if (ROOT / k).is_dir() or (ROOT / f"{k}.py").is_file()}
    assert keys - {"__pycache__"} <= set(LAYERS), sorted(keys - set(LAYERS))


@pytest.mark.parametrize(
    ("relative", "code", "rule"),
    [
        ("imaging/bad.py", "from pie_cli.cli.console import info\n", "only pie_cli.cli imports the shell"),
        ("imaging/bad.py", "def f():\n    import torch\n", "imaging/ stays numpy/PIL only, never torch"),
        (
            "cli/commands/bad.py",
            "from pie_cli.cli.commands.simulate import simulate\n",
            "never imports another command",
        ),
        (
            "core/bad.py",
            "def f():\n    from pie_cli.simulate.run import run\n",
            "may not import the layer above it",
        ),
        ("runs/bad.py", "from pie_cli.core import registry\n", "are one layer and independent"),
        ("simulate/bad.py", "from ..training import runner\n", "are one layer and independent"),
    ],
    ids=["shell", "torch-in-imaging", "command-to-command", "upward", "sibling", "relative-sibling"],
)
def test_a_back_edge_is_caught(tmp_path, relative, code, rule):
    """The checker itself: a copy of the package with one bad import added fails with a message naming it."""
    copy = tmp_path / "pie_cli"
    for source in ROOT.rglob("*.py"):
        target = copy / source.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    assert problems(copy) == []
    (copy / relative).write_text(code, encoding="utf-8")
    found = problems(copy)
    assert len(found) == 1 and found[0].startswith(f"pie_cli/{relative}:") and rule in found[0], found


def test_services_print_nothing_and_return_results(tiny_model, inputs, tmp_path, capfd):
    """Rule 1 in behaviour: called from Python, every service is silent and hands back data."""
    from pie_cli import SimulateSpec, run_simulation
    from pie_cli.doctor.checks import collect
    from pie_cli.evaluation.evaluate import evaluate_run
    from pie_cli.training import runner
    from pie_cli.training.config import OPTION_NAMES, TrainSpec
    from tests.helpers import colour_folder

    spec = SimulateSpec(inputs["image"], "effusion", inputs["mask"], str(tiny_model), tmp_path / "run")
    spec = spec.with_values(steps=1, inference_steps=4, resolution=64, device="cpu")
    done = run_simulation(spec)
    assert (
        done.out == tmp_path / "run" and done.steps == 1 and done.gif == tmp_path / "run" / "progression.gif"
    )
    evaluation = evaluate_run(done.out)
    assert [m.index for m in evaluation.metrics] == [0, 1] and all(p.is_file() for p in evaluation.written)
    report = collect()
    assert report["pie"] and report["versions"]["torch"] and isinstance(report["problems"], list)
    flags = {
        "data": str(colour_folder(tmp_path / "data")),
        "model": str(tiny_model),
        "out": str(tmp_path / "ft"),
    }
    defaults = {name: getattr(TrainSpec(), name) for name in OPTION_NAMES}
    plan = runner.plan({**defaults, **flags}, dict.fromkeys(flags, "command line"))
    assert len(plan.data.records) == 8 and plan.checkpoint is None and not (tmp_path / "ft").exists()
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
