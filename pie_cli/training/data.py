"""Report-image pairs from the formats our users have, as (image, prompt) records.

Formats (``--data-format``, detected when ``auto``):
- ``folder``: an image folder with ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` + a text column);
- ``csv`` / ``jsonl``: a table with ``--image-column`` / ``--caption-column``, paths relative to it;
- ``hf``: a dataset in the local Hugging Face datasets cache (``org/name``) or saved with ``save_to_disk``;
- ``chexpert``: CheXpert ``train.csv`` (14 observations: 1 positive, 0 negative, -1 uncertain, blank
  unmentioned; ``Frontal/Lateral`` view);
- ``ham10000``: ``HAM10000_metadata.csv`` (``image_id``, ``dx``), images anywhere below the root;
- ``eyepacs``: Kaggle diabetic retinopathy ``trainLabels.csv`` (``image``, ``level`` 0-4).

Prompts are ``--prompt-template`` (default ``"{instance}, {labels}"``) filled with the instance
prompt, the labels text (positive findings joined with commas, as in the original work, or the
caption column) and any column of the row. No torch here: ``--dry-run`` stays fast.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pie_cli.errors import UserError
from pie_cli.training.config import TrainSpec

TEXT_COLUMNS = ("text", "caption", "report", "prompt", "impression", "findings", "label", "labels")
IMAGE_COLUMNS = ("file_name", "image", "path", "filepath", "image_path", "filename", "file")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".dcm", ".dicom")

CHEXPERT_OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
HAM10000_DX = {
    "akiec": "actinic keratoses and intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesions",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevi",
    "vasc": "vascular lesions",
}
EYEPACS_LEVELS = {
    0: "no apparent diabetic retinopathy",
    1: "mild non-proliferative diabetic retinopathy",
    2: "moderate non-proliferative diabetic retinopathy",
    3: "severe non-proliferative diabetic retinopathy",
    4: "proliferative diabetic retinopathy",
}
DEFAULT_INSTANCE = {
    "chexpert": "A chest X-ray image",
    "ham10000": "A dermoscopic image of a skin lesion",
    "eyepacs": "A fundus photograph",
}


@dataclass(frozen=True)
class Record:
    """One training example: an image file (or a row of a datasets table) and its prompt."""

    image: Path | int
    prompt: str
    where: str  # "metadata.csv row 7", for error messages


@dataclass
class TrainingData:
    records: list[Record]
    format: str
    source: str
    dataset: Any = None  # a datasets.Dataset when format == "hf"
    image_column: str | None = None
    skipped: int = 0  # rows left out by a filter (e.g. CheXpert lateral views)

    def open(self, record: Record):
        """The record's image as a PIL image (decoded)."""
        if isinstance(record.image, Path):
            from pie_cli.imaging.media import open_image

            return open_image(record.image, f"image ({record.where})")
        return self.dataset[record.image][self.image_column]


# --------------------------------------------------------------------------- helpers


def render_prompt(template: str, fields: dict[str, Any], where: str) -> str:
    try:
        text = template.format_map(fields)
    except (KeyError, IndexError, ValueError) as exc:
        known = ", ".join("{" + k + "}" for k in ("instance", "labels", "caption"))
        raise UserError(
            f"--prompt-template {template!r} cannot be filled for {where} ({exc}); use {known} or a column name."
        ) from None
    text = re.sub(r"(\s*,\s*){2,}", ", ", text)
    return re.sub(r"^[\s,]+|[\s,]+$", "", text)


def _inside(base: Path, value: str, where: str, data_path: Path) -> Path:
    base = base.resolve()
    path = (base / value).resolve()
    if path != base and base not in path.parents:
        raise UserError(
            f"{where}: {value!r} escapes the data folder {data_path}; image paths must stay inside it."
        )
    return path


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, source: str) -> str:
    if wanted:
        if wanted not in columns:
            raise UserError(
                f"{source} has no column {wanted!r} (--{what}-column); its columns are {', '.join(columns)}."
            )
        return wanted
    for name in candidates:
        if name in columns:
            return name
    flag = f"--{what}-column"
    raise UserError(
        f"{source} has no {what} column (looked for {', '.join(candidates)}); name it with {flag}. "
        f"Its columns are {', '.join(columns) or '(none)'}."
    )


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """(columns, [(row number as a person counts it, row)]) of a CSV or JSON-lines file."""
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        if path.suffix.lower() in (".jsonl", ".json"):
            columns: list[str] = []
            with open(path, encoding="utf-8") as fh:
                for n, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise UserError(f"{path} line {n} is not valid JSON ({exc.msg}).") from None
                    if not isinstance(row, dict):
                        raise UserError(f"{path} line {n} is not a JSON object.")
                    columns.extend(k for k in row if k not in columns)
                    rows.append((n, row))
            return columns, rows
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            columns = list(reader.fieldnames or [])
            for n, row in enumerate(reader, start=2):
                rows.append((n, row))
        return columns, rows
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a UTF-8 text table.") from None


def _index_images(root: Path) -> dict[str, Path]:
    """File stem -> path for every image below ``root`` (HAM10000 / EyePACS keep images in subfolders)."""
    index: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            index.setdefault(p.stem, p)
    return index


# --------------------------------------------------------------------------- formats


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "metadata.jsonl").is_file() or (path / "metadata.csv").is_file():
            return "folder"
        if (path / "HAM10000_metadata.csv").is_file():
            return "ham10000"
        if (path / "trainLabels.csv").is_file():
            return "eyepacs"
        if (path / "train.csv").is_file() and "Frontal/Lateral" in (path / "train.csv").read_text(
            encoding="utf-8-sig", errors="replace"
        ).split("\n", 1)[0]:
            return "chexpert"
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return "hf"
        raise UserError(
            f"--data {path} is a folder without metadata.jsonl or metadata.csv; add one (file_name + a text "
            "column) or name the layout with --data-format."
        )
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".csv":
        header = path.read_text(encoding="utf-8-sig", errors="replace").split("\n", 1)[0]
        if "Frontal/Lateral" in header:
            return "chexpert"
        if "image_id" in header and "dx" in header:
            return "ham10000"
        if header.replace(" ", "").lower().startswith("image,level"):
            return "eyepacs"
        return "csv"
    raise UserError(
        f"--data {path} is not a folder, a .csv or a .jsonl file; name the layout with --data-format."
    )


def _table_records(spec: TrainSpec, table: Path, base: Path, data_path: Path) -> list[Record]:
    columns, rows = _read_table(table)
    image_col = _pick(columns, spec.image_column, IMAGE_COLUMNS, "image", str(table))
    text_col = _pick(columns, spec.caption_column, TEXT_COLUMNS, "caption", str(table))
    instance = spec.instance_prompt or ""
    records = []
    for n, row in rows:
        where = f"{table.name} row {n}"
        value = row.get(image_col)
        if value in (None, ""):
            raise UserError(f"{where} has no {image_col}.")
        caption = str(row.get(text_col) or "").strip()
        fields = {
            **{k: v for k, v in row.items() if isinstance(k, str)},
            "instance": instance,
            "labels": caption,
            "caption": caption,
        }
        records.append(
            Record(
                _inside(base, str(value), where, data_path),
                render_prompt(spec.prompt_template, fields, where),
                where,
            )
        )
    return records


def _chexpert(spec: TrainSpec, data_path: Path) -> tuple[list[Record], int]:
    table = data_path / "train.csv" if data_path.is_dir() else data_path
    root = data_path if data_path.is_dir() else data_path.parent
    columns, rows = _read_table(table)
    for required in ("Path", "Frontal/Lateral"):
        if required not in columns:
            raise UserError(f"{table} is not a CheXpert table: it has no {required!r} column.")
    observations = [c for c in CHEXPERT_OBSERVATIONS if c in columns]
    instance = spec.instance_prompt if spec.instance_prompt is not None else DEFAULT_INSTANCE["chexpert"]
    positive_values = {"1", "1.0"} | ({"-1", "-1.0"} if spec.uncertain == "positive" else set())
    records, skipped = [], 0
    for n, row in rows:
        view = (row.get("Frontal/Lateral") or "").strip().lower()
        if spec.view != "all" and view != spec.view:
            skipped += 1
            continue
        where = f"{table.name} row {n}"
        rel = Path(row["Path"])
        if rel.parts and rel.parts[0] == root.name:  # paths start with the dataset folder's own name
            rel = Path(*rel.parts[1:])
        positives = [
            c for c in observations if (row.get(c) or "").strip() in positive_values and c != "No Finding"
        ]
        labels = ", ".join(positives) if positives else "No Finding"
        fields = {**row, "instance": instance, "labels": labels, "caption": labels}
        records.append(
            Record(
                _inside(root, str(rel), where, data_path),
                render_prompt(spec.prompt_template, fields, where),
                where,
            )
        )
    return records, skipped


def _indexed_table(
    spec: TrainSpec, data_path: Path, table_name: str, id_col: str, label: Callable[[dict], str], kind: str
) -> list[Record]:
    table = data_path / table_name if data_path.is_dir() else data_path
    root = data_path if data_path.is_dir() else data_path.parent
    columns, rows = _read_table(table)
    if id_col not in columns:
        raise UserError(f"{table} is not a {kind} table: it has no {id_col!r} column.")
    images = _index_images(root)
    instance = spec.instance_prompt if spec.instance_prompt is not None else DEFAULT_INSTANCE[kind]
    records = []
    for n, row in rows:
        where = f"{table.name} row {n}"
        path = images.get(str(row[id_col]).strip())
        if path is None:
            raise UserError(
                f"{where}: no image named {row[id_col]!r} ({'/'.join(IMAGE_SUFFIXES)}) below {root}."
            )
        labels = label(row)
        fields = {**row, "instance": instance, "labels": labels, "caption": labels}
        records.append(Record(path, render_prompt(spec.prompt_template, fields, where), where))
    return records


def _ham_label(row: dict) -> str:
    dx = (row.get("dx") or "").strip()
    return HAM10000_DX.get(dx, dx)


def _eyepacs_label(row: dict) -> str:
    try:
        return EYEPACS_LEVELS[int(float(row.get("level", "")))]
    except (ValueError, KeyError):
        raise UserError(
            f"trainLabels.csv: level {row.get('level')!r} of {row.get('image')!r} is not 0-4."
        ) from None


def _hf(spec: TrainSpec, data: str) -> TrainingData:
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never download at training time
    import datasets

    path = Path(data).expanduser()
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if spec.split not in loaded:
                    raise UserError(
                        f"--data {data} has no split {spec.split!r} (--split); it has {', '.join(loaded)}."
                    )
                loaded = loaded[spec.split]
        else:
            loaded = datasets.load_dataset(data, split=spec.split)
    except (FileNotFoundError, ConnectionError, ValueError) as exc:
        raise UserError(
            f"--data {data} is neither a local path nor a dataset in the local Hugging Face datasets cache "
            f"({type(exc).__name__}); download it once with `datasets` while online, or use a folder."
        ) from None
    columns = list(loaded.column_names)
    image_features = [c for c, f in loaded.features.items() if type(f).__name__ == "Image"]
    image_col = spec.image_column or (image_features[0] if image_features else None)
    image_col = _pick(columns, image_col, IMAGE_COLUMNS, "image", f"dataset {data}")
    text_col = _pick(columns, spec.caption_column, TEXT_COLUMNS, "caption", f"dataset {data}")
    instance = spec.instance_prompt or ""
    records = []
    for i, caption in enumerate(loaded[text_col]):
        where = f"dataset {data} row {i}"
        fields = {"instance": instance, "labels": str(caption), "caption": str(caption)}
        records.append(Record(i, render_prompt(spec.prompt_template, fields, where), where))
    return TrainingData(records, "hf", data, dataset=loaded, image_column=image_col)


def load_data(spec: TrainSpec) -> TrainingData:
    """Read ``--data`` into records (prompts rendered), without decoding any image."""
    data = spec.data or ""
    path = Path(data).expanduser()
    fmt = spec.data_format
    if fmt == "auto":
        if not path.exists():
            if re.match(r"^[\w.-]+(/[\w.-]+)?$", data) and "/" in data:
                fmt = "hf"
            else:
                raise UserError(f"--data {data} does not exist.")
        else:
            fmt = detect_format(path)
    elif fmt != "hf" and not path.exists():
        raise UserError(f"--data {data} does not exist.")

    skipped = 0
    if fmt == "hf":
        result = _hf(spec, data)
    else:
        if fmt == "folder":
            if not path.is_dir():
                raise UserError(f"--data {data} is not a folder (--data-format folder).")
            table = path / "metadata.jsonl" if (path / "metadata.jsonl").is_file() else path / "metadata.csv"
            if not table.is_file():
                raise UserError(f"--data {data} has no metadata.jsonl or metadata.csv.")
            records = _table_records(spec, table, path, path)
        elif fmt in ("csv", "jsonl"):
            if not path.is_file():
                raise UserError(f"--data {data} is not a file (--data-format {fmt}).")
            records = _table_records(spec, path, path.parent, path.parent)
        elif fmt == "chexpert":
            records, skipped = _chexpert(spec, path)
        elif fmt == "ham10000":
            records = _indexed_table(spec, path, "HAM10000_metadata.csv", "image_id", _ham_label, "ham10000")
        else:
            records = _indexed_table(spec, path, "trainLabels.csv", "image", _eyepacs_label, "eyepacs")
        result = TrainingData(records, fmt, data, skipped=skipped)
    if spec.max_samples is not None:
        result.records = result.records[: spec.max_samples]
    if not result.records:
        raise UserError(
            f"--data {data} holds no training examples{' after the view filter' if skipped else ''}."
        )
    return result


def check_images(data: TrainingData, progress: Callable[[int, int], None] | None = None) -> None:
    """Every image file exists and has a readable header; the first bad one is named with its row."""
    from PIL import Image, UnidentifiedImageError

    from pie_cli.imaging.dicom import check_dicom, is_dicom

    if data.format == "hf":
        return
    for k, record in enumerate(data.records):
        path = record.image
        if isinstance(path, Path) and path.is_file() and is_dicom(path):
            check_dicom(path, f"image ({record.where})")  # header only, like PIL's check below
            if progress is not None:
                progress(k + 1, len(data.records))
            continue
        try:
            with Image.open(path) as img:
                _check_complete(img, path)
        except FileNotFoundError:
            raise UserError(f"image {path} ({record.where}) does not exist.") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            reason = "not an image pie can read" if isinstance(exc, UnidentifiedImageError) else str(exc)
            raise UserError(f"image {path} ({record.where}) cannot be read: {reason}.") from None
        if progress is not None:
            progress(k + 1, len(data.records))


def _check_complete(img: Any, path: Path) -> None:
    """A cheap whole-file check without decoding pixels: truncated files fail before training starts.

    PNG: every chunk's CRC up to IEND (``verify``, I/O only). JPEG: the end-of-image marker
    must be in the last KiB. Other formats: the header only.
    """
    if img.format == "PNG":
        img.verify()
    elif img.format == "JPEG":
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 1024))
            if b"\xff\xd9" not in fh.read():
                raise OSError("the file is truncated (no JPEG end-of-image marker)")


def class_records(spec: TrainSpec) -> list[Record]:
    """Prior-preservation images: every image in ``--class-data``, captioned with ``--class-prompt``."""
    folder = Path(spec.class_data or "")
    if not folder.is_dir():
        raise UserError(f"--class-data {folder} is not a folder.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"--class-data {folder} holds no images.")
    return [Record(p, spec.class_prompt or "", f"--class-data {p.name}") for p in files]
