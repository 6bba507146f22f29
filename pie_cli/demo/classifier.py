"""The phantom-domain disease-severity classifier: a tiny CNN, weights in safetensors beside its config.

For each finding (``effusion_left``, ``effusion_right``, ``cardiomegaly``) it predicts the grade
0-3. Its outputs are, per finding, the probability that the finding is present (1 - P(grade 0),
the "confidence" the PIE paper evaluates with) and, as ``<finding>_severity``, the expected
grade divided by 3 (which keeps rising while a finding grows after it is certainly present).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

FINDINGS = ("effusion_left", "effusion_right", "cardiomegaly")
GRADES = 4
LABELS = FINDINGS + tuple(f"{f}_severity" for f in FINDINGS)
INPUT_SIZE = 64
WEIGHTS = "classifier.safetensors"
CONFIG = "config.json"


class FindingNet(nn.Module):
    """Grey 64 x 64 image in [-1, 1] -> grade logits [B, findings, 4]."""

    def __init__(self, labels: tuple[str, ...] = FINDINGS, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for out in (width, 2 * width, 4 * width, 4 * width):
            layers += [
                nn.Conv2d(channels, out, 3, padding=1),
                nn.GroupNorm(4, out),
                nn.SiLU(),
                nn.MaxPool2d(2),
            ]
            channels = out
        self.features = nn.Sequential(*layers)  # 64 -> 4
        # Keep where things are (left vs right matters): flatten the 4 x 4 map rather than pooling it away.
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * 16, 64), nn.SiLU(), nn.Linear(64, len(labels) * GRADES)
        )
        self.findings = tuple(labels)
        self.width = width

    @property
    def labels(self) -> tuple[str, ...]:
        return self.findings + tuple(f"{f}_severity" for f in self.findings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).view(x.shape[0], len(self.findings), GRADES)


def to_input(images: list[Image.Image]) -> torch.Tensor:
    """PIL images (any mode/size) -> [B, 1, 64, 64] in [-1, 1]."""
    arrays = []
    for img in images:
        grey = img.convert("L")
        if grey.size != (INPUT_SIZE, INPUT_SIZE):
            grey = grey.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BOX)
        arrays.append(np.asarray(grey, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays))[:, None]


def save(model: FindingNet, directory: Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / WEIGHTS))
    config = {
        "architecture": "FindingNet",
        "findings": list(model.findings),
        "grades": GRADES,
        "outputs": list(model.labels),
        "width": model.width,
        "input_size": INPUT_SIZE,
        **(extra or {}),
    }
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load(directory: Path) -> FindingNet:
    from safetensors.torch import load_file

    config = json.loads((directory / CONFIG).read_text())
    model = FindingNet(tuple(config["findings"]), int(config["width"]))
    model.load_state_dict(load_file(str(directory / WEIGHTS)))
    return model.eval()


def builtin_dir() -> Path:
    return Path(__file__).parent / "classifier"


@torch.no_grad()
def predict(model: FindingNet, images: list[Image.Image]) -> np.ndarray:
    """[len(images), len(model.labels)]: presence probabilities, then expected grade / 3, per finding."""
    probs = torch.softmax(model(to_input(images)), dim=-1)  # [B, F, 4]
    presence = 1.0 - probs[..., 0]
    severity = (probs * torch.arange(GRADES, dtype=probs.dtype)).sum(dim=-1) / (GRADES - 1)
    return torch.cat([presence, severity], dim=1).numpy()
