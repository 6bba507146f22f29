"""`pie models list|add|convert|remove|info|pull`: the shared model registry."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from pie_cli.cli.boundary import guarded
from pie_cli.cli.console import human_bytes, info, out, result, warn
from pie_cli.cli.options import (
    AllowPickleOpt,
    DebugOpt,
    JsonOpt,
    ModelConfigOpt,
    OverwriteOpt,
    out_option,
)
from pie_cli.errors import UserError
from pie_cli.imaging.files import writing

models_app = typer.Typer(
    help="The model registry: built-in aliases, your aliases, local folders and the Hugging Face cache.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


# The table's words for registry.status values.
_SHOWN = {"ok": ("green", "ready"), "not cached": ("yellow", "not cached"), "broken": ("red", "broken")}


@models_app.command("list")
@guarded
def list_models(as_json: JsonOpt = False, debug: DebugOpt = False) -> None:
    """List built-in and user aliases and whether each resolves offline."""
    from pie_cli.core.registry import entries, load_user_models, status

    users = load_user_models()
    rows = []
    for row in entries(users):
        found = status(row["name"], users)
        ok = found.status == "ok"
        note = row["note"] if row["source"] == "built-in" or ok else found.detail
        rows.append(
            {
                **row,
                "status": found.status,
                "path": found.detail if ok else None,
                "weights": found.weights,
                "note": note,
            }
        )
    if as_json:
        result(json.dumps(rows, indent=2))
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("name", "kind", "source", "target", "status", "weights"):
        table.add_column(col, overflow="fold")
    for r in rows:
        style, word = _SHOWN[r["status"]]
        table.add_row(
            r["name"],
            r["kind"],
            r["source"],
            r["target"]
            + (f" (on {r['base']})" if r.get("base") else "")
            + (f" (configs: {r['config']})" if r.get("config") else ""),
            f"[{style}]{word}[/{style}]",
            escape(r["weights"] or ""),
        )
    out().print(table)


@models_app.command("add")
@guarded
def add(
    name: Annotated[str, typer.Argument(help="Alias to create.", show_default=False)],
    target: Annotated[
        str,
        typer.Argument(
            help="Model folder, single-file checkpoint (.safetensors/.ckpt), UNet folder, LoRA weights, repo id or alias.",
            show_default=False,
        ),
    ],
    base: Annotated[
        str | None, typer.Option("--base", help="Model a LoRA or UNet applies to.", show_default=False)
    ] = None,
    weight: Annotated[float, typer.Option("--weight", help="LoRA weight.")] = 1.0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing alias of that name.")] = False,
    model_config: ModelConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Register NAME for TARGET, e.g. a `pie finetune` output (LoRA adapters need --base)."""
    from pie_cli.core.registry import add_alias

    added = add_alias(
        name, target, base=base, weight=weight, force=force, config=model_config, note=info, warn=warn
    )
    base_note = f", on {added.base}" if added.base else ""
    if added.kind == "single-file":
        base_note = f", configs: {added.config or 'built-in SD 1.x'}"
    info(f"added {name} -> {added.target} ({added.kind}{base_note})")


@models_app.command("convert")
@guarded
def convert(
    src: Annotated[
        str,
        typer.Argument(
            help="Single-file checkpoint (.safetensors/.ckpt), or a model (folder, alias, repo) with pickle weights.",
            show_default=False,
        ),
    ],
    out: out_option("Folder to write the model into (diffusers layout, safetensors weights)."),
    model_config: ModelConfigOpt = None,
    allow_pickle: AllowPickleOpt = False,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write SRC once as a diffusers-layout model with safetensors weights: then use --model OUT (no --allow-pickle)."""
    from pie_cli.cli.display import ProgressDisplay
    from pie_cli.core.convert import convert as convert_model

    with ProgressDisplay() as display:
        done = convert_model(
            src,
            out,
            model_config=model_config,
            allow_pickle=allow_pickle,
            overwrite=overwrite,
            reporter=display,
        )
    size = human_bytes(done.bytes)
    info(f"converted {src} -> {done.out} ({done.files} files, {size}, {done.dtype} safetensors)")
    result(str(done.out))


@models_app.command("remove")
@guarded
def remove(
    name: Annotated[str, typer.Argument(help="Alias to remove (files are not touched).", show_default=False)],
    debug: DebugOpt = False,
) -> None:
    """Remove a user alias (the files it points to stay where they are)."""
    from pie_cli.core.registry import BUILTIN_ALIASES, BUILTIN_LOCAL, edit_user_models, user_models_file

    if name in BUILTIN_ALIASES or name in BUILTIN_LOCAL:
        raise UserError(f"alias {name} is built in and cannot be removed.")
    with writing(user_models_file()), edit_user_models() as models:
        if name not in models:
            raise UserError(f"no user alias named {name} (see `pie models list`).")
        del models[name]
    info(f"removed {name}")


@models_app.command("info")
@guarded
def model_info(
    reference: Annotated[str, typer.Argument(help="Model reference.", show_default=False)],
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Where a model reference resolves to and what it contains (read from its configs, no weights loaded)."""
    from pie_cli.core.model_files import model_summary
    from pie_cli.core.registry import resolve

    source = resolve(reference)
    data = {**source.describe(), **model_summary(source.path)}
    if as_json:
        result(json.dumps(data, indent=2))
        return
    console = out()
    shown = ("reference", "alias", "origin", "checkpoint", "config", "repo_id", "revision", "path", "unet")
    for key in shown:
        if data.get(key):
            console.print(f"{key:<20} {data[key]}", markup=False)
    if data["loras"]:
        console.print(f"{'loras':<20} {', '.join(data['loras'])}", markup=False)
    for key in ("vae_scale_factor", "cross_attention_dim", "sample_size"):
        if data.get(key) is not None:
            console.print(f"{key:<20} {data[key]}", markup=False)
    loads: dict[str, list[dict]] = {}
    for row in data["weights"]:
        loads.setdefault(row["part"], []).append(row)
    for row in loads.get("checkpoint", []):  # a single file: its weights; the folder above gives the configs
        how = "pickle: needs --allow-pickle" if row["format"] == "pickle" else row["format"]
        size = human_bytes(row["bytes"])
        console.print(f"{'weights':<20} {size}  ({how}, sha256 {row['sha256']})", markup=False)
    for comp, entry in data["components"].items():
        detail = entry.get("class") or "present"
        console.print(f"{comp:<20} {detail if entry['present'] else 'missing'}", markup=False)
        for row in loads.get(comp, []):  # the files loading reads (the --unet's for a UNet override)
            how = [f"{row['variant']} variant"] if row["variant"] else []
            how += ["pickle: needs --allow-pickle"] if row["format"] == "pickle" else []
            extra = f"  ({', '.join(how)})" if how else ""
            console.print(f"{'':<20} {row['file']}  {human_bytes(row['bytes'])}{extra}", markup=False)


@models_app.command("pull")
@guarded
def pull(
    reference: Annotated[
        str, typer.Argument(help="Built-in alias or Hugging Face repo id[@revision].", show_default=False)
    ],
    revision: Annotated[
        str | None,
        typer.Option(
            "--revision", help="Branch, tag or commit to download (or write REPO@REV).", show_default=False
        ),
    ] = None,
    variant: Annotated[
        str | None,
        typer.Option(
            "--variant",
            help="Download a weights variant, e.g. fp16 (half the size of the default).",
            show_default=False,
        ),
    ] = None,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle",
            help="Download .bin pickle weights where a part has no safetensors (trusted repos only).",
        ),
    ] = False,
    single_file: Annotated[
        list[str] | None,
        typer.Option(
            "--single-file",
            metavar="GLOB",
            help="Also download the root-level single-file checkpoint(s) matching GLOB (e.g. v1-5-pruned-emaonly.safetensors).",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the files and their total size; download nothing.")
    ] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Download a model into the Hugging Face cache: configs, tokenizer and the safetensors weights pie loads.

    Never the safety checker, never pickle weights unless --allow-pickle, never root-level single-file
    checkpoints unless named with --single-file. The path of the snapshot is printed on stdout.
    """
    from pie_cli.cli.console import ui
    from pie_cli.core.hub import download, plan_pull
    from pie_cli.paths import hf_hub_cache

    plan = plan_pull(
        reference,
        revision=revision,
        variant=variant,
        allow_pickle=allow_pickle,
        single_files=tuple(single_file or ()),
    )
    for note in plan.notes:
        (warn if "pickle" in note else info)(note)
    size = human_bytes(plan.total_bytes)
    where = f"{plan.repo_id}@{plan.revision} (commit {plan.commit[:12]})"
    if dry_run:
        if as_json:
            result(json.dumps({**plan.describe(), "dry_run": True}, indent=2))
            return
        console = out()
        for f in plan.files:
            console.print(f"{human_bytes(f.size):>10}  {f.path}", markup=False)
        console.print(f"{size:>10}  total: {len(plan.files)} files of {where}", markup=False)
        if plan.left_out:
            names = ", ".join(f"{f.path} ({human_bytes(f.size)})" for f in plan.left_out)
            info(f"left out: {names} (--single-file NAME to add one)")
        info("dry run: nothing was downloaded.")
        return
    info(f"downloading {len(plan.files)} files ({size}) of {where} into {hf_hub_cache()} ...")
    pulled = download(plan, progress=not ui.quiet and ui.progress != "off")
    for note in pulled.notes:
        warn(note)
    info(f"pulled {plan.repo_id}@{plan.revision}: {len(plan.files)} files, {size}")
    if as_json:
        result(json.dumps({**plan.describe(), "commit": pulled.commit, "path": str(pulled.path)}, indent=2))
    else:
        result(str(pulled.path))
