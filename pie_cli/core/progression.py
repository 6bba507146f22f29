"""Progressive Image Editing (PIE, Liang et al. 2023) over diffusers components.

This module is the algorithm and nothing else: it takes loaded components, a PIL image,
an optional PIL mask and the parameters, and yields frames one by one. No files, no
terminal, no global RNG: every random draw is a ``torch.randn``-family call with the
one ``torch.Generator`` passed in, so a run is reproducible and can be made noise-free
by patching ``torch.randn``.

The semantics are the original method's, exactly; this docstring is their specification
(the tests compare the frames, noise-free, with an independent implementation of it, and with
diffusers' own img2img for the maskless case):

    inputs:   x0 = the image, 8-bit RGB, short side resized to R and centre-cropped to R x R
              (opt-in ``fit``: "pad" letterboxes it on R x R, "native" keeps its aspect; see
              imaging.geometry); mask (8-bit grey, white = edit, grey = partial) in the same
              geometry; prompt p;
              N steps, strength g, guidance w, blend weights b1 (outside) and b2 (inside), T
    prepare:  x0 -> z_init = sf * sample(VAE.encode(x0)); text embeddings of [negative, prompt];
              (each text truncated to the tokenizer's L = 77 tokens, BOS and EOS included;
              opt-in, not the original's: ``long_prompt="chunk"`` encodes all of it, 75 tokens per
              window wrapped in BOS/EOS and padded to L, windows concatenated along the sequence,
              every text padded with empty windows to the most any needs: the negative and each
              prompt share one length; a text within one window is encoded as truncating does)
              M = bilinear (no antialias) mask at latent size, in [0, 1];
              ts = scheduler.timesteps[T - k:] with k = min(int(T * strength), T)
    step n:   z   = sf * sample(VAE.encode(x_{n-1}));  z_t = add_noise(z, e, ts[0])
              ref_i = add_noise(z_init, e', ts[i])     (one e' for the whole step)
              for i, t in enumerate(ts):
                  if mask and i > 0: z_t = ref_i * (1 - M) + z_t * M
                  eps = eps_u + w * (eps_c - eps_u);  z_t = scheduler.step(eps, t, z_t)
                  (w = 1 reads eps_c alone and w = 0 eps_u alone, the formula's value without the
                  other branch: see :func:`guidance_branches`)
              z_out = z_init + (z_t - z_init) * (b1 * (1 - M) + b2 * M)   (z_t without a mask)
              (opt-in, not the original's: b2 may vary per step, ``beta2_schedule``; the mask may
              grow over the steps, ``mask_growth``: step n then uses M_n, see imaging.growth)
              x_n = 8-bit RGB of clamp(VAE.decode(z_out / sf) / 2 + 0.5, 0, 1)
              (the next step starts from this rounded 8-bit frame: part of the method)
              (opt-in, not the original's: ``preserve_outside`` makes x_n = x0 + (x_n - x0) * W with
              W the feathered mask, imaging.compose.feather_weight, so pixels beyond the feather are
              x0's bit for bit; with ``fit="pad"`` W is 0 on the padding, which frames never show)
    pace:     (opt-in, not the original's; :class:`Pace`) z_out is made for every candidate b2 of
              the step, all decoded in batches and scored with x_{n-1}; x_n is the one whose score
              is nearest the target for step n (ties: a new frame before x_{n-1}, then the smaller
              b2). No random draw is added, so a paced run is reproducible and resumable.

With every random draw replaced by zeros the algorithm is deterministic. With PNDM, whose
timestep list holds one repeated entry, ``ts`` has k + 1 entries; with DDIM, k. A run costs
N * len(ts) UNet calls (batch 2 per trajectory; 1 at a step whose guidance w is 1 or 0), one text
encoding, N VAE encodes and N decodes.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pie_cli.core.devices import input_memory_format, release_after_use
from pie_cli.core.parameters import PieConfig, denoise_count
from pie_cli.errors import NumericalError
from pie_cli.imaging.geometry import Geometry, fit_geometry
from pie_cli.imaging.masks import prepare_mask
from pie_cli.imaging.media import frame_of, onto_canvas, prepare_image

__all__ = [
    "Components",
    "Frame",
    "Pace",
    "PieConfig",
    "ResumePoint",
    "denoise_count",
    "guidance_branches",
    "progress",
    "progress_batch",
]

# on_denoise(progression_step, denoise_index (1-based), denoise_total)
DenoiseCallback = Callable[[int, int, int], None]


@dataclass
class Components:
    """The five parts of a Stable Diffusion 1.x model that PIE drives."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any

    @classmethod
    def from_pipeline(cls, pipe: Any) -> Components:
        """Take the components of a loaded diffusers Stable Diffusion pipeline."""
        return cls(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


@dataclass(frozen=True)
class Frame:
    """One frame of a progression: index 0 is the preprocessed input (without ``fit="pad"``'s padding)."""

    index: int
    image: Image.Image
    seconds: float
    pace: dict[str, Any] | None = None  # a paced run: {"beta2" (None: held), "score", "target"}


@dataclass(frozen=True)
class Pace:
    """Closed-loop pace: each step keeps the candidate frame whose score is nearest the step's target.

    ``score`` maps frames to one number each (e.g. a classifier's severity of the finding);
    ``targets`` holds the target of steps 1..N, or is empty for a straight line from frame 0's
    score to ``end``. ``candidates`` are the blend weights b2 tried inside the mask at every
    step: they share the step's one denoising pass and differ only in the blend, so a step
    costs the same UNet calls as an unpaced one, plus len(candidates) decodes and scores.
    """

    score: Callable[[list[Image.Image]], Any]
    candidates: tuple[float, ...] = tuple(i / 10 for i in range(11))
    targets: tuple[float, ...] = ()
    end: float = 1.0
    decode_batch: int = 4  # candidate frames decoded at once (memory at large resolutions)
    refine: int = 8  # extra blends tried between the two candidates whose scores straddle the target

    def check(self, steps: int) -> None:
        if not self.candidates:
            raise ValueError("pace needs at least one candidate blend weight")
        if any(not (math.isfinite(c) and 0.0 <= c <= 1.0) for c in self.candidates):
            raise ValueError("pace candidates must be blend weights in [0, 1]")
        if self.targets and len(self.targets) != steps:
            raise ValueError(f"pace has {len(self.targets)} targets for {steps} steps")

    def targets_from(self, first: float, steps: int) -> tuple[float, ...]:
        """The target of each step 1..N, given frame 0's score."""
        if self.targets:
            return self.targets
        return tuple(first + (self.end - first) * n / steps for n in range(1, steps + 1))


def fresh_scheduler(components: Components) -> Any:
    """A private copy of the model's scheduler, so runs never share scheduler state."""
    sched = components.scheduler
    return type(sched).from_config(sched.config)


def step_timesteps(
    scheduler: Any, inference_steps: int, strength: float, device: torch.device
) -> torch.Tensor:
    """Reset ``scheduler`` for a new progression step and return ``ts = timesteps[T - k:]``.

    The slice is taken exactly as written: with PNDM, whose list holds one repeated
    entry, that is k + 1 timesteps; with DDIM it is k.
    """
    k = denoise_count(inference_steps, strength)
    scheduler.set_timesteps(inference_steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        # Sigma-based schedulers (Euler, DPM-Solver) look up the noise level by position.
        scheduler.set_begin_index(inference_steps - k)
    return scheduler.timesteps[inference_steps - k :]


def guidance_branches(guidance: float) -> str:
    """Which UNet predictions the guided noise eps = eps_u + w * (eps_c - eps_u) of a step needs.

    ``"cond"`` for w = 1 (eps_c: the unconditional branch has no effect, the UNet runs at batch K;
    equal to the formula within float rounding), ``"uncond"`` for w = 0 (eps_u, the formula's value
    exactly), ``"both"`` (batch 2K) for every other w, 0 < w < 1 included: there the formula
    interpolates between the two predictions, as the original method computes it. (Diffusers'
    pipelines instead drop guidance for every w <= 1, using eps_c; pie keeps the formula.)
    """
    if guidance == 1.0:
        return "cond"
    if guidance == 0.0:
        return "uncond"
    return "both"


def count_prompt_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of ``text`` including BOS/EOS; CLIP reads at most ``tokenizer.model_max_length``."""
    return len(tokenizer(text, truncation=False).input_ids)


def image_to_tensor(img: Image.Image, device: torch.device) -> torch.Tensor:
    """8-bit RGB PIL image -> float32 tensor [1, 3, H, W] in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255.0
    return (x * 2.0 - 1.0).to(device)


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """Decoded tensor [1, 3, H, W] in VAE range -> 8-bit RGB: clamp(x / 2 + 0.5, 0, 1), rounded."""
    x = (x.float() / 2 + 0.5).clamp(0, 1)
    arr = (x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")


def mask_to_latent(
    mask: Image.Image, size: tuple[int, int], channels: int, device: torch.device
) -> torch.Tensor:
    """8-bit mask -> [1, C, h, w] in [0, 1]: bilinear resize without antialiasing, then / 255."""
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32).copy())[None, None].to(device)
    m = F.interpolate(m, size=size, mode="bilinear", align_corners=False, antialias=False)
    return (m / 255.0).repeat(1, channels, 1, 1)


@torch.no_grad()
def encode_text(components: Components, texts: list[str], long_prompt: str = "truncate") -> torch.Tensor:
    """CLIP embeddings of ``texts`` [B, L, D], each padded to the tokenizer's max length L.

    ``long_prompt="chunk"``: every token is read, in windows of L - 2 tokens, each wrapped in
    BOS/EOS and padded to L, and a text's window embeddings are concatenated along the sequence
    ([B, n * L, D]). All texts get the same n, the most any of them needs (empty windows pad the
    others), so the negative prompt and every prompt of a schedule stay interchangeable. When
    every text fits one window this is the truncating encoding exactly.
    """
    tok = components.tokenizer
    if long_prompt == "chunk":
        windows = _chunk_token_ids(tok, texts)
        if windows is not None:
            hidden = _encode_ids(components, *windows)  # [B * n, L, D]
            return hidden.reshape(len(texts), -1, hidden.shape[-1])
    batch = tok(
        texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    )
    return _encode_ids(components, batch.input_ids, batch.attention_mask)


def _chunk_token_ids(tok: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(input ids, attention mask) [B * n, L] of every text cut into n windows; None when n is 1."""
    length = tok.model_max_length
    width = length - 2  # BOS and EOS around each window
    content = tok(texts, add_special_tokens=False, truncation=False).input_ids
    n = max([1, *(math.ceil(len(ids) / width) for ids in content)])
    if n == 1:
        return None
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows, masks = [], []
    for ids in content:
        for c in range(n):
            window = [tok.bos_token_id, *ids[c * width : (c + 1) * width], tok.eos_token_id]
            rows.append(window + [pad] * (length - len(window)))
            masks.append([1] * len(window) + [0] * (length - len(window)))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long)


def _encode_ids(
    components: Components, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The text encoder's last hidden states of token ids (the mask only where the encoder uses one)."""
    enc = components.text_encoder
    device = next(enc.parameters()).device
    mask = attention_mask.to(device) if getattr(enc.config, "use_attention_mask", False) else None
    return enc(input_ids.to(device), attention_mask=mask)[0]


@torch.no_grad()
def encode_posterior(components: Components, x: torch.Tensor) -> Any:
    """The VAE's posterior distribution for an image tensor in [-1, 1]."""
    vae = components.vae
    x = x.to(device=vae.device, dtype=vae.dtype).contiguous(memory_format=input_memory_format(vae))
    return vae.encode(x).latent_dist


def sample_latents(components: Components, posterior: Any, generators: list[torch.Generator]) -> torch.Tensor:
    """scaling_factor * sample(posterior), in float32; batch element k draws from ``generators[k]``."""
    gens = generators if len(generators) > 1 else generators[0]
    return components.vae.config.scaling_factor * posterior.sample(generator=gens).float()


@torch.no_grad()
def decode_latents(components: Components, z: torch.Tensor, step: int | None = None) -> list[Image.Image]:
    """8-bit frames of latents ``z``; NaN/inf in the decoded tensor is a ``NumericalError``, never a black frame."""
    vae = components.vae
    z = (z / vae.config.scaling_factor).to(vae.dtype).contiguous(memory_format=input_memory_format(vae))
    x = vae.decode(z).sample
    if not torch.isfinite(x).all():
        where = f"progression step {step}" if step is not None else "decoding"
        raise NumericalError(
            f"{where}: the VAE decoded NaN or infinite pixels (a numerical overflow, typical of an fp16 VAE); "
            "nothing was written for it. Rerun with --dtype fp32."
        )
    return [tensor_to_image(x[k : k + 1]) for k in range(x.shape[0])]


def _require_finite(z: torch.Tensor, step: int, what: str) -> None:
    if not torch.isfinite(z).all():
        raise NumericalError(
            f"progression step {step} produced NaN or infinite {what} (a numerical overflow); "
            "nothing was written for it. Rerun with --dtype fp32."
        )


def randn_like(z: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Standard normal noise shaped like ``z``; row k drawn with ``generators[k]`` on its own device.

    Drawing row by row makes trajectory k of a batch draw exactly what a single run with
    ``generators[k]`` draws.
    """
    rows = [
        torch.randn((1, *z.shape[1:]), generator=g, device=g.device, dtype=torch.float32).to(z.device)
        for g in generators
    ]
    return torch.cat(rows) if len(rows) > 1 else rows[0]


def _repeat_posterior(posterior: Any, k: int) -> Any:
    """The same posterior for ``k`` trajectories (sampled independently)."""
    if k == 1:
        return posterior
    return type(posterior)(posterior.parameters.repeat(k, 1, 1, 1))


@dataclass
class _Prepared:
    """Everything computed once per run (K trajectories share the input, mask and text)."""

    geometry: Geometry
    x0: Image.Image  # frame 0 on the canvas
    keep: list[np.ndarray | None]  # per step 1..N: the composite weight W (None: the decoded frame as is)
    z_init: torch.Tensor  # [K, C, h, w]: each trajectory samples its own
    posterior0: Any  # frame 0's posterior, repeated K times
    mask: torch.Tensor | None
    step_masks: list[torch.Tensor] | None  # with a mask growth: the mask of steps 1..N
    negative: torch.Tensor  # [1, L, D]
    prompts: dict[str, torch.Tensor]  # prompt -> [1, L, D]


@torch.no_grad()
def _prepare(
    components: Components,
    image: Image.Image,
    mask: Image.Image | None,
    config: PieConfig,
    generators: list[torch.Generator],
) -> _Prepared:
    device = components.device
    # 1. Frame 0: the input, 8-bit RGB, short side resized to R and centre-cropped (or --fit's geometry).
    geometry = fit_geometry(image.size, config.resolution, config.fit)
    x0 = prepare_image(image, config.resolution, config.fit)
    # 2. Text, once per run and in one batch: the unconditional (negative) text, then every prompt.
    prompts = config.prompts()
    embeddings = encode_text(components, [config.negative_prompt, *prompts], config.long_prompt).to(
        components.unet.dtype
    )
    by_prompt = {p: embeddings[i + 1 : i + 2] for i, p in enumerate(prompts)}
    release_after_use(components.text_encoder)  # not used again this run: its pages leave the peak
    # 3. Initial latents, once per run.
    posterior0 = _repeat_posterior(encode_posterior(components, image_to_tensor(x0, device)), len(generators))
    z_init = sample_latents(components, posterior0, generators)
    # 4. Mask at latent size.
    latent_mask = step_masks = None
    masks8: list[Image.Image | None] = [None] * config.steps
    if mask is not None:
        size, channels = tuple(z_init.shape[-2:]), z_init.shape[1]
        m8 = onto_canvas(
            prepare_mask(mask, image.size, config.resolution, fit=config.fit),
            Image.new("L", geometry.canvas, 0),
            geometry,
        )
        latent_mask = mask_to_latent(m8, size, channels, device)
        masks8 = [m8] * config.steps
        if config.mask_growth:
            from pie_cli.imaging.growth import grow

            masks8 = list(grow(m8, config.mask_growth, config.steps))
            step_masks = [mask_to_latent(m, size, channels, device) for m in masks8]
    keep = _composite_weights(geometry, masks8, config)
    return _Prepared(
        geometry, x0, keep, z_init, posterior0, latent_mask, step_masks, embeddings[:1], by_prompt
    )


def _composite_weights(
    geometry: Geometry, masks8: list[Image.Image | None], config: PieConfig
) -> list[np.ndarray | None]:
    """Per step, the weight W of the decoded frame against x0 (None: no composite, the original method)."""
    if not (config.preserve_outside or geometry.padded):
        return [None] * len(masks8)
    from pie_cli.imaging.compose import feather_weight

    content = np.zeros((geometry.canvas[1], geometry.canvas[0]))
    left, top, right, bottom = geometry.content
    content[top:bottom, left:right] = 1.0
    cache: dict[int, np.ndarray] = {}
    out: list[np.ndarray | None] = []
    for m8 in masks8:
        if not config.preserve_outside or m8 is None:
            out.append(content)
            continue
        key = id(m8)
        if key not in cache:
            cache[key] = feather_weight(m8, config.feather_pixels()) * content
        out.append(cache[key])
    return out


def _keep(prep: _Prepared, frames: list[Image.Image], n: int) -> list[Image.Image]:
    """The frames of step ``n`` after its composite with x0 (as decoded when there is none)."""
    weight = prep.keep[n - 1]
    if weight is None:
        return frames
    from pie_cli.imaging.compose import composite

    return [composite(prep.x0, f, weight) for f in frames]


def _frames_to_tensor(frames: list[Image.Image], device: torch.device) -> torch.Tensor:
    return torch.cat([image_to_tensor(f, device) for f in frames])


@torch.no_grad()
def _progression_step(
    components: Components,
    prep: _Prepared,
    x_prev: list[Image.Image],
    n: int,
    config: PieConfig,
    generators: list[torch.Generator],
    on_denoise: DenoiseCallback | None,
    pace: Pace | None = None,
    target: float = 0.0,
) -> tuple[list[Image.Image], list[dict[str, Any]] | None]:
    device = components.device
    unet = components.unet
    k = len(generators)
    scheduler = fresh_scheduler(components)
    ts = step_timesteps(scheduler, config.inference_steps, config.strength_at(n), device)
    step_accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
    guidance = config.guidance_at(n)
    branches = guidance_branches(guidance)
    prompt = prep.prompts[config.prompt_at(n)]
    texts = {"both": [prep.negative, prompt], "cond": [prompt], "uncond": [prep.negative]}[branches]
    text = torch.cat([t for t in texts for _ in range(k)])  # each branch's K rows together, as eps is split
    layout = input_memory_format(unet)

    # 1. Latents of the previous frames (their 8-bit images), noised to ts[0].
    #    Frame 0's posterior is already known from the preparation: no second encode.
    posterior = prep.posterior0 if n == 1 else encode_posterior(components, _frames_to_tensor(x_prev, device))
    z = sample_latents(components, posterior, generators)
    _require_finite(z, n, "latents when encoding the previous frame")
    z_t = scheduler.add_noise(z, randn_like(z, generators), ts[:1])
    # 2. One noise tensor per trajectory for the reference latents of every timestep of this step.
    ref_noise = randn_like(prep.z_init, generators)
    mask = prep.step_masks[n - 1] if prep.step_masks is not None else prep.mask

    # 3. Masked denoising with classifier-free guidance: one UNet call (batch 2K) per timestep;
    #    batch K when w = 1 or 0 leaves one branch without effect (guidance_branches).
    total = len(ts)
    for i, t in enumerate(ts):
        if mask is not None and i > 0:
            # ref_i = add_noise(z_init, e', ts[i]); computed here rather than up front so
            # that schedulers which look noise levels up by position see the right one.
            ref = scheduler.add_noise(prep.z_init, ref_noise, t.reshape(1))
            z_t = ref * (1 - mask) + z_t * mask
        model_in = scheduler.scale_model_input(torch.cat([z_t, z_t]) if branches == "both" else z_t, t)
        model_in = model_in.to(unet.dtype).contiguous(memory_format=layout)
        eps = unet(model_in, t, encoder_hidden_states=text, return_dict=False)[0]
        if branches == "both":
            eps_u, eps_c = eps.float().chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        else:
            # A tensor of its own: the scheduler keeps eps in its history (PNDM), and a UNet compiled
            # with CUDA graphs may hand the same output memory back at its next call.
            eps = eps.to(torch.float32, copy=True)
        extra = {"generator": generators if k > 1 else generators[0]} if step_accepts_generator else {}
        z_t = scheduler.step(eps, t, z_t, return_dict=False, **extra)[0].float()
        if on_denoise is not None:
            on_denoise(n, i + 1, total)

    # 4. Blend against the initial latents: b1 outside the mask, b2 inside.
    if pace is not None and mask is not None:
        return _paced_frames(components, prep, z_t, mask, n, config, pace, target, x_prev)
    if mask is None:
        z_out = z_t
    else:
        weight = config.beta1 * (1 - mask) + config.beta2_at(n) * mask
        z_out = prep.z_init + (z_t - prep.z_init) * weight

    _require_finite(z_out, n, "latents")
    # 5. Decode to 8-bit frames; the next step starts from these rounded images (composited with x0
    #    outside the mask when preserving, and on the padding).
    return _keep(prep, decode_latents(components, z_out, step=n), n), None


def _paced_frames(
    components: Components,
    prep: _Prepared,
    z_t: torch.Tensor,
    mask: torch.Tensor,
    n: int,
    config: PieConfig,
    pace: Pace,
    target: float,
    x_prev: list[Image.Image],
) -> tuple[list[Image.Image], list[dict[str, Any]]]:
    """Blend, decode and score every candidate b2; keep, per trajectory, the frame nearest ``target``.

    The previous frame is a candidate too (kept when no blend comes nearer: a step whose edit
    overshoots or vanishes then holds the finding rather than jumping); ties go to the smaller b2.
    """
    _require_finite(z_t, n, "latents")
    frames, choices = [], []
    step = max(1, pace.decode_batch)

    def score(images: list[Image.Image]) -> Any:  # the classifier sees frames as they are written
        return pace.score([frame_of(img, prep.geometry) for img in images])

    for k in range(z_t.shape[0]):
        z_k, init_k = z_t[k : k + 1], prep.z_init[k : k + 1]

        def blends(weights: tuple[float, ...], z_k=z_k, init_k=init_k) -> list[Image.Image]:
            out: list[Image.Image] = []
            for start in range(0, len(weights), step):
                chunk = weights[start : start + step]
                z_out = torch.cat(
                    [init_k + (z_k - init_k) * (config.beta1 * (1 - mask) + c * mask) for c in chunk]
                )
                out += _keep(prep, decode_latents(components, z_out, step=n), n)
            return out

        weights = list(pace.candidates)
        images = blends(pace.candidates)
        scores = [float(s) for s in score([*images, x_prev[k]])]
        held_score = scores.pop()
        if pace.refine > 0:
            # The score may jump between neighbouring candidates: look closer where it crosses the target.
            order = sorted(range(len(weights)), key=lambda i: weights[i])
            brackets = [
                (weights[a], weights[b])
                for a, b in zip(order, order[1:], strict=False)
                if (scores[a] - target) * (scores[b] - target) < 0
            ]
            if brackets:
                nearest = min(range(len(weights)), key=lambda i: abs(scores[i] - target))
                lo, hi = next((ab for ab in brackets if weights[nearest] in ab), brackets[0])
                finer = tuple(
                    round(lo + (hi - lo) * j / (pace.refine + 1), 6) for j in range(1, pace.refine + 1)
                )
                more = blends(finer)
                weights += list(finer)
                images += more
                scores += [float(s) for s in score(more)]
        pool = len(images)
        best = min(
            range(pool + 1),
            key=lambda i: (
                abs((scores[i] if i < pool else held_score) - target),
                i == pool,
                weights[i] if i < pool else 0.0,
            ),
        )
        if best < pool:
            frames.append(images[best])
            choices.append(
                {"beta2": weights[best], "score": round(scores[best], 6), "target": round(target, 6)}
            )
        else:  # the previous frame, held
            frames.append(x_prev[k])
            choices.append({"beta2": None, "score": round(held_score, 6), "target": round(target, 6)})
    return frames, choices


def _normalise_call(
    components: Any, config: PieConfig | None, params: dict[str, Any]
) -> tuple[Components, PieConfig]:
    """(Components, checked PieConfig) from what a caller passed: a pipeline or Components, and a
    PieConfig or keyword parameters."""
    if not isinstance(components, Components):
        components = Components.from_pipeline(components)
    if config is None:
        config = PieConfig(**params)
    elif params:
        raise TypeError("pass either config or keyword parameters, not both")
    config.check()
    return components, config


def progress_batch(
    components: Components | Any,
    image: Image.Image,
    mask: Image.Image | None = None,
    config: PieConfig | None = None,
    *,
    generators: list[torch.Generator] | None = None,
    seeds: list[int] | None = None,
    on_denoise: DenoiseCallback | None = None,
    resume: ResumePoint | None = None,
    pace: Pace | None = None,
    **params: Any,
) -> Iterator[list[Frame]]:
    """K independent progressions of one image, batched: yields K frames per step.

    Trajectory k uses ``generators[k]`` (or a CPU generator seeded ``seeds[k]``) and equals,
    to float tolerance, a single :func:`progress` run with that generator; every denoising
    step is one UNet call with batch 2K (K where the step's guidance is 1 or 0, see
    :func:`guidance_branches`).

    After each yield the generators are exactly where the next step will start drawing, so
    a caller can save ``g.get_state()`` with the frames. ``resume`` continues such a run: the
    generators must be freshly seeded as for the original run (the preparation draws again),
    then they are set to the saved states and the progression goes on from ``resume.step + 1``
    with the saved frames; on CPU the frames equal an uninterrupted run's bit for bit.
    Nothing is yielded for the steps already done.

    ``pace`` (needs a mask) steers every step towards a target score, see :class:`Pace`;
    each frame then carries the chosen blend weight, its score and the target.
    """
    components, config = _normalise_call(components, config, params)
    if pace is not None:
        if mask is None:
            raise ValueError("pace chooses the blend weight inside the mask: give a mask")
        pace.check(config.steps)
    if generators is None:
        generators = [torch.Generator("cpu").manual_seed(s) for s in (seeds or [42])]
    start = time.perf_counter()
    prep = _prepare(components, image, mask, config, generators)
    targets: tuple[float, ...] = ()
    shown = frame_of(prep.x0, prep.geometry)
    if pace is not None:
        targets = pace.targets_from(float(pace.score([shown])[0]), config.steps)
    seconds = time.perf_counter() - start
    first = 1
    frames = [prep.x0] * len(generators)
    if resume is None:
        yield [Frame(0, shown, seconds) for _ in generators]
    else:
        if len(resume.rng_states) != len(generators) or len(resume.frames) != len(generators):
            raise ValueError("resume point has a different number of trajectories")
        for g, state in zip(generators, resume.rng_states, strict=True):
            g.set_state(state)
        first = resume.step + 1
        if resume.step > 0:
            frames = [onto_canvas(f.convert("RGB"), prep.x0, prep.geometry) for f in resume.frames]
    for n in range(first, config.steps + 1):
        start = time.perf_counter()
        frames, chosen = _progression_step(
            components, prep, frames, n, config, generators, on_denoise, pace, targets[n - 1] if pace else 0.0
        )
        seconds = time.perf_counter() - start
        yield [
            Frame(n, frame_of(f, prep.geometry), seconds, chosen[j] if chosen is not None else None)
            for j, f in enumerate(frames)
        ]


@dataclass
class ResumePoint:
    """Where an interrupted progression stopped: its last whole step, those frames, the RNG states."""

    step: int
    frames: list[Image.Image]
    rng_states: list[torch.Tensor]


def progress(
    components: Components | Any,
    image: Image.Image,
    mask: Image.Image | None = None,
    config: PieConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    seed: int = 42,
    on_denoise: DenoiseCallback | None = None,
    pace: Pace | None = None,
    **params: Any,
) -> Iterator[Frame]:
    """Run PIE and yield frames x0 .. xN one by one (x0 is the preprocessed input).

    ``components`` is a :class:`Components` or a diffusers Stable Diffusion pipeline.
    ``image`` and ``mask`` are PIL images of any size (the mask either the image's size
    or its frame size under ``fit``). Parameters come as a :class:`PieConfig` or as keyword arguments
    (``prompt=..., steps=..., strength=...``). Without ``generator``, a CPU generator
    seeded with ``seed`` is used; a CPU generator gives the same frames on every device
    up to floating-point differences.
    """
    generator = generator if generator is not None else torch.Generator("cpu").manual_seed(seed)
    for frames in progress_batch(
        components, image, mask, config, generators=[generator], on_denoise=on_denoise, pace=pace, **params
    ):
        yield frames[0]
