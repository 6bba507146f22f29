"""Loading a resolved model into memory, for inference and for training, with an in-process cache.

One loader for both: :func:`load_parts` reads the UNet, VAE, text encoder and tokenizer of a
:class:`~pie_cli.core.registry.ModelSource` with ``local_files_only`` and safetensors only
(pickle weights need ``allow_pickle``), and :func:`load_scheduler` reads its scheduler under
one policy (an unknown class is the user's error, never a silent substitute). No safety
checker or feature extractor is loaded, nothing is downloaded.

:func:`load` builds inference :class:`Components` on a placement, applies the source's LoRA
adapters, and caches the result per (model, UNet, adapters, dtypes, device), so a cohort or an
evaluation loads each model once; :func:`forget` drops entries whose files are going away.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pie_cli.core.devices import Placement
from pie_cli.core.model_files import LORA_FILE, lora_weight_file, part_folder, weight_choices
from pie_cli.core.parameters import SCHEDULER_CHOICES
from pie_cli.core.progression import Components
from pie_cli.core.registry import ModelSource
from pie_cli.errors import UserError, one_line

_SCHEDULER_CLASSES = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}

_CACHE: dict[tuple, Components] = {}


def forget(prefix: Path | str) -> None:
    """Drop cached models whose files lie under ``prefix`` (they are about to be deleted)."""
    prefix = str(Path(prefix).resolve())
    for key in [k for k in _CACHE if any(str(part).startswith(prefix) for part in k)]:
        del _CACHE[key]


@contextmanager
def quiet_libraries(verbose: bool = False):
    """Silence diffusers/transformers progress bars and info chatter (pie draws its own)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if verbose:
        yield
        return
    levels = (diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity())
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
            yield
    finally:
        diffusers.utils.logging.set_verbosity(levels[0])
        transformers.utils.logging.set_verbosity(levels[1])


# --------------------------------------------------------------------------- the files of a model


def load_parts(
    source: ModelSource,
    *,
    dtype: Any = None,
    vae_dtype: Any = None,
    allow_pickle: bool = False,
    warn=None,
) -> tuple[Any, Any, Any, Any]:
    """(unet, vae, text_encoder, tokenizer) of ``source`` on the CPU, in ``dtype`` (default fp32).

    ``vae_dtype`` defaults to ``dtype``. The parts are checked to belong together.
    A single-file checkpoint is read by :func:`_single_file_parts`.
    """
    if source.checkpoint is not None:
        return _single_file_parts(source, dtype, vae_dtype, allow_pickle, warn)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    # CLIPTokenizerFast reads tokenizer.json (the demo model ships only that) on transformers 4.x too;
    # on 5.x it is CLIPTokenizer itself.
    from transformers import CLIPTextModel
    from transformers import CLIPTokenizerFast as CLIPTokenizer

    chosen = weight_choices(source, allow_pickle, warn)  # safetensors or pickle, default weights or a variant
    root = source.path

    def opts(part: str) -> dict:
        return {"local_files_only": True, **chosen[part].load_options()}

    typed = {} if dtype is None else {"torch_dtype": dtype}
    vae_typed = {} if (vae_dtype or dtype) is None else {"torch_dtype": vae_dtype or dtype}
    unet_folder = part_folder(source, "unet")
    if _converts_from_fp32_files(unet_folder, chosen["unet"], dtype):
        # Read as stored (memory-mapped, nothing copied), then converted tensor by tensor, each
        # fp32 source handed back as it goes: the peak is the converted UNet, not fp32 + converted.
        import torch

        from pie_cli.core.devices import convert_releasing

        unet = UNet2DConditionModel.from_pretrained(unet_folder, torch_dtype=torch.float32, **opts("unet"))
        convert_releasing(unet, dtype)
    else:
        unet = UNet2DConditionModel.from_pretrained(unet_folder, **typed, **opts("unet"))
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **vae_typed, **opts("vae"))
    text_encoder, info = CLIPTextModel.from_pretrained(
        root,
        subfolder="text_encoder",
        output_loading_info=True,
        **({} if dtype is None else {"dtype": dtype}),
        **opts("text_encoder"),
    )
    missing = [k for k in info.get("missing_keys", ()) if "position_ids" not in k]
    if missing:
        # transformers would run it with random weights (e.g. a 5.x checkpoint read by transformers 4.x).
        raise UserError(
            f"model {source.reference}: the text encoder's weights do not match its config ({len(missing)} "
            f"tensors missing, e.g. {missing[0]}); it may have been saved by another transformers version."
        )
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
    _check_fit(source, unet, text_encoder, vae)
    return unet, vae, text_encoder, tokenizer


def _converts_from_fp32_files(folder: Path, choice: Any, dtype: Any) -> bool:
    """Whether the part in ``folder`` is loaded into a narrower float dtype from safetensors files holding only fp32."""
    import torch

    if dtype not in (torch.bfloat16, torch.float16) or not choice.safetensors:
        return False
    files = [folder / name for name in choice.names if name.endswith(".safetensors")]
    return bool(files) and all(safetensors_float_dtypes(f) == {"F32"} for f in files)


def safetensors_float_dtypes(path: Path) -> set[str]:
    """The dtypes ("F32", "F16", "BF16", ...) of the floating-point tensors a safetensors file holds (its header only)."""
    import struct

    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if not 2 <= size <= 100_000_000:
                return set()
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return set()  # unreadable here: the loader's own reading reports it
    return {
        entry["dtype"]
        for name, entry in header.items()
        if name != "__metadata__"
        and isinstance(entry, dict)
        and str(entry.get("dtype", "")).startswith(("F", "BF"))
    }


def _single_file_parts(source: ModelSource, dtype: Any, vae_dtype: Any, allow_pickle: bool, warn) -> tuple:
    """(unet, vae, text_encoder, tokenizer) from a single-file checkpoint and the configs of ``source.path``.

    Through diffusers' single-file loaders, always with the local configs and
    ``local_files_only`` (without a ``config`` diffusers looks the model's configs up on the Hub):
    ``from_single_file`` for the UNet and VAE, and the CLIP converter ``from_single_file`` uses for
    the text encoder. The file is read once, and checked against the configs before any model
    is built. A ``--unet`` replaces the checkpoint's UNet.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        SingleFileComponentError,
        create_diffusers_clip_model_from_ldm,
    )
    from transformers import CLIPTextModel
    from transformers import CLIPTokenizerFast as CLIPTokenizer

    from pie_cli.core.single_file import check_layout, check_source_weights, config_name

    path = source.checkpoint
    safe = check_source_weights(source, allow_pickle, warn)  # a .ckpt only with --allow-pickle
    state = _read_checkpoint(path)
    check_layout({k: tuple(v.shape) for k, v in state.items()}, path, source.path, source.config)
    root = str(source.path)
    common = {"config": root, "local_files_only": True}
    model_dtype = dtype or torch.float32
    # Built in the file's own dtypes and cast once every tensor is known to be there: diffusers leaves
    # what the file lacks unset (on the meta device), only logging it, and moving such a model fails.
    lacks = (
        f"single file {path} lacks some of the {{}}'s weights; it does not fit {config_name(source.config)}."
    )
    what = "UNet"
    try:
        if source.unet is not None:
            unet = UNet2DConditionModel.from_pretrained(
                source.unet, torch_dtype=model_dtype, local_files_only=True, use_safetensors=safe["unet"]
            )
        else:
            unet = UNet2DConditionModel.from_single_file(state, subfolder="unet", **common)
        what = "VAE"
        vae = AutoencoderKL.from_single_file(state, subfolder="vae", **common)
        what = "text encoder"
        text_encoder = create_diffusers_clip_model_from_ldm(
            CLIPTextModel, state, subfolder="text_encoder", **common
        )
        what = "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
    except NotImplementedError as exc:
        if "meta tensor" not in str(exc):
            raise
        raise UserError(lacks.format(what)) from None
    except (
        SingleFileComponentError,
        ValueError,
        KeyError,
        RuntimeError,
        OSError,
        TypeError,
        AttributeError,
    ) as exc:
        raise UserError(
            f"single file {path} does not load with {config_name(source.config)} "
            f"({what}: {one_line(exc)})".rstrip(".")
            + "."
        ) from None
    del state
    for what, module in (("UNet", unet), ("VAE", vae), ("text encoder", text_encoder)):
        if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
            raise UserError(lacks.format(what))
    unet.to(model_dtype)
    vae.to(vae_dtype or model_dtype)
    text_encoder.to(model_dtype)
    _check_fit(source, unet, text_encoder, vae)
    return unet, vae, text_encoder, tokenizer


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The tensors of a single file: safetensors, or a ``.ckpt`` read weights-only (the caller allowed the pickle)."""
    import torch

    where = f"single file {path}"
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{where} cannot be read as safetensors ({one_line(exc)}).") from None
    import pickle
    import zipfile

    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        raise UserError(
            f"{where} holds Python objects besides tensors (a training run's callbacks or optimizer), which pie "
            "does not unpickle even with --allow-pickle; save its state_dict alone, or as .safetensors."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{where} is not a readable PyTorch checkpoint ({one_line(exc)}).") from None
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    tensors = (
        {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if isinstance(data, dict)
        else {}
    )
    if not tensors:
        raise UserError(f"{where} holds no tensors (not a state dict); it is not a model checkpoint.")
    return tensors


def load_scheduler(source: ModelSource) -> Any:
    """The model's own inference scheduler, from ``scheduler/scheduler_config.json``."""
    import diffusers

    root = source.path
    try:
        config = json.loads((root / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise UserError(
            f"model {source.reference}'s scheduler/scheduler_config.json cannot be read as JSON."
        ) from None
    name = config.get("_class_name", "PNDMScheduler") if isinstance(config, dict) else None
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        # Only a scheduler: another class named here (a model) would load weights, pickles included.
        raise UserError(
            f"model {source.reference} names {name!r} in scheduler/scheduler_config.json, which is not a diffusers scheduler."
        )
    return cls.from_pretrained(root, subfolder="scheduler", local_files_only=True)


def _check_fit(source: ModelSource, unet, text_encoder, vae) -> None:
    hidden = text_encoder.config.hidden_size
    if unet.config.cross_attention_dim != hidden:
        raise UserError(
            f"the UNet expects text embeddings of size {unet.config.cross_attention_dim} but model "
            f"{source.reference}'s text encoder gives {hidden}; the --unet does not belong to this model."
        )
    if unet.config.in_channels != vae.config.latent_channels:
        raise UserError(
            f"the UNet takes {unet.config.in_channels} latent channels but the VAE of model "
            f"{source.reference} makes {vae.config.latent_channels}."
        )


# --------------------------------------------------------------------------- inference


def load(
    source: ModelSource,
    placement: Placement,
    *,
    verbose: bool = False,
    allow_pickle: bool = False,
    warn=None,
) -> Components:
    """Load (or fetch from the in-process cache) the inference components of ``source``.

    ``source`` carries everything that defines the model: its folder, a replacement UNet and
    its LoRA adapters (see :meth:`ModelSource.with_overrides`).
    """
    key = (
        allow_pickle,
        str(source.path),
        str(source.checkpoint) if source.checkpoint else None,
        str(source.unet) if source.unet else None,
        tuple((str(a.path), a.weight) for a in source.loras),
        str(placement.dtype),
        str(placement.vae_dtype),
        str(placement.device),
    )
    if key in _CACHE:
        return _CACHE[key]
    with quiet_libraries(verbose):
        components = _load(source, placement, allow_pickle, warn)
    _CACHE[key] = components
    return components


def _load(source: ModelSource, placement: Placement, allow_pickle: bool, warn) -> Components:
    unet, vae, text_encoder, tokenizer = load_parts(
        source, dtype=placement.dtype, vae_dtype=placement.vae_dtype, allow_pickle=allow_pickle, warn=warn
    )
    scheduler = load_scheduler(source)
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    unet.to(placement.device)
    vae.to(placement.device)
    text_encoder.to(placement.device)
    components = Components(unet, vae, text_encoder, tokenizer, scheduler)
    if source.loras:
        _apply_loras(components, source)
        # Injected LoRA layers are created in training mode; their dropout must be off at inference.
        components.unet.eval()
        components.text_encoder.eval()
    return components


def _apply_loras(components: Components, source: ModelSource) -> None:
    """Load the source's diffusers-format LoRA weights into the UNet (and text encoder) and set their weights."""
    pipe = as_pipeline(components)
    names = []
    for i, adapter in enumerate(source.loras):
        name = f"lora_{i}"
        weights = adapter.file or lora_weight_file(adapter.path)
        if weights is None:
            raise UserError(
                f"LoRA {adapter.path} holds no LoRA weights ({LORA_FILE} or a .safetensors file)."
            )
        try:
            pipe.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError, TypeError, AttributeError) as exc:
            raise UserError(
                f"LoRA {adapter.path} could not be applied to model {source.reference}: {one_line(exc)}".rstrip(
                    "."
                )
                + "."
            ) from None
        if name not in _loaded_adapters(pipe):
            raise UserError(
                f"LoRA {weights} has no layer this model's UNet or text encoder knows (is it an SD 1.x LoRA in "
                "diffusers or kohya/A1111 format? For a `pie finetune` checkpoint give its step_N folder)."
            )
        names.append(name)
    try:
        pipe.set_adapters(names, adapter_weights=[a.weight for a in source.loras])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(
            f"the LoRA adapters could not be combined: {one_line(exc)}".rstrip(".") + "."
        ) from None
    logging.getLogger(__name__).debug("applied LoRA adapters %s", names)


def _loaded_adapters(pipe) -> set[str]:
    """The adapter names loaded into the pipeline's UNet and text encoder."""
    found: set[str] = set()
    for names in pipe.get_list_adapters().values():
        found.update(names)
    return found


def as_pipeline(components: Components, pipeline_class=None):
    """A diffusers Stable Diffusion pipeline (or ``pipeline_class``) sharing ``components`` (no safety checker)."""
    if pipeline_class is None:
        from diffusers import StableDiffusionPipeline as pipeline_class
    pipe = pipeline_class(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=components.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def select_scheduler(components: Components, name: str) -> Components:
    """Components with the scheduler ``name`` (built from the model's scheduler config)."""
    if name == "model":
        return components
    import diffusers

    if name not in _SCHEDULER_CLASSES:
        raise UserError(f"--scheduler must be one of {', '.join(SCHEDULER_CHOICES)}; got {name!r}.")
    cls = getattr(diffusers, _SCHEDULER_CLASSES[name])
    overrides = {"skip_prk_steps": True} if name == "pndm" else {}
    scheduler = cls.from_config(components.scheduler.config, **overrides)
    return Components(
        components.unet, components.vae, components.text_encoder, components.tokenizer, scheduler
    )
