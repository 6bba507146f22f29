"""Training data: image folders with metadata, tables, CheXpert, HAM10000, EyePACS, saved HF datasets."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from tests.helpers import colour_folder


def _spec(**kwargs):
    from pie_cli.training.config import TrainSpec

    return TrainSpec(**kwargs)


def test_folder_csv_and_tables(tmp_path):
    from pie_cli.training.data import load_data

    folder = colour_folder(tmp_path / "csvfolder", n=4, fmt="csv")
    data = load_data(_spec(data=str(folder)))
    assert data.format == "folder" and [r.prompt for r in data.records][:2] == [
        "a red square",
        "a blue square",
    ]
    table = tmp_path / "pairs.jsonl"
    shutil.copy(folder / "0.png", tmp_path / "x.png")
    table.write_text(json.dumps({"img": "x.png", "report": "small effusion", "side": "left"}) + "\n")
    data = load_data(
        _spec(
            data=str(table),
            image_column="img",
            prompt_template="{instance}, {side} {report}",
            instance_prompt="A chest X-ray",
        )
    )
    assert data.format == "jsonl" and data.records[0].prompt == "A chest X-ray, left small effusion"
    assert data.records[0].image == tmp_path / "x.png"


def test_chexpert_labels_uncertainty_and_views(tmp_path):
    from pie_cli.training.data import load_data

    root = tmp_path / "CheXpert-v1.0-small"
    header = (
        "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,Edema,Pleural Effusion,Support Devices\n"
    )
    rows = [
        "CheXpert-v1.0-small/train/p1/s1/view1_frontal.jpg,F,60,Frontal,AP,,1.0,-1.0,1.0,0.0\n",
        "CheXpert-v1.0-small/train/p1/s1/view2_lateral.jpg,F,60,Lateral,,,1.0,,,\n",
        "CheXpert-v1.0-small/train/p2/s1/view1_frontal.jpg,M,40,Frontal,PA,1.0,,,,\n",
    ]
    root.mkdir()
    (root / "train.csv").write_text(header + "".join(rows))
    for rel in ("p1/s1/view1_frontal.jpg", "p1/s1/view2_lateral.jpg", "p2/s1/view1_frontal.jpg"):
        (root / "train" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (16, 16)).save(root / "train" / rel)
    data = load_data(_spec(data=str(root)))
    assert data.format == "chexpert" and data.skipped == 1
    assert [r.prompt for r in data.records] == [
        "A chest X-ray image, Cardiomegaly, Pleural Effusion",
        "A chest X-ray image, No Finding",
    ]
    assert data.records[0].image == root / "train/p1/s1/view1_frontal.jpg"
    data = load_data(_spec(data=str(root / "train.csv"), uncertain="positive", view="all"))
    assert data.records[0].prompt == "A chest X-ray image, Cardiomegaly, Edema, Pleural Effusion"
    assert len(data.records) == 3 and data.records[1].prompt == "A chest X-ray image, Cardiomegaly"
    lateral = load_data(_spec(data=str(root), view="lateral", prompt_template="{labels} ({Sex}, {Age})"))
    assert [r.prompt for r in lateral.records] == ["Cardiomegaly (F, 60)"]


def test_ham10000_and_eyepacs(tmp_path):
    from pie_cli.training.data import load_data

    ham = tmp_path / "ham"
    (ham / "HAM10000_images_part_2").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(ham / "HAM10000_images_part_2" / "ISIC_0024306.jpg")
    (ham / "HAM10000_metadata.csv").write_text(
        "lesion_id,image_id,dx,dx_type,age,sex,localization\nHAM_0000118,ISIC_0024306,mel,histo,80.0,male,scalp\n"
    )
    data = load_data(_spec(data=str(ham)))
    assert data.format == "ham10000"
    assert data.records[0].prompt == "A dermoscopic image of a skin lesion, melanoma"

    dr = tmp_path / "dr"
    (dr / "train").mkdir(parents=True)
    for name in ("10_left", "10_right"):
        Image.new("RGB", (8, 8)).save(dr / "train" / f"{name}.jpeg")
    (dr / "trainLabels.csv").write_text("image,level\n10_left,0\n10_right,4\n")
    data = load_data(_spec(data=str(dr)))
    assert data.format == "eyepacs"
    assert [r.prompt for r in data.records] == [
        "A fundus photograph, no apparent diabetic retinopathy",
        "A fundus photograph, proliferative diabetic retinopathy",
    ]


def test_saved_hugging_face_dataset(tmp_path):
    datasets = pytest.importorskip(
        "datasets", reason="--data-format hf needs the optional `datasets` package"
    )

    from pie_cli.training.data import load_data

    ds = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (8, 8), (255, 0, 0))] * 2, "report": ["left effusion", "normal"]},
        features=datasets.Features({"image": datasets.Image(), "report": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    data = load_data(_spec(data=str(tmp_path / "saved")))
    assert data.format == "hf" and [r.prompt for r in data.records] == ["left effusion", "normal"]
    assert data.open(data.records[0]).size == (8, 8)
