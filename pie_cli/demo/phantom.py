"""Synthetic chest-X-ray phantoms with graded findings (numpy + PIL, deterministic by seed).

Not anatomy: a body outline, two dark lung fields with rib shadows, a heart, a spine and
detector noise, with enough variation (size, position, rib phase, exposure) for a model to
learn, and findings of known severity:

- pleural effusion, left or right, severity 0-3: a dense region filling the lung base up
  to 20 / 40 / 65 % of its height, its upper border a meniscus rising laterally;
- cardiomegaly, severity 0-3: the heart widened by 12 % per grade.

Radiological convention: the patient's left is on the image's right. Every phantom comes
with its lung-field masks and ground-truth severities, and a short report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

SEVERITY_WORDS = {1: "small", 2: "moderate", 3: "large"}
CARDIO_WORDS = {1: "mild", 2: "moderate", 3: "severe"}
EFFUSION_FILL = {0: 0.0, 1: 0.20, 2: 0.40, 3: 0.65}
HEALTHY_REPORT = "no acute cardiopulmonary abnormality"


@dataclass(frozen=True)
class Findings:
    effusion_left: int = 0  # patient's left = image right
    effusion_right: int = 0
    cardiomegaly: int = 0

    def report(self) -> str:
        parts = []
        for side in ("left", "right"):
            sev = getattr(self, f"effusion_{side}")
            if sev:
                parts.append(f"{SEVERITY_WORDS[sev]} {side} pleural effusion")
        if self.cardiomegaly:
            parts.append(f"{CARDIO_WORDS[self.cardiomegaly]} cardiomegaly")
        return " and ".join(parts) if parts else HEALTHY_REPORT


@dataclass
class Phantom:
    image: Image.Image  # "L"
    left_lung: Image.Image  # "L" mask, 255 = the patient's left lung field (image right)
    right_lung: Image.Image
    findings: Findings
    seed: int
    params: dict = field(default_factory=dict)

    @property
    def report(self) -> str:
        return self.findings.report()


def _ellipse(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def render(
    findings: Findings, seed: int, size: int = 64, supersample: int = 4, varied: bool = False
) -> Phantom:
    """One phantom with the given findings; anatomy, exposure and noise vary with ``seed``.

    ``varied`` also varies how a finding looks (fluid level, meniscus, density, edge), for
    training a classifier that must judge generated images, not only these drawings.
    """
    rng = np.random.default_rng(seed)
    n = size * supersample
    y, x = np.mgrid[0:n, 0:n] / n  # coordinates in [0, 1)
    p = {
        "body_cx": 0.5 + rng.normal(0, 0.01),
        "body_cy": 0.56 + rng.normal(0, 0.01),
        "body_rx": 0.46 + rng.normal(0, 0.012),
        "body_ry": 0.52 + rng.normal(0, 0.012),
        "lung_dx": 0.19 + rng.normal(0, 0.008),
        "lung_cy": 0.46 + rng.normal(0, 0.012),
        "lung_rx": 0.13 + rng.normal(0, 0.006),
        "lung_ry": 0.28 + rng.normal(0, 0.012),
        "heart_cx": 0.545 + rng.normal(0, 0.008),
        "heart_cy": 0.64 + rng.normal(0, 0.01),
        "heart_rx": 0.14 + rng.normal(0, 0.006),
        "heart_ry": 0.12 + rng.normal(0, 0.005),
        "rib_phase": rng.uniform(0, 0.06),
        "exposure": rng.normal(0, 0.03),
        "contrast": 1 + rng.normal(0, 0.05),
        "noise": abs(rng.normal(0.02, 0.005)),
    }
    img = np.full((n, n), 0.06)
    body = _ellipse(y, x, p["body_cy"], p["body_cx"], p["body_ry"], p["body_rx"])
    img[body] = 0.52
    lungs = {}
    for side, sign in (("right", -1), ("left", 1)):  # patient's right lung is on the image's left
        cx = p["body_cx"] + sign * p["lung_dx"]
        lungs[side] = _ellipse(y, x, p["lung_cy"], cx, p["lung_ry"], p["lung_rx"])
        img[lungs[side]] = 0.20
    ribs = np.zeros_like(img, dtype=bool)
    for k in range(7):
        centre = 0.22 + p["rib_phase"] + 0.075 * k + 0.9 * (x - p["body_cx"]) ** 2
        ribs |= np.abs(y - centre) < 0.011
    any_lung = lungs["left"] | lungs["right"]
    img[ribs & any_lung] += 0.12
    heart_rx = p["heart_rx"] * (1 + 0.12 * findings.cardiomegaly)
    heart = _ellipse(
        y, x, p["heart_cy"], p["heart_cx"], p["heart_ry"] * (1 + 0.04 * findings.cardiomegaly), heart_rx
    )
    img[heart] = 0.60
    spine = (np.abs(x - p["body_cx"]) < 0.035) & body
    img[spine] = 0.72
    for side, sign in (("right", -1), ("left", 1)):
        sev = getattr(findings, f"effusion_{side}")
        if not sev:
            continue
        lung = lungs[side]
        cx = p["body_cx"] + sign * p["lung_dx"]
        bottom = p["lung_cy"] + p["lung_ry"]
        fill = EFFUSION_FILL[sev] * (rng.uniform(0.75, 1.25) if varied else 1.0)
        curve = rng.uniform(0.0, 0.09) if varied else 0.05
        density = rng.uniform(0.45, 0.66) if varied else 0.58
        edge = rng.uniform(0.02, 0.08) if varied else 0.04
        level = bottom - fill * 2 * p["lung_ry"]
        lateral = np.clip(sign * (x - cx) / p["lung_rx"], -1, 1)  # +1 at the lung's outer edge
        border = level - curve * (lateral + 1) ** 2  # the meniscus climbs along the chest wall
        fluid = lung & (y > border)
        depth = np.clip((y - border) / edge, 0, 1)  # a soft top edge
        img = np.where(fluid, 0.20 + (density - 0.20) * depth, img)
    img = (img - 0.5) * p["contrast"] + 0.5 + p["exposure"]
    img = np.clip(img, 0, 1)
    small = Image.fromarray((img * 255).round().astype(np.uint8), mode="L").resize(
        (size, size), Image.Resampling.BOX
    )
    arr = np.asarray(small, dtype=np.float64) + rng.normal(0, p["noise"] * 255, size=(size, size))
    image = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), mode="L")

    def mask(m: np.ndarray) -> Image.Image:
        m = m & ~heart
        return (
            Image.fromarray((m * 255).astype(np.uint8), mode="L")
            .resize((size, size), Image.Resampling.BOX)
            .point(lambda v: 255 if v >= 128 else 0)
        )

    return Phantom(image, mask(lungs["left"]), mask(lungs["right"]), findings, seed, p)


def sample_findings(
    rng: np.random.Generator, kinds: tuple[str, ...] = ("effusion",), healthy: float = 0.4
) -> Findings:
    """Findings for a training phantom: healthy with probability ``healthy``, else one finding of a random grade."""
    if rng.random() < healthy:
        return Findings()
    kind = kinds[int(rng.integers(len(kinds)))]
    sev = int(rng.integers(1, 4))
    if kind == "cardiomegaly":
        return Findings(cardiomegaly=sev)
    return Findings(**{f"effusion_{'left' if rng.random() < 0.5 else 'right'}": sev})


def chest_phantom(size: int = 256, seed: int = 0) -> tuple[Image.Image, Image.Image, Image.Image]:
    """(image, right-lung mask, left-lung mask) of a healthy phantom (kept for the tests and older callers)."""
    ph = render(Findings(), seed, size, supersample=2 if size > 128 else 4)
    return ph.image, ph.right_lung, ph.left_lung


def metadata(ph: Phantom, file_name: str) -> dict:
    return {"file_name": file_name, "text": ph.report, **asdict(ph.findings), "seed": ph.seed}
