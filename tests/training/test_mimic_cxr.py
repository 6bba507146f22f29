"""`pie finetune --data-format mimic-cxr`: a MIMIC-CXR-JPG root as PhysioNet ships it, with its reports.

Every test writes a small fake tree in the real layout (metadata / split / CheXpert-label tables,
some gzip-compressed, ``files/pNN/pSUBJECT/sSTUDY/DICOM.jpg`` and the MIMIC-CXR reports
``files/pNN/pSUBJECT/sSTUDY.txt``). The reports are invented text with the real reports' shape.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.helpers import finetune_argv

METADATA_COLUMNS = (
    "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
    "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
    "PatientOrientationCodeSequence_CodeMeaning"
)
LABEL_COLUMNS = (
    "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,"
    "Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices"
)
# name -> (dicom_id, subject_id, study_id, ViewPosition, split), in the metadata table's order
IMAGES = {
    "a_pa": ("0a1b2c3d-11111111-22222222-33333333-44444444", "10000032", "50414267", "PA", "train"),
    "a_lat": ("0a1b2c3d-55555555-66666666-77777777-88888888", "10000032", "50414267", "LATERAL", "train"),
    "b_ap": ("1f2e3d4c-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd", "10000032", "53189527", "AP", "train"),
    "c_pa": ("2c3d4e5f-12121212-34343434-56565656-78787878", "11000011", "51111111", "PA", "train"),
    "d_val": ("3d4e5f60-13131313-24242424-35353535-46464646", "12000012", "52222222", "PA", "validate"),
    "e_blank": ("4e5f6071-57575757-68686868-79797979-80808080", "13000013", "53333333", "", "train"),
    "f_noreport": ("5f607182-91919191-a2a2a2a2-b3b3b3b3-c4c4c4c4", "14000014", "54444444", "AP", "train"),
    "g_nosection": ("60718293-d5d5d5d5-e6e6e6e6-f7f7f7f7-08080808", "15000015", "55555555", "PA", "train"),
    "h_test": ("718293a4-19191919-2a2a2a2a-3b3b3b3b-4c4c4c4c", "16000016", "56666666", "PA", "test"),
}
# study -> {observation: value}: 1.0 positive, 0.0 negative, -1.0 uncertain, absent = blank
LABELS = {
    "50414267": {"No Finding": "1.0"},
    "53189527": {"Cardiomegaly": "1.0", "Edema": "-1.0"},
    "51111111": {
        "Atelectasis": "-1.0",
        "Pleural Effusion": "1.0",
        "Support Devices": "1.0",
        "Fracture": "0.0",
    },
    "52222222": {"Pneumonia": "1.0"},
    "53333333": {"Lung Opacity": "1.0"},
    "54444444": {"Pneumothorax": "1.0", "Fracture": "0.0"},
    "55555555": {"Consolidation": "1.0", "Edema": "1.0"},  # CheXpert's order names Edema first
    "56666666": {"No Finding": "1.0"},
}
A_FINDINGS = (
    "PA and lateral views of the chest were obtained. A small left pleural effusion layers posteriorly. "
    "The cardiomediastinal silhouette is within normal limits. No pneumothorax."
)
A_IMPRESSION = "Small left pleural effusion. No pneumothorax."
B_FINDINGS = "The heart is moderately enlarged. Mild pulmonary vascular congestion without overt edema."
C_IMPRESSION = "Moderate right pleural effusion, larger than on the study of ___."
REPORTS = {
    # Wrapped lines, the FINAL REPORT line, the usual headers, both sections.
    "50414267": (
        "                                 FINAL REPORT\n"
        " EXAMINATION:  CHEST (PA AND LAT)\n"
        " \n"
        " INDICATION:  ___F with cough and fever  // eval for pneumonia\n"
        " \n"
        " TECHNIQUE:  Chest PA and lateral\n"
        " \n"
        " COMPARISON:  None.\n"
        " \n"
        " FINDINGS: \n"
        " \n"
        " PA and lateral views of the chest were obtained.  A small left pleural effusion\n"
        " layers posteriorly. The cardiomediastinal silhouette is within normal limits.\n"
        " No pneumothorax.\n"
        " \n"
        " IMPRESSION: \n"
        " \n"
        " Small left pleural effusion.  No pneumothorax.\n"
    ),
    # No IMPRESSION; a time with a colon inside the text; a section after FINDINGS.
    "53189527": (
        "                                 FINAL REPORT\n"
        " HISTORY:  Shortness of breath.\n"
        "\n"
        " FINDINGS:  The heart is moderately enlarged.  Mild pulmonary vascular\n"
        " congestion without overt edema.\n"
        "\n"
        " NOTIFICATION:  Discussed with Dr. ___ at 3:45 pm on the day of the study.\n"
    ),
    # IMPRESSION only, its text on the header's line; Windows line ends.
    "51111111": (
        "                                 FINAL REPORT\r\n"
        " EXAMINATION:  CHEST (PORTABLE AP)\r\n"
        " INDICATION:  Effusion follow-up.\r\n"
        " IMPRESSION:  Moderate right pleural effusion, larger than on the study\r\n"
        " of ___.\r\n"
    ),
    "52222222": " FINAL REPORT\n FINDINGS:  Right lower lobe opacity.\n IMPRESSION:  Pneumonia.\n",
    "53333333": " FINAL REPORT\n IMPRESSION:  Left basilar opacity.\n",
    # 54444444 has no report file.
    # Neither FINDINGS nor IMPRESSION.
    "55555555": (
        "                                 FINAL REPORT\n"
        " INDICATION:  Line placement.\n"
        " COMPARISON:  Chest radiograph of ___.\n"
    ),
    "56666666": " FINAL REPORT\n IMPRESSION:  No acute process.\n",
}
META = "mimic-cxr-2.0.0-metadata.csv"
SPLIT = "mimic-cxr-2.0.0-split.csv"
CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv"


def _write_table(path: Path, text: str, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def mimic_tree(root: Path, gz: tuple[str, ...] = (META, CHEXPERT), reports: Path | None = None) -> Path:
    """A MIMIC-CXR-JPG root: the three tables (those in ``gz`` compressed), JPEGs, and the reports
    under ``reports`` (default: beside the study folders, as unpacked from MIMIC-CXR)."""
    root.mkdir(parents=True)
    meta, split = [METADATA_COLUMNS], ["dicom_id,study_id,subject_id,split"]
    for k, (dicom, subject, study, view, part) in enumerate(IMAGES.values()):
        meta.append(
            f"{dicom},{subject},{study},CHEST (PA AND LAT),{view},48,40,21800506,213014.531,"
            f"CHEST (PA AND LAT),{'postero-anterior' if view == 'PA' else ''},Erect"
        )
        split.append(f"{dicom},{study},{subject},{part}")
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("L", (40, 48), 40 + 20 * k).save(folder / f"{dicom}.jpg", quality=90)
    observations = LABEL_COLUMNS.split(",")[2:]
    labels = [LABEL_COLUMNS]
    subjects = {study: subject for _, subject, study, _, _ in IMAGES.values()}
    for study, values in LABELS.items():
        labels.append(",".join([subjects[study], study, *(values.get(o, "") for o in observations)]))
    _write_table(root / META, "\n".join(meta) + "\n", META in gz)
    _write_table(root / SPLIT, "\n".join(split) + "\n", SPLIT in gz)
    _write_table(root / CHEXPERT, "\n".join(labels) + "\n", CHEXPERT in gz)
    base = reports if reports is not None else root / "files"
    for study, text in REPORTS.items():
        subject = subjects[study]
        report = base / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_bytes(text.encode())
    return root


@pytest.fixture
def mimic(tmp_path) -> Path:
    return mimic_tree(tmp_path / "mimic-cxr-jpg")


def _load(root: Path, **options):
    from pie_cli.training.config import TrainSpec
    from pie_cli.training.data import load_data

    return load_data(TrainSpec(data=str(root), **options))


def _image(root: Path, name: str) -> Path:
    dicom, subject, study, _, _ = IMAGES[name]
    return (root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg").resolve()


def _prompts(data, root: Path) -> dict[str, str]:
    """{image name in IMAGES: its prompt}, in the records' order."""
    names = {_image(root, name): name for name in IMAGES}
    return {names[r.image]: r.prompt for r in data.records}


# --------------------------------------------------------------------------- reports


def test_report_sections_drop_headers_and_join_wrapped_lines():
    from pie_cli.training.formats import report_sections, report_text

    sections = report_sections(REPORTS["50414267"])
    assert sections == {
        "EXAMINATION": "CHEST (PA AND LAT)",
        "INDICATION": "___F with cough and fever // eval for pneumonia",
        "TECHNIQUE": "Chest PA and lateral",
        "COMPARISON": "None.",
        "FINDINGS": A_FINDINGS,
        "IMPRESSION": A_IMPRESSION,
    }
    second = report_sections(REPORTS["53189527"])
    assert second["FINDINGS"] == B_FINDINGS and "IMPRESSION" not in second
    assert second["NOTIFICATION"] == "Discussed with Dr. ___ at 3:45 pm on the day of the study."
    assert report_sections(REPORTS["51111111"])["IMPRESSION"] == C_IMPRESSION
    assert report_text(sections, "impression") == (A_IMPRESSION, "IMPRESSION")
    assert report_text(sections, "findings") == (A_FINDINGS, "FINDINGS")
    assert report_text(sections, "both") == (f"{A_FINDINGS} {A_IMPRESSION}", "both")
    assert report_text(second, "impression") == (B_FINDINGS, "FINDINGS")
    assert report_text(second, "both") == (B_FINDINGS, "FINDINGS")
    assert report_text(report_sections(REPORTS["55555555"]), "impression") is None
    assert report_text(report_sections(" FINDINGS:\n \n IMPRESSION:\n"), "both") is None  # empty sections
    wet = report_sections(
        " WET READ: ___ ___ 9:12 PM\n  Small left effusion.\n ______________\n"
        "                                 FINAL REPORT\n INDICATION:  Dyspnea.\n IMPRESSION:  Small left effusion.\n"
    )
    assert wet == {
        "WET READ": "___ ___ 9:12 PM Small left effusion. ______________",  # the FINAL REPORT line is no text
        "INDICATION": "Dyspnea.",
        "IMPRESSION": "Small left effusion.",
    }
    combined = report_sections(" FINAL REPORT\n FINDINGS AND IMPRESSION:  No acute\n process.\n")
    assert report_text(combined, "impression") == ("No acute process.", "IMPRESSION")
    assert report_text(combined, "findings") == ("No acute process.", "FINDINGS")
    assert report_text(combined, "both") == ("No acute process.", "both")  # said once


# --------------------------------------------------------------------------- prompts and filters

FRONTAL_TRAIN = ["a_pa", "b_ap", "c_pa", "f_noreport", "g_nosection"]
LABEL_PROMPTS = {
    "a_pa": "A chest X-ray image, No Finding",
    "b_ap": "A chest X-ray image, Cardiomegaly",
    "c_pa": "A chest X-ray image, Pleural Effusion, Support Devices",
    "f_noreport": "A chest X-ray image, Pneumothorax",
    "g_nosection": "A chest X-ray image, Edema, Consolidation",
}
PROMPTS = {
    "impression": {"a_pa": A_IMPRESSION, "b_ap": B_FINDINGS, "c_pa": C_IMPRESSION},
    "findings": {"a_pa": A_FINDINGS, "b_ap": B_FINDINGS, "c_pa": C_IMPRESSION},
    "both": {"a_pa": f"{A_FINDINGS} {A_IMPRESSION}", "b_ap": B_FINDINGS, "c_pa": C_IMPRESSION},
    "labels": {},
}
FALLBACK_NOTES = {
    "impression": ["1 of 5 prompts from FINDINGS: the report has no IMPRESSION."],
    "findings": ["1 of 5 prompts from IMPRESSION: the report has no FINDINGS."],
    "both": [
        "1 of 5 prompts from FINDINGS alone: the report has no IMPRESSION.",
        "1 of 5 prompts from IMPRESSION alone: the report has no FINDINGS.",
    ],
    "labels": [],
}


@pytest.mark.parametrize("section", list(PROMPTS))
def test_prompts_per_image_for_each_report_section(mimic, section):
    data = _load(mimic, report_section=section)
    assert data.format == "mimic-cxr" and data.skipped == 2  # the lateral view and the blank ViewPosition
    assert _prompts(data, mimic) == {**LABEL_PROMPTS, **PROMPTS[section]}
    assert list(_prompts(data, mimic)) == FRONTAL_TRAIN  # the metadata table's order
    assert data.records[0].where == "mimic-cxr-2.0.0-metadata.csv.gz row 2"
    split_note = "2 of 9 images left out by --split train (other splits)."
    labels_notes = [
        "1 of 5 prompts from the labels (mimic-cxr-2.0.0-chexpert.csv.gz): the report has neither FINDINGS "
        "nor IMPRESSION.",
        f"1 of 5 prompts from the labels (mimic-cxr-2.0.0-chexpert.csv.gz): no report under {mimic / 'files'}.",
    ]
    assert data.notes == (
        split_note,
        *FALLBACK_NOTES[section],
        *([] if section == "labels" else labels_notes),
    )


def test_labels_follow_uncertain_and_the_template_knows_report_and_columns(mimic):
    data = _load(mimic, report_section="labels", uncertain="positive", instance_prompt="Chest radiograph")
    assert _prompts(data, mimic)["b_ap"] == "Chest radiograph, Cardiomegaly, Edema"
    assert _prompts(data, mimic)["c_pa"] == "Chest radiograph, Atelectasis, Pleural Effusion, Support Devices"
    templated = _load(mimic, prompt_template="{instance} ({ViewPosition}): {report}")
    assert _prompts(templated, mimic) == {
        "a_pa": f"A chest X-ray image (PA): {A_IMPRESSION}",
        "b_ap": f"A chest X-ray image (AP): {B_FINDINGS}",
        "c_pa": f"A chest X-ray image (PA): {C_IMPRESSION}",
        "f_noreport": "A chest X-ray image (AP): Pneumothorax",  # {report} is the labels where it falls back
        "g_nosection": "A chest X-ray image (PA): Edema, Consolidation",
    }


def test_view_split_and_max_samples_filters(mimic):
    lateral = _load(mimic, view="lateral")
    assert list(_prompts(lateral, mimic)) == ["a_lat"] and lateral.skipped == 6
    assert lateral.records[0].prompt == A_IMPRESSION  # the study's report, whichever view
    every = _load(mimic, view="all")
    assert list(_prompts(every, mimic)) == [
        "a_pa", "a_lat", "b_ap", "c_pa", "e_blank", "f_noreport", "g_nosection"
    ]  # fmt: skip
    assert _prompts(every, mimic)["e_blank"] == "Left basilar opacity."
    validate = _load(mimic, split="validate")
    assert _prompts(validate, mimic) == {"d_val": "Pneumonia."}
    assert validate.notes == ("8 of 9 images left out by --split validate (other splits).",)
    first = _load(mimic, max_samples=2)
    assert list(_prompts(first, mimic)) == ["a_pa", "b_ap"]
    assert first.notes[1] == "1 of 2 prompts from FINDINGS: the report has no IMPRESSION."


@pytest.mark.parametrize("gz", [(), (META, SPLIT, CHEXPERT)], ids=["plain", "gzip"])
def test_plain_and_gzip_tables_read_alike_and_auto_detects_the_root(tmp_path, gz):
    from pie_cli.training.formats import detect_format

    root = mimic_tree(tmp_path / "m", gz=gz)
    assert detect_format(root) == "mimic-cxr"
    meta = root / (META + (".gz" if META in gz else ""))
    assert detect_format(meta) == "mimic-cxr"  # the metadata table itself names the root
    assert _prompts(_load(root), root) == {**LABEL_PROMPTS, **PROMPTS["impression"]}
    assert _prompts(_load(meta), root) == {**LABEL_PROMPTS, **PROMPTS["impression"]}
    assert _load(root).records[0].where == f"{meta.name} row 2"


def test_reports_in_their_own_tree(tmp_path):
    from pie_cli.errors import UserError

    reports = tmp_path / "mimic-cxr" / "2.0.0"
    root = mimic_tree(tmp_path / "jpg", reports=reports / "files")
    for given in (reports, reports / "files"):  # the folder holding files/, or files/ itself
        data = _load(root, reports=str(given))
        assert _prompts(data, root) == {**LABEL_PROMPTS, **PROMPTS["impression"]}
    # Without --reports the labels would be all there is: refused, naming the folder searched.
    with pytest.raises(UserError, match=r"no report was found for any of the 5 selected studies under"):
        _load(root)


def test_labels_table_is_needed_only_where_a_prompt_uses_it(tmp_path):
    from pie_cli.errors import UserError

    root = mimic_tree(tmp_path / "m")
    (root / (CHEXPERT + ".gz")).unlink()
    with pytest.raises(UserError) as refused:
        _load(root)  # two studies fall back to their labels
    assert str(refused.value) == (
        f"--data {root} has no mimic-cxr-2.0.0-chexpert.csv[.gz] or mimic-cxr-2.0.0-negbio.csv[.gz], whose "
        "labels these prompts need (--report-section labels, a study without the section, or --prompt-template)."
    )
    data = _load(root, max_samples=1)  # study 50414267 has its IMPRESSION: no labels needed
    assert [r.prompt for r in data.records] == [A_IMPRESSION]
    negbio = root / "mimic-cxr-2.0.0-negbio.csv"
    negbio.write_text(f"{LABEL_COLUMNS}\n10000032,50414267,,,,,,,,,,,,,1.0,\n")
    data = _load(root, report_section="labels", max_samples=2)
    assert [r.prompt for r in data.records] == ["A chest X-ray image, Pneumothorax", "A chest X-ray image"]
    assert (
        data.notes[-1]
        == "1 of 2 studies without a row in mimic-cxr-2.0.0-negbio.csv: their {labels} are empty."
    )


# --------------------------------------------------------------------------- the command line


def test_dry_run_lists_the_prompts_and_the_fallbacks(cli, mimic, tiny_model, tmp_path):
    out = tmp_path / "run"
    result = cli("finetune", "--data", mimic, "--model", tiny_model, "--out", out, "--dry-run", "--no-probe")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:10] == [
        f"5 examples (mimic-cxr: {mimic}, 2 left out by --view frontal)",
        f"  mimic-cxr-2.0.0-metadata.csv.gz row 2: {A_IMPRESSION}",
        f"  mimic-cxr-2.0.0-metadata.csv.gz row 4: {B_FINDINGS}",
        f"  mimic-cxr-2.0.0-metadata.csv.gz row 5: {C_IMPRESSION}",
        "  mimic-cxr-2.0.0-metadata.csv.gz row 8: A chest X-ray image, Pneumothorax",
        "  mimic-cxr-2.0.0-metadata.csv.gz row 9: A chest X-ray image, Edema, Consolidation",
        "note: 2 of 9 images left out by --split train (other splits).",
        "note: 1 of 5 prompts from FINDINGS: the report has no IMPRESSION.",
        "note: 1 of 5 prompts from the labels (mimic-cxr-2.0.0-chexpert.csv.gz): the report has neither "
        "FINDINGS nor IMPRESSION.",
        f"note: 1 of 5 prompts from the labels (mimic-cxr-2.0.0-chexpert.csv.gz): no report under {mimic / 'files'}.",
    ]
    assert not out.exists()


def _drop_column(root: Path, name: str, column: str) -> None:
    path = root / name
    text = gzip.decompress(path.read_bytes()).decode() if name.endswith(".gz") else path.read_text()
    rows = [line.split(",") for line in text.splitlines()]
    k = rows[0].index(column)
    text = "\n".join(",".join(r[:k] + r[k + 1 :]) for r in rows) + "\n"
    path.write_bytes(gzip.compress(text.encode())) if name.endswith(".gz") else path.write_text(text)


REFUSED = {
    "no metadata table": (
        lambda r, t: (r / f"{META}.gz").unlink(),
        ["--data-format", "mimic-cxr"],
        "--data {r} is not a MIMIC-CXR-JPG root: it has no mimic-cxr-2.0.0-metadata.csv or "
        "mimic-cxr-2.0.0-metadata.csv.gz.",
    ),
    "no split table": (
        lambda r, t: (r / SPLIT).unlink(),
        [],
        "--data {r} is not a MIMIC-CXR-JPG root: it has no mimic-cxr-2.0.0-split.csv or "
        "mimic-cxr-2.0.0-split.csv.gz.",
    ),
    "no ViewPosition column": (
        lambda r, t: _drop_column(r, f"{META}.gz", "ViewPosition"),
        [],
        "{r}/mimic-cxr-2.0.0-metadata.csv.gz has no 'ViewPosition' column, which a MIMIC-CXR-JPG metadata "
        "table has (dicom_id, subject_id, study_id, ViewPosition).",
    ),
    "no split column": (
        lambda r, t: _drop_column(r, SPLIT, "split"),
        [],
        "{r}/mimic-cxr-2.0.0-split.csv has no 'split' column, which a MIMIC-CXR-JPG split table has "
        "(dicom_id, split).",
    ),
    "nothing left after the filters": (
        lambda r, t: None,
        ["--split", "validate", "--view", "lateral"],
        "--data {r}: no image is left after the filters (9 in mimic-cxr-2.0.0-metadata.csv.gz: 8 left out by "
        "--split validate, 1 by --view lateral).",
    ),
    "unknown split": (
        lambda r, t: None,
        ["--split", "validation"],
        "--split validation: mimic-cxr-2.0.0-split.csv has the splits test, train, validate.",
    ),
    "no report anywhere": (
        lambda r, t: (t / "empty").mkdir(),
        ["--reports", "{t}/empty"],
        "--report-section impression: no report was found for any of the 5 selected studies under {t}/empty "
        "(pNN/pSUBJECT/sSTUDY.txt); point --reports at the unpacked MIMIC-CXR reports, or use "
        "--report-section labels.",
    ),
    "reports not a folder": (
        lambda r, t: None,
        ["--reports", "{t}/nowhere"],
        "--reports {t}/nowhere is not a folder.",
    ),
    "unknown report section": (
        lambda r, t: None,
        ["--report-section", "summary"],
        "--report-section must be one of impression, findings, both, labels; got 'summary'.",
    ),
    "truncated gzip": (
        lambda r, t: (r / f"{META}.gz").write_bytes((r / f"{META}.gz").read_bytes()[:-12]),
        [],
        "MIMIC-CXR table {r}/mimic-cxr-2.0.0-metadata.csv.gz cannot be decompressed (",
    ),
    "an id that is no number": (
        lambda r, t: (
            (r / f"{META}.gz").write_bytes(
                gzip.compress(f"{METADATA_COLUMNS}\nx1,../../etc,5,,PA,,,,,,,\n".encode())
            ),
            (r / SPLIT).write_text("dicom_id,study_id,subject_id,split\nx1,5,../../etc,train\n"),
        ),
        [],
        "mimic-cxr-2.0.0-metadata.csv.gz row 2: subject_id '../../etc', study_id '5', dicom_id 'x1' do not name "
        "an image (subject and study ids are numbers, a dicom_id is one file name).",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
def test_refusals_exit_2_with_one_sentence(cli, mimic, tiny_model, tmp_path, case):
    damage, extra, expected = REFUSED[case]
    damage(mimic, tmp_path)
    out = tmp_path / "run"
    args = [a.format(t=tmp_path) for a in extra]
    result = cli("finetune", "--data", mimic, "--model", tiny_model, "--out", out, "--dry-run", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
    assert expected.format(r=mimic, t=tmp_path) in " ".join(result.stderr.split())
    assert "Traceback" not in result.output and not out.exists()


# --------------------------------------------------------------------------- training


def test_two_training_steps_on_the_tree(cli, mimic, tiny_model, tmp_path):
    out = tmp_path / "run"
    argv = finetune_argv(mimic, tiny_model, out, "--max-steps", "2", "--checkpoint-every", "1000")
    result = cli(*argv, "--report-section", "both")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out / "pytorch_lora_weights.safetensors")
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["data"]["format"] == "mimic-cxr" and summary["data"]["examples"] == 5
    assert "finetune: 1 of 5 prompts from FINDINGS alone: the report has no IMPRESSION." in result.stderr
    config = yaml.safe_load((out / "training_config.yaml").read_text())
    assert config["report_section"] == "both" and config["reports"] is None


def test_an_image_listed_but_absent_is_refused_before_training(cli, mimic, tiny_model, tmp_path):
    missing = _image(mimic, "c_pa")
    missing.unlink()
    out = tmp_path / "run"
    result = cli(*finetune_argv(mimic, tiny_model, out, "--max-steps", "1"))
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: image {missing} (mimic-cxr-2.0.0-metadata.csv.gz row 5) does not exist."
    )
    assert not (out / "pytorch_lora_weights.safetensors").exists()


def test_the_mimic_recipe_is_a_valid_configuration(tmp_path):
    from pie_cli.training.config import merge, read_yaml

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "mimic-cxr-lora.yaml"
    values = read_yaml(recipe)
    assert values["data_format"] == "mimic-cxr" and values["report_section"] == "impression"
    spec = merge({"data": "d", "out": "o"}, {"data", "out"}, values)
    spec.check()
    assert spec.view == "frontal" and spec.split == "train" and spec.method == "lora"


# --------------------------------------------------------------------------- files


def test_a_gzip_table_is_decompressed_within_a_limit(tmp_path):
    from pie_cli.errors import UserError
    from pie_cli.imaging.files import read_csv

    bomb = tmp_path / "bomb.csv.gz"
    bomb.write_bytes(gzip.compress(b"a,b\n" + b"0" * (2 << 20) + b",1\n"))
    assert bomb.stat().st_size < 10_000
    with pytest.raises(UserError) as refused:
        read_csv(bomb, "table", limit=1 << 20)
    assert (
        str(refused.value) == f"table {bomb} is larger than 1 MB uncompressed; that is not a file pie reads."
    )
    table = tmp_path / "t.csv.gz"
    table.write_bytes(gzip.compress("x,y\n1,é\n\n2,3\n".encode()))
    assert read_csv(table, "table") == (["x", "y"], [(2, {"x": "1", "y": "é"}), (4, {"x": "2", "y": "3"})])
    table.write_bytes(b"x,y\n1,2\n")  # named .gz, but plain text
    with pytest.raises(UserError, match=r"^table .*t\.csv\.gz cannot be decompressed \(Not a gzipped file"):
        read_csv(table, "table")


def test_images_may_live_behind_a_linked_files_folder_but_not_link_out_of_it(tmp_path):
    from pie_cli.errors import UserError

    root = mimic_tree(tmp_path / "m")
    disk = tmp_path / "big-disk" / "files"
    disk.parent.mkdir()
    (root / "files").rename(disk)
    (root / "files").symlink_to(disk, target_is_directory=True)  # the images on another disk
    data = _load(root)
    assert data.records[0].image == _image(root, "a_pa") and str(disk) in str(data.records[0].image)
    outside = tmp_path / "elsewhere"
    (disk / "p11").rename(outside)
    (disk / "p11").symlink_to(outside, target_is_directory=True)  # a folder below files/ linking out
    with pytest.raises(UserError) as refused:
        _load(root)
    assert str(refused.value) == (
        f"mimic-cxr-2.0.0-metadata.csv.gz row 5: 'p11' escapes the data folder {root}; image paths must stay "
        "inside it."
    )
