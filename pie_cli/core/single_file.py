"""Single-file Stable Diffusion 1.x checkpoints: what one holds, and which configs describe it.

A single file (``model.safetensors``, or a pickled ``model.ckpt``) in the original LDM/CompVis
layout holds the weights of the UNet (``model.diffusion_model.*``), the VAE
(``first_stage_model.*``) and the CLIP text encoder (``cond_stage_model.transformer.text_model.*``),
but no configs and no tokenizer. Those come from a diffusers-layout folder: ``--model-config
DIR|alias``, or pie's built-in SD 1.x configs (:data:`BUILTIN_CONFIG`: SD 1.5's architecture,
scheduler and CLIP tokenizer, no weights), so a file loads without the network.

Torch-free: a safetensors file's tensor names and shapes are its JSON header, read here
directly, so a file that does not fit its configs is refused before anything is loaded.
Loading the weights is :mod:`pie_cli.core.loading`'s job.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pie_cli.errors import UserError

BUILTIN_CONFIG = Path(__file__).parent / "configs" / "sd-v1"
BUILTIN_CONFIG_NAME = "built-in"  # what a manifest and `pie models info` call pie's own configs
SAFE_SUFFIX = ".safetensors"
PICKLE_SUFFIX = ".ckpt"
SUFFIXES = (SAFE_SUFFIX, PICKLE_SUFFIX)
UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
CLIP_KEY = TEXT + "text_model.embeddings.position_embedding.weight"  # how diffusers recognises CLIP
# What a diffusers folder must hold to describe a single file (the weights come from the file).
CONFIG_FILES = (
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
)
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header

Shapes = Mapping[str, tuple[int, ...]]


def config_name(label: str | None) -> str:
    """How a message names the configs: pie's built-in SD 1.x configs, or the --model-config given."""
    if label is None or label == BUILTIN_CONFIG_NAME:
        return "pie's built-in SD 1.x configs"
    return f"the configs of {label}"


def check_suffix(path: Path) -> None:
    """A single file pie knows by its extension: ``.safetensors``, or a ``.ckpt`` pickle."""
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(
            f"model file {path} is neither a .safetensors nor a .ckpt checkpoint; give a Stable Diffusion "
            "single file of one of those kinds, or a model folder in diffusers layout."
        )


def is_pickle(path: Path) -> bool:
    return path.suffix.lower() == PICKLE_SUFFIX


def check_config_dir(folder: Path, label: str | None) -> None:
    """``folder`` holds the configs and tokenizer a single file needs, or a ``UserError`` naming what is missing."""
    missing = [name for name in CONFIG_FILES if not (folder / name).is_file()]
    tokenizer = folder / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file() and not (
        (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file()
    ):
        missing.append("tokenizer/vocab.json + merges.txt")
    if missing:
        where = (
            "pie's built-in SD 1.x configs"
            if label in (None, BUILTIN_CONFIG_NAME)
            else f"--model-config {label}"
        )
        raise UserError(
            f"{where} ({folder}) cannot describe a single-file checkpoint: missing {', '.join(missing)}."
        )


# --------------------------------------------------------------------------- what a file holds


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of a safetensors file, from its header (nothing else is read).

    A file that is not safetensors, or is cut short, is a ``UserError`` naming it.
    """
    return {name: tuple(entry["shape"]) for name, entry in _header(path).items()}


def unet_dtype(path: Path) -> str | None:
    """The stored type of a safetensors checkpoint's UNet ("F16", "BF16", "F32", ...); None for a pickle."""
    if is_pickle(path):
        return None
    return next((e.get("dtype") for n, e in _header(path).items() if n.startswith(UNET)), None)


def _header(path: Path) -> dict[str, dict[str, Any]]:
    """A safetensors file's header: tensor name -> {"dtype", "shape", "data_offsets"}, checked."""
    where = f"single file {path}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            if not 2 <= length <= min(MAX_HEADER, size - 8):
                raise UserError(f"{where} is not a safetensors file (no valid header); is it complete?")
            header = json.loads(fh.read(length).decode("utf-8"))
    except UserError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise UserError(f"{where} is not a safetensors file (its header is not JSON).") from None
    if not isinstance(header, dict):
        raise UserError(f"{where} is not a safetensors file (its header is not a table of tensors).")
    tensors: dict[str, dict[str, Any]] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(shape, list)
            and all(isinstance(n, int) and n >= 0 for n in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(n, int) for n in offsets)
        ):
            raise UserError(f"{where} is not a safetensors file (tensor {name!r} has no valid shape).")
        tensors[name] = entry
        end = max(end, offsets[1])
    if 8 + length + end > size:
        raise UserError(
            f"{where} is cut short: its header names {8 + length + end} bytes, the file has {size}; "
            "download or copy it again."
        )
    return tensors


def looks_like_checkpoint(path: Path) -> bool:
    """Whether a file is meant as a whole-model checkpoint (a ``.ckpt``, or safetensors with UNet weights)."""
    suffix = path.suffix.lower()
    if suffix == PICKLE_SUFFIX:
        return True
    if suffix != SAFE_SUFFIX:
        return False
    try:
        return any(name.startswith(UNET) for name in safetensors_shapes(path))
    except UserError:
        return False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise UserError(f"{path} cannot be read as JSON.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object of settings.")
    return data


def _count(shapes: Shapes, prefix: str) -> int:
    """How many numbered children ``prefix`` has (``PREFIX0.``, ``PREFIX1.``, ...)."""
    found = set()
    for name in shapes:
        if name.startswith(prefix):
            head = name[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return max(found) + 1 if found else 0


def check_layout(shapes: Shapes, path: Path, config_dir: Path, label: str | None) -> None:
    """Refuse a file that is not an SD 1.x checkpoint in the LDM layout, or that ``config_dir`` does not describe.

    Checked from names and shapes only: the three models are there, and the UNet's, VAE's and
    text encoder's sizes and depths are those of the configs. One ``UserError`` naming the file.
    """
    where = f"single file {path}"
    names = list(shapes)
    if any(n.startswith("conditioner.embedders.") for n in names):
        raise UserError(f"{where} is a Stable Diffusion XL checkpoint; pie runs Stable Diffusion 1.x models.")
    if any(n.startswith("cond_stage_model.model.") for n in names):
        raise UserError(
            f"{where} is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder); pie runs Stable Diffusion 1.x models."
        )
    if not any(n.startswith(UNET) for n in names):
        raise UserError(
            f"{where} is not a Stable Diffusion checkpoint: it holds no UNet weights ({UNET}*); "
            "a LoRA goes with --lora, a model folder with --model DIR."
        )
    for prefix, part in ((VAE, "VAE"), (TEXT, "text encoder")):
        if not any(n.startswith(prefix) for n in names):
            raise UserError(
                f"{where} holds no {part} weights ({prefix}*); pie needs a checkpoint with the UNet, VAE and "
                "text encoder in it."
            )
    if CLIP_KEY not in shapes:
        raise UserError(f"{where}'s text encoder is not in the CLIP layout diffusers reads (no {CLIP_KEY}).")
    unet = _read_json(config_dir / "unet" / "config.json")
    vae = _read_json(config_dir / "vae" / "config.json")
    text = _read_json(config_dir / "text_encoder" / "config.json")

    def fits(what: str, got: Any, want: Any) -> None:
        if got != want:
            raise UserError(
                f"{where} does not match {config_name(label)}: its {what} is {got} where the configs say {want}; "
                "give --model-config with the diffusers folder or alias whose configs describe it."
            )

    channels = list(unet.get("block_out_channels") or [])
    layers = unet.get("layers_per_block", 2)
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    fits("UNet's first width", conv_in[0] if conv_in else None, channels[0] if channels else None)
    fits(
        "UNet's input channels",
        conv_in[1] if conv_in and len(conv_in) > 1 else None,
        unet.get("in_channels", 4),
    )
    if isinstance(layers, int) and channels:
        fits(
            "number of UNet input blocks",
            _count(shapes, UNET + "input_blocks."),
            len(channels) * (layers + 1),
        )
    cross = next(
        (s for n, s in shapes.items() if n.startswith(UNET) and n.endswith("attn2.to_k.weight")), None
    )
    if cross is not None and len(cross) == 2:
        fits("UNet's text embedding size", cross[1], unet.get("cross_attention_dim"))
    vae_channels = list(vae.get("block_out_channels") or [])
    vae_in = shapes.get(VAE + "encoder.conv_in.weight")
    fits("VAE's first width", vae_in[0] if vae_in else None, vae_channels[0] if vae_channels else None)
    fits("number of VAE encoder blocks", _count(shapes, VAE + "encoder.down."), len(vae_channels))
    quant = shapes.get(VAE + "quant_conv.weight")
    fits("VAE's latent channels", quant[0] // 2 if quant else None, vae.get("latent_channels", 4))
    tokens = shapes.get(TEXT + "text_model.embeddings.token_embedding.weight")
    fits(
        "text encoder's vocabulary x width",
        f"{tokens[0]} x {tokens[1]}" if tokens and len(tokens) == 2 else None,
        f"{text.get('vocab_size')} x {text.get('hidden_size')}",
    )
    fits("text encoder's positions", shapes[CLIP_KEY][0], text.get("max_position_embeddings"))
    fits(
        "number of text encoder layers",
        _count(shapes, TEXT + "text_model.encoder.layers."),
        text.get("num_hidden_layers"),
    )


def check_file(path: Path, config_dir: Path, label: str | None) -> None:
    """What can be checked of a single file without opening a pickle: a safetensors file's layout."""
    check_suffix(path)
    if not is_pickle(path):
        check_layout(safetensors_shapes(path), path, config_dir, label)


# --------------------------------------------------------------------------- policy and identity


def refuse_pickle(path: Path, allow_pickle: bool, warn=None) -> None:
    """A ``.ckpt`` is a pickle, which can run code when opened: only with ``--allow-pickle``."""
    if not is_pickle(path):
        return
    if not allow_pickle:
        raise UserError(
            f"single file {path} is a pickle, which can run code when opened: pass --allow-pickle if you trust it, "
            f"or convert it once with `pie models convert {path} --out DIR --allow-pickle` and use DIR."
        )
    if warn is not None:
        warn(
            f"loading the pickle checkpoint {path} (--allow-pickle); a pickle file can run arbitrary code: "
            "load only files you trust."
        )


def check_source_weights(source: Any, allow_pickle: bool = False, warn=None) -> dict[str, bool]:
    """The weights of a resolved model, checked before anything is loaded (pickles need ``allow_pickle``).

    A model folder: :func:`~pie_cli.core.model_files.check_weights` (for each part, whether it
    loads from safetensors). A single file: its pickle policy, and the ``--unet`` replacing its UNet.
    """
    from pie_cli.core.model_files import check_weights, use_safetensors

    if source.checkpoint is None:
        return check_weights(source, allow_pickle, warn)
    refuse_pickle(source.checkpoint, allow_pickle, warn)
    found = dict.fromkeys(("unet", "vae", "text_encoder"), not is_pickle(source.checkpoint))
    if source.unet is not None:
        found["unet"] = use_safetensors(source.unet, "UNet", allow_pickle, warn)
    return found


def checkpoint_row(source: Any) -> dict[str, Any]:
    """The single file as a row of :func:`~pie_cli.core.model_files.loaded_weights` (whole-file SHA-256)."""
    from pie_cli.core.model_files import file_digest

    path = source.checkpoint
    return {
        "part": "checkpoint",
        "file": str(path),
        "bytes": path.stat().st_size,
        "format": "pickle" if is_pickle(path) else "safetensors",
        "variant": None,
        "sha256": file_digest(path),
    }


def checkpoint_status(source: Any) -> tuple[str | None, str]:
    """:func:`~pie_cli.core.model_files.weights_status` of a single file: (problem or None, a few words)."""
    from pie_cli.core.model_files import weight_choice

    words = "single file, " + (
        "pickle: needs --allow-pickle" if is_pickle(source.checkpoint) else "safetensors"
    )
    if source.unet is not None:
        try:
            choice = weight_choice(source.unet, "UNet", allow_pickle=True)
        except UserError as exc:
            return exc.message, "none"
        words += ", UNet " + ("safetensors" if choice.safetensors else "pickle only: needs --allow-pickle")
    return None, words
