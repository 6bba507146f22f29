"""The synthetic phantoms and `pie demo data|case`."""

from __future__ import annotations

import json

import numpy as np

from pie_cli.demo.phantom import Findings, render


def test_phantoms_are_deterministic_and_findings_local():
    a = render(Findings(), seed=11)
    b = render(Findings(), seed=11)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    sick = render(Findings(effusion_left=3), seed=11)
    diff = np.abs(np.asarray(sick.image, dtype=int) - np.asarray(a.image, dtype=int)) > 0
    left = np.asarray(a.left_lung) > 0
    assert diff.any() and diff[:, :28].sum() == 0  # only the image's right half (patient's left) changes
    assert diff[left].mean() > 0.2
    assert sick.report == "large left pleural effusion"
    assert render(Findings(cardiomegaly=2), seed=1).report == "moderate cardiomegaly"
    assert a.report == "no acute cardiopulmonary abnormality"


def test_demo_data_and_case_commands(cli, tmp_path):
    result = cli("demo", "data", "--out", tmp_path / "d", "-n", "12", "--findings", "effusion,cardiomegaly")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "d" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all((tmp_path / "d" / r["file_name"]).is_file() for r in rows)
    assert all((tmp_path / "d" / r["mask_left"]).is_file() for r in rows)
    assert {"text", "effusion_left", "effusion_right", "cardiomegaly"} <= set(rows[0])
    dry = cli("finetune", "--data", tmp_path / "d", "--model", "demo", "--out", tmp_path / "ft", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.startswith("12 examples (folder:")
    again = cli("demo", "data", "--out", tmp_path / "d", "-n", "2")
    assert again.exit_code == 2 and "is not empty; pass --overwrite" in again.stderr
    bad = cli("demo", "data", "--out", tmp_path / "e", "--findings", "pneumonia")
    assert bad.exit_code == 2 and "--findings 'pneumonia'" in bad.stderr

    result = cli("demo", "case", "--out", tmp_path / "case")
    assert result.exit_code == 0, result.output
    names = {p.name for p in (tmp_path / "case").iterdir()}
    assert names == {"chest.png", "left-lung.png", "right-lung.png", "truth.json", ".pie-files.json"}
    truth = json.loads((tmp_path / "case" / "truth.json").read_text())
    assert truth["report"] == "no acute cardiopulmonary abnormality" and truth["effusion_left"] == 0
