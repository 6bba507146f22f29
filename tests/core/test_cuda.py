"""The CUDA path: run only where a GPU is present (CI has none; a lent GPU machine does)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_components(tiny_model):
    from pie_cli.core.devices import choose_placement, tune_for_speed
    from pie_cli.core.loading import load
    from pie_cli.core.registry import resolve

    placement = choose_placement("cuda", "auto", vae_force_upcast=True)
    components = load(resolve(str(tiny_model)), placement)
    tune_for_speed(components, placement)
    return components, placement


def test_auto_dtype_is_fp16_with_an_fp32_vae(cuda_components):
    components, placement = cuda_components
    assert components.unet.dtype == torch.float16 and components.vae.dtype == torch.float32
    assert placement.device.type == "cuda"


def test_fp16_progression_is_finite_and_close_to_fp32(cuda_components, tiny_model, phantom):
    from pie_cli.core.devices import choose_placement
    from pie_cli.core.loading import load
    from pie_cli.core.progression import progress
    from pie_cli.core.registry import resolve

    image, _, left = phantom
    params = {"prompt": "effusion", "steps": 2, "inference_steps": 10, "resolution": 64}
    half = [np.asarray(f.image, dtype=np.int16) for f in progress(cuda_components[0], image, left, **params)]
    full_comps = load(resolve(str(tiny_model)), choose_placement("cuda", "fp32"))
    full = [np.asarray(f.image, dtype=np.int16) for f in progress(full_comps, image, left, **params)]
    assert all(np.isfinite(f).all() for f in half)
    assert np.abs(half[-1] - full[-1]).mean() < 8  # fp16 drifts, but not into another image


def test_trajectories_on_cuda_equal_single_runs(cuda_components, phantom):
    from pie_cli.core.progression import progress, progress_batch

    image, _, left = phantom
    params = {"prompt": "effusion", "steps": 2, "inference_steps": 10, "resolution": 64}
    batched = list(progress_batch(cuda_components[0], image, left, seeds=[3, 4], **params))
    single = list(progress(cuda_components[0], image, left, seed=4, **params))
    diff = np.abs(
        np.asarray(batched[-1][1].image, dtype=np.int16) - np.asarray(single[-1].image, dtype=np.int16)
    )
    assert diff.mean() < 2


def test_compile_runs(cuda_components, phantom):
    from pie_cli.core.devices import tune_for_speed
    from pie_cli.core.progression import progress

    components, placement = cuda_components
    tune_for_speed(components, placement, compile_unet=True)
    image, _, left = phantom
    frames = list(
        progress(components, image, left, prompt="effusion", steps=1, inference_steps=4, resolution=64)
    )
    assert len(frames) == 2
