"""The held-out denoising loss (``--validation-split``): one number per evaluation, comparable across steps.

The held-out examples are chosen by the seed alone (:func:`split_records`), never trained on, and
scored by the denoising loss at fixed timesteps with fixed noise: each example's latents are its
posterior mean (centre crop or the run's ``--fit``, no flip, its own prompt, no caption dropout),
noised at each of :data:`TIMESTEP_FRACTIONS` of the training schedule with noise drawn from a
generator seeded by (seed, example, timestep). So the same weights always give the same value,
whatever the step, the batch size or the process, and two runs with one seed log identical
validation losses for identical weights. The loss is the plain mean squared error against the
model's target (noise, or velocity for v-prediction), weighted by the loss mask where the run
trains with one (``--loss-mask``), without Min-SNR weighting: it measures the model, not the
objective's weighting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pie_cli.errors import UserError

# Where on the training schedule (fractions of num_train_timesteps) each held-out example is scored.
TIMESTEP_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
# The random stream of the held-out choice (distinct from every other seeded stream of a run).
_SPLIT_STREAM = 7
_NOISE_STREAM = 11


def held_out_count(total: int, fraction: float) -> int:
    """How many of ``total`` examples ``--validation-split fraction`` holds out (at least 1)."""
    return max(1, round(total * fraction)) if fraction > 0 else 0


def split_records(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training records, held-out records): a seeded choice, each list in its original order."""
    if fraction <= 0:
        return list(records), []
    n = held_out_count(len(records), fraction)
    if len(records) - n < 1:
        raise UserError(
            f"--validation-split {fraction:g} of {len(records)} examples leaves none to train on; "
            "give more examples or a smaller split."
        )
    import numpy as np

    chosen = set(np.random.default_rng([seed, _SPLIT_STREAM]).permutation(len(records))[:n].tolist())
    train = [r for i, r in enumerate(records) if i not in chosen]
    held = [r for i, r in enumerate(records) if i in chosen]
    return train, held


def timesteps_of(num_train_timesteps: int) -> tuple[int, ...]:
    return tuple(min(num_train_timesteps - 1, int(f * num_train_timesteps)) for f in TIMESTEP_FRACTIONS)


@dataclass
class HeldOut:
    """What the held-out loss needs: the examples' dataset (``PairDataset``) and the run's settings."""

    dataset: Any
    seed: int
    batch_size: int = 1


def heldout_loss(held: HeldOut, unet: Any, vae: Any, text_encoder: Any, scheduler: Any, device: Any) -> float:
    """The mean held-out denoising loss of these weights (models used as given: call under eval mode)."""
    import torch
    import torch.nn.functional as F

    ds = held.dataset
    timesteps = timesteps_of(scheduler.config.num_train_timesteps)
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    total, count = 0.0, 0
    with torch.no_grad():
        for index in range(len(ds)):
            item = ds[index]
            pixels = ds.image(index).unsqueeze(0).to(device, dtype=vae.dtype)
            latents = vae.encode(pixels).latent_dist.mean.float() * vae.config.scaling_factor
            embeddings = text_encoder(item["input_ids"].unsqueeze(0).to(device))[0]
            weight = _latent_weight(item.get("loss_mask"), latents, device)
            for t in timesteps:
                gen = torch.Generator("cpu").manual_seed(_noise_seed(held.seed, index, t))
                noise = torch.randn(latents.shape, generator=gen).to(device)
                tt = torch.tensor([t], device=device)
                noisy = scheduler.add_noise(latents, noise, tt)
                target = scheduler.get_velocity(latents, noise, tt) if v_prediction else noise
                pred = unet(noisy.to(unet.dtype), tt, embeddings.to(unet.dtype)).sample.float()
                error = F.mse_loss(pred, target.float(), reduction="none")
                total += float(masked_mean(error, weight)[0])
                count += 1
    return total / max(1, count)


def _noise_seed(seed: int, index: int, timestep: int) -> int:
    return (seed * 1_000_003 + index * 10_007 + timestep * 101 + _NOISE_STREAM) % (2**63 - 1)


def _latent_weight(mask: Any, latents: Any, device: Any) -> Any:
    if mask is None:
        return None
    return latent_mask(mask.unsqueeze(0).to(device), latents.shape[-2:])


def latent_mask(mask: Any, size: tuple[int, int]) -> Any:
    """A pixel mask B x 1 x H x W in [0, 1] at latent resolution: the fraction of each latent cell it covers."""
    import torch.nn.functional as F

    mask = mask.float()
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.adaptive_avg_pool2d(mask, tuple(size))


def masked_mean(error: Any, weight: Any) -> Any:
    """Per-example mean of ``error`` (B x C x h x w), weighted by ``weight`` (B x 1 x h x w) when given.

    An example whose mask is empty contributes 0 (nothing of it is trained on).
    """
    if weight is None:
        return error.mean(dim=(1, 2, 3))
    weighted = (error * weight).sum(dim=(1, 2, 3))
    area = weight.sum(dim=(1, 2, 3)) * error.shape[1]
    return weighted / area.clamp_min(1e-12)


def best_of(history: list[tuple[int, float]]) -> tuple[int, float] | None:
    """(step, loss) of the lowest finite held-out loss (the earliest of equal ones)."""
    finite = [(s, v) for s, v in history if math.isfinite(v)]
    return min(finite, key=lambda sv: (sv[1], sv[0])) if finite else None
