"""`pie models list|add|remove|info|pull`: the shared model registry."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from pie_cli.cli.boundary import guarded
from pie_cli.cli.console import human_bytes, info, out, result, warn
from pie_cli.cli.options import DebugOpt, JsonOpt
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
        rows.append({**row, "status": found.status, "path": found.detail if ok else None, "note": note})
    if as_json:
        result(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("name", "kind", "source", "target", "status"):
        table.add_column(col, overflow="fold")
    for r in rows:
        style, word = _SHOWN[r["status"]]
        table.add_row(
            r["name"],
            r["kind"],
            r["source"],
            r["target"] + (f" (on {r['base']})" if r.get("base") else ""),
            f"[{style}]{word}[/{style}]",
        )
    out().print(table)


@models_app.command("add")
@guarded
def add(
    name: Annotated[str, typer.Argument(help="Alias to create.", show_default=False)],
    target: Annotated[
        str,
        typer.Argument(help="Model folder, UNet folder, LoRA weights, repo id or alias.", show_default=False),
    ],
    base: Annotated[
        str | None, typer.Option("--base", help="Model a LoRA or UNet applies to.", show_default=False)
    ] = None,
    weight: Annotated[float, typer.Option("--weight", help="LoRA weight.")] = 1.0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing alias of that name.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Register NAME for TARGET, e.g. a `pie finetune` output (LoRA adapters need --base)."""
    from pie_cli.core.registry import add_alias

    added = add_alias(name, target, base=base, weight=weight, force=force, note=info, warn=warn)
    base_note = f", on {added.base}" if added.base else ""
    info(f"added {name} -> {added.target} ({added.kind}{base_note})")


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
    for key in ("reference", "alias", "origin", "repo_id", "revision", "path", "unet"):
        if data.get(key):
            console.print(f"{key:<20} {data[key]}", markup=False)
    if data["loras"]:
        console.print(f"{'loras':<20} {', '.join(data['loras'])}", markup=False)
    for key in ("vae_scale_factor", "cross_attention_dim", "sample_size"):
        if data.get(key) is not None:
            console.print(f"{key:<20} {data[key]}", markup=False)
    for comp, entry in data["components"].items():
        detail = entry.get("class") or "present"
        if "weights" in entry:
            detail += f"  {entry['weights']}, {human_bytes(entry['bytes'])}"
        console.print(f"{comp:<20} {detail if entry['present'] else 'missing'}", markup=False)


# Files of a diffusers SD 1.x repo that pie needs: configs, tokenizer, fp32 safetensors.
PULL_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]


@models_app.command("pull")
@guarded
def pull(
    reference: Annotated[
        str, typer.Argument(help="Built-in alias or Hugging Face repo id[@revision].", show_default=False)
    ],
    debug: DebugOpt = False,
) -> None:
    """Download a model into the Hugging Face cache (safetensors weights and configs only)."""
    from pie_cli.core.registry import BUILTIN_ALIASES, BUILTIN_LOCAL, REPO_ID, load_user_models
    from pie_cli.paths import hf_hub_cache, hf_offline

    if reference in BUILTIN_LOCAL:
        raise UserError(f"{reference} ships with pie; there is nothing to download.")
    users = load_user_models()
    target = users[reference].target if reference in users else BUILTIN_ALIASES.get(reference, reference)
    match = REPO_ID.match(target)
    if not match:
        raise UserError(
            f"{reference} is not a built-in alias or a Hugging Face repo id; nothing to download."
        )
    if hf_offline():
        raise UserError(f"HF_HUB_OFFLINE is set, so {reference} cannot be downloaded; unset it to pull.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    info(f"downloading {match['repo']} into {hf_hub_cache()} (safetensors and configs only) ...")
    try:
        path = snapshot_download(
            match["repo"], revision=match["rev"], cache_dir=str(hf_hub_cache()), allow_patterns=PULL_PATTERNS
        )
    except RepositoryNotFoundError:
        raise UserError(
            f"{match['repo']} does not exist on the Hugging Face Hub or needs a login (`hf auth login`)."
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise UserError(f"could not download {match['repo']}: {exc}".rstrip(".") + ".") from None
    result(path)
