"""What a folder of Stable Diffusion files is: a full model, a UNet alone or a LoRA, and what it holds.

Diffusers layout: ``model_index.json`` and ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/`` folders, each with its config and (for the first three) weights. Torch-free:
only directory listings and small JSON files are read, and weight files as bytes to hash them
(:func:`loaded_weights`, never unpickled). Which weight files a part loads (safetensors or pickle,
the default or a variant such as fp16) is decided once, by name, in :func:`choose_weights`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
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
    """(safetensors files, pickle files) directly inside ``folder``, whatever their names and variants.

    Which of them loading reads is :func:`weight_choice`'s decision.
    """
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
        names = _file_names(folder)
        choice = choose_weights(names, allow_pickle=False) or choose_weights(names)
        if choice is not None:  # the files loading reads (pickle ones only with --allow-pickle)
            entry["weights"] = "safetensors" if choice.safetensors else "pickle only"
            entry["variant"] = choice.variant
            entry["files"] = {n: (folder / n).stat().st_size for n in choice.names}
            entry["bytes"] = sum(entry["files"].values())
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
# The weight files diffusers (unet/, vae/) and transformers (text_encoder/) load: NAME[.VARIANT].EXT,
# sharded NAME-00001-of-00002[.VARIANT].EXT (diffusers) or NAME[.VARIANT]-00001-of-00002.EXT
# (transformers), and the shards' index NAME.EXT.index[.VARIANT].json. A variant is "fp16", "non_ema", ...
_WEIGHT_BASE = r"(?:diffusion_pytorch_model|model|pytorch_model)"
_WEIGHT_NAME = re.compile(
    rf"^{_WEIGHT_BASE}(?:\.(?P<v1>\w+))?(?:-\d{{5}}-of-\d{{5}})?(?:\.(?P<v2>\w+))?\.(?P<ext>safetensors|bin)$"
)
_INDEX_NAME = re.compile(rf"^{_WEIGHT_BASE}\.(?P<ext>safetensors|bin)\.index(?:\.(?P<v1>\w+))?\.json$")


def parse_weight_name(name: str) -> tuple[bool, str | None, bool] | None:
    """(safetensors?, variant, is a shard index?) of a weight file name diffusers or transformers load, else None."""
    found = _WEIGHT_NAME.match(name)
    index = found is None
    found = found or _INDEX_NAME.match(name)
    if found is None or (found.groupdict().get("v2") and found["v1"]):
        return None
    return found["ext"] == "safetensors", found["v1"] or found.groupdict().get("v2"), index


@dataclass(frozen=True)
class WeightChoice:
    """The weight files of one part that load together (shards and their index included)."""

    names: tuple[str, ...]
    safetensors: bool
    variant: str | None  # None: the default weights; "fp16": diffusers' variant="fp16" files

    def load_options(self) -> dict[str, Any]:
        """The ``from_pretrained`` arguments that read exactly these files."""
        return {"use_safetensors": self.safetensors, **({"variant": self.variant} if self.variant else {})}


def choose_weights(
    names: Iterable[str], prefer: str | None = None, allow_pickle: bool = True
) -> WeightChoice | None:
    """The weight files among ``names`` (one folder's file names) that loading reads, or None.

    Safetensors before pickle (pickle only with ``allow_pickle``); within a format the ``prefer``red
    variant, then the default weights, then fp16, then any other variant. Used for a local folder
    (loading, ``pie models info``) and for a Hub listing (``pie models pull``) alike.
    """
    groups: dict[tuple[bool, str | None], list[str]] = {}
    for name in names:
        parsed = parse_weight_name(name)
        if parsed is not None:
            groups.setdefault(parsed[:2], []).append(name)
    loadable = {k: v for k, v in groups.items() if any(not parse_weight_name(n)[2] for n in v)}
    for safe in (True, False) if allow_pickle else (True,):
        variants = sorted(
            (v for s, v in loadable if s == safe),
            key=lambda v: (v != prefer, v is not None, v != "fp16", v or ""),
        )
        if variants:
            return WeightChoice(tuple(sorted(loadable[(safe, variants[0])])), safe, variants[0])
    return None


def _file_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def weight_choice(folder: Path, what: str, allow_pickle: bool = False, warn=None) -> WeightChoice:
    """The weights loading reads from ``folder``; pickle-only weights need ``allow_pickle``.

    A folder with no weights, or pickle weights without ``allow_pickle``, is a ``UserError``. A
    folder whose safetensors all carry a variant (only ``*.fp16.safetensors``) loads that variant,
    and ``warn`` says so.
    """
    names = _file_names(folder)
    choice = choose_weights(names, allow_pickle=False)
    if choice is None:
        pickles = [n for n in names if Path(n).suffix in PICKLE_SUFFIXES]
        if not pickles:
            raise UserError(f"{what} ({folder}) has no weights file.")
        if not allow_pickle:
            raise UserError(
                f"{what} ({folder}) has only pickle weights ({pickles[0]}), which can run code when opened; "
                "convert them to .safetensors, or pass --allow-pickle if you trust the file."
            )
        choice = choose_weights(names, allow_pickle=True)
        if choice is None:
            raise UserError(
                f"{what} ({folder}) has pickle weights ({pickles[0]}) under a name diffusers does not load "
                "(diffusion_pytorch_model.bin, pytorch_model.bin)."
            )
        if warn is not None:
            warn(
                f"{what}: loading pickle weights {folder / choice.names[0]} (--allow-pickle); "
                "a pickle file can run arbitrary code: load only files you trust."
            )
    if choice.variant and warn is not None:
        kind = "safetensors weights" if choice.safetensors else "weights"
        warn(
            f"{what}: loading the {choice.variant} variant ({choice.names[0]}): {folder} has no {kind} without a variant."
        )
    return choice


def use_safetensors(folder: Path, what: str, allow_pickle: bool = False, warn=None) -> bool:
    """True when ``folder`` loads from safetensors; pickle-only weights need ``allow_pickle`` (then False).

    A folder with no weights, or pickle weights without ``allow_pickle``, is a ``UserError``.
    """
    return weight_choice(folder, what, allow_pickle, warn).safetensors


def part_folder(source: Any, part: str) -> Path:
    """Where ``part`` (unet, vae, text_encoder, ...) of ``source`` is read from (``--unet`` replaces the UNet)."""
    if part == "unet" and source.unet is not None:
        return source.unet
    return source.path / part


def _what(source: Any, part: str) -> str:
    return "UNet" if part == "unet" and source.unet is not None else f"model {source.reference}: {part}"


def weight_choices(source: Any, allow_pickle: bool = False, warn=None) -> dict[str, WeightChoice]:
    """For each weighted part, the files it loads from (:func:`weight_choice`); refuses pickle-only parts early."""
    return {
        p: weight_choice(part_folder(source, p), _what(source, p), allow_pickle, warn) for p in WEIGHTED_PARTS
    }


def check_weights(source: Any, allow_pickle: bool = False, warn=None) -> dict[str, bool]:
    """For each weighted part, whether it loads from safetensors; refuses pickle-only parts early."""
    return {p: c.safetensors for p, c in weight_choices(source, allow_pickle, warn).items()}


def weights_status(source: Any) -> tuple[str | None, str]:
    """(what makes ``source`` unloadable or None, a few words on its weights) without loading anything.

    The words: ``safetensors``, ``safetensors, fp16 variant (unet, vae)``, ``pickle only (unet):
    needs --allow-pickle``; a part without weights is the problem's sentence.
    """
    if getattr(source, "checkpoint", None) is not None:  # a single file: its weights are that file
        from pie_cli.core.single_file import checkpoint_status

        return checkpoint_status(source)
    variants: dict[str, list[str]] = {}
    pickled = []
    for part in WEIGHTED_PARTS:
        try:
            choice = weight_choice(part_folder(source, part), _what(source, part), allow_pickle=True)
        except UserError as exc:
            return exc.message, "none"
        if not choice.safetensors:
            pickled.append(part)
        if choice.variant:
            variants.setdefault(choice.variant, []).append(part)
    words = "safetensors" if not pickled else f"pickle only ({', '.join(pickled)}): needs --allow-pickle"
    for variant, parts in variants.items():
        words += f", {variant} variant ({', '.join(parts)})"
    return None, words


_DIGESTS: dict[tuple, str] = {}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def file_digest(path: Path) -> str:
    """The SHA-256 of a file, computed once per process (per path, size and modification time).

    A file of the Hugging Face cache is a link to ``blobs/<sha256>`` when it was stored with LFS
    (every weights file): that name is the Hub's SHA-256 of the content, taken as is.
    """
    import hashlib

    real = Path(path).resolve()
    if path.is_symlink() and real.parent.name == "blobs" and _SHA256.fullmatch(real.name):
        return real.name
    stat = real.stat()
    key = (str(real), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(real, "rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def loaded_weights(source: Any) -> list[dict[str, Any]]:
    """The weight files loading ``source`` reads, per part: file, bytes, format, variant and SHA-256.

    ``file`` is relative to the model folder (absolute for a ``--unet`` elsewhere). Pickle files
    are listed where they are the only weights (they load with ``--allow-pickle``); a part without
    weights is left out (loading refuses it). Reading a file to hash it never unpickles it.
    """
    rows, parts = [], WEIGHTED_PARTS
    if getattr(source, "checkpoint", None) is not None:  # a single file: that file (and a --unet's weights)
        from pie_cli.core.single_file import checkpoint_row

        rows, parts = [checkpoint_row(source)], (("unet",) if source.unet is not None else ())
    for part in parts:
        folder = part_folder(source, part)
        names = _file_names(folder)
        choice = choose_weights(names, allow_pickle=False) or choose_weights(names)
        for name in choice.names if choice else ():
            path = folder / name
            try:
                shown = path.relative_to(source.path).as_posix()
            except ValueError:
                shown = str(path)
            rows.append(
                {
                    "part": part,
                    "file": shown,
                    "bytes": path.stat().st_size,
                    "format": "safetensors" if choice.safetensors else "pickle",
                    "variant": choice.variant,
                    "sha256": file_digest(path),
                }
            )
    return rows
