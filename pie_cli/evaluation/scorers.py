"""Optional scorers for `pie evaluate`: a finding classifier and CLIP image similarity.

Classifiers (``--classifier``):
- ``demo``: the phantom classifier shipped with pie (effusion left/right, cardiomegaly);
- a folder with a Hugging Face image-classification model (``config.json`` with ``id2label``,
  safetensors weights); its ``preprocessor_config.json`` is applied by ``AutoImageProcessor``;
  a multi-label model (``problem_type`` ``multi_label_classification``) gets a sigmoid per
  label, others a softmax;
- a TorchScript (``torch.jit.save``) or ``.pt2`` (``torch.export.save``) file: it gets a float
  tensor [B, 3, S, S] in [0, 1] and returns logits [B, K]; a sidecar ``NAME.json`` may give
  ``labels``, ``input_size`` (S, default the frame size) and ``activation`` (``sigmoid`` or
  ``softmax``, the default);
- ``xrv:NAME@PATH``: a torchxrayvision model (``pip install 'pie-cli[xrv]'``), e.g.
  ``xrv:densenet121-res224-all@~/Downloads/nih-pc-chex-...-best.pt``: weights from the file the
  user downloaded (they are pickles: refused without ``--allow-pickle``), never fetched; frames
  go in as xrv expects (grey, [-1024, 1024], centre crop, 224 px) and its calibrated outputs
  are used as they are.

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
    from transformers import AutoImageProcessor, AutoModelForImageClassification

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
    processor = None
    if (folder / "preprocessor_config.json").is_file():
        try:
            processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"--classifier {folder}: its preprocessor_config.json cannot be used ({str(exc).splitlines()[0]})."
            ) from None
    size = int(getattr(model.config, "image_size", 224))
    multi = getattr(model.config, "problem_type", None) == "multi_label_classification"

    @torch.no_grad()
    def predict(images):
        if processor is not None:  # resize, crop, rescale and normalise exactly as the model was trained
            pixels = processor(
                images=[img.convert("RGB") for img in images], return_tensors="pt"
            ).pixel_values
        else:
            pixels = _tensor(images, size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        logits = model(pixel_values=pixels).logits
        return (torch.sigmoid(logits) if multi else torch.softmax(logits, dim=-1)).numpy()

    return Classifier(str(folder), labels, predict)


def _torchscript(path: Path) -> Classifier:
    import torch

    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    if path.suffix == ".pt2":
        try:
            model = torch.export.load(str(path)).module()
        except Exception as exc:
            raise UserError(
                f"--classifier {path} is not a torch.export program ({str(exc).splitlines()[0]})."
            ) from None
    else:
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
        x = _tensor(images, size)
        try:
            logits = model(x)
        except (RuntimeError, AssertionError):
            if len(images) == 1:
                raise
            # A program exported for a fixed batch (often 1) takes the frames one at a time.
            logits = torch.cat([model(x[i : i + 1]) for i in range(len(images))])
        return (torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, dim=-1)).numpy()

    labels = meta.get("labels")
    if labels is None:
        probe = predict([Image.new("RGB", (size or 64, size or 64))])
        labels = [str(i) for i in range(probe.shape[1])]
    return Classifier(str(path), tuple(labels), predict)


def _xrv(spec: str, allow_pickle: bool) -> Classifier:
    """``xrv:NAME@PATH``: a torchxrayvision model from the weights file the user downloaded."""
    import os
    import shutil
    import socket
    import tempfile

    import torch

    name, _, where = spec[len("xrv:") :].partition("@")
    if not name or not where:
        raise UserError(
            f"--classifier {spec}: give the model and the weights file you downloaded, "
            "e.g. xrv:densenet121-res224-all@/data/weights/densenet121-res224-all.pt (pie never downloads)."
        )
    weights = Path(where).expanduser()
    if not weights.is_file():
        raise UserError(f"--classifier {spec}: {weights} is not a file.")
    if not allow_pickle:
        raise UserError(
            f"--classifier {spec}: torchxrayvision's weights are pickles, which can run code when loaded; "
            "pass --allow-pickle to load this file if you trust it."
        )
    try:
        import torchxrayvision as xrv
    except ImportError:
        raise UserError(f"--classifier {spec} needs torchxrayvision: pip install 'pie-cli[xrv]'.") from None
    urls = getattr(xrv.models, "model_urls", {})
    entry = urls.get(name) or urls.get(name.split("-")[-1])
    if not isinstance(entry, dict) or "weights_url" not in entry:
        known = ", ".join(sorted(urls)) or "none"
        raise UserError(f"--classifier {spec}: torchxrayvision knows no model {name!r} (it knows: {known}).")
    factory = xrv.models.ResNet if name.startswith("resnet") else xrv.models.DenseNet
    home = Path(tempfile.mkdtemp(prefix="pie-xrv-"))
    cache = home / ".torchxrayvision" / "models_data"
    cache.mkdir(parents=True)
    try:
        # xrv reads the weights from its cache folder (~/.torchxrayvision/models_data, or cache_dir
        # where it takes one) under their published file name: the user's file is put there.
        target = cache / os.path.basename(str(entry["weights_url"]))
        try:
            target.symlink_to(weights.resolve())
        except OSError:
            shutil.copyfile(weights, target)
        blocked = socket.socket.connect

        def refuse(*_a, **_k):
            raise ConnectionRefusedError("pie never downloads")

        import inspect

        extra = (
            {"cache_dir": str(cache) + os.sep} if "cache_dir" in inspect.signature(factory).parameters else {}
        )
        socket.socket.connect = refuse  # whatever xrv does, nothing leaves this machine
        old_home = os.environ.get("HOME")
        os.environ["HOME"] = str(home)
        try:
            model = factory(weights=name, **extra)
        except Exception as exc:  # xrv raises bare Exceptions for files it cannot use
            raise UserError(
                f"--classifier {spec}: torchxrayvision could not read {weights} as {name}'s weights "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})."
            ) from None
        finally:
            socket.socket.connect = blocked
            if old_home is None:
                os.environ.pop("HOME", None)
            else:
                os.environ["HOME"] = old_home
    finally:
        shutil.rmtree(home, ignore_errors=True)
    model.eval()
    labels = tuple(str(p) for p in model.pathologies)

    @torch.no_grad()
    def predict(images):
        batch = []
        for img in images:
            grey = np.asarray(img.convert("L"), dtype=np.float32)
            x = xrv.datasets.normalize(grey, 255)[None]  # [1, H, W] in [-1024, 1024]
            side = min(x.shape[1:])
            top, left = (x.shape[1] - side) // 2, (x.shape[2] - side) // 2
            x = torch.from_numpy(np.ascontiguousarray(x[:, top : top + side, left : left + side]))
            x = torch.nn.functional.interpolate(
                x[None], size=(224, 224), mode="bilinear", antialias=True, align_corners=False
            )[0]  # as xrv.datasets.XRayResizer (skimage, order 1, anti-aliased)
            batch.append(x)
        return model(torch.stack(batch)).numpy()  # xrv's calibrated outputs, used as they are

    return Classifier(spec, labels, predict)


def load_classifier(spec: str, allow_pickle: bool = False) -> Classifier:
    if spec.startswith("xrv:"):
        return _xrv(spec, allow_pickle)
    if spec == "demo":
        return _demo()
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return _huggingface(path)
    if path.is_file():
        return _torchscript(path)
    raise UserError(
        f"--classifier {spec}: expected 'demo', xrv:NAME@WEIGHTS, a Hugging Face image-classification folder, "
        "or a TorchScript or .pt2 file."
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


def pace_scorer(
    reference: str, target: str | None, prompt: str, allow_pickle: bool = False
) -> tuple[Callable, dict]:
    """What `pie simulate --pace` follows: (frames -> one score each, a record of what is scored).

    The score is the classifier's severity of the target finding (expected grade / 3) where it
    grades findings, as the demo classifier does, else its probability. A cohort loads each
    classifier once.
    """
    classifier = cached_classifier(reference, allow_pickle)
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


def cached_classifier(reference: str, allow_pickle: bool = False) -> Classifier:
    """``load_classifier`` once per reference and process (a cohort or K trajectories share it)."""
    path = Path(reference.split("@", 1)[-1] if reference.startswith("xrv:") else reference).expanduser()
    files = sorted(path.rglob("*")) if path.is_dir() else [path] if path.is_file() else []
    # A file changed in place is loaded again: the key holds every file's size and time.
    key = f"{reference}|{allow_pickle}|" + ";".join(
        f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file()
    )
    if key not in _LOADED:
        _LOADED[key] = load_classifier(reference, allow_pickle)
    return _LOADED[key]
