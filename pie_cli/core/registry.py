"""The model registry: one place that turns a model reference into local files.

A reference is, in this order of precedence:

1. a user alias (``pie models add NAME TARGET``), stored in ``$PIE_HOME/models.json``;
2. a built-in alias (``sd-v1-4``, ``sd-v1-5``, ``mimic-cxr``);
   (a bare name is an alias even if a folder of that name is in the working directory;
   write ``./name`` for the folder)
3. a path to a local directory in diffusers layout;
4. a Hugging Face repo id (``org/name`` or ``org/name@revision``), taken from the local
   HF cache only. Nothing here touches the network; ``pie models pull`` downloads.

This module only reads small JSON files and directory listings (no torch), so
``pie models list`` is instant; what a folder of model files looks like is ``model_files.py``'s. Loading weights is ``pie_cli.core.loading``'s job.

A resolved reference is a :class:`ModelSource`; ``--unet`` and ``--lora`` are merged into it
once, with :meth:`ModelSource.with_overrides`, and everything downstream (loading, the
manifest) reads the adapters from there. :func:`status` classifies a reference (ready, not
downloaded, broken) for ``pie models list`` and ``pie doctor`` alike.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pie_cli.core.model_files import (
    LORA_FILE,
    check_model_dir,
    lora_weight_file,
)
from pie_cli.errors import UserError
from pie_cli.imaging.files import write_text
from pie_cli.paths import hf_hub_cache, pie_home

BUILTIN_ALIASES: dict[str, str] = {
    "sd-v1-4": "CompVis/stable-diffusion-v1-4",
    "sd-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "mimic-cxr": "IrohXu/stable-diffusion-mimic-cxr-v0.1",
}
# Shipped inside the package: always available offline.
BUILTIN_LOCAL: dict[str, Path] = {"demo": Path(__file__).parent.parent / "demo" / "model"}
BUILTIN_NOTES: dict[str, str] = {
    "demo": "tiny model trained on synthetic chest phantoms (64 px), shipped with pie",
    "sd-v1-4": "Stable Diffusion 1.4 (CompVis)",
    "sd-v1-5": "Stable Diffusion 1.5",
    "mimic-cxr": "SD fine-tuned on MIMIC-CXR report-image pairs (PIE paper)",
}
REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")
ALIAS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _number(value: float) -> str:
    """A weight as short text that reads back as exactly the same float ("1", "0.8", "0.123456789")."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


@dataclass(frozen=True)
class Adapter:
    """A diffusers-format LoRA: what the user named (``path``), its weights ``file`` and its weight."""

    path: Path
    weight: float = 1.0
    # The .safetensors file inside ``path`` (``path`` itself for a file); derived, so not compared.
    file: Path | None = field(default=None, compare=False)

    def spec(self) -> str:
        """``PATH:WEIGHT``, as ``--lora`` takes it (the weight written so that it reads back exactly)."""
        return f"{self.path}:{_number(self.weight)}"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model reference: where its files are and how it was found."""

    reference: str
    path: Path  # the diffusers-layout folder: the model, or (single file) the configs describing it
    origin: str  # "directory" | "hf-cache" | "built-in" | "single-file"
    repo_id: str | None = None
    revision: str | None = None  # commit hash for hf-cache models
    alias: str | None = None
    unet: Path | None = None  # a fine-tuned UNet replacing the model's own
    loras: tuple[Adapter, ...] = ()
    # A single-file checkpoint (.safetensors / .ckpt): its weights, with ``path``'s configs and tokenizer.
    checkpoint: Path | None = None
    config: str | None = None  # how those configs were named: --model-config as given, or "built-in"

    def with_overrides(self, unet: Path | None = None, loras: tuple[Adapter, ...] = ()) -> ModelSource:
        """This model with ``--unet`` replacing its UNet and ``--lora`` adapters after its own."""
        return replace(self, unet=unet or self.unet, loras=(*self.loras, *loras))

    def describe(self) -> dict:
        return {
            "reference": self.reference,
            "path": str(self.path),
            "origin": self.origin,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "alias": self.alias,
            "unet": str(self.unet) if self.unet else None,
            "loras": [a.spec() for a in self.loras],
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "config": self.config,
            # the weight files loading reads, per part, with their sizes, variant and SHA-256
            "weights": _loaded_weights(self),
        }


def _loaded_weights(source: ModelSource) -> list[dict]:
    from pie_cli.core.model_files import loaded_weights

    return loaded_weights(source)


class ModelNotCached(UserError):
    """A reference that would resolve if its Hugging Face repo were downloaded (``pie models pull``)."""

    def __init__(self, repo_id: str, revision: str | None, reference: str) -> None:
        rev = f"@{revision}" if revision else ""
        super().__init__(
            f"model {reference} ({repo_id}{rev}) is not in the local Hugging Face cache ({hf_hub_cache()}); "
            f"download it once with `pie models pull {reference}`."
        )
        self.repo_id = repo_id
        self.revision = revision
        self.pull = reference  # what to pass to `pie models pull`


@dataclass
class UserModel:
    """One entry of ``models.json``; a damaged entry keeps what was there and says what is wrong."""

    target: str
    kind: str = "model"  # model | lora | unet | single-file
    base: str | None = None  # for lora / unet entries: the model they apply to
    weight: float = 1.0
    added: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    config: str | None = None  # for a single-file entry: the --model-config describing it (None: built-in)
    problem: str | None = field(default=None, compare=False)  # why this entry cannot be used
    raw: Any = field(default=None, compare=False, repr=False)  # a damaged entry as read, written back as is

    def record(self) -> Any:
        if self.problem is not None:
            return self.raw
        return {
            "target": self.target,
            "kind": self.kind,
            "base": self.base,
            "weight": self.weight,
            "added": self.added,
            **({"config": self.config} if self.config is not None else {}),
        }


SINGLE_FILE = "single-file"  # a .safetensors / .ckpt checkpoint, with the configs that describe it
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
KINDS = ("model", "lora", "unet", SINGLE_FILE)
MAX_ALIAS_CHAIN = 32  # an alias of an alias of ...: deeper is a mistake (or a loop)


# --------------------------------------------------------------------------- files


def user_models_file() -> Path:
    return pie_home() / "models.json"


def load_user_models() -> dict[str, UserModel]:
    """The user's aliases; a damaged file is one ``UserError`` naming it, a damaged entry is marked.

    The file must be UTF-8 JSON: ``{"version": 1, "models": {NAME: {"target": ..., "kind": ...,
    "base": ..., "weight": ...}}}``. An entry that does not fit (a null target, an unknown kind,
    a NaN weight ...) is kept with its ``problem``: `pie models list` shows it as broken and
    using it says why, while every other alias keeps working.
    """
    from pie_cli.imaging.files import require_regular_file

    path = user_models_file()
    if not path.exists():
        return {}
    where = f"model registry {path}"
    require_regular_file(path, "model registry")
    raw = path.read_bytes()[: 16 << 20]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{where} is not UTF-8 text; fix or delete it.") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        detail = getattr(exc, "msg", None) or type(exc).__name__
        raise UserError(f"{where} is not valid JSON ({detail}); fix or delete it.") from None
    models = data.get("models", {}) if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise UserError(f"{where} is not a pie registry (no 'models' object); fix or delete it.")
    return {str(name): _entry(str(name), entry) for name, entry in models.items()}


def _entry(name: str, entry: Any) -> UserModel:
    """One registry entry, checked field by field (never raises)."""

    def broken(problem: str) -> UserModel:
        return UserModel(target="", problem=problem, raw=entry)

    if not ALIAS_NAME.match(name):
        return broken(f"{name!r} is not a valid alias name")
    if not isinstance(entry, dict):
        return broken(f"its entry is {type(entry).__name__}, not an object")
    target, kind, base = entry.get("target"), entry.get("kind", "model"), entry.get("base")
    weight, added = entry.get("weight", 1.0), entry.get("added", "")
    if not isinstance(target, str) or not target.strip():
        return broken(f"its target is {target!r}, not a path or a model reference")
    if kind not in KINDS:
        return broken(f"its kind is {kind!r}, not one of {', '.join(KINDS)}")
    if base is not None and (not isinstance(base, str) or not base.strip()):
        return broken(f"its base is {base!r}, not a model reference")
    if kind not in ("model", SINGLE_FILE) and base is None:
        return broken(f"it is a {kind} without a base model")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        return broken(f"its weight is {weight!r}, not a finite number")
    config = entry.get("config")
    if config is not None and (not isinstance(config, str) or not config.strip()):
        return broken(f"its config is {config!r}, not a model reference")
    added = added if isinstance(added, str) else ""
    return UserModel(target, kind, base, float(weight), added, config, raw=entry)


@contextmanager
def edit_user_models() -> Iterator[dict[str, UserModel]]:
    """Read, change and write the registry under a cross-process lock.

    Two `pie models add` at once (a cluster array job) must not lose either entry: the
    read-modify-write runs under ``models.json.lock`` and the write itself is atomic.
    """
    from filelock import FileLock, Timeout

    path = user_models_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(path) + ".lock", timeout=60):
            models = load_user_models()
            yield models
            save_user_models(models)
    except Timeout:
        raise UserError(
            f"model registry {path} stayed locked for 60 s by another pie process; retry."
        ) from None


def save_user_models(models: dict[str, UserModel]) -> None:
    path = user_models_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"version": 1, "models": {name: m.record() for name, m in sorted(models.items())}}
    write_text(path, json.dumps(data, indent=2) + "\n")


def add_alias(
    name: str,
    target: str,
    *,
    base: str | None = None,
    weight: float = 1.0,
    force: bool = False,
    config: str | None = None,
    note: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> UserModel:
    """Register ``name`` for ``target`` (a model, a single-file checkpoint, a UNet or a LoRA; the latter two need a base).

    The base of a `pie finetune` output is read from its ``training_config.yaml`` when not
    given (``note`` says so); a model target that does not resolve offline is registered with
    a ``warn``ing. A single file is registered with ``config`` (``--model-config``; default: pie's
    built-in SD 1.x configs) once it fits them. The registry is edited under its cross-process lock.
    """
    from pie_cli.core.model_files import classify_target, trained_on
    from pie_cli.core.single_file import looks_like_checkpoint
    from pie_cli.imaging.files import writing

    if not ALIAS_NAME.match(name):
        raise UserError(
            f"alias {name!r} must start with a letter or digit and use only letters, digits, '.', '_', '-'."
        )
    if name in BUILTIN_ALIASES or name in BUILTIN_LOCAL:
        raise UserError(f"alias {name} is built in; choose another name.")
    if not math.isfinite(weight):
        raise UserError(f"--weight must be a finite number, got {weight:g}.")
    models = load_user_models()
    if name in models and not force:
        raise UserError(f"alias {name} already exists ({models[name].target}); pass --force to replace it.")
    path = Path(target).expanduser()
    single = path.is_file() and (
        path.suffix.lower() not in SINGLE_FILE_SUFFIXES or looks_like_checkpoint(path)
    )
    kind = SINGLE_FILE if single else classify_target(target)
    stored = str(path.resolve()) if path.exists() else target
    if config is not None and kind != SINGLE_FILE:
        raise UserError(f"--model-config is for single-file checkpoints; {target} is a {kind}.")
    if kind == SINGLE_FILE:
        if base:
            raise UserError(
                f"--base is only for LoRA adapters and UNets; {target} is a whole-model checkpoint."
            )
        config_path = Path(config).expanduser() if config is not None else None
        if config_path is not None and config_path.exists():
            config = str(config_path.resolve())
        try:
            resolve(stored, config=config)  # the file fits its configs (a pickle is not opened)
        except ModelNotCached as exc:
            if warn is not None:
                warn(exc.message)
    elif kind in {"lora", "unet"}:
        if not base:
            base = trained_on(path)
            if base and note is not None:
                note(f"base model {base} (from {path / 'training_config.yaml'})")
        if not base:
            raise UserError(f"{target} is a {kind}; say which model it applies to with --base MODEL.")
        resolve(base)
    else:
        if base:
            raise UserError(f"--base is only for LoRA adapters and UNets; {target} is a full model.")
        if (
            not path.exists()
            and not REPO_ID.match(target)
            and target not in BUILTIN_ALIASES
            and target not in models
        ):
            raise UserError(f"{target} does not exist and is not an alias or a repo id.")
        found = status(target, models)
        if found.status != "ok" and warn is not None:
            warn(found.reason or found.detail)
    entry = UserModel(target=stored, kind=kind, base=base, weight=weight, config=config)
    with writing(user_models_file()), edit_user_models() as current:  # locked: a concurrent add is kept
        if name in current and name not in models and not force:
            raise UserError(f"alias {name} was just added by another process; pass --force to replace it.")
        current[name] = entry
    return entry


# --------------------------------------------------------------------------- resolution


def hf_snapshot(repo_id: str, revision: str | None = None) -> tuple[Path, str] | None:
    """(snapshot folder, commit hash) of a repo in the local HF cache, or None if absent."""
    repo_dir = hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
    if not repo_dir.is_dir():
        return None
    rev = revision or "main"
    if rev.startswith("/") or ".." in rev.split("/"):
        return None  # a ref name never leaves refs/
    commit = rev
    ref = repo_dir / "refs" / rev
    if ref.is_file():
        try:
            commit = ref.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        return None  # snapshots are named by commit: anything else (a bad ref, "..") never resolves
    snapshot = repo_dir / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    return snapshot, commit


def _explicit_path(reference: str) -> bool:
    """Written as a path (``./name``, ``a/b/c``, ``~/x``): never an alias."""
    return "/" in reference or "\\" in reference or reference.startswith((".", "~"))


def _looks_like_path(reference: str) -> bool:
    """Meant as a file system path rather than a repo id (``org/name``)."""
    return (
        reference.startswith((".", "/", "~"))
        or "\\" in reference
        or reference.lower().endswith(SINGLE_FILE_SUFFIXES)
    )


def resolve(reference: str, *, config: str | None = None, _seen: tuple[str, ...] = ()) -> ModelSource:
    """Resolve a model reference to local files, or raise a ``UserError`` saying what to do.

    ``config`` (``--model-config DIR|alias``) names the diffusers-layout folder whose configs and
    tokenizer describe a single-file checkpoint; without it a single file uses pie's built-in
    SD 1.x configs (or those its alias was registered with). A model folder has its own.
    """
    source = _resolve(reference, config, _seen)
    if config is not None and source.checkpoint is None:
        raise UserError(
            f"--model-config {config} describes a single-file checkpoint, but --model {reference} is a model "
            "in diffusers layout with its own configs; drop --model-config."
        )
    return source


def _resolve(reference: str, config: str | None, _seen: tuple[str, ...]) -> ModelSource:
    reference = reference.strip()
    if not reference:
        raise UserError(
            "--model is empty; give a model directory, an alias (see `pie models list`) or a repo id."
        )
    explicit_path = _explicit_path(reference)
    users = {} if explicit_path else _aliases_for(reference)
    if not explicit_path and reference in users:  # an alias wins over a same-named folder in the cwd
        if reference in _seen:
            raise UserError(
                f"model alias {reference} refers to itself through {' -> '.join((*_seen, reference))} "
                f"(in {user_models_file()}); re-point one of them with `pie models add NAME TARGET --force`."
            )
        if len(_seen) >= MAX_ALIAS_CHAIN:
            raise UserError(
                f"model alias {_seen[0]} goes through more than {MAX_ALIAS_CHAIN} aliases "
                f"({' -> '.join(_seen[:4])} ...) in {user_models_file()}; point it at a model directly."
            )
        entry = users[reference]
        if entry.problem is not None:
            raise UserError(
                f"model alias {reference} in {user_models_file()} is broken: {entry.problem}; "
                f"fix it there or remove it with `pie models remove {reference}`."
            )
        return _resolve_user(reference, entry, _seen + (reference,), config)
    if not explicit_path and reference in BUILTIN_LOCAL:
        local = BUILTIN_LOCAL[reference]
        if not (local / "model_index.json").is_file():
            raise UserError(
                f"the built-in {reference} model is missing from this installation ({local}); "
                "build it with `make demo-model`."
            )
        return ModelSource(reference, local, "built-in", alias=reference)
    if not explicit_path and reference in BUILTIN_ALIASES:
        return replace(_resolve_repo(BUILTIN_ALIASES[reference], None, reference), alias=reference)
    path = Path(reference).expanduser()
    if path.exists():
        if path.is_file():
            return _single_file(reference, path, config, _seen)
        check_model_dir(path, reference)
        return ModelSource(reference, path.resolve(), "directory")
    if _looks_like_path(reference):
        kind = "file" if reference.lower().endswith(SINGLE_FILE_SUFFIXES) else "directory"
        raise UserError(f"model {kind} {reference} does not exist.")
    match = REPO_ID.match(reference)
    if match:
        return _resolve_repo(match["repo"], match["rev"], reference)
    known = sorted(set(BUILTIN_ALIASES) | set(BUILTIN_LOCAL) | set(users))
    raise UserError(
        f"unknown model {reference!r}: not a directory, an alias ({', '.join(known)}) or a Hugging Face repo id."
    )


def _aliases_for(reference: str) -> dict[str, UserModel]:
    """The user's aliases; a damaged registry stops only references that could be aliases.

    A built-in name cannot be a user alias (``pie models add`` refuses them), so ``demo`` and
    ``sd-v1-5`` keep working when ``models.json`` is broken.
    """
    try:
        return load_user_models()
    except UserError:
        if reference in BUILTIN_LOCAL or reference in BUILTIN_ALIASES:
            return {}
        raise


def _resolve_repo(repo_id: str, revision: str | None, reference: str) -> ModelSource:
    found = hf_snapshot(repo_id, revision)
    if found is None:
        raise ModelNotCached(repo_id, revision, reference)
    snapshot, commit = found
    check_model_dir(snapshot, reference)
    return ModelSource(reference, snapshot, "hf-cache", repo_id=repo_id, revision=commit)


def _resolve_user(
    name: str, entry: UserModel, seen: tuple[str, ...], config: str | None = None
) -> ModelSource:
    if entry.kind in ("model", SINGLE_FILE):
        # A single file's alias keeps the configs it was registered with, unless --model-config names others.
        found = _resolve(entry.target, config or entry.config, seen)
        return replace(found, reference=name, alias=name)
    if not entry.base:
        raise UserError(f"model alias {name} is a {entry.kind} without a base model; re-add it with --base.")
    base = _resolve(entry.base, config, seen)
    target = Path(entry.target)
    if not target.exists():
        raise UserError(f"model alias {name} points to {target}, which no longer exists.")
    if entry.kind == "lora":
        adapter = Adapter(target, entry.weight, lora_weight_file(target))
        return replace(base, reference=name, alias=name, loras=(*base.loras, adapter))
    return replace(base, reference=name, alias=name, unet=target)


def _single_file(reference: str, path: Path, config: str | None, seen: tuple[str, ...]) -> ModelSource:
    """A single-file checkpoint with the configs that describe it, checked as far as reading its header allows."""
    from pie_cli.core.single_file import BUILTIN_CONFIG, BUILTIN_CONFIG_NAME, check_config_dir, check_file

    folder, label = BUILTIN_CONFIG, BUILTIN_CONFIG_NAME
    if config is not None:
        try:
            described = None if Path(config).expanduser().is_file() else _resolve(config, None, seen)
        except ModelNotCached:
            raise
        except UserError as exc:
            raise UserError(f"--model-config {config}: {exc.message}") from None
        if described is None or described.checkpoint is not None:
            raise UserError(
                f"--model-config {config} is itself a single file; give the diffusers-layout folder (or alias) "
                f"whose configs describe {path}."
            )
        if described.loras or described.unet:
            raise UserError(
                f"--model-config {config} is a LoRA or UNet on a model; give the model whose configs describe {path}."
            )
        folder, label = described.path, config
    check_config_dir(folder, label)
    check_file(path, folder, label)
    return ModelSource(reference, folder, "single-file", checkpoint=path.resolve(), config=label)


# --------------------------------------------------------------------------- options


def parse_lora(spec: str) -> Adapter:
    """``PATH`` or ``PATH:WEIGHT`` -> Adapter (the path must exist)."""
    path_part, weight = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
            path_part = head
        except ValueError:
            pass
    if not math.isfinite(weight):
        raise UserError(f"--lora {spec}: the weight must be a finite number, got {weight:g}.")
    path = Path(path_part).expanduser()
    if not path.exists():
        raise UserError(f"--lora {spec}: {path} does not exist.")
    file = lora_weight_file(path)
    if file is None:
        raise UserError(
            f"--lora {spec}: {path} holds no LoRA weights (expected {LORA_FILE} or a .safetensors file)."
        )
    return Adapter(path.resolve(), weight, file.resolve())


# --------------------------------------------------------------------------- status


@dataclass(frozen=True)
class ModelStatus:
    """Whether a reference resolves offline: ``ok`` (``detail`` is its path), ``not cached`` or ``broken``."""

    status: str
    detail: str  # the path when ok, else what is wrong or what to do
    reason: str | None = None  # the resolution error's own sentence, when not ok
    # when ok, its weights in a few words: "safetensors", "safetensors, fp16 variant (unet)", "pickle only ..."
    weights: str | None = None


def status(reference: str, users: dict[str, UserModel] | None = None) -> ModelStatus:
    """Resolve ``reference`` without loading anything and say whether it is usable here.

    A model that resolves but has a part without weights (a pull that fetched only configs) is
    broken; one whose weights are pickles only is ok, its ``weights`` saying it needs --allow-pickle.
    """
    from pie_cli.core.model_files import weights_status

    try:
        source = resolve(reference)
        problem, weights = weights_status(source)
        if problem is not None:
            return ModelStatus("broken", problem, problem)
        return ModelStatus("ok", str(source.checkpoint or source.path), weights=weights)
    except UserError as exc:
        entry = (users if users is not None else _users_or_empty()).get(reference)
        if entry is not None and entry.kind != "model" and not Path(entry.target).exists():
            message = f"its {entry.kind} {entry.target} no longer exists."
            return ModelStatus("broken", message, message)
        if isinstance(exc, ModelNotCached):
            detail = f"{exc.repo_id} is not in the Hugging Face cache (`pie models pull {exc.pull}`)"
            return ModelStatus("not cached", detail, exc.message)
        return ModelStatus("broken", exc.message, exc.message)


def _users_or_empty() -> dict[str, UserModel]:
    try:
        return load_user_models()
    except UserError:
        return {}


def entries(users: dict[str, UserModel] | None = None) -> list[dict]:
    """Every built-in and user alias as a row (name, kind, source, target[, base], note)."""
    users = load_user_models() if users is None else users
    rows: list[dict] = []
    for name in BUILTIN_LOCAL:
        rows.append(
            {
                "name": name,
                "kind": "model",
                "source": "built-in",
                "target": "(shipped with pie)",
                "note": BUILTIN_NOTES[name],
            }
        )
    for name, repo in BUILTIN_ALIASES.items():
        rows.append(
            {"name": name, "kind": "model", "source": "built-in", "target": repo, "note": BUILTIN_NOTES[name]}
        )
    for name, entry in users.items():
        rows.append(
            {
                "name": name,
                "kind": entry.kind,
                "source": "user",
                "target": entry.target or "(damaged entry)",
                "base": entry.base,
                "config": entry.config,
                "note": "",
            }
        )
    return rows


def source_fingerprint(source: ModelSource) -> str:
    """:func:`model_files.fingerprint` of everything ``source`` loads: its parts, --unet, its LoRA files.

    A single-file checkpoint counts by its whole content's SHA-256 (a fine-tune keeps the file's
    size and often its first and last tensors), with the configs that describe it.
    """
    from pie_cli.core.model_files import COMPONENTS, file_digest, fingerprint

    folders = [source.unet if (c == "unet" and source.unet) else source.path / c for c in COMPONENTS]
    files = [a.file or lora_weight_file(a.path) or a.path for a in source.loras]
    found = fingerprint([f for f in folders if Path(f).is_dir()], [f for f in files if Path(f).is_file()])
    if source.checkpoint is None:
        return found
    import hashlib

    return hashlib.sha256(f"{found}\0{file_digest(source.checkpoint)}".encode()).hexdigest()[:16]
