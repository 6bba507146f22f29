"""Hugging Face repos for tests: their files, built from the tiny model, and the cache huggingface_hub makes of them.

:func:`repo_files` writes an SD-1.x repo the way the Hub holds ``stable-diffusion-v1-5``:
``model_index.json`` naming ``safety_checker`` and ``feature_extractor``, fp16 variants beside the
default weights, ``.bin`` beside ``.safetensors``, root-level single-file checkpoints; every
weights file is real (the tiny model's tensors), so loading it runs.

:func:`lay_out` puts such a repo into the (hermetic) HF cache exactly as huggingface_hub 2.x lays
out a download: ``models--ORG--NAME/blobs/<etag>`` (the SHA-256 of an LFS file, the git blob
SHA-1 of any other), ``snapshots/<commit>/<path>`` as relative symlinks into ``blobs/``, and
``refs/<name>`` holding the commit. tests/core/test_hub_pull.py checks that the real client,
pulling from the Hub stand-in (tests/hub_stand_in.py), writes the same tree.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from functools import cache
from pathlib import Path

from tests.helpers import HF_COMMIT

# The suffixes the Hub's .gitattributes puts in LFS (what huggingface_hub names by SHA-256).
LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".pkl", ".msgpack", ".h5", ".onnx")
WEIGHTS = {  # part -> (safetensors name, pickle name) of its default weights
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}
SINGLE_FILES = ("v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt")


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def etag(path: str, data: bytes) -> str:
    """The name huggingface_hub gives the file's blob: the Hub's ETag."""
    return hashlib.sha256(data).hexdigest() if is_lfs(path) else git_blob_sha1(data)


def variant_name(name: str, variant: str) -> str:
    stem, _, ext = name.rpartition(".")
    return f"{stem}.{variant}.{ext}"


@cache
def _tensors(model: Path, part: str) -> dict:
    from safetensors.torch import load_file

    return load_file(model / part / WEIGHTS[part][0])


def _safetensors(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata={"format": "pt"})


def _pickle(tensors: dict) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


@cache
def _repo_files(model: Path, weights: tuple[str, ...], extras: bool) -> tuple[tuple[str, bytes], ...]:
    files: dict[str, bytes] = {}
    for path in sorted(model.rglob("*")):
        rel = path.relative_to(model).as_posix()
        if path.is_file() and not rel.endswith(".safetensors"):
            files[rel] = path.read_bytes()
    index = json.loads(files["model_index.json"])
    index.update(
        safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
        feature_extractor=["transformers", "CLIPImageProcessor"],
        requires_safety_checker=True,
    )
    files["model_index.json"] = json.dumps(index, indent=2).encode()
    for part, (safe, pickled) in WEIGHTS.items():
        fp32 = _tensors(model, part)
        fp16 = {k: v.half() for k, v in fp32.items()}
        made = {
            "safetensors": (safe, lambda t=fp32: _safetensors(t)),
            "fp16": (variant_name(safe, "fp16"), lambda t=fp16: _safetensors(t)),
            "bin": (pickled, lambda t=fp32: _pickle(t)),
            "fp16.bin": (variant_name(pickled, "fp16"), lambda t=fp16: _pickle(t)),
        }
        for kind in weights:
            name, make = made[kind]
            files[f"{part}/{name}"] = make()
    if extras:
        import torch

        generator = torch.Generator().manual_seed(0)
        checker = {"vision_model.embeddings.weight": torch.randn(64, 32, generator=generator)}
        files["safety_checker/config.json"] = b'{"_class_name": "StableDiffusionSafetyChecker"}'
        files["safety_checker/model.safetensors"] = _safetensors(checker)
        files["safety_checker/pytorch_model.bin"] = _pickle(checker)
        files["feature_extractor/preprocessor_config.json"] = (
            b'{"image_processor_type": "CLIPImageProcessor"}'
        )
        single = {f"model.diffusion_model.{k}": v for k, v in _tensors(model, "unet").items()}
        files[SINGLE_FILES[0]] = _safetensors(single)
        files[SINGLE_FILES[1]] = _pickle(single)
        files["v1-inference.yaml"] = b"model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n"
        files["README.md"] = b"---\nlicense: creativeml-openrail-m\n---\n# a stand-in for an SD 1.x repo\n"
        files[".gitattributes"] = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    return tuple(sorted(files.items()))


def repo_files(
    model: Path, weights: tuple[str, ...] = ("safetensors",), extras: bool = True
) -> dict[str, bytes]:
    """The files of an SD 1.x repo made of ``model`` (the tiny model), path -> content.

    ``weights`` says which weights each of unet/, vae/, text_encoder/ holds: ``safetensors``
    (default weights), ``fp16`` (``*.fp16.safetensors``), ``bin`` (``*.bin`` pickles), ``fp16.bin``.
    ``extras`` adds what pie must leave alone: ``safety_checker/`` (its weights too),
    ``feature_extractor/``, the root-level single-file checkpoints (:data:`SINGLE_FILES`), a
    ``v1-inference.yaml``, ``README.md`` and ``.gitattributes``. Built once per combination.
    """
    return dict(_repo_files(Path(model), tuple(weights), extras))


def repo_dir(repo_id: str, cache_dir: Path | None = None) -> Path:
    hub = Path(cache_dir) if cache_dir is not None else Path(os.environ["HF_HUB_CACHE"])
    return hub / ("models--" + repo_id.replace("/", "--"))


def lay_out(
    repo_id: str,
    files: dict[str, bytes],
    *,
    commit: str = HF_COMMIT,
    refs: tuple[str, ...] = ("main",),
    cache_dir: Path | None = None,
) -> Path:
    """Put ``files`` into the HF cache as huggingface_hub does (blobs, symlinked snapshot, refs); the snapshot."""
    repo = repo_dir(repo_id, cache_dir)
    snapshot = repo / "snapshots" / commit
    for path, data in files.items():
        blob = repo / "blobs" / etag(path, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, like huggingface_hub
    return snapshot


def cache_tree(repo: Path) -> dict[str, str]:
    """A cached repo as {relative path: what it is}: a blob's size, a link's target, a ref's commit.

    Two caches of the same files compare equal whatever wrote them (the tree listing huggingface_hub
    also keeps, ``trees/<commit>.json``, and lock files are left out).
    """
    tree = {}
    for path in sorted(repo.rglob("*")):
        rel = path.relative_to(repo).as_posix()
        if rel.startswith((".locks", "trees/")) or rel == "trees":
            continue
        if path.is_symlink():
            tree[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            tree[rel] = path.read_text() if rel.startswith("refs/") else f"{path.stat().st_size} bytes"
    return tree
