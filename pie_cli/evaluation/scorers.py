"""Optional scorers for `pie evaluate`: a finding classifier and CLIP image similarity.

Classifiers (``--classifier``):
- ``demo``: the phantom classifier shipped with pie (effusion left/right, cardiomegaly);
- a folder with a Hugging Face image-classification model (``config.json`` with ``id2label``,
  safetensors weights, optional ``preprocessor_config.json`` for size/mean/std);
- a TorchScript (``torch.jit.save``) or ``.pt2`` (``torch.export.save``) file: it gets a float tensor [B, 3, S, S] in [0, 1] and
  returns logits [B, K]; a sidecar ``NAME.json`` may give ``labels``, ``input_size`` (S,
  default the frame size) and ``activation`` (``sigmoid`` or ``softmax``, the default).

CLIP (``--clip``): a local CLIP model folder; frames are resized, centre-cropped and
normalised the way CLIP was trained, and compared with frame 0 by cosine similarity.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pie_cli.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's training statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Classifier:
    name: str
    labels: tuple[str, ...]
    predict: Callable[[list[Image.Image]], np.ndarray]  # -> [N, K] probabilities


def _tensor(
    images: list[Image.Image], size: int | None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop=False
):
    import torch

    arrays = []
    for img in images:
        rgb = img.convert("RGB")
        if size is not None:
            if crop:
                from pie_cli.imaging.media import fit_square

                rgb = fit_square(rgb, size, Image.Resampling.BICUBIC)
            elif rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
        arr = (np.asarray(rgb, dtype=np.float32) / 255.0 - np.array(mean, np.float32)) / np.array(
            std, np.float32
        )
        arrays.append(arr.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays))


def _demo() -> Classifier:
    from pie_cli.demo import classifier as clf

    folder = clf.builtin_dir()
    if not (folder / clf.WEIGHTS).is_file():
        raise UserError(
            f"the built-in demo classifier is missing ({folder}); build it with `make demo-model`."
        )
    model = clf.load(folder)
    return Classifier("demo", model.labels, lambda images: clf.predict(model, images))


def _huggingface(folder: Path) -> Classifier:
    import torch
    from transformers import AutoModelForImageClassification

    try:
        model = AutoModelForImageClassification.from_pretrained(
            folder, local_files_only=True, use_safetensors=True
        )
    except (OSError, ValueError) as exc:
        raise UserError(
            f"--classifier {folder} is not a loadable image-classification model ({exc})."
        ) from None
    model.eval()
    labels = tuple(model.config.id2label[i] for i in range(len(model.config.id2label)))
    pre = {}
    if (folder / "preprocessor_config.json").is_file():
        pre = json.loads((folder / "preprocessor_config.json").read_text())
    size = pre.get("size", {}).get("height") if isinstance(pre.get("size"), dict) else pre.get("size")
    size = size or getattr(model.config, "image_size", 224)
    mean = pre.get("image_mean", (0.5, 0.5, 0.5)) if pre.get("do_normalize", True) else (0, 0, 0)
    std = pre.get("image_std", (0.5, 0.5, 0.5)) if pre.get("do_normalize", True) else (1, 1, 1)
    multi = getattr(model.config, "problem_type", None) == "multi_label_classification"

    @torch.no_grad()
    def predict(images):
        logits = model(pixel_values=_tensor(images, int(size), mean, std)).logits
        return (torch.sigmoid(logits) if multi else torch.softmax(logits, dim=-1)).numpy()

    return Classifier(str(folder), labels, predict)


def _torchscript(path: Path) -> Classifier:
    import torch

    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    try:
        model = torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError) as exc:
        raise UserError(
            f"--classifier {path} is not a TorchScript archive ({str(exc).splitlines()[0]})."
        ) from None
    size = meta.get("input_size")
    activation = meta.get("activation", "softmax")

    @torch.no_grad()
    def predict(images):
        logits = model(_tensor(images, size))
        return (torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, dim=-1)).numpy()

    labels = meta.get("labels")
    if labels is None:
        probe = predict([Image.new("RGB", (size or 64, size or 64))])
        labels = [str(i) for i in range(probe.shape[1])]
    return Classifier(str(path), tuple(labels), predict)


def load_classifier(spec: str) -> Classifier:
    if spec == "demo":
        return _demo()
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return _huggingface(path)
    if path.is_file():
        return _torchscript(path)
    raise UserError(
        f"--classifier {spec}: expected 'demo', a Hugging Face image-classification folder or a TorchScript file."
    )


def target_label(labels: tuple[str, ...], prompt: str | None, explicit: str | None) -> str:
    """The classifier output to follow: --target-label, else the label whose words all occur in the prompt."""
    if explicit is not None:
        if explicit not in labels:
            raise UserError(
                f"--target-label {explicit!r} is not one of the classifier's labels: {', '.join(labels)}."
            )
        return explicit
    words = set(re.findall(r"[a-z0-9]+", (prompt or "").lower()))
    scored = []
    for label in labels:
        parts = re.findall(r"[a-z0-9]+", label.lower())
        if parts and all(p in words for p in parts):
            scored.append((len(parts), label))
    if not scored:
        raise UserError(
            f"cannot tell which classifier label the prompt {prompt!r} is about; "
            f"name it with --target-label (one of {', '.join(labels)})."
        )
    return max(scored)[1]


class ClipImages:
    """CLIP image embeddings from a local model folder."""

    def __init__(self, folder: Path) -> None:
        from transformers import CLIPVisionModelWithProjection

        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(
                folder, local_files_only=True, use_safetensors=True
            ).eval()
        except (OSError, ValueError) as exc:
            raise UserError(f"--clip {folder} is not a loadable CLIP model ({exc}).") from None
        self.size = int(self.model.config.image_size)

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        import torch

        with torch.no_grad():
            emb = self.model(
                pixel_values=_tensor(images, self.size, CLIP_MEAN, CLIP_STD, crop=True)
            ).image_embeds
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return emb.numpy()


def score_column(labels: tuple[str, ...], label: str) -> str:
    """The output that measures ``label``'s severity: ``<label>_severity`` where the classifier grades it."""
    graded = f"{label}_severity"
    return graded if not label.endswith("_severity") and graded in labels else label


_LOADED: dict[str, Classifier] = {}


def pace_scorer(reference: str, target: str | None, prompt: str) -> tuple[Callable, dict]:
    """What `pie simulate --pace` follows: (frames -> one score each, a record of what is scored).

    The score is the classifier's severity of the target finding (expected grade / 3) where it
    grades findings, as the demo classifier does, else its probability. A cohort loads each
    classifier once.
    """
    classifier = cached_classifier(reference)
    try:
        label = target_label(classifier.labels, prompt, target)
    except UserError as exc:
        raise UserError(str(exc).replace("--target-label", "--target")) from None
    column = score_column(classifier.labels, label)
    index = classifier.labels.index(column)

    def score(images: list[Image.Image]) -> np.ndarray:
        return np.asarray(classifier.predict(images), dtype=np.float64)[:, index]

    kind = "severity (expected grade / 3)" if column != label else "probability"
    return score, {"classifier": reference, "target": label, "output": column, "score": kind}


def cached_classifier(reference: str) -> Classifier:
    """``load_classifier`` once per reference and process (a cohort or K trajectories share it)."""
    path = Path(reference).expanduser()
    files = sorted(path.rglob("*")) if path.is_dir() else [path] if path.is_file() else []
    # A file changed in place is loaded again: the key holds every file's size and time.
    key = (
        reference
        + "|"
        + ";".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file())
    )
    if key not in _LOADED:
        _LOADED[key] = load_classifier(reference)
    return _LOADED[key]
