"""The dataset formats `pie finetune --data` reads, one entry each in :data:`FORMATS`.

- ``folder``: an image folder with ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` + a text column);
- ``csv`` / ``jsonl``: a table with ``--image-column`` / ``--caption-column``, paths relative to it;
- ``hf``: a dataset in the local Hugging Face datasets cache (``org/name``) or saved with ``save_to_disk``;
- ``chexpert``: CheXpert ``train.csv`` (14 observations: 1 positive, 0 negative, -1 uncertain, blank
  unmentioned; ``Frontal/Lateral`` view);
- ``mimic-cxr``: a MIMIC-CXR-JPG root (see below);
- ``ham10000``: ``HAM10000_metadata.csv`` (``image_id``, ``dx``), images anywhere below the root;
- ``eyepacs``: Kaggle diabetic retinopathy ``trainLabels.csv`` (``image``, ``level`` 0-4).

A format is a reader ``(spec, data, path) -> TrainingData`` plus, for ``--data-format auto``,
a test of a root folder and/or of a table's first line. Adding one is an entry in
:data:`FORMATS` and its name in ``config.DATA_FORMATS``. Image paths always stay inside the
dataset's folder; no image is decoded here.

MIMIC-CXR-JPG, as PhysioNet ships it (each table ``.csv`` or ``.csv.gz``; ``auto`` knows the root by
its metadata table and ``files/``):

- ``mimic-cxr-2.0.0-metadata.csv``: one row per image (``dicom_id``, ``subject_id``, ``study_id``,
  ``ViewPosition``); the image is ``files/pNN/pSUBJECT/sSTUDY/DICOM_ID.jpg``, NN the first two digits
  of the subject;
- ``mimic-cxr-2.0.0-split.csv``: ``dicom_id`` -> ``split`` (train, validate, test), filtered by
  ``--split`` (an image missing from it is in no split);
- ``mimic-cxr-2.0.0-chexpert.csv`` (else ``-negbio.csv``): the 14 CheXpert observations per study,
  turned into ``{labels}`` exactly as for ``chexpert`` (``--uncertain`` for -1). Only needed where a
  prompt uses the labels; a study without a row has empty labels.

``--view frontal`` keeps ViewPosition PA and AP, ``lateral`` keeps LATERAL and LL; every other value
(AP AXIAL, LAO, XTABLE LATERAL...) and a blank one, whose view nobody recorded, only ``--view all``.
The prompt is ``--report-section`` of the study's free-text report (MIMIC-CXR's ``sSTUDY.txt``,
beside the study folder under ``files/`` or under ``--reports``): the text after ``IMPRESSION:``
or ``FINDINGS:`` (``both``: findings then impression) up to the next upper-case header, with
whitespace collapsed and the ``FINAL REPORT`` line and headers dropped; never truncated (CLIP reads
77 tokens; the tokenizer cuts the rest). A study without that section takes the other one, then its
labels prompt (``--prompt-template``, as ``labels`` gives every study); each fallback is counted in
the data's notes. A template naming ``{report}`` is rendered for every study, ``{report}`` being the
chosen text (the labels where a study falls back).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pie_cli.errors import UserError
from pie_cli.training.config import DATA_FORMATS, TrainSpec
from pie_cli.training.data import (
    IMAGE_COLUMNS,
    IMAGE_SUFFIXES,
    MASK_COLUMNS,
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
    "mimic-cxr": "A chest X-ray image",
    "ham10000": "A dermoscopic image of a skin lesion",
    "eyepacs": "A fundus photograph",
}


# --------------------------------------------------------------------------- helpers


def _inside(base: Path, value: str, where: str, data_path: Path) -> Path:
    base = base.resolve()
    return _within(base, (base / value).resolve(), value, where, data_path)


def _within(base: Path, path: Path, value: str, where: str, data_path: Path) -> Path:
    """``path`` (resolved) when it is ``base`` (resolved) or below it, else the refusal naming ``value``."""
    if path != base and base not in path.parents:
        raise UserError(
            f"{where}: {value!r} escapes the data folder {data_path}; image paths must stay inside it."
        )
    return path


class _Below:
    """:func:`_inside` for many paths below one base sharing folders (MIMIC-CXR: 377,110 images in
    227,835 study folders): the same resolved path and the same refusal, with each folder's symbolic
    links followed once instead of every component of every path (one ``lstat`` per new name)."""

    def __init__(self, base: Path, data_path: Path) -> None:
        self.base, self.data_path = base.resolve(), data_path
        self.folders: dict[tuple[str, ...], Path] = {(): self.base}

    def __call__(self, names: tuple[str, ...], where: str) -> Path:
        """base/names[0]/names[1]/..., resolved; each name a plain one (no separator, not . or ..)."""
        return self._step(self.folder(names[:-1], where), names, where)

    def folder(self, names: tuple[str, ...], where: str) -> Path:
        if names not in self.folders:
            self.folders[names] = self._step(self.folder(names[:-1], where), names, where)
        return self.folders[names]

    def _step(self, parent: Path, names: tuple[str, ...], where: str) -> Path:
        path = parent / names[-1]
        if not path.is_symlink():
            return path
        return _within(self.base, path.resolve(), "/".join(names), where, self.data_path)


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
    # --loss-mask data: every row names its mask, a path inside the data folder like its image.
    mask_col = (
        _pick(columns, spec.mask_column, MASK_COLUMNS, "mask", str(table))
        if spec.loss_mask == "data"
        else None
    )
    instance = spec.instance_prompt or ""
    records = []
    for n, row in rows:
        where = f"{table.name} row {n}"
        value = row.get(image_col)
        if value in (None, ""):
            raise UserError(f"{where} has no {image_col}.")
        mask = row.get(mask_col) if mask_col else None
        if mask_col and mask in (None, ""):
            raise UserError(f"{where} has no {mask_col} (--loss-mask data needs a mask for every image).")
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
                _inside(base, str(mask), where, data_path) if mask_col else None,
            )
        )
    return records


def _chexpert_labels(row: dict, observations: list[str], uncertain: str) -> str:
    """The positive CheXpert observations of a row joined with commas (as the original work), else No Finding.

    Values: 1 positive, 0 negative, -1 uncertain (positive with ``--uncertain positive``), blank unmentioned.
    """
    positive_values = {"1", "1.0"} | ({"-1", "-1.0"} if uncertain == "positive" else set())
    positives = [
        c for c in observations if (row.get(c) or "").strip() in positive_values and c != "No Finding"
    ]
    return ", ".join(positives) if positives else "No Finding"


def _chexpert(spec: TrainSpec, data_path: Path) -> tuple[list[Record], int]:
    table = data_path / "train.csv" if data_path.is_dir() else data_path
    root = data_path if data_path.is_dir() else data_path.parent
    columns, rows = _read_table(table)
    for required in ("Path", "Frontal/Lateral"):
        if required not in columns:
            raise UserError(f"{table} is not a CheXpert table: it has no {required!r} column.")
    observations = [c for c in CHEXPERT_OBSERVATIONS if c in columns]
    instance = spec.instance_prompt if spec.instance_prompt is not None else DEFAULT_INSTANCE["chexpert"]
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
        labels = _chexpert_labels(row, observations, spec.uncertain)
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


# --------------------------------------------------------------------------- MIMIC-CXR-JPG

MIMIC_PREFIX = "mimic-cxr-2.0.0-"
MIMIC_VIEWS = {"frontal": ("PA", "AP"), "lateral": ("LATERAL", "LL")}
MIMIC_TABLE_LIMIT = 1 << 30  # uncompressed: the metadata table is ~50 MB for 377,110 images
# An upper-case header at the start of a line, then a colon: "IMPRESSION:", "WET READ:", "RECOMMENDATION(S):".
_PATH_CHARS = re.compile(r"[/\\\x00]")  # a dicom_id is one file name
_REPORT_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z0-9 ,&/()'-]*[A-Z)])[ \t]*:", re.MULTILINE)


def _mimic_table(root: Path, kind: str) -> Path | None:
    """``mimic-cxr-2.0.0-KIND.csv`` in ``root``, else its ``.csv.gz``, else None."""
    for name in (f"{MIMIC_PREFIX}{kind}.csv", f"{MIMIC_PREFIX}{kind}.csv.gz"):
        if (root / name).is_file():
            return root / name
    return None


def _mimic_rows(table: Path, required: tuple[str, ...], kind: str) -> tuple[list[str], list]:
    from pie_cli.imaging.files import read_csv

    columns, rows = read_csv(table, "MIMIC-CXR table", limit=MIMIC_TABLE_LIMIT)
    for name in required:
        if name not in columns:
            raise UserError(
                f"{table} has no {name!r} column, which a MIMIC-CXR-JPG {kind} table has "
                f"({', '.join(required)})."
            )
    return columns, rows


def report_sections(text: str) -> dict[str, str]:
    """The sections of a MIMIC-CXR free-text report: upper-case header -> its text, whitespace collapsed.

    The ``FINAL REPORT`` line and the headers themselves are dropped, as is text before the first
    header; a header given twice has its texts joined; empty sections are left out.
    """
    kept = "\n".join(line for line in text.splitlines() if " ".join(line.split()) != "FINAL REPORT")
    found = list(_REPORT_HEADER.finditer(kept))
    sections: dict[str, str] = {}
    for k, match in enumerate(found):
        end = found[k + 1].start() if k + 1 < len(found) else len(kept)
        body = " ".join(kept[match.end() : end].split())
        name = " ".join(match.group(1).split())
        if body:
            sections[name] = f"{sections[name]} {body}" if name in sections else body
    return sections


def report_text(sections: dict[str, str], choice: str) -> tuple[str, str] | None:
    """(text, where it came from) for ``--report-section choice``, falling back to the other section.

    ``both`` is FINDINGS then IMPRESSION; a report's "FINDINGS AND IMPRESSION:" section serves as
    either. None when the report has neither.
    """
    combined = sections.get("FINDINGS AND IMPRESSION")
    findings = sections.get("FINDINGS") or combined
    impression = sections.get("IMPRESSION") or combined
    if choice == "both" and findings and impression:
        return (findings if findings == impression else f"{findings} {impression}"), "both"
    order = [("FINDINGS", findings), ("IMPRESSION", impression)]
    if choice == "impression":
        order.reverse()
    for name, text in order:
        if text:
            return text, name
    return None


def _template_fields(template: str) -> set[str]:
    """The field names ``template`` uses (``{report}``, ``{labels}``...); malformed templates name none."""
    from string import Formatter

    try:
        names = [name for _, name, _, _ in Formatter().parse(template) if name]
    except ValueError:
        return set()  # render_prompt says what is wrong with it
    return {re.split(r"[.\[]", name, maxsplit=1)[0] for name in names}


def _mimic_images(
    spec: TrainSpec, data: str, root: Path, meta: Path, split_table: Path
) -> tuple[list[tuple[str, dict, str, str, Path]], int, int, int]:
    """([(where, metadata row, subject, study, image)], images listed, left out by --split, by --view)."""
    _, split_rows = _mimic_rows(split_table, ("dicom_id", "split"), "split")
    splits = {row["dicom_id"].strip(): row["split"].strip() for _, row in split_rows}
    del split_rows
    if spec.split not in set(splits.values()):
        known = ", ".join(sorted(set(splits.values()) - {""})) or "(none)"
        raise UserError(f"--split {spec.split}: {split_table.name} has the splits {known}.")
    _, meta_rows = _mimic_rows(meta, ("dicom_id", "subject_id", "study_id", "ViewPosition"), "metadata")
    views = MIMIC_VIEWS.get(spec.view)
    kept, other_split, other_view = [], 0, 0
    for n, row in meta_rows:
        if splits.get(row["dicom_id"].strip(), "") != spec.split:
            other_split += 1
        elif views is not None and row["ViewPosition"].strip().upper() not in views:
            other_view += 1
        else:
            kept.append((n, row))
    total = len(meta_rows)
    del meta_rows, splits
    if not kept:
        raise UserError(
            f"--data {data}: no image is left after the filters ({total} in {meta.name}: {other_split} left "
            f"out by --split {spec.split}, {other_view} by --view {spec.view})."
        )
    if spec.max_samples is not None:
        kept = kept[: spec.max_samples]
    images = _Below(root / "files", root)
    selected = []
    for n, row in kept:
        where = f"{meta.name} row {n}"
        subject, study, dicom = (row[c].strip() for c in ("subject_id", "study_id", "dicom_id"))
        if not (subject.isdigit() and study.isdigit() and dicom and not _PATH_CHARS.search(dicom)):
            raise UserError(
                f"{where}: subject_id {subject!r}, study_id {study!r}, dicom_id {dicom!r} do not name an image "
                "(subject and study ids are numbers, a dicom_id is one file name)."
            )
        image = images((f"p{subject[:2]}", f"p{subject}", f"s{study}", f"{dicom}.jpg"), where)
        selected.append((where, row, subject, study, image))
    return selected, total, other_split, other_view


def _mimic_reports(
    spec: TrainSpec, root: Path, studies: set[tuple[str, str]]
) -> tuple[Path, dict[tuple[str, str], tuple[str, str] | None], set[tuple[str, str]]]:
    """(folder searched, {study: (text, section) or None}, studies without a report file)."""
    from pie_cli.imaging.files import read_text_file

    base = root / "files"
    if spec.reports:
        base = Path(spec.reports).expanduser()
        if not base.is_dir():
            raise UserError(f"--reports {spec.reports} is not a folder.")
        if (base / "files").is_dir():
            base = base / "files"
    below = _Below(base, base)
    texts: dict[tuple[str, str], tuple[str, str] | None] = {}
    no_file: set[tuple[str, str]] = set()
    for subject, study in sorted(studies):
        report = below((f"p{subject[:2]}", f"p{subject}", f"s{study}.txt"), f"study s{study}")
        if not report.is_file():
            no_file.add((subject, study))
            continue
        text = read_text_file(report, f"report of study s{study}", limit=1 << 20)
        texts[(subject, study)] = report_text(report_sections(text), spec.report_section)
    if len(no_file) == len(studies):
        raise UserError(
            f"--report-section {spec.report_section}: no report was found for any of the {len(studies)} "
            f"selected studies under {base} (pNN/pSUBJECT/sSTUDY.txt); point --reports at the unpacked "
            "MIMIC-CXR reports, or use --report-section labels."
        )
    return base, texts, no_file


def _mimic(spec: TrainSpec, data: str, path: Path) -> TrainingData:
    root = path if path.is_dir() else path.parent
    tables = {kind: _mimic_table(root, kind) for kind in ("metadata", "split")}
    for kind, table in tables.items():
        if table is None:
            raise UserError(
                f"--data {data} is not a MIMIC-CXR-JPG root: it has no {MIMIC_PREFIX}{kind}.csv or "
                f"{MIMIC_PREFIX}{kind}.csv.gz."
            )
    meta = Path(tables["metadata"] or "")

    # 1. Images: the metadata joined with the official split, filtered by --split and --view.
    selected, total, other_split, other_view = _mimic_images(
        spec, data, root, meta, Path(tables["split"] or "")
    )
    studies = {(subject, study) for _, _, subject, study, _ in selected}

    # 2. Report sections, read once per study.
    texts: dict[tuple[str, str], tuple[str, str] | None] = {}
    no_file: set[tuple[str, str]] = set()
    base = root / "files"
    if spec.report_section != "labels":
        base, texts, no_file = _mimic_reports(spec, root, studies)

    # 3. Labels, where a prompt needs them: the labels prompt (chosen, or a fallback) or a template naming them.
    fields_used = _template_fields(spec.prompt_template)
    with_report = "report" in fields_used
    need_labels = spec.report_section == "labels" or any(texts.get(s) is None for s in studies)
    need_labels = need_labels or (with_report and bool(fields_used & {"labels", *CHEXPERT_OBSERVATIONS}))
    labels_of: dict[str, dict] = {}
    label_table, observations = None, []
    if need_labels:
        label_table = _mimic_table(root, "chexpert") or _mimic_table(root, "negbio")
        if label_table is None:
            raise UserError(
                f"--data {data} has no {MIMIC_PREFIX}chexpert.csv[.gz] or {MIMIC_PREFIX}negbio.csv[.gz], "
                "whose labels these prompts need (--report-section labels, a study without the section, or "
                "--prompt-template)."
            )
        columns, label_rows = _mimic_rows(label_table, ("study_id",), "label")
        observations = [c for c in CHEXPERT_OBSERVATIONS if c in columns]
        wanted = {study for _, study in studies}
        labels_of = {r["study_id"].strip(): r for _, r in label_rows if r["study_id"].strip() in wanted}
        del label_rows

    # 4. One prompt per image.
    instance = spec.instance_prompt if spec.instance_prompt is not None else DEFAULT_INSTANCE["mimic-cxr"]
    origins: Counter[str] = Counter()
    unlabelled: set[str] = set()
    records = []
    for where, row, subject, study, image in selected:
        label_row = labels_of.get(study, {})
        if need_labels and not label_row:
            unlabelled.add(study)
        labels = _chexpert_labels(label_row, observations, spec.uncertain) if label_row else ""
        chosen = texts.get((subject, study))
        if chosen is not None:
            report, origin = chosen
        elif spec.report_section == "labels":
            report, origin = labels, "labels"
        else:
            report, origin = labels, "no report" if (subject, study) in no_file else "no section"
        fields = {
            **row,
            **label_row,
            "instance": instance,
            "labels": labels,
            "report": report,
            "caption": report,
        }
        if chosen is not None and not with_report:
            prompt = report
        else:
            prompt = render_prompt(spec.prompt_template, fields, where)
        records.append(Record(image, prompt, where))
        origins[origin] += 1
    notes = []
    if other_split:
        notes.append(f"{other_split} of {total} images left out by --split {spec.split} (other splits).")
    notes += _fallback_notes(spec.report_section, origins, len(records), base, label_table)
    if unlabelled and label_table is not None:
        notes.append(
            f"{len(unlabelled)} of {len(studies)} studies without a row in {label_table.name}: "
            "their {labels} are empty."
        )
    return TrainingData(records, "mimic-cxr", data, skipped=other_view, notes=tuple(notes))


def _fallback_notes(
    chosen: str, origins: Counter, images: int, base: Path, label_table: Path | None
) -> list[str]:
    """One line per kind of fallback taken, with its number of images."""
    notes = []
    other = {"impression": "FINDINGS", "findings": "IMPRESSION"}.get(chosen)
    if other and origins[other]:
        notes.append(
            f"{origins[other]} of {images} prompts from {other}: the report has no {chosen.upper()}."
        )
    if chosen == "both":
        for name, missing in (("FINDINGS", "IMPRESSION"), ("IMPRESSION", "FINDINGS")):
            if origins[name]:
                notes.append(
                    f"{origins[name]} of {images} prompts from {name} alone: the report has no {missing}."
                )
    table = f" ({label_table.name})" if label_table is not None else ""
    if origins["no section"]:
        notes.append(
            f"{origins['no section']} of {images} prompts from the labels{table}: the report has neither "
            "FINDINGS nor IMPRESSION."
        )
    if origins["no report"]:
        notes.append(
            f"{origins['no report']} of {images} prompts from the labels{table}: no report under {base}."
        )
    return notes


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
    "mimic-cxr": DataFormat(
        _mimic,
        root=lambda p: _mimic_table(p, "metadata") is not None and (p / "files").is_dir(),
        table=lambda p, h: (
            p.name.lower() in (f"{MIMIC_PREFIX}metadata.csv", f"{MIMIC_PREFIX}metadata.csv.gz")
        ),
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
