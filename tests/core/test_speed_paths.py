"""The speed paths of the core (issue 18): one UNet branch where guidance leaves the other without
effect, the CPU's packed weights and channels-last layout, threads, and what a CPU without bf16 gets.

Each is checked against the plain path it replaces: same frames within float rounding, and the work
actually saved (UNet batch sizes counted) or the layout actually handed over.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pie_cli.core import devices, progression
from pie_cli.core.progression import Components, progress_batch
from tests.helpers import pixels, zeros_randn

PARAMS = {"prompt": "large left pleural effusion", "steps": 2, "inference_steps": 10, "resolution": 64}


def unet_batches(monkeypatch, components) -> list[int]:
    """Every UNet call's batch size, in order (a wrapper around the UNet's forward)."""
    batches: list[int] = []
    forward = components.unet.forward

    def counting(sample, *a, **k):
        batches.append(sample.shape[0])
        return forward(sample, *a, **k)

    monkeypatch.setattr(components.unet, "forward", counting)
    return batches


def final_frames(components, image, mask, seeds=(3, 4), **params) -> list[np.ndarray]:
    """The last frame of each trajectory (K = len(seeds)) as int16 RGB."""
    *_, last = progress_batch(components, image, mask, seeds=list(seeds), **{**PARAMS, **params})
    return [pixels(f.image) for f in last]


def two_branch_path(monkeypatch) -> None:
    """The path before issue 18: both branches at every step, eps = eps_u + w * (eps_c - eps_u)."""
    monkeypatch.setattr(progression, "guidance_branches", lambda w: "both")


# --------------------------------------------------------------------------- guidance


def test_guidance_one_and_zero_run_the_unet_at_batch_k_and_others_at_2k(components, phantom, monkeypatch):
    image, _, left = phantom
    batches = unet_batches(monkeypatch, components)
    for w, batch in ((1.0, 2), (0.0, 2), (7.5, 4), (0.5, 4)):  # K = 2 trajectories
        batches.clear()
        final_frames(components, image, left, guidance_scale=w)
        assert batches == [batch] * (2 * 6), w  # 2 steps x len(ts) = 6 (PNDM, T=10, strength 0.5)


def test_a_guidance_schedule_picks_the_branches_per_step(components, phantom, monkeypatch):
    image, _, left = phantom
    batches = unet_batches(monkeypatch, components)
    final_frames(components, image, left, seeds=(5,), guidance_schedule=(1.0, 7.5))
    assert batches == [1] * 6 + [2] * 6


@pytest.mark.parametrize("w", [1.0, 0.0])
def test_one_branch_frames_equal_the_two_branch_path(components, phantom, monkeypatch, w):
    image, _, left = phantom
    fast = final_frames(components, image, left, guidance_scale=w)
    with monkeypatch.context() as patch:
        two_branch_path(patch)
        batches = unet_batches(patch, components)
        old = final_frames(components, image, left, guidance_scale=w)
        assert set(batches) == {4}  # the old path did run both branches
    for a, b in zip(fast, old, strict=True):
        assert np.abs(a - b).max() <= 1  # float rounding only: the same frames
    assert np.abs(fast[0] - fast[1]).max() > 10  # and not trivially equal (two seeds differ)


def test_guidance_zero_follows_the_negative_prompt_and_one_the_prompt(components, phantom, monkeypatch):
    """w = 0 is eps_u alone (the prompt has no effect), w = 1 eps_c alone (the negative prompt has none)."""
    zeros_randn(monkeypatch)
    image, _, left = phantom
    zero = [
        final_frames(components, image, left, seeds=(1,), guidance_scale=0.0, prompt=p)[0] for p in ("a", "b")
    ]
    assert np.array_equal(zero[0], zero[1])
    one = [
        final_frames(components, image, left, seeds=(1,), guidance_scale=1.0, negative_prompt=n)[0]
        for n in ("", "blurry")
    ]
    assert np.array_equal(one[0], one[1])
    other = final_frames(components, image, left, seeds=(1,), guidance_scale=1.0, prompt="a")[0]
    assert np.abs(other - zero[0]).max() > 0  # w = 1 does read the prompt


def test_guidance_below_one_keeps_the_formula(components, phantom, monkeypatch):
    """0 < w < 1 is not the prompt's prediction alone (diffusers' rule): pie keeps eps_u + w (eps_c - eps_u)."""
    zeros_randn(monkeypatch)
    image, _, left = phantom
    half = final_frames(components, image, left, seeds=(1,), guidance_scale=0.5)[0]
    one = final_frames(components, image, left, seeds=(1,), guidance_scale=1.0)[0]
    zero = final_frames(components, image, left, seeds=(1,), guidance_scale=0.0)[0]
    assert np.abs(half - one).max() > 2 and np.abs(half - zero).max() > 2


def test_one_branch_eps_is_a_tensor_of_its_own(components, phantom, monkeypatch):
    """A UNet that hands back the same output memory at every call (as CUDA graphs do) gives the same
    frames: the scheduler's history (PNDM keeps past eps) never aliases the UNet's output."""
    image, _, left = phantom
    want = final_frames(components, image, left, seeds=(2,), guidance_scale=1.0)
    forward = components.unet.forward
    buffers: dict[tuple, torch.Tensor] = {}

    def reusing(sample, *a, **k):
        out = forward(sample, *a, **k)
        eps = out[0] if isinstance(out, tuple) else out.sample
        buffer = buffers.setdefault(tuple(eps.shape), torch.empty_like(eps))
        buffer.copy_(eps)
        return (buffer,)

    monkeypatch.setattr(components.unet, "forward", reusing)
    got = final_frames(components, image, left, seeds=(2,), guidance_scale=1.0)
    assert len(buffers) == 1  # every call did hand back the one buffer
    assert np.array_equal(want[0], got[0])


# --------------------------------------------------------------------------- CPU packed weights and layout


def fresh_components(tiny_model, dtype: str = "fp32") -> Components:
    """The tiny model loaded anew (not the session's cached object: tuning changes modules in place)."""
    from pie_cli.core.loading import load_parts, load_scheduler
    from pie_cli.core.registry import resolve

    placement = devices.choose_placement("cpu", dtype)
    source = resolve(str(tiny_model))
    unet, vae, text, tokenizer = load_parts(source, dtype=placement.dtype, vae_dtype=placement.vae_dtype)
    for module in (unet, vae, text):
        module.eval().requires_grad_(False)
    return Components(unet, vae, text, tokenizer, load_scheduler(source))


needs_packing = pytest.mark.skipif(
    not devices._packing_works(torch.float32), reason="this torch has no working oneDNN packed kernels"
)


@needs_packing
def test_packed_cpu_model_gives_the_plain_models_frames(tiny_model, phantom):
    image, _, left = phantom
    plain = fresh_components(tiny_model)
    tuned = fresh_components(tiny_model)
    record = devices.tune_for_speed(tuned, devices.choose_placement("cpu", "fp32"))
    assert (
        record["unet"]
        == record["vae"]
        == {"memory_format": "channels_last", "weights": "packed", "compiled": False}
    )
    assert tuned.unet.conv_in.weight.numel() == 0  # the plain copy is freed: memory does not grow
    assert tuned.unet.dtype == torch.float32 and tuned.device.type == "cpu"
    for a, b in zip(final_frames(plain, image, left), final_frames(tuned, image, left), strict=True):
        assert np.abs(a - b).max() <= 1
    again = devices.tune_for_speed(tuned, devices.choose_placement("cpu", "fp32"))  # a cached model: once
    assert again == record


@needs_packing
def test_tuned_model_gets_its_inputs_channels_last(tiny_model, phantom, monkeypatch):
    image, _, left = phantom
    tuned = fresh_components(tiny_model)
    devices.tune_for_speed(tuned, devices.choose_placement("cpu", "fp32"))
    seen: dict[str, set[bool]] = {"unet": set(), "encode": set(), "decode": set()}

    def recording(name, fn):
        def wrapper(x, *a, **k):
            seen[name].add(x.is_contiguous(memory_format=torch.channels_last))
            return fn(x, *a, **k)

        return wrapper

    monkeypatch.setattr(tuned.unet, "forward", recording("unet", tuned.unet.forward))
    monkeypatch.setattr(tuned.vae, "encode", recording("encode", tuned.vae.encode))
    monkeypatch.setattr(tuned.vae, "decode", recording("decode", tuned.vae.decode))
    final_frames(tuned, image, left, seeds=(1,))
    assert seen == {"unet": {True}, "encode": {True}, "decode": {True}}


def test_without_working_packed_kernels_the_model_stays_plain(tiny_model, monkeypatch):
    def broken(self, x):
        raise RuntimeError("no such kernel")

    devices._packing_works.cache_clear()
    monkeypatch.setattr(devices._PackedConv, "__call__", broken)
    try:
        tuned = fresh_components(tiny_model)
        record = devices.tune_for_speed(tuned, devices.choose_placement("cpu", "fp32"))
    finally:
        devices._packing_works.cache_clear()
    assert record["unet"] == {"memory_format": "channels_last", "weights": "plain", "compiled": False}
    assert tuned.unet.conv_in.weight.numel() > 0


def test_tuning_can_leave_the_layout_alone(tiny_model):
    tuned = fresh_components(tiny_model)
    record = devices.tune_for_speed(
        tuned, devices.choose_placement("cpu", "fp32"), channels_last=False, pack_weights=False
    )
    assert record["vae"] == {"memory_format": "contiguous", "weights": "plain", "compiled": False}
    assert devices.input_memory_format(tuned.vae) == torch.contiguous_format


# --------------------------------------------------------------------------- dtype and threads


def test_auto_is_fp32_on_the_cpu_and_bf16_is_opt_in(monkeypatch):
    auto = devices.choose_placement("cpu", "auto")
    assert (auto.dtype, auto.vae_dtype) == (torch.float32, torch.float32)
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    bf16 = devices.choose_placement("cpu", "bf16")
    assert bf16.dtype == torch.bfloat16 and not bf16.notes
    assert bf16.vae_dtype == torch.float32  # measured: bf16 hurts the VAE more than the UNet
    assert devices.choose_placement("cpu", "auto").dtype == torch.float32  # never switched by auto


def test_a_cpu_without_bf16_hardware_is_told_and_never_switched(monkeypatch):
    monkeypatch.setattr(
        torch.cpu, "get_capabilities", lambda: {"avx2": True, "architecture": "x86_64"}, raising=False
    )
    assert devices.cpu_has_native_bf16() is False
    placement = devices.choose_placement("cpu", "bf16")
    assert placement.dtype == torch.bfloat16
    assert any("no bf16 hardware" in note and "emulated" in note for note in placement.notes)
    assert devices.choose_placement("cpu", "auto").dtype == torch.float32


def test_bf16_frames_stay_finite_and_near_fp32(tiny_model, phantom):
    image, _, left = phantom
    full = fresh_components(tiny_model)
    half = fresh_components(tiny_model, "bf16")
    assert half.unet.dtype == torch.bfloat16
    devices.tune_for_speed(half, devices.choose_placement("cpu", "bf16"))
    for a, b in zip(final_frames(full, image, left), final_frames(half, image, left), strict=True):
        assert np.abs(a - b).mean() < 8  # bf16 drifts from fp32, but not into another image


def test_threads_are_set_for_the_block_and_restored():
    before = torch.get_num_threads()
    with devices.intra_op_threads(1) as used:
        assert used == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with devices.intra_op_threads(None) as used:
        assert used == before


# --------------------------------------------------------------------------- memory of a part used once


linux_only = pytest.mark.skipif(
    not devices._file_mappings(unwritten_only=True), reason="needs Linux's /proc/self/smaps and file mappings"
)


def mapped_weights(tmp_path, dirty: bool = False) -> tuple[torch.nn.Module, str]:
    """A 4 MB Linear read memory-mapped from a safetensors file (as the model loader reads one)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    save_file({"weight": torch.randn(1024, 1024), "bias": torch.randn(1024)}, tmp_path / "part.safetensors")
    layer = torch.nn.Linear(1024, 1024)
    layer.load_state_dict(load_file(tmp_path / "part.safetensors"), assign=True)
    layer.weight.sum()  # used: every page resident
    if dirty:
        with torch.no_grad():
            layer.weight[0, 0] = 1234.5  # written in place: the process's own copy of that page
    setattr(layer, devices._RELEASE, True)
    return layer, str(tmp_path / "part.safetensors")


def resident_kb(path: str) -> int:
    """Resident kB of this process's mappings of ``path`` (smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            inside = fields[-1] == path
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@linux_only
def test_a_part_used_once_hands_back_its_file_pages_and_reads_the_same_after(tmp_path):
    layer, path = mapped_weights(tmp_path)
    before = layer.weight.clone()
    assert resident_kb(path) >= 4000
    assert devices.release_after_use(layer) >= 1
    assert resident_kb(path) < 100  # the 4 MB weight no longer counts in the RSS
    assert torch.equal(layer.weight, before)  # read back from the file, unchanged


@linux_only
def test_a_written_mapping_is_never_handed_back(tmp_path):
    layer, path = mapped_weights(tmp_path, dirty=True)
    assert devices.release_after_use(layer) == 0
    assert float(layer.weight[0, 0].detach()) == 1234.5  # what was written stays
    assert resident_kb(path) >= 4000


def test_only_a_part_marked_by_tuning_is_released(tmp_path, tiny_model):
    layer, _ = mapped_weights(tmp_path)
    delattr(layer, devices._RELEASE)
    assert devices.release_after_use(layer) == 0
    tuned = fresh_components(tiny_model)
    record = devices.tune_for_speed(tuned, devices.choose_placement("cpu", "fp32"))
    assert record["text_encoder"] == {"released_after_use": True}
    assert record["unet"]["weights"] in ("packed", "plain")


@linux_only
def test_a_run_releases_the_text_encoder_after_encoding_once(tiny_model, phantom, monkeypatch):
    image, _, left = phantom
    tuned = fresh_components(tiny_model)
    devices.tune_for_speed(tuned, devices.choose_placement("cpu", "fp32"))
    order: list[str] = []
    release = devices.release_after_use
    monkeypatch.setattr(progression, "release_after_use", lambda m: order.append("release") or release(m))
    forward = tuned.text_encoder.forward
    monkeypatch.setattr(
        tuned.text_encoder, "forward", lambda *a, **k: order.append("text") or forward(*a, **k)
    )
    first = final_frames(tuned, image, left, seeds=(1,))
    second = final_frames(tuned, image, left, seeds=(1,))  # a cached model: the text read back from the file
    assert order == ["text", "release", "text", "release"]
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


@needs_packing
def test_the_tuned_model_stays_within_the_oracles_tolerance_with_zero_noise(tiny_model, phantom, monkeypatch):
    """The literal reference of the method, run on the plain model, against pie on the tuned one."""
    from pie_cli.core.parameters import PieConfig
    from tests.core.test_progression import _reference_step

    zeros_randn(monkeypatch)
    image, _, left = phantom
    plain = fresh_components(tiny_model)
    tuned = fresh_components(tiny_model)
    devices.tune_for_speed(tuned, devices.choose_placement("cpu", "fp32"))
    cfg = PieConfig(prompt=PARAMS["prompt"], steps=3, inference_steps=10, resolution=64, beta1=0.2, beta2=0.9)
    frames = [f.image for f in progression.progress(tuned, image, left, cfg)]
    for n in range(1, len(frames)):
        expected = _reference_step(plain, frames[n - 1], frames[0], left, cfg)
        assert np.abs(pixels(frames[n]) - expected).max() <= 1, n


@linux_only
def test_converting_a_mapped_part_hands_back_the_fp32_pages_and_rounds_as_to_does(tmp_path):
    layer, path = mapped_weights(tmp_path)
    want = {k: v.to(torch.bfloat16) for k, v in layer.state_dict().items()}
    assert resident_kb(path) >= 4000
    devices.convert_releasing(layer, torch.bfloat16)
    assert layer.weight.dtype == layer.bias.dtype == torch.bfloat16
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in want.items())
    assert resident_kb(path) < 100  # the fp32 source no longer counts


def test_the_stored_dtypes_are_read_from_the_header_alone(tmp_path):
    from safetensors.torch import save_file

    from pie_cli.core.loading import safetensors_float_dtypes

    save_file({"a": torch.zeros(2), "ids": torch.zeros(2, dtype=torch.int64)}, tmp_path / "f32.safetensors")
    save_file({"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float16)}, tmp_path / "mixed.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    assert safetensors_float_dtypes(tmp_path / "f32.safetensors") == {"F32"}
    assert safetensors_float_dtypes(tmp_path / "mixed.safetensors") == {"F32", "F16"}
    assert safetensors_float_dtypes(tmp_path / "junk.safetensors") == set()
    assert safetensors_float_dtypes(tmp_path / "missing.safetensors") == set()


@pytest.mark.parametrize("stored", ["fp32", "fp16"])
def test_a_bf16_unet_from_fp32_files_is_converted_lean_with_from_pretrained_values(
    tiny_model, tmp_path, monkeypatch, stored
):
    import shutil

    from diffusers import UNet2DConditionModel

    from pie_cli.core.loading import load_parts
    from pie_cli.core.registry import resolve

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    if stored == "fp16":
        unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.float16)
        shutil.rmtree(model / "unet")
        unet.save_pretrained(model / "unet", safe_serialization=True)
    calls: list[torch.dtype] = []
    convert = devices.convert_releasing
    monkeypatch.setattr(devices, "convert_releasing", lambda m, d: calls.append(d) or convert(m, d))
    unet = load_parts(resolve(str(model)), dtype=torch.bfloat16, vae_dtype=torch.float32)[0]
    want = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.bfloat16).state_dict()
    assert calls == ([torch.bfloat16] if stored == "fp32" else [])  # an fp16 UNet loads as before
    assert unet.dtype == torch.bfloat16
    assert want.keys() == unet.state_dict().keys()
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in want.items())
