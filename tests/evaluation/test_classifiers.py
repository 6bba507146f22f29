"""Real classifier formats for `pie evaluate --classifier` and `pie simulate --pace`: .pt2 programs,
Hugging Face image classifiers (multi-label sigmoid, AutoImageProcessor), torchxrayvision."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import phantom_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model, phantom) -> Path:
    return phantom_run(tmp_path_factory.mktemp("clf"), tiny_model, phantom)


def frames(run: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(run.glob("frame_*.png"))]


def confidences(run: Path) -> list[float]:
    return [f["confidence"] for f in json.loads((run / "metrics.json").read_text())["frames"]]


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_a_pt2_program_is_really_loaded(cli, run, tmp_path):
    """Exported for batch 1 (as most are): the frames go through one at a time."""
    model = Tiny().eval()
    path = tmp_path / "clf.pt2"
    torch.export.save(torch.export.export(model, (torch.rand(1, 3, 32, 32),)), str(path))
    path.with_suffix(".json").write_text(
        json.dumps({"labels": ["effusion", "edema", "other"], "input_size": 32, "activation": "sigmoid"})
    )
    result = cli("evaluate", run, "--classifier", path, "--target-label", "edema")
    assert result.exit_code == 0, result.output
    x = torch.stack(
        [
            torch.from_numpy(
                np.asarray(f.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float32) / 255
            ).permute(2, 0, 1)
            for f in frames(run)
        ]
    )
    with torch.no_grad():
        expected = torch.sigmoid(model(x))[:, 1].numpy()
    assert confidences(run) == pytest.approx(expected.tolist(), abs=1e-5)
    (tmp_path / "bad.pt2").write_bytes(b"not a program")
    result = cli("evaluate", run, "--classifier", tmp_path / "bad.pt2")
    assert result.exit_code == 2
    assert f"--classifier {tmp_path / 'bad.pt2'} is not a torch.export program" in result.stderr


def hf_classifier(folder: Path, multi: bool) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        id2label={0: "effusion", 1: "edema", 2: "cardiomegaly"},
        label2id={"effusion": 0, "edema": 1, "cardiomegaly": 2},
        problem_type="multi_label_classification" if multi else "single_label_classification",
    )
    torch.manual_seed(5)
    ViTForImageClassification(config).save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.4] * 3, image_std=[0.2] * 3
    ).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("multi", [True, False])
def test_hugging_face_classifiers_use_their_processor_and_the_right_activation(cli, run, tmp_path, multi):
    from transformers import AutoImageProcessor, ViTForImageClassification

    folder = hf_classifier(tmp_path / "vit", multi)
    result = cli("evaluate", run, "--classifier", folder, "--target-label", "edema")
    assert result.exit_code == 0, result.output
    model = ViTForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    pixels = processor(images=frames(run), return_tensors="pt").pixel_values
    plain = (pixels * 0.2 + 0.4 - 0.5) / 0.5  # what pie's own fallback normalisation would give
    assert (pixels - plain).abs().max() > 0.1  # so the processor's mean/std are what is tested
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    probs = torch.sigmoid(logits) if multi else torch.softmax(logits, dim=-1)
    assert confidences(run) == pytest.approx(probs[:, 1].tolist(), abs=1e-5)


STAND_IN = '''
"""A stand-in for torchxrayvision's public API (models.DenseNet, models.model_urls, datasets.normalize)."""
import os, socket, types
import numpy as np
import torch

SEEN = {}

def normalize(img, maxval, reshape=False):
    return (2 * (img.astype(np.float32) / maxval) - 1.0) * 1024

datasets = types.SimpleNamespace(normalize=normalize)

class DenseNet(torch.nn.Module):
    def __init__(self, weights=None, cache_dir=None):
        super().__init__()
        if weights == "densenet121-res224-nih":  # what a library does when it wants to download
            socket.create_connection(("127.0.0.1", 9)).close()
        folder = cache_dir or os.path.join(os.path.expanduser("~"), ".torchxrayvision", "models_data")
        path = os.path.join(folder, os.path.basename(model_urls["all"]["weights_url"]))
        saved = torch.load(path, map_location="cpu", weights_only=False)
        self.pathologies = saved["pathologies"]
        self.scale = saved["scale"]

    def forward(self, x):
        SEEN["shape"], SEEN["min"], SEEN["max"] = tuple(x.shape), float(x.min()), float(x.max())
        base = torch.sigmoid(x.mean(dim=(1, 2, 3)) / 1024 * self.scale)
        return torch.stack([base, 1 - base], dim=1)

ResNet = DenseNet
model_urls = {"all": {"weights_url": "https://example.invalid/v1/nih-pc-chex-densenet121-best.pt"},
              "nih": {"weights_url": "https://example.invalid/v1/nih-densenet121-best.pt"}}
models = types.SimpleNamespace(DenseNet=DenseNet, ResNet=ResNet, model_urls=model_urls)
'''


@pytest.fixture
def xrv_stand_in(tmp_path, monkeypatch):
    package = tmp_path / "site" / "torchxrayvision"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(STAND_IN))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "torchxrayvision", raising=False)
    weights = tmp_path / "downloads" / "my-weights.pt"
    weights.parent.mkdir()
    torch.save({"pathologies": ["Effusion", "Edema"], "scale": 3.0}, weights)
    yield weights
    sys.modules.pop("torchxrayvision", None)


def test_xrv_takes_the_users_file_and_xrvs_preprocessing(cli, run, xrv_stand_in):
    import socket

    connect = socket.socket.connect
    spec = f"xrv:densenet121-res224-all@{xrv_stand_in}"
    result = cli("evaluate", run, "--classifier", spec, "--target-label", "Effusion", "--allow-pickle")
    assert result.exit_code == 0, result.output
    seen = sys.modules["torchxrayvision"].SEEN
    assert seen["shape"] == (3, 1, 224, 224)  # grey, 224 px, every frame in one batch
    assert -1024 <= seen["min"] < seen["max"] <= 1024  # xrv's normalisation
    grey = [np.asarray(f.convert("L"), dtype=np.float32) for f in frames(run)]
    # Outputs are used as they are: no sigmoid or softmax on top of the model's calibrated values.
    expected = [1 / (1 + np.exp(-((2 * g / 255 - 1) * 1024).mean() / 1024 * 3.0)) for g in grey]
    assert confidences(run) == pytest.approx(expected, abs=2e-3)
    assert socket.socket.connect is connect  # the guard is lifted again


def test_xrv_never_downloads(cli, run, xrv_stand_in):
    spec = f"xrv:densenet121-res224-nih@{xrv_stand_in}"
    result = cli("evaluate", run, "--classifier", spec, "--allow-pickle")
    assert result.exit_code == 2
    assert "torchxrayvision could not read" in result.stderr and "pie never downloads" in result.stderr


@pytest.mark.parametrize(
    ("spec", "flags", "message"),
    [
        (
            "xrv:densenet121-res224-all",
            ("--allow-pickle",),
            "give the model and the weights file you downloaded",
        ),
        ("xrv:densenet121-res224-all@{missing}", ("--allow-pickle",), "is not a file"),
        ("xrv:densenet121-res224-all@{weights}", (), "torchxrayvision's weights are pickles"),
        (
            "xrv:nope@{weights}",
            ("--allow-pickle",),
            "torchxrayvision knows no model 'nope' (it knows: all, nih)",
        ),
    ],
)
def test_xrv_refusals(cli, run, xrv_stand_in, spec, flags, message):
    spec = spec.format(weights=xrv_stand_in, missing=xrv_stand_in.parent / "missing.pt")
    before = sorted(p.name for p in run.iterdir())
    result = cli("evaluate", run, "--classifier", spec, *flags)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written


def test_xrv_without_the_package_names_the_extra(cli, run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchxrayvision", None)  # import fails as if not installed
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    result = cli("evaluate", run, "--classifier", f"xrv:densenet121-res224-all@{weights}", "--allow-pickle")
    assert result.exit_code == 2
    assert "needs torchxrayvision: pip install 'pie-cli[xrv]'" in result.stderr
