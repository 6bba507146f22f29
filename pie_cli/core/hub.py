"""``pie models pull``: download a model from the Hugging Face Hub into the local cache, knowing what it fetches.

:func:`plan_pull` asks the Hub for the repo's file list with sizes (one ``model_info`` call) and
:func:`select_files` decides from names alone, per component: ``model_index.json``, the configs
of ``unet/``, ``vae/``, ``text_encoder/``, all of ``tokenizer/``, ``scheduler/*.json``, and for
each weighted part the files loading reads (:func:`pie_cli.core.model_files.choose_weights`:
safetensors, the default weights or the ``--variant``). Never ``safety_checker/`` or
``feature_extractor/``, never pickle weights unless allowed, never the multi-GB root-level
single-file checkpoints unless named with ``--single-file``. A repo pie could not load is refused
here, before anything is written.

:func:`download` fetches exactly the planned files with ``snapshot_download`` (which writes the
cache's ``refs/``, ``blobs/`` and ``snapshots/``) and checks that each one arrived: a pull that
ended without its weights is an error, never a success.

Exit codes, through the CLI's boundary: a repo or option that cannot give a loadable model
(unknown repo or revision, pickle-only weights, no such variant, configs without weights) is a
``UserError`` (exit 2): nothing was downloaded and the sentence says what to pass instead. A
download that did not deliver what the Hub listed (network, Hub, a repo changed mid-pull) is a
``PieError`` (exit 1): the input was fine, rerunning may fix it.

huggingface_hub is imported inside functions only. The Hub is ``$HF_ENDPOINT`` when set, read at
call time like the cache location (:mod:`pie_cli.paths`).
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pie_cli.core.model_files import PICKLE_SUFFIXES, WEIGHTED_PARTS, choose_weights, parse_weight_name
from pie_cli.errors import PieError, UserError, one_line

# Top-level files that are single-file checkpoints (v1-5-pruned.safetensors, *.ckpt): left out unless named.
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


@dataclass(frozen=True)
class HubFile:
    """One file of a Hub repo: its path in the repo and size in bytes (None when the Hub did not say)."""

    path: str
    size: int | None = None


@dataclass(frozen=True)
class PullPlan:
    """What ``pie models pull`` will download: decided from the Hub's listing, nothing fetched yet."""

    reference: str
    repo_id: str
    revision: str  # as asked: a branch, tag or commit ("main" by default)
    commit: str  # what the revision pointed to when listed
    files: tuple[HubFile, ...]
    variant: str | None = None
    notes: tuple[str, ...] = ()
    left_out: tuple[HubFile, ...] = field(default=())  # root-level single-file checkpoints not taken

    @property
    def total_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)

    def describe(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "variant": self.variant,
            "files": [{"path": f.path, "bytes": f.size} for f in self.files],
            "total_bytes": self.total_bytes,
            "left_out": [{"path": f.path, "bytes": f.size} for f in self.left_out],
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class Pulled:
    """A finished pull: the snapshot folder and the commit it holds."""

    path: Path
    commit: str
    notes: tuple[str, ...] = ()


def endpoint() -> str | None:
    """``$HF_ENDPOINT`` (a mirror, or a stand-in in tests), read now; None means huggingface_hub's default."""
    value = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return value or None


def _hub_name() -> str:
    return endpoint() or "the Hugging Face Hub"


# --------------------------------------------------------------------------- the reference


def pull_target(reference: str, revision: str | None = None) -> tuple[str, str | None]:
    """(repo id, revision or None) of a ``pie models pull`` reference: an alias, ``org/name`` or ``org/name@rev``."""
    from pie_cli.core.registry import BUILTIN_ALIASES, BUILTIN_LOCAL, REPO_ID, load_user_models

    reference = reference.strip()
    if reference in BUILTIN_LOCAL:
        raise UserError(f"{reference} ships with pie; there is nothing to download.")
    users = load_user_models()
    target = users[reference].target if reference in users else BUILTIN_ALIASES.get(reference, reference)
    match = REPO_ID.match(target)
    if not match:
        raise UserError(
            f"{reference} is not a built-in alias or a Hugging Face repo id; nothing to download."
        )
    given = match["rev"]
    if revision is not None and not revision.strip():
        raise UserError("--revision is empty; give a branch, tag or commit.")
    if given and revision and given != revision:
        raise UserError(f"{reference} names revision {given} and --revision says {revision}; give it once.")
    return match["repo"], (revision or given)


# --------------------------------------------------------------------------- choosing files


def _plural(items: list[str], one: str, many: str) -> str:
    return one if len(items) == 1 else many


def select_files(
    repo: str,
    listing: list[HubFile],
    *,
    variant: str | None = None,
    allow_pickle: bool = False,
    single_files: tuple[str, ...] = (),
) -> tuple[list[HubFile], list[str], list[HubFile]]:
    """(files to download, notes, single-file checkpoints left out) of a repo listing; refuses what cannot load.

    ``repo`` names the repo in the messages (``org/name@rev``).
    """
    sizes = {f.path: f.size for f in listing}
    folders: dict[str, list[str]] = {}
    for path in sizes:
        head, _, name = path.rpartition("/")
        folders.setdefault(head, []).append(name)
    take: list[str] = [p for p in ("model_index.json",) if p in sizes]
    notes: list[str] = []
    missing: list[str] = []
    no_weights: list[str] = []
    pickled: dict[str, str] = {}  # part -> an example pickle file, when pickle is all it has
    chosen = {}
    for part in WEIGHTED_PARTS:
        names = sorted(folders.get(part, []))
        if "config.json" not in names:
            missing.append(f"{part}/config.json")
        choice = choose_weights(names, prefer=variant, allow_pickle=False)
        if choice is None:
            pick = choose_weights(names, prefer=variant, allow_pickle=True)
            if pick is None:
                no_weights.append(part)
                continue
            if not allow_pickle:
                pickled[part] = f"{part}/{pick.names[0]}"
                continue
            choice = pick
        chosen[part] = choice
        take += [f"{part}/{n}" for n in names if n.endswith(".json") and parse_weight_name(n) is None]
        take += [f"{part}/{n}" for n in choice.names]
    tokenizer = sorted(folders.get("tokenizer", []))
    if not tokenizer:
        missing.append("tokenizer/")
    take += [f"tokenizer/{n}" for n in tokenizer]
    scheduler = sorted(n for n in folders.get("scheduler", []) if n.endswith(".json"))
    if "scheduler_config.json" not in scheduler:
        missing.append("scheduler/scheduler_config.json")
    take += [f"scheduler/{n}" for n in scheduler]

    top = sorted(folders.get("", []))
    singles = [n for n in top if n.endswith(SINGLE_FILE_SUFFIXES)]
    named: list[str] = []
    for pattern in single_files:
        found = [n for n in top if fnmatch.fnmatchcase(n, pattern) and n != "model_index.json"]
        if not found:
            have = f"its single-file checkpoints are {', '.join(singles)}" if singles else "it has none"
            raise UserError(f"--single-file {pattern} matches no file at the top of {repo} ({have}).")
        for name in found:
            if Path(name).suffix in PICKLE_SUFFIXES and not allow_pickle:
                raise UserError(
                    f"--single-file {name} is a pickle file, which can run code when loaded; "
                    "add --allow-pickle if you trust it."
                )
            named += [name] if name not in named else []
    if missing or no_weights:
        problems = ([f"no weights for {', '.join(no_weights)}"] if no_weights else []) + (
            [f"no {', '.join(missing)}"] if missing else []
        )
        if not named:
            hint = (
                f"; its single-file checkpoint{'s' if len(singles) > 1 else ''} ({', '.join(singles)}) "
                "can be fetched with --single-file NAME and turned into a model with `pie models convert`"
                if singles
                else ""
            )
            raise UserError(
                f"{repo} is not a Stable Diffusion model in diffusers layout ({'; '.join(problems)}), "
                f"so nothing was downloaded{hint}."
            )
        notes.append(
            f"{repo} is not in diffusers layout ({'; '.join(problems)}): only {', '.join(named)} is downloaded."
        )
        take = list(named)
    else:
        if pickled:
            parts = list(pickled)
            raise UserError(
                f"{repo} has only pickle weights for {', '.join(parts)} ({next(iter(pickled.values()))}), which can "
                "run code when loaded, so nothing was downloaded; pass --allow-pickle to download them if you trust "
                "the repo, and turn them into safetensors with `pie models convert`."
            )
        _variant_notes(repo, chosen, variant, folders, notes)
        for part, choice in chosen.items():
            if not choice.safetensors:
                notes.append(
                    f"{part}: downloading pickle weights {part}/{choice.names[0]} (--allow-pickle); "
                    "a pickle file can run arbitrary code: load only files you trust."
                )
        take += [n for n in named if n not in take]
    files = [HubFile(p, sizes[p]) for p in take]
    left_out = [HubFile(n, sizes[n]) for n in singles if n not in named]
    return files, notes, left_out


def _variant_notes(repo: str, chosen: dict, variant: str | None, folders: dict, notes: list[str]) -> None:
    with_variant = [p for p, c in chosen.items() if c.variant == variant]
    if variant is not None:
        if not with_variant:
            elsewhere = [
                f"{p}/{n}"
                for p in WEIGHTED_PARTS
                for n in folders.get(p, [])
                if (parse_weight_name(n) or (None, None))[1] == variant
            ]
            detail = (  # safetensors win over a pickle of the variant, even with --allow-pickle
                f"in safetensors; only the pickle {elsewhere[0]}"
                if elsewhere
                else f"no file like unet/diffusion_pytorch_model.{variant}.safetensors"
            )
            raise UserError(
                f"{repo} has no {variant} variant ({detail}); pull it without --variant {variant}."
            )
        lacking = [p for p in chosen if p not in with_variant]
        if lacking:
            notes.append(
                f"{', '.join(lacking)} {_plural(lacking, 'has', 'have')} no {variant} variant in {repo}: "
                f"{_plural(lacking, 'its', 'their')} default weights are downloaded."
            )
    fallback: dict[str, list[str]] = {}
    for part, choice in chosen.items():
        if choice.variant and choice.variant != variant:
            fallback.setdefault(choice.variant, []).append(part)
    for other, parts in fallback.items():
        notes.append(
            f"{', '.join(parts)} {_plural(parts, 'has', 'have')} no default safetensors weights in {repo}: "
            f"{_plural(parts, 'its', 'their')} {other} variant is downloaded (pie loads it)."
        )


# --------------------------------------------------------------------------- the Hub


def _check_online(repo: str) -> None:
    from pie_cli.paths import hf_offline

    if hf_offline():
        raise UserError(f"HF_HUB_OFFLINE is set, so {repo} cannot be downloaded; unset it to pull.")


def _hub_errors(repo: str, revision: str | None, exc: BaseException) -> PieError | None:
    """One sentence for an error of huggingface_hub (or its HTTP client), else None."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return UserError(
            f"{repo} is gated on {_hub_name()}: accept its conditions on its page, then log in (`hf auth login`)."
        )
    if isinstance(exc, RepositoryNotFoundError):
        return UserError(f"{repo} does not exist on {_hub_name()} or needs a login (`hf auth login`).")
    if isinstance(exc, RevisionNotFoundError):
        return UserError(
            f"{repo} has no revision {revision or 'main'} (a branch, tag or commit) on {_hub_name()}."
        )
    if isinstance(exc, OfflineModeIsEnabled):
        return UserError(f"HF_HUB_OFFLINE is set, so {repo} cannot be downloaded; unset it to pull.")
    if isinstance(exc, HfHubHTTPError):
        code = exc.response.status_code if exc.response is not None else "an error"
        return PieError(f"{_hub_name()} answered {code} for {repo}; try again later ({one_line(exc)}).")
    if isinstance(exc, (*_transport_errors(), LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        return PieError(
            f"cannot reach {_hub_name()} for {repo} ({one_line(exc)}); check the network, "
            "the proxy or HF_ENDPOINT, and rerun."
        )
    return None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The network errors of the HTTP client this huggingface_hub uses (httpx2, httpx or requests)."""
    import importlib

    found = []
    for module, name in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests", "RequestException"),
    ):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def plan_pull(
    reference: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    allow_pickle: bool = False,
    single_files: tuple[str, ...] = (),
) -> PullPlan:
    """List the repo on the Hub and decide what to download (nothing is written), or refuse in one sentence."""
    repo_id, rev = pull_target(reference, revision)
    if variant is not None and not re.fullmatch(r"\w+", variant):
        raise UserError(f"--variant must be a name such as fp16, got {variant!r}.")
    _check_online(repo_id)
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint()).model_info(repo_id, revision=rev, files_metadata=True)
    except Exception as exc:
        mapped = _hub_errors(repo_id, rev, exc)
        if mapped is None:
            raise
        raise mapped from None
    if not info.sha:
        raise PieError(
            f"{_hub_name()} listed {repo_id} without its commit; is HF_ENDPOINT a Hugging Face Hub?"
        )
    listing = [HubFile(s.rfilename, s.size) for s in info.siblings or ()]
    shown = f"{repo_id}@{rev}" if rev else repo_id
    files, notes, left_out = select_files(
        shown, listing, variant=variant, allow_pickle=allow_pickle, single_files=single_files
    )
    return PullPlan(
        reference=reference,
        repo_id=repo_id,
        revision=rev or "main",
        commit=info.sha,
        files=tuple(files),
        variant=variant,
        notes=tuple(notes),
        left_out=tuple(left_out),
    )


def download(plan: PullPlan, *, progress: bool = True) -> Pulled:
    """Fetch ``plan``'s files into the HF cache and check each one arrived (progress bars on stderr)."""
    from pie_cli.paths import hf_hub_cache

    _check_online(plan.repo_id)
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        folder = snapshot_download(
            plan.repo_id,
            revision=plan.revision,
            cache_dir=str(hf_hub_cache()),
            allow_patterns=[glob.escape(f.path) for f in plan.files],
            endpoint=endpoint(),
        )
    except Exception as exc:
        mapped = _hub_errors(plan.repo_id, plan.revision, exc)
        if mapped is None:
            raise
        raise mapped from None
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    path = Path(folder)
    return _check_arrived(plan, path)


def _check_arrived(plan: PullPlan, path: Path) -> Pulled:
    """Every planned file is in the snapshot (with its listed size, when the commit is the one listed)."""
    commit = path.name
    notes = []
    same = commit == plan.commit
    if not same:
        notes.append(
            f"{plan.repo_id}@{plan.revision} moved from {plan.commit[:12]} to {commit[:12]} during the pull."
        )
    short = []
    for f in plan.files:
        local = path / f.path
        if not local.is_file() or (same and f.size is not None and local.stat().st_size != f.size):
            short.append(f.path)
    if short:
        weights = [
            p for p in short if parse_weight_name(p.rpartition("/")[2]) or p.endswith(SINGLE_FILE_SUFFIXES)
        ]
        what = "its weights" if weights else f"{len(short)} of its files"
        raise PieError(
            f"the download of {plan.repo_id}@{plan.revision} ended without {what} ({', '.join((weights or short)[:3])}"
            f"{' ...' if len(weights or short) > 3 else ''}){'; ' + notes[0].rstrip('.') if notes else ''}; "
            f"rerun `pie models pull {plan.reference}`."
        )
    return Pulled(path, commit, tuple(notes))
