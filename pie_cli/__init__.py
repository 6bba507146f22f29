"""pie: simulate disease progression on medical images (Progressive Image Editing, Liang et al. 2023).

Start reading at ``core/progression.py``: the algorithm, with no files and no terminal.
The package is layered; a module imports only from its own layer or the ones below it
(``tests/test_architecture.py`` checks this, ``docs/ARCHITECTURE.md`` explains it)::

    cli/         the shell: Typer app, one module per command, error boundary, options,
                 consoles, progress display. Nothing else imports it.
    simulate/    training/    evaluation/    doctor/
                 one service per command family: spec -> work -> result, no printing
    core/        PIE itself (parameters, schedules, progression) and the model it drives
                 (registry, loading, devices, distributed)
    runs/        the run folder on disk: manifest schema, writer, frames, locks
    demo/        phantoms, the tiny test model, the built-in demo model and classifier
    imaging/     pixels in and out, numpy/PIL only: media, DICOM, files, masks, animations
    errors.py  paths.py  signals.py  reporting.py   shared by every layer

The Python API is re-exported here and imported on first use (``import pie_cli`` stays
instant)::

    from pie_cli import progress, load, resolve, choose_placement
    components = load(resolve("sd-v1-5"), choose_placement("cuda", "auto"))
    for frame in progress(components, image, mask, prompt="large left pleural effusion"):
        frame.image.save(f"frame_{frame.index:03d}.png")
"""

from __future__ import annotations

__version__ = "0.1.0"

# name -> module that defines it (imported lazily by __getattr__)
_API = {
    "progress": "pie_cli.core.progression",
    "progress_batch": "pie_cli.core.progression",
    "Components": "pie_cli.core.progression",
    "Frame": "pie_cli.core.progression",
    "ResumePoint": "pie_cli.core.progression",
    "PieConfig": "pie_cli.core.parameters",
    "load": "pie_cli.core.loading",
    "resolve": "pie_cli.core.registry",
    "parse_lora": "pie_cli.core.registry",
    "choose_placement": "pie_cli.core.devices",
    "SimulateSpec": "pie_cli.simulate.spec",
    "run_simulation": "pie_cli.simulate.run",  # pie_cli.simulate.run.run: `pie simulate IMAGE` from Python
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'pie_cli' has no attribute {name!r}")
    import importlib

    if name == "run_simulation":
        return importlib.import_module(module).run
    return getattr(importlib.import_module(module), name)
