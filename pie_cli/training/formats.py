"""The dataset formats `pie finetune --data` reads, one entry each in :data:`FORMATS`.

- ``folder``: an image folder with ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` + a text column);
- ``csv`` / ``jsonl``: a table with ``--image-column`` / ``--caption-column``, paths relative to it;
- ``hf``: a dataset in the local Hugging Face datasets cache (``org/name``) or saved with ``save_to_disk``;
- ``chexpert``: CheXpert ``train.csv`` (14 observations: 1 positive, 0 negative, -1 uncertain, blank
  unmentioned; ``Frontal/Lateral`` view);
- ``ham10000``: ``HAM10000_metadata.csv`` (``image_id``, ``dx``), images anywhere below the root;
- ``eyepacs``: Kaggle diabetic retinopathy ``trainLabels.csv`` (``image``, ``level`` 0-4).

A format is a reader ``(spec, data, path) -> TrainingData`` plus, for ``--data-format auto``,
a test of a root folder and/or of a table's first line. Adding one is an entry in
:data:`FORMATS` and its name in ``config.DATA_FORMATS``. Image paths always stay inside the
dataset's folder; no image is decoded here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pie_cli.errors import UserError
from pie_cli.training.config import DATA_FORMATS, TrainSpec
from pie_cli.training.data import (
    IMAGE_COLUMNS,
    IMAGE_SUFFIXES,
    TEXT_COLUMNS,
    Record,
    TrainingData,
    render_prompt,
)

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


# --------------------------------------------------------------------------- helpers


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
    from pie_cli.imaging.files import read_csv, read_text_file

    if path.suffix.lower() not in (".jsonl", ".json"):
        return read_csv(path, "table")
    rows: list[tuple[int, dict[str, Any]]] = []
    columns: list[str] = []
    for n, line in enumerate(read_text_file(path, "table", limit=1 << 30).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise UserError(f"{path} line {n} is not valid JSON ({getattr(exc, 'msg', exc)}).") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {n} is not a JSON object.")
        columns.extend(k for k in row if k not in columns)
        rows.append((n, row))
    return columns, rows


def _index_images(root: Path) -> dict[str, Path]:
    """File stem -> path for every image below ``root`` (HAM10000 / EyePACS keep images in subfolders)."""
    index: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            index.setdefault(p.stem, p)
    return index


# --------------------------------------------------------------------------- readers


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


def _hf(spec: TrainSpec, data: str, path: Path) -> TrainingData:
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never download at training time
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"--data {data} is a Hugging Face dataset, which needs the `datasets` package: "
            "pip install 'pie-cli[hf]'."
        ) from None

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


def _folder(spec: TrainSpec, data: str, path: Path) -> TrainingData:
    if not path.is_dir():
        raise UserError(f"--data {data} is not a folder (--data-format folder).")
    table = path / "metadata.jsonl" if (path / "metadata.jsonl").is_file() else path / "metadata.csv"
    if not table.is_file():
        raise UserError(f"--data {data} has no metadata.jsonl or metadata.csv.")
    return TrainingData(_table_records(spec, table, path, path), "folder", data)


def _table_file(kind: str) -> Callable[[TrainSpec, str, Path], TrainingData]:
    def read(spec: TrainSpec, data: str, path: Path) -> TrainingData:
        if not path.is_file():
            raise UserError(f"--data {data} is not a file (--data-format {kind}).")
        return TrainingData(_table_records(spec, path, path.parent, path.parent), kind, data)

    return read


def _chexpert_data(spec: TrainSpec, data: str, path: Path) -> TrainingData:
    records, skipped = _chexpert(spec, path)
    return TrainingData(records, "chexpert", data, skipped=skipped)


def _ham10000(spec: TrainSpec, data: str, path: Path) -> TrainingData:
    records = _indexed_table(spec, path, "HAM10000_metadata.csv", "image_id", _ham_label, "ham10000")
    return TrainingData(records, "ham10000", data)


def _eyepacs(spec: TrainSpec, data: str, path: Path) -> TrainingData:
    records = _indexed_table(spec, path, "trainLabels.csv", "image", _eyepacs_label, "eyepacs")
    return TrainingData(records, "eyepacs", data)


def _first_line(path: Path) -> str:
    """A table's header line (without reading the rest: CheXpert's train.csv is tens of MB)."""
    from pie_cli.imaging.files import require_regular_file

    require_regular_file(path, "table")
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        return fh.readline().rstrip("\r\n")


def _chexpert_header(header: str) -> bool:
    return "Frontal/Lateral" in header


def _ham_header(header: str) -> bool:
    return "image_id" in header and "dx" in header and not _chexpert_header(header)


def _eyepacs_header(header: str) -> bool:
    return header.replace(" ", "").lower().startswith("image,level") and not _ham_header(header)


@dataclass(frozen=True)
class DataFormat:
    """How to read one dataset layout, and how ``--data-format auto`` recognises it."""

    read: Callable[[TrainSpec, str, Path], TrainingData]  # (spec, --data as given, its path)
    root: Callable[[Path], bool] | None = None  # a dataset root folder in this layout
    table: Callable[[Path, str], bool] | None = None  # a table file of it (its path, its first line)


def _csv_table(test: Callable[[str], bool]) -> Callable[[Path, str], bool]:
    return lambda path, header: path.suffix.lower() == ".csv" and test(header)


# In detection order: the first format whose test accepts --data is taken.
FORMATS: dict[str, DataFormat] = {
    "folder": DataFormat(
        _folder, root=lambda p: (p / "metadata.jsonl").is_file() or (p / "metadata.csv").is_file()
    ),
    "ham10000": DataFormat(
        _ham10000, root=lambda p: (p / "HAM10000_metadata.csv").is_file(), table=_csv_table(_ham_header)
    ),
    "eyepacs": DataFormat(
        _eyepacs, root=lambda p: (p / "trainLabels.csv").is_file(), table=_csv_table(_eyepacs_header)
    ),
    "chexpert": DataFormat(
        _chexpert_data,
        root=lambda p: (p / "train.csv").is_file() and _chexpert_header(_first_line(p / "train.csv")),
        table=_csv_table(_chexpert_header),
    ),
    "hf": DataFormat(
        _hf, root=lambda p: (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()
    ),
    "jsonl": DataFormat(_table_file("jsonl"), table=lambda p, h: p.suffix.lower() in (".jsonl", ".json")),
    "csv": DataFormat(_table_file("csv"), table=lambda p, h: p.suffix.lower() == ".csv"),
}
if tuple(FORMATS) != tuple(f for f in DATA_FORMATS if f != "auto"):  # a format is added in both places
    raise ImportError(f"training.formats.FORMATS {tuple(FORMATS)} != config.DATA_FORMATS {DATA_FORMATS}")


def detect_format(path: Path) -> str:
    """The format of an existing ``--data`` path, or a ``UserError`` saying how to name it."""
    if path.is_dir():
        for name, fmt in FORMATS.items():
            if fmt.root is not None and fmt.root(path):
                return name
        raise UserError(
            f"--data {path} is a folder without metadata.jsonl or metadata.csv; add one (file_name + a text "
            "column) or name the layout with --data-format."
        )
    header = _first_line(path) if path.suffix.lower() == ".csv" else ""
    for name, fmt in FORMATS.items():
        if fmt.table is not None and fmt.table(path, header):
            return name
    raise UserError(
        f"--data {path} is not a folder, a .csv or a .jsonl file; name the layout with --data-format."
    )
