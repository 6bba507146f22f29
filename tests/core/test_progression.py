"""The PIE algorithm (DESIGN.md section 2) through the Python API, on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pie_cli.core.progression import (
    Components,
    PieConfig,
    fresh_scheduler,
    mask_to_latent,
    progress,
    step_timesteps,
)
from pie_cli.imaging.media import prepare_image
from tests.helpers import half_mask, pixels, zeros_randn

PROMPT = "large left pleural effusion"


def run(components, image, mask=None, seed=42, **params):
    params = {"prompt": PROMPT, "steps": 3, "inference_steps": 10, "resolution": 64, **params}
    return [f.image for f in progress(components, image, mask, seed=seed, **params)]


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def test_frame_zero_is_the_preprocessed_input(components, phantom):
    image, _, left = phantom
    frames = run(components, image.resize((80, 64)), None, steps=1)
    expected = prepare_image(image.resize((80, 64)), 64)
    assert frames[0].size == (64, 64)
    assert max_diff(frames[0], expected) == 0


def test_same_seed_reproduces_other_seed_differs(components, phantom):
    image, _, left = phantom
    a = run(components, image, left, seed=7)
    b = run(components, image, left, seed=7)
    c = run(components, image, left, seed=8)
    assert len(a) == 4
    assert all(max_diff(x, y) == 0 for x, y in zip(a, b, strict=True))
    assert max_diff(a[-1], c[-1]) > 10


def _vae_round_trip(components, img: Image.Image) -> np.ndarray:
    """decode(encode(x)) computed here, independently of pie's helpers."""
    vae = components.vae
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        out = vae.decode(mean).sample
    out = ((out / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0) * 255).round()
    return out.numpy().astype(np.int16)


def test_zero_mask_and_zero_beta1_gives_the_vae_round_trip(components, phantom):
    image, _, _ = phantom
    empty = Image.new("L", (64, 64), 0)
    frames = run(components, image, empty, beta1=0.0, steps=3)
    expected = _vae_round_trip(components, frames[0])
    for frame in frames[1:]:
        assert np.abs(pixels(frame) - expected).max() <= 1


def test_mask_confines_change(components, phantom):
    """Far from the mask border, pixels outside change much less than inside."""
    image, _, _ = phantom
    big = image.resize((128, 128))
    mask = half_mask(128, "left")
    frames = run(components, big, mask, resolution=128, steps=4)
    change = np.abs(pixels(frames[-1]) - pixels(frames[1])).mean(axis=2)
    inside = change[:, :40].mean()
    outside = change[:, 88:].mean()
    assert inside > 8 * max(outside, 0.1), (inside, outside)


def test_beta1_zero_keeps_latents_outside_the_mask_at_z_init(components, phantom, monkeypatch):
    """With b1 = 0, every latent cell outside the mask is exactly z_init when decoded.

    (Pixels cannot show this exactly: the VAE decoder's GroupNorm couples all pixels.)
    """
    zeros_randn(monkeypatch)
    image, _, _ = phantom
    decoded = []
    real_decode = components.vae.decode

    def recording_decode(z, *a, **k):
        decoded.append(z.clone())
        return real_decode(z, *a, **k)

    monkeypatch.setattr(components.vae, "decode", recording_decode)
    frames = run(components, image, half_mask(64, "left"), beta1=0.0, beta2=0.75, steps=2)
    x0 = torch.from_numpy(np.asarray(frames[0], dtype=np.float32) / 255.0 * 2 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        z_init_unscaled = components.vae.encode(x0).latent_dist.mean
    assert len(decoded) == 2
    for z in decoded:
        # latent columns whose 4 central pixels are black: z_init (up to the sf * z / sf rounding)
        assert torch.allclose(z[..., 4:], z_init_unscaled[..., 4:], rtol=1e-6, atol=1e-7)
        assert (z[..., :4] - z_init_unscaled[..., :4]).abs().mean() > 1e-3


def test_noise_free_runs_agree_exactly(components, phantom, monkeypatch):
    zeros_randn(monkeypatch)
    image, _, left = phantom
    a = run(components, image, left, seed=1)
    b = run(components, image, left, seed=2)  # the seed no longer matters
    assert all(max_diff(x, y) == 0 for x, y in zip(a, b, strict=True))


def test_no_mask_is_repeated_img2img(components, phantom, monkeypatch):
    """Noise-free, each unmasked step equals diffusers' own img2img pipeline applied to the previous frame."""
    from diffusers import StableDiffusionImg2ImgPipeline

    zeros_randn(monkeypatch)
    image, _, _ = phantom
    frames = run(components, image, None, steps=3, inference_steps=20, strength=0.5, guidance_scale=7.5)
    from pie_cli.core.loading import as_pipeline

    # diffusers' own img2img code, on the same weights with a fresh scheduler.
    pipe = as_pipeline(
        Components(**{**components.__dict__, "scheduler": fresh_scheduler(components)}),
        StableDiffusionImg2ImgPipeline,
    )
    for n in range(1, len(frames)):
        out = pipe(
            PROMPT,
            image=frames[n - 1],
            strength=0.5,
            num_inference_steps=20,
            guidance_scale=7.5,
            output_type="np",
        ).images[0]
        expected = (out * 255).round().astype(np.int16)
        diff = np.abs(pixels(frames[n]) - expected)
        # Same arithmetic up to float summation order inside the convolutions.
        assert diff.max() <= 3 and diff.mean() < 0.5, (n, diff.max(), diff.mean())


def _reference_step(c: Components, x_prev: Image.Image, x0: Image.Image, mask8: Image.Image, cfg: PieConfig):
    """DESIGN.md section 2, written out literally and separately from pie (noise-free: all draws are zero)."""
    sched = type(c.scheduler).from_config(c.scheduler.config)
    T = cfg.inference_steps
    sched.set_timesteps(T)
    k = min(int(T * cfg.strength), T)
    ts = sched.timesteps[T - k :]
    sf = c.vae.config.scaling_factor

    def to_x(img):
        return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0 * 2 - 1

    with torch.no_grad():
        z_init = sf * c.vae.encode(to_x(x0)).latent_dist.mean
        m = torch.from_numpy(np.asarray(mask8, dtype=np.float32))[None, None]
        M = (
            torch.nn.functional.interpolate(m, size=z_init.shape[-2:], mode="bilinear", align_corners=False)
            / 255.0
        ).repeat(1, 4, 1, 1)
        ids = c.tokenizer(
            [cfg.negative_prompt, cfg.prompt],
            padding="max_length",
            max_length=c.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        emb = c.text_encoder(ids)[0]
        z = sf * c.vae.encode(to_x(x_prev)).latent_dist.mean
        zero = torch.zeros_like(z)
        z_t = sched.add_noise(z, zero, ts[:1])
        refs = [sched.add_noise(z_init, zero, t.reshape(1)) for t in ts]
        for i, t in enumerate(ts):
            if i > 0:
                z_t = refs[i] * (1 - M) + z_t * M
            eps_u, eps_c = c.unet(torch.cat([z_t, z_t]), t, encoder_hidden_states=emb).sample.chunk(2)
            z_t = sched.step(eps_u + cfg.guidance_scale * (eps_c - eps_u), t, z_t).prev_sample
        z_out = z_init + (z_t - z_init) * (cfg.beta1 * (1 - M) + cfg.beta2 * M)
        x = (c.vae.decode(z_out / sf).sample / 2 + 0.5).clamp(0, 1)
    return (x[0].permute(1, 2, 0) * 255).round().numpy().astype(np.int16)


def test_masked_steps_match_the_literal_reference(components, phantom, monkeypatch):
    zeros_randn(monkeypatch)
    image, _, left = phantom
    cfg = PieConfig(prompt=PROMPT, steps=3, inference_steps=10, resolution=64, beta1=0.2, beta2=0.9)
    frames = [f.image for f in progress(components, image, left, cfg)]
    for n in range(1, len(frames)):
        expected = _reference_step(components, frames[n - 1], frames[0], left, cfg)
        diff = np.abs(pixels(frames[n]) - expected)
        assert diff.max() <= 1, (n, diff.max())


def test_soft_mask_is_partial_strength(components, phantom):
    """A grey mask edits more than black and less than white (same seed)."""
    image, _, _ = phantom
    frames = {}
    for level in (0, 128, 255):
        frames[level] = run(components, image, Image.new("L", (64, 64), level), beta1=0.0, steps=2)
    ref = _vae_round_trip(components, frames[0][0])
    change = {lvl: np.abs(pixels(f[-1]) - ref).mean() for lvl, f in frames.items()}
    assert change[0] < 1 < change[128] < change[255]


def test_timestep_slice_is_taken_as_written(components):
    pndm = fresh_scheduler(components)
    assert type(pndm).__name__ == "PNDMScheduler"
    assert len(step_timesteps(pndm, 50, 0.5, torch.device("cpu"))) == 26  # k + 1 (one repeated entry)
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(components.scheduler.config)
    assert len(step_timesteps(ddim, 50, 0.5, torch.device("cpu"))) == 25
    assert len(step_timesteps(ddim, 10, 0.29, torch.device("cpu"))) == 2  # int(2.9) = 2
    ts = step_timesteps(ddim, 10, 1.0, torch.device("cpu"))
    assert len(ts) == 10 and int(ts[0]) == int(ddim.timesteps[0])


def test_mask_reaches_latents_as_the_mean_of_four_central_pixels():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(64, 64)).astype(np.uint8)
    latent = mask_to_latent(Image.fromarray(arr), (8, 8), 4, torch.device("cpu"))
    assert latent.shape == (1, 4, 8, 8)
    blocks = arr.reshape(8, 8, 8, 8).transpose(0, 2, 1, 3).astype(np.float64)
    central = blocks[:, :, 3:5, 3:5].mean(axis=(2, 3)) / 255.0
    assert np.allclose(latent[0, 0].numpy(), central, atol=1e-6)
    assert torch.equal(latent[0, 0], latent[0, 3])
    whole_block = blocks.mean(axis=(2, 3)) / 255.0
    assert not np.allclose(central, whole_block, atol=1e-3)  # PIL-style box averaging would differ


def test_encodes_prompt_once_and_counts_model_calls(components, phantom, monkeypatch):
    """N * len(ts) UNet calls; text encoded once; the VAE encodes N times (frame 0 once) and decodes N times."""
    calls = {"text": 0, "encode": 0, "decode": 0, "unet": 0}

    def counting(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)

        return wrapper

    monkeypatch.setattr(components.text_encoder, "forward", counting("text", components.text_encoder.forward))
    monkeypatch.setattr(components.vae, "encode", counting("encode", components.vae.encode))
    monkeypatch.setattr(components.vae, "decode", counting("decode", components.vae.decode))
    monkeypatch.setattr(components.unet, "forward", counting("unet", components.unet.forward))
    image, _, left = phantom
    run(components, image, left, steps=4, inference_steps=10, strength=0.5)
    assert calls == {"text": 1, "encode": 4, "decode": 4, "unet": 4 * 6}


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++"])
def test_other_schedulers(components, phantom, name):
    from pie_cli.core.loading import select_scheduler

    image, _, left = phantom
    comps = select_scheduler(components, name)
    a = run(comps, image, left, steps=2, beta1=0.0)
    b = run(comps, image, left, steps=2, beta1=0.0)
    assert all(max_diff(x, y) == 0 for x, y in zip(a, b, strict=True))
    assert max_diff(a[-1], a[0]) > 0


def test_accepts_a_diffusers_pipeline(components, phantom):
    from pie_cli.core.loading import as_pipeline

    pipe = as_pipeline(components)
    image, _, left = phantom
    a = run(pipe, image, left, steps=1)
    b = run(components, image, left, steps=1)
    assert max_diff(a[-1], b[-1]) == 0


def test_rejects_bad_parameters(components, phantom):
    image, _, _ = phantom
    with pytest.raises(ValueError, match="strength"):
        run(components, image, strength=0.0)
    with pytest.raises(ValueError, match="no denoising step"):
        run(components, image, strength=0.05, inference_steps=10)


def test_batched_trajectories_equal_single_runs(components, phantom):
    from pie_cli.core.progression import progress_batch

    image, _, left = phantom
    params = {"prompt": PROMPT, "steps": 3, "inference_steps": 10, "resolution": 64}
    batched = list(progress_batch(components, image, left, seeds=[5, 6, 7], **params))
    assert len(batched) == 4 and all(len(step) == 3 for step in batched)
    for k, seed in enumerate((5, 6, 7)):
        single = run(components, image, left, seed=seed, steps=3)
        for n in range(4):
            assert max_diff(batched[n][k].image, single[n]) <= 1, (k, n)
    assert max_diff(batched[-1][0].image, batched[-1][1].image) > 10  # independent trajectories


def test_batched_call_counts(components, phantom, monkeypatch):
    """UNet = steps x len(ts) calls of batch 2K; text encoded once; one batched VAE encode/decode per step."""
    from pie_cli.core.progression import progress_batch

    calls = {"text": [], "encode": [], "decode": [], "unet": []}

    def counting(name, fn):
        def wrapper(x, *a, **k):
            calls[name].append(x.shape[0])
            return fn(x, *a, **k)

        return wrapper

    monkeypatch.setattr(components.text_encoder, "forward", counting("text", components.text_encoder.forward))
    monkeypatch.setattr(components.vae, "encode", counting("encode", components.vae.encode))
    monkeypatch.setattr(components.vae, "decode", counting("decode", components.vae.decode))
    monkeypatch.setattr(components.unet, "forward", counting("unet", components.unet.forward))
    image, _, left = phantom
    schedule = (
        "small left pleural effusion",
        "moderate left pleural effusion",
        "large left pleural effusion",
    )
    list(
        progress_batch(
            components,
            image,
            left,
            seeds=[1, 2, 3, 4],
            prompt=PROMPT,
            steps=3,
            inference_steps=10,
            resolution=64,
            prompt_schedule=schedule,
            strength_schedule=(0.3, 0.5, 0.5),
        )
    )
    assert calls["text"] == [4]  # negative + 3 scheduled prompts, one batch
    assert calls["encode"] == [1, 4, 4]  # frame 0 once; steps 2 and 3 batched
    assert calls["decode"] == [4, 4, 4]
    assert calls["unet"] == [8] * (4 + 6 + 6)  # len(ts) = k + 1 with PNDM: 4, 6, 6


def test_prompt_schedule_changes_the_prompt_per_step(components, phantom):
    image, _, left = phantom
    same = run(components, image, left, steps=2, prompt_schedule=(PROMPT, PROMPT))
    plain = run(components, image, left, steps=2)
    other = run(components, image, left, steps=2, prompt_schedule=(PROMPT, "cardiomegaly"))
    assert max_diff(same[-1], plain[-1]) == 0
    assert max_diff(other[1], plain[1]) == 0 and max_diff(other[2], plain[2]) > 0
    with pytest.raises(ValueError, match="prompt_schedule has 1 entries but --steps is 2"):
        run(components, image, left, steps=2, prompt_schedule=(PROMPT,))


def test_beta2_schedule_sets_what_each_step_keeps(components, phantom):
    """b2 per step: a constant schedule is the default run; b2 = 0 keeps the mask's inside at frame 0."""
    image, _, left = phantom
    plain = run(components, image, left, steps=2)
    constant = run(components, image, left, steps=2, beta2_schedule=(0.75, 0.75))
    assert all(max_diff(a, b) == 0 for a, b in zip(plain, constant, strict=True))
    later = run(components, image, left, steps=2, beta2_schedule=(0.75, 0.2))
    assert max_diff(later[1], plain[1]) == 0 and max_diff(later[2], plain[2]) > 0
    # Inside the mask the frame moves away from b2 = 0's (the VAE round trip of frame 0) as b2 grows.
    inside = pixels(left) > 127
    frame = {
        b: pixels(run(components, image, left, steps=1, beta2_schedule=(b,))[1]) for b in (0.0, 0.5, 1.0)
    }
    moved = [np.abs(frame[b] - frame[0.0])[inside].mean() for b in (0.5, 1.0)]
    assert 0 < moved[0] < moved[1]
    with pytest.raises(ValueError, match="beta2_schedule has 1 entries but --steps is 2"):
        run(components, image, left, steps=2, beta2_schedule=(0.5,))
    with pytest.raises(ValueError, match=r"beta2_schedule values must be in \[0, 1\], got 1.5"):
        run(components, image, left, steps=1, beta2_schedule=(1.5,))


def test_mask_growth_changes_only_the_grown_part(components, phantom):
    """Step n of a growing mask is exactly a step with the fixed mask M_n (same draws, same frames)."""
    from pie_cli.imaging.growth import grow
    from pie_cli.imaging.masks import prepare_mask

    image, _, left = phantom
    plain = run(components, image, left, steps=3)
    grown = run(components, image, left, steps=3, mask_growth="rise")
    assert max_diff(grown[1], plain[1]) > 0
    m8 = prepare_mask(left, image.size, 64)
    first = grow(m8, "rise", 3)[0]
    assert 0 < (pixels(first) > 0).sum() < (pixels(m8) > 0).sum()
    fixed = run(components, image, first, steps=1)
    assert max_diff(grown[1], fixed[1]) == 0
    last = run(components, image, left, steps=1, mask_growth="rise")  # N = 1: the whole mask
    assert max_diff(last[1], run(components, image, left, steps=1)[1]) == 0
    with pytest.raises(ValueError, match="mask_growth 'up' is not one of rise, dilate"):
        run(components, image, left, steps=1, mask_growth="up")
