"""What a folder of Stable Diffusion files is: a full model, a UNet alone or a LoRA, and what it holds.

Diffusers layout: ``model_index.json`` and ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/`` folders, each with its config and (for the first three) weights. Torch-free:
only directory listings and small JSON files are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pie_cli.errors import UserError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# The diffusers LoRA format's weights file: what `pie finetune` writes and `load_lora_weights` reads.
LORA_FILE = "pytorch_lora_weights.safetensors"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and (
        (path / "model_index.json").is_file()
        or all((path / c).is_dir() for c in ("unet", "vae", "text_encoder"))
    )


def missing_components(path: Path) -> list[str]:
    return [c for c in COMPONENTS if not (path / c).is_dir()]


def check_model_dir(path: Path, reference: str) -> None:
    """Raise a ``UserError`` unless ``path`` holds a complete SD 1.x model in diffusers layout."""
    if lora_weight_file(path) is not None:
        raise UserError(
            f"model {reference} is a LoRA adapter, not a model; pass it with --lora "
            "or register it with `pie models add NAME PATH --base MODEL`."
        )
    if unet_config_dir(path) == path:
        raise UserError(f"model {reference} is a UNet alone; pass it with --unet on top of a full --model.")
    missing = missing_components(path)
    if missing:
        raise UserError(
            f"model {reference} ({path}) is not a Stable Diffusion model in diffusers layout: "
            f"missing {', '.join(m + '/' for m in missing)}."
        )


def weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickle files) directly inside ``folder``."""
    if not folder.is_dir():
        return [], []
    files = [p for p in folder.iterdir() if p.is_file()]
    return (
        [p for p in files if p.suffix == ".safetensors"],
        [p for p in files if p.suffix in PICKLE_SUFFIXES],
    )


def lora_weight_file(path: Path) -> Path | None:
    """The LoRA weights file of ``path`` (a file, or a directory holding one), else None."""
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if path.is_dir() and not (path / "model_index.json").exists() and not (path / "config.json").exists():
        if (path / LORA_FILE).is_file():
            return path / LORA_FILE
        candidates = sorted(path.glob("*lora*.safetensors"))
        if len(candidates) == 1:
            return candidates[0]
    return None


def unet_config_dir(path: Path) -> Path | None:
    """The folder holding a UNet's config.json: ``path/unet`` or ``path`` itself."""
    for folder in (path / "unet", path):
        cfg = folder / "config.json"
        if cfg.is_file():
            try:
                if json.loads(cfg.read_text(encoding="utf-8")).get("_class_name") == "UNet2DConditionModel":
                    return folder
            except json.JSONDecodeError:
                return None
    return None


def classify_target(target: str) -> str:
    """What a ``pie models add`` target is: model, lora or unet."""
    path = Path(target).expanduser()
    if path.exists():
        if lora_weight_file(path) is not None:
            return "lora"
        if is_model_dir(path):
            return "model"
        if unet_config_dir(path) is not None:
            return "unet"
        raise UserError(
            f"{target} is neither a model in diffusers layout, a UNet folder nor a LoRA adapter ({LORA_FILE})."
        )
    return "model"


def resolve_unet_path(spec: Path) -> Path:
    """``--unet PATH``: a fine-tuned UNet in diffusers layout, its ``unet/`` subfolder or itself."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"--unet {spec} does not exist.")
    folder = unet_config_dir(path)
    if folder is None:
        raise UserError(
            f"--unet {spec} is not a UNet in diffusers layout "
            "(expected config.json of a UNet2DConditionModel there or in its unet/ subfolder)."
        )
    return folder.resolve()


def model_summary(path: Path) -> dict:
    """A light description of a model directory, read from its JSON configs."""
    info: dict = {"components": {}}
    index = path / "model_index.json"
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        info["pipeline"] = data.get("_class_name")
    for comp in COMPONENTS:
        folder = path / comp
        entry: dict = {"present": folder.is_dir()}
        cfg_name = "scheduler_config.json" if comp == "scheduler" else "config.json"
        cfg_file = folder / cfg_name
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            entry["class"] = cfg.get("_class_name") or (cfg.get("architectures") or [None])[0]
        safe, pickle = weight_files(folder)
        if safe or pickle:
            entry["weights"] = "safetensors" if safe else "pickle only"
            entry["bytes"] = sum(p.stat().st_size for p in (safe or pickle))
        info["components"][comp] = entry
    vae_cfg = path / "vae" / "config.json"
    if vae_cfg.is_file():
        vae = json.loads(vae_cfg.read_text(encoding="utf-8"))
        info["vae_scale_factor"] = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
        info["vae_force_upcast"] = bool(vae.get("force_upcast", True))
    unet_cfg = path / "unet" / "config.json"
    if unet_cfg.is_file():
        unet = json.loads(unet_cfg.read_text(encoding="utf-8"))
        info["cross_attention_dim"] = unet.get("cross_attention_dim")
        info["sample_size"] = unet.get("sample_size")
    return info


def vae_force_upcast(path: Path) -> bool:
    cfg = path / "vae" / "config.json"
    try:
        return bool(json.loads(cfg.read_text(encoding="utf-8")).get("force_upcast", True))
    except (OSError, json.JSONDecodeError):
        return True


def trained_on(path: Path) -> str | None:
    """The base model a `pie finetune` output was trained from (its ``training_config.yaml``), if any."""
    cfg = path / "training_config.yaml" if path.is_dir() else path.parent / "training_config.yaml"
    if not cfg.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) and model else None


def fingerprint(folders: list[Path], files: list[Path] = ()) -> str:
    """A short identity of a model's files, read without loading them: same files, same fingerprint.

    Every file below ``folders`` (and each of ``files``) counts with its relative name and size;
    small files (configs, tokenizers, LoRA weights up to 1 MB) with their whole content, large
    weights with their first and last 64 kB. A model re-pointed, retrained or replaced changes it.
    """
    import hashlib

    digest = hashlib.sha256()

    def add(path: Path, name: str) -> None:
        size = path.stat().st_size
        digest.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as fh:
            if size <= 1 << 20:
                digest.update(fh.read())
            else:
                digest.update(fh.read(1 << 16))
                fh.seek(-(1 << 16), 2)
                digest.update(fh.read(1 << 16))

    for k, folder in enumerate(folders):
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            add(path, f"{k}/{path.relative_to(folder).as_posix()}")
    for k, path in enumerate(files):
        add(Path(path), f"file{k}")
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- weights

WEIGHTED_PARTS = ("unet", "vae", "text_encoder")


def use_safetensors(folder: Path, what: str, allow_pickle: bool = False, warn=None) -> bool:
    """True when ``folder`` has safetensors weights; pickle-only weights need ``allow_pickle`` (then False).

    A folder with no weights, or pickle weights without ``allow_pickle``, is a ``UserError``.
    """
    safe, pickle = weight_files(folder)
    if safe:
        return True
    if pickle:
        if allow_pickle:
            if warn is not None:
                warn(
                    f"{what}: loading pickle weights {folder / pickle[0].name} (--allow-pickle); "
                    "a pickle file can run arbitrary code: load only files you trust."
                )
            return False
        raise UserError(
            f"{what} ({folder}) has only pickle weights ({pickle[0].name}), which can run code when opened; "
            "convert them to .safetensors, or pass --allow-pickle if you trust the file."
        )
    raise UserError(f"{what} ({folder}) has no weights file.")


def part_folder(source: Any, part: str) -> Path:
    """Where ``part`` (unet, vae, text_encoder, ...) of ``source`` is read from (``--unet`` replaces the UNet)."""
    if part == "unet" and source.unet is not None:
        return source.unet
    return source.path / part


def check_weights(source: Any, allow_pickle: bool = False, warn=None) -> dict[str, bool]:
    """For each weighted part, whether it loads from safetensors; refuses pickle-only parts early."""
    found = {}
    for part in WEIGHTED_PARTS:
        what = "UNet" if part == "unet" and source.unet is not None else f"model {source.reference}: {part}"
        found[part] = use_safetensors(part_folder(source, part), what, allow_pickle, warn)
    return found
