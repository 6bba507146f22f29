"""pie deletes or replaces only files it can prove it wrote, and never writes over an input.

Proof is one of:

- the folder's ledger (``.pie-files.json``): every file pie writes into a folder is recorded
  there with its fingerprint, so a file the user changed since no longer matches (a log pie
  appends to stays pie's while it only grows);
- a PNG's own ``pie_sha256`` text chunk: the digest of its pixels when pie saved it;
- an animation's provenance (the GIF comment, the WebP EXIF, the MP4 comment pie writes);
- in a folder pie wrote before it kept ledgers, pie's own file markers (PNG provenance chunks,
  a manifest's ``pie_version``, the metrics' layout).

:func:`plan_overwrite` decides, before anything is touched, what an ``--overwrite`` deletes and
refuses a user file the new output would replace; :func:`refuse_overlap` refuses an output that
is, contains or lies inside an input.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pie_cli.errors import UserError
from pie_cli.imaging.files import TEMP_NAME, write_text

if TYPE_CHECKING:
    from PIL import Image

LEDGER = ".pie-files.json"
PIXELS_KEY = "pie_sha256"
_SMALL = 64 << 20  # files up to this size are fingerprinted by their whole content


def pixel_digest(img: Image.Image) -> str:
    """sha256 of an image's mode, size and pixels (what a PNG's ``pie_sha256`` chunk holds)."""
    import hashlib

    digest = hashlib.sha256(f"{img.mode}|{img.size[0]}x{img.size[1]}|".encode())
    digest.update(img.tobytes())
    return digest.hexdigest()


def fingerprint(path: Path) -> str:
    """A file's identity for the ledger: its sha256, or for a large file its size, mtime and ends."""
    import hashlib

    path = Path(path)
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if stat.st_size <= _SMALL:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
            return f"sha256:{digest.hexdigest()}"
        digest.update(fh.read(1 << 20))
        fh.seek(-(1 << 20), 2)
        digest.update(fh.read(1 << 20))
    return f"large:{stat.st_size}:{stat.st_mtime_ns}:{digest.hexdigest()}"


def _prefix_print(path: Path, size: int | None = None) -> str:
    """The fingerprint of a file's first ``size`` bytes (all of it now when None)."""
    import hashlib

    size = Path(path).stat().st_size if size is None else size
    with open(path, "rb") as fh:
        head = fh.read(size)
    if len(head) != size:
        raise ValueError("shorter than recorded")
    return f"prefix:{size}:{hashlib.sha256(head).hexdigest()}"


class Ledger:
    """The files pie wrote into one folder (``FOLDER/.pie-files.json``), by path relative to it.

    Several writers may hold a ledger of one folder (a training run's loop and its summary):
    each save re-reads the file and applies only its own changes since, so none is lost.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(os.path.abspath(folder))
        self.files: dict[str, str] = self._read()
        self._set: dict[str, str] = {}
        self._drop: set[str] = set()

    def _read(self) -> dict[str, str]:
        import json

        path = self.folder / LEDGER
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError, RecursionError):
            data = {}  # unreadable: then nothing is provably pie's
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(files, dict):
            return {}
        return {k: v for k, v in files.items() if isinstance(k, str) and isinstance(v, str)}

    def owns(self, rel: str) -> bool:
        """Whether ``rel`` is a file pie recorded here and it is still exactly what pie wrote."""
        recorded = self.files.get(rel)
        path = self.folder / rel
        if recorded is None or not path.is_file() or path.is_symlink():
            return False
        try:
            if recorded.startswith("prefix:"):
                return _prefix_print(path, int(recorded.split(":")[1])) == recorded
            return fingerprint(path) == recorded
        except (OSError, ValueError, IndexError):
            return False

    def record(self, *paths: Path, save: bool = True, growing: bool = False) -> None:
        """Note files pie has just written (paths as the caller names them: absolute or from the cwd).

        ``growing`` is for a log pie appends to (``metrics.csv``): what is there now is recorded
        as its beginning, and the file stays pie's while it only grows.
        """
        for path in paths:
            path = Path(os.path.abspath(path))
            rel = path.relative_to(self.folder).as_posix()
            self._set[rel] = self.files[rel] = _prefix_print(path) if growing else fingerprint(path)
            self._drop.discard(rel)
        if save:
            self.save()

    def forget(self, *rels: str, save: bool = True) -> None:
        for rel in rels:
            self.files.pop(rel, None)
            self._set.pop(rel, None)
            self._drop.add(rel)
        if save:
            self.save()

    def save(self) -> None:
        import json

        from pie_cli import __version__

        files = self._read()
        files.update(self._set)
        for rel in self._drop:
            files.pop(rel, None)
        self.files, self._set, self._drop = files, {}, set()
        data = {"written_by": f"pie {__version__}", "files": dict(sorted(files.items()))}
        write_text(self.folder / LEDGER, json.dumps(data, indent=1) + "\n")


def written_by_pie(path: Path, ledger: Ledger | None = None) -> bool:
    """Whether pie can prove it wrote ``path`` as it is now (see the ownership note above)."""
    path = Path(path)
    if not path.is_file() or path.is_symlink():
        return False
    if ledger is not None:
        try:
            rel = path.resolve().relative_to(ledger.folder.resolve()).as_posix()
        except ValueError:
            rel = None
        if rel is not None and ledger.owns(rel):
            return True
    suffix = path.suffix.lower()
    try:
        from PIL import Image

        with Image.open(path) as img:
            if suffix == ".png":
                recorded = img.info.get(PIXELS_KEY) or getattr(img, "text", {}).get(PIXELS_KEY)
                if not recorded:
                    return False
                img.load()
                return pixel_digest(img) == recorded
            if suffix == ".gif":
                return "generated by pie" in str(img.info.get("comment", b""))
            if suffix == ".webp":
                return str(img.getexif().get(0x0131, "")).startswith("pie ")
    except (OSError, ValueError, SyntaxError):
        return False
    if suffix == ".mp4":
        try:
            import av

            with av.open(str(path)) as container:
                return "generated by pie" in container.metadata.get("comment", "")
        except Exception:  # no PyAV, or not a video it can open: not provable
            return False
    return False


def legacy_pie_file(path: Path) -> bool:
    """A file of a folder pie wrote before it kept a ledger, recognised by what only pie writes there."""
    import json

    name, suffix = path.name, path.suffix.lower()
    try:
        if suffix == ".png":
            from PIL import Image

            with Image.open(path) as img:
                info = img.info
            return str(info.get("Software", "")).startswith("pie ") and info.get("synthetic") == "true"
        if name in ("manifest.json", "metrics.json", "truth.json", "training_summary.json"):
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                return False
            if name == "manifest.json":
                return "pie_version" in data and data.get("synthetic") is True
            if name == "truth.json":  # pie demo case
                return {"report", "file_name", "seed"} <= set(data)
            if name == "training_summary.json":
                return "pie_version" in data and isinstance(data.get("sources"), dict)
            return (
                isinstance(data.get("frames"), list)
                and isinstance(data.get("summary"), dict)
                and "run" in data
            )
        if name == "metadata.jsonl":  # pie demo data
            with open(path, encoding="utf-8") as fh:
                first = json.loads(fh.readline() or "{}")
            return isinstance(first, dict) and {"file_name", "text", "mask_left", "seed"} <= set(first)
        if name in ("metrics.csv", "training_config.yaml"):  # pie evaluate's or finetune's
            with open(path, encoding="utf-8") as fh:
                head = fh.readline()
            return (
                head.startswith("index,change_in_mask,")
                or head.strip() == "step,loss,lr,seconds"
                or head.startswith("# Effective pie finetune configuration")
            )
    except (OSError, ValueError, SyntaxError, RecursionError):
        return False
    return False


def _dead_temporary(path: Path) -> bool:
    """A ``.NAME.PID.tmp`` left by a pie process that no longer runs."""
    match = TEMP_NAME.match(path.name)
    if match is None:
        return False
    pid = int(match.group("pid"))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def plan_overwrite(
    folder: Path,
    will_write: Callable[[str], bool],
    option: str = "--out",
    reserved: tuple[str, ...] = (),
    legacy_outputs: Callable[[str], bool] | None = None,
) -> list[Path]:
    """The files of ``folder`` an ``--overwrite`` deletes, or a ``UserError`` before anything is touched.

    ``will_write(rel)`` says whether the new output writes that path (relative, ``/``-separated).
    Deleted: files a ledger here (or in the sub-folder holding them) records and that are unchanged;
    a file the new output writes over when pie can prove it made it (a PNG's pixel digest, an
    animation's provenance); in a folder without any ledger (written by an older pie), files at
    ``legacy_outputs`` paths that carry pie's markers; and temporaries of dead pie processes.
    Every other file is the user's and stays, and one the new output would replace is refused.
    ``reserved`` names bookkeeping files of the caller (the lock), which are left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    ledgers: dict[Path, Ledger | None] = {}

    def ledger_for(path: Path) -> Ledger | None:
        for directory in path.parents:
            if directory not in ledgers:
                ledgers[directory] = Ledger(directory) if (directory / LEDGER).is_file() else None
            if ledgers[directory] is not None:
                return ledgers[directory]
            if directory == folder:
                return None
        return None

    remove: list[Path] = []
    for path in sorted(folder.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        rel = path.relative_to(folder).as_posix()
        if rel in reserved or path.name == LEDGER:
            continue
        if _dead_temporary(path):
            remove.append(path)
            continue
        ledger = ledger_for(path)
        if ledger is not None and ledger.owns(
            Path(os.path.abspath(path)).relative_to(ledger.folder).as_posix()
        ):
            remove.append(path)
        elif will_write(rel):
            # A manifest is pie's record whatever became of it: a valid pie manifest is replaced.
            if written_by_pie(path) or (
                (ledger is None or path.name == "manifest.json") and legacy_pie_file(path)
            ):
                remove.append(path)
            else:
                raise UserError(
                    f"{option} {folder} holds {rel}, which pie did not write (or which changed since pie wrote it); "
                    "pie never replaces it: move it away or choose another directory."
                )
        elif ledger is None and legacy_outputs is not None and legacy_outputs(rel) and legacy_pie_file(path):
            remove.append(path)
    return remove


def remove_planned(folder: Path, files: list[Path]) -> None:
    """Delete what :func:`plan_overwrite` found, then the sub-folders left holding nothing (but a ledger)."""
    folder = Path(folder)
    emptied = set()
    for path in files:
        path.unlink(missing_ok=True)
        emptied.update(p for p in path.parents if p != folder and folder in p.parents)
    for directory in sorted(emptied, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            if [p.name for p in directory.iterdir()] == [LEDGER]:
                (directory / LEDGER).unlink()
            directory.rmdir()  # only when empty: a user file inside keeps its folder
    for ledger_path in [folder / LEDGER, *folder.rglob(LEDGER)]:
        if ledger_path.is_file():
            ledger = Ledger(ledger_path.parent)
            gone = [rel for rel in ledger.files if not (ledger.folder / rel).exists()]
            if gone:
                ledger.forget(*gone)


# --------------------------------------------------------------------------- inputs and outputs


def _resolved(path: Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser().resolve()))


def refuse_overlap(
    option: str,
    out: Path,
    inputs: list[tuple[str, Path | None]],
    will_write: Callable[[str], bool] | None = None,
) -> None:
    """Refuse an output folder that is, contains or lies inside an input folder, or that would write
    over an input file, whatever ``--overwrite`` says (checked before anything runs)."""
    target = _resolved(out)
    for what, path in inputs:
        if path is None:
            continue
        source = _resolved(path)
        if source.is_dir():
            if source == target:
                raise UserError(f"{option} {out} is {what} {path} itself; write the output somewhere else.")
            if source in target.parents:
                raise UserError(f"{option} {out} lies inside {what} {path}; write the output outside it.")
            if target in source.parents:
                raise UserError(
                    f"{option} {out} contains {what} {path}; write the output where no input lies."
                )
        elif source == target:
            raise UserError(f"{option} {out} is {what} {path} itself; give another name.")
        elif will_write is not None and target in source.parents:
            rel = source.relative_to(target).as_posix()
            if will_write(rel):
                raise UserError(
                    f"{what} {path} is where pie writes its {rel} in {option} {out}; choose another {option}."
                )
