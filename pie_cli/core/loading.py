"""Loading a resolved model into memory, with an in-process cache.

Components are loaded one by one (UNet, VAE, text encoder, tokenizer, scheduler) with
``local_files_only`` and safetensors only: no safety checker or feature extractor is
loaded, nothing is downloaded. Loaded sets are cached per (model path, UNet override,
adapters, dtypes, device), so a cohort or an evaluation loads each model once.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

from pie_cli.core.devices import Placement
from pie_cli.core.progression import Components
from pie_cli.core.registry import Adapter, ModelSource, weight_files
from pie_cli.errors import UserError

SCHEDULER_CHOICES = ("model", "pndm", "ddim", "dpm++", "euler")
_SCHEDULER_CLASSES = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}

_CACHE: dict[tuple, Components] = {}


def clear_cache() -> None:
    _CACHE.clear()


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


def require_safetensors(folder: Path, what: str, allow_pickle: bool = False, warn=None) -> bool:
    """True when ``folder`` has safetensors weights; pickle-only weights need ``allow_pickle``."""
    safe, pickle = weight_files(folder)
    if safe:
        return True
    if pickle:
        if allow_pickle:
            if warn is not None:
                warn(
                    f"{what}: loading pickle weights {folder / pickle[0].name} (--allow-pickle); "
                    "a pickle file can run arbitrary code: load only files you trust."
                )
            return False
        raise UserError(
            f"{what} ({folder}) has only pickle weights ({pickle[0].name}), which can run code when opened; "
            "convert them to .safetensors, or pass --allow-pickle if you trust the file."
        )
    raise UserError(f"{what} ({folder}) has no weights file.")


def load(
    source: ModelSource,
    placement: Placement,
    *,
    unet: Path | None = None,
    loras: tuple[Adapter, ...] = (),
    verbose: bool = False,
    allow_pickle: bool = False,
    warn=None,
) -> Components:
    """Load (or fetch from the in-process cache) the components of ``source``."""
    unet_path = unet or source.unet
    adapters = (*source.loras, *loras)
    key = (
        allow_pickle,
        str(source.path),
        str(unet_path) if unet_path else None,
        tuple((str(a.path), a.weight) for a in adapters),
        str(placement.dtype),
        str(placement.vae_dtype),
        str(placement.device),
    )
    if key in _CACHE:
        return _CACHE[key]
    with quiet_libraries(verbose):
        components = _load(source, placement, unet_path, adapters, allow_pickle, warn)
    _CACHE[key] = components
    return components


def _load(
    source: ModelSource,
    placement: Placement,
    unet_path: Path | None,
    adapters: tuple[Adapter, ...],
    allow_pickle: bool = False,
    warn=None,
):
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = source.path
    unet_dir = unet_path or (root / "unet")
    safe = {
        "unet": require_safetensors(
            unet_dir, "UNet" if unet_path else f"model {source.reference}: unet", allow_pickle, warn
        ),
        "vae": require_safetensors(root / "vae", f"model {source.reference}: vae", allow_pickle, warn),
        "text_encoder": require_safetensors(
            root / "text_encoder", f"model {source.reference}: text_encoder", allow_pickle, warn
        ),
    }

    def opts(part: str) -> dict:
        return {"local_files_only": True, "use_safetensors": safe[part]}

    unet_model = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=placement.dtype, **opts("unet"))
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=placement.vae_dtype, **opts("vae"))
    text_encoder = CLIPTextModel.from_pretrained(
        root, subfolder="text_encoder", dtype=placement.dtype, **opts("text_encoder")
    )
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
    sched_cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    sched_cls = getattr(diffusers, sched_cfg.get("_class_name", "PNDMScheduler"), None)
    if sched_cls is None:
        raise UserError(
            f"model {source.reference} names an unknown scheduler {sched_cfg.get('_class_name')!r}."
        )
    scheduler = sched_cls.from_pretrained(root, subfolder="scheduler", local_files_only=True)

    _check_fit(source, unet_model, text_encoder, vae)
    for module in (unet_model, vae, text_encoder):
        module.eval().requires_grad_(False)
    unet_model.to(placement.device)
    vae.to(placement.device)
    text_encoder.to(placement.device)
    components = Components(unet_model, vae, text_encoder, tokenizer, scheduler)
    if adapters:
        _apply_loras(components, adapters, source)
        # Injected LoRA layers are created in training mode; their dropout must be off at inference.
        components.unet.eval()
        components.text_encoder.eval()
    return components


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


def _apply_loras(components: Components, adapters: tuple[Adapter, ...], source: ModelSource) -> None:
    """Load diffusers-format LoRA weights into the UNet (and text encoder) and set their weights."""
    from pie_cli.core.registry import lora_weight_file

    pipe = as_pipeline(components)
    names = []
    for i, adapter in enumerate(adapters):
        weights = lora_weight_file(adapter.path)
        name = f"lora_{i}"
        try:
            pipe.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise UserError(
                f"LoRA {adapter.path} could not be applied to model {source.reference}: {exc}".rstrip(".")
                + "."
            ) from None
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[a.weight for a in adapters])
    logging.getLogger(__name__).debug("applied LoRA adapters %s", names)


def as_pipeline(components: Components, pipeline_class=None):
    """A diffusers Stable Diffusion pipeline sharing ``components`` (no safety checker)."""
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
