"""`pie doctor`: what pie runs on here, and whether it works (the checks live in ``pie_cli/doctor``).

Exit 0 when healthy, 1 with one line per problem otherwise; ``--json`` prints the report as it is.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from pie_cli.cli.console import err, error, human_bytes, out, result
from pie_cli.cli.options import DebugOpt, DeviceOpt, JsonOpt


def doctor(
    self_test: Annotated[
        bool,
        typer.Option(
            "--self-test", help="Also build a tiny model and run a 2-step progression with it (~10 s on CPU)."
        ),
    ] = False,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Check the installation: versions, devices, the Hugging Face cache, registered models.

    Exits 1 and lists the problems when something pie needs is missing or broken.
    """
    from pie_cli.cli.display import ProgressDisplay
    from pie_cli.doctor.checks import collect

    with ProgressDisplay() as display:
        report = collect(self_test=self_test, device=device, reporter=display)
    if (report["self_test"] or {}).get("traceback"):  # with --debug
        err().print(report["self_test"]["traceback"], markup=False)
    if as_json:
        result(json.dumps(report, indent=2))
        for problem in report["problems"]:
            error(problem)
    else:
        _render(report)
    if report["problems"]:
        raise typer.Exit(1)


def _render(report: dict[str, Any]) -> None:
    """The report as aligned lines on stdout (rich markup in values; labels are plain)."""
    from pie_cli.doctor.checks import REQUIRED_PACKAGES
    from pie_cli.doctor.self_test import SELF_TEST_MARGIN

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
            memory = f"{human_bytes(dev.get('total_bytes'))} total, {human_bytes(dev.get('free_bytes'))} free"
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
        (
            "ram",
            f"{human_bytes(cpu['ram_total_bytes'])} total, {human_bytes(cpu['ram_available_bytes'])} available",
        )
    )
    for note in devices.get("notes", []):
        rows.append(("note", _escape(note)))
    section("devices", rows)

    if storage["hf_cache_exists"]:
        bound = "" if storage["hf_cache_size_complete"] else ">= "
        size = f"{bound}{human_bytes(storage['hf_cache_bytes'])} in {bound}{storage['hf_cache_files']} files"
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
