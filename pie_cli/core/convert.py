"""`pie models convert`: a model written once as a diffusers-layout folder with safetensors weights.

The source is a single-file checkpoint (``.safetensors``, or a ``.ckpt`` with ``allow_pickle``)
with the configs that describe it, or a model folder (alias, repo) whose weights are pickles
only. It is loaded by the same loader as inference (:func:`~pie_cli.core.loading.load_parts`)
and saved part by part, so ``--model OUT`` afterwards loads the same tensors without
``--allow-pickle`` or ``--model-config``.

``--out`` follows pie's output rules: refused when it is or holds an input, or is not empty
without ``overwrite`` (then only files pie can prove it wrote are replaced, never a user's).
Everything is written into a temporary folder beside ``--out`` and published by one rename
(into a folder that still holds user files: one rename per file); every file is recorded in the
folder's ledger. Torch is imported only by :func:`convert`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pie_cli.core.registry import ModelSource
from pie_cli.errors import UserError
from pie_cli.reporting import SILENT, Reporter

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
RECORD = "conversion.json"  # where the folder came from: the source, its SHA-256, the configs, pie's version
_DTYPES = {"F16": "float16", "BF16": "bfloat16"}  # a half-precision checkpoint stays half precision


def converted_file(rel: str) -> bool:
    """Whether a path (relative to ``--out``) is one `pie models convert` writes."""
    return rel in ("model_index.json", RECORD) or rel.split("/")[0] in PARTS


@dataclass(frozen=True)
class ConvertPlan:
    source: ModelSource
    out: Path
    remove: tuple[Path, ...]  # pie's own files in --out that --overwrite replaces


@dataclass(frozen=True)
class ConvertResult:
    out: Path
    source: ModelSource
    files: int
    bytes: int
    dtype: str


def plan_convert(
    src: str,
    out: Path,
    *,
    model_config: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> ConvertPlan:
    """Everything checked before a model is loaded or a file written; a ``UserError`` naming the problem."""
    from pie_cli.core.model_files import check_weights
    from pie_cli.core.registry import resolve
    from pie_cli.core.single_file import refuse_pickle
    from pie_cli.imaging.files import check_out_dir
    from pie_cli.imaging.ownership import plan_overwrite, refuse_overlap

    source = resolve(src, config=model_config)
    if source.loras or source.unet is not None:
        raise UserError(
            f"{src} is a LoRA or UNet on a model; `pie models convert` writes whole models (convert the base model)."
        )
    if source.checkpoint is not None:
        refuse_pickle(source.checkpoint, allow_pickle)
    elif all(check_weights(source, allow_pickle).values()):
        raise UserError(
            f"model {src} ({source.path}) already loads from safetensors weights; there is nothing to convert."
        )
    out = Path(out)
    inputs = [
        ("SRC", source.checkpoint or source.path),
        ("--model-config", source.path if source.checkpoint is not None else None),
    ]
    refuse_overlap("--out", out, inputs, converted_file)
    check_out_dir(out, overwrite)
    remove = plan_overwrite(out, converted_file) if overwrite else []
    return ConvertPlan(source, out, tuple(remove))


def convert(
    src: str,
    out: Path,
    *,
    model_config: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    reporter: Reporter = SILENT,
) -> ConvertResult:
    """Convert ``src`` into the diffusers-layout folder ``out`` (safetensors weights) and return what was written."""
    import torch

    from pie_cli.core.loading import forget, load_parts, load_scheduler, quiet_libraries
    from pie_cli.core.single_file import unet_dtype
    from pie_cli.imaging.files import fsync_tree, temp_path, writing

    plan = plan_convert(src, out, model_config=model_config, allow_pickle=allow_pickle, overwrite=overwrite)
    source = plan.source
    stored = unet_dtype(source.checkpoint) if source.checkpoint is not None else None
    dtype = getattr(torch, _DTYPES.get(stored or "", "float32"))
    with reporter.status(f"loading {src}"), quiet_libraries(reporter.verbose):
        unet, vae, text_encoder, tokenizer = load_parts(
            source, dtype=dtype, allow_pickle=allow_pickle, warn=reporter.warn
        )
        scheduler = load_scheduler(source)
    out = plan.out
    tmp = temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of this very process id: never the user's
    try:
        with writing(tmp), reporter.status(f"writing {out}"), quiet_libraries(reporter.verbose):
            tmp.mkdir(parents=True)
            unet.save_pretrained(tmp / "unet", safe_serialization=True)
            vae.save_pretrained(tmp / "vae", safe_serialization=True)
            text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
            tokenizer.save_pretrained(tmp / "tokenizer")
            scheduler.save_pretrained(tmp / "scheduler")
            _write_json(tmp / "model_index.json", _model_index(unet, vae, text_encoder, tokenizer, scheduler))
            _write_json(tmp / RECORD, _record(src, source, str(dtype).removeprefix("torch.")))
            written = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
            fsync_tree(tmp)
            forget(out)
            _publish(tmp, out, plan.remove, written)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum((out / rel).stat().st_size for rel in written)
    return ConvertResult(out, source, len(written), size, str(dtype).removeprefix("torch."))


def _model_index(unet: Any, vae: Any, text_encoder: Any, tokenizer: Any, scheduler: Any) -> dict[str, Any]:
    import diffusers

    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "text_encoder": ["transformers", type(text_encoder).__name__],
        "tokenizer": ["transformers", type(tokenizer).__name__],
        "unet": ["diffusers", type(unet).__name__],
        "vae": ["diffusers", type(vae).__name__],
    }


def _record(src: str, source: ModelSource, dtype: str) -> dict[str, Any]:
    from pie_cli import __version__
    from pie_cli.core.model_files import file_digest

    return {
        "written_by": f"pie {__version__}",
        "converted_from": src,
        "checkpoint": str(source.checkpoint) if source.checkpoint is not None else None,
        "checkpoint_sha256": file_digest(source.checkpoint) if source.checkpoint is not None else None,
        "model": str(source.path) if source.checkpoint is None else None,
        "config": source.config,
        "config_path": str(source.path) if source.checkpoint is not None else None,
        "dtype": dtype,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from pie_cli.imaging.files import write_text

    write_text(path, json.dumps(data, indent=2) + "\n")


def _publish(tmp: Path, out: Path, remove: tuple[Path, ...], written: list[str]) -> None:
    """Put the finished folder ``tmp`` in place of ``out`` and record its files in ``out``'s ledger.

    A new (or empty) ``out``: one rename. An ``out`` that still holds files after pie's own are
    removed: each new file renamed into it, the user's files left where they are.
    """
    from pie_cli.imaging.ownership import LEDGER, Ledger, remove_planned

    if out.is_dir():
        remove_planned(out, list(remove))
        left = [p.name for p in out.iterdir()]
        if left == [LEDGER]:
            (out / LEDGER).unlink()
            left = []
        if not left:
            out.rmdir()
    if not out.exists():
        Ledger(tmp).record(
            *(tmp / rel for rel in written)
        )  # the ledger's names are relative: they move along
        os.replace(tmp, out)
        return
    moved = []
    for rel in written:
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / rel, target)
        moved.append(target)
    Ledger(out).record(*moved)
