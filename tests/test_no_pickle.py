"""Defect class: pie opens a pickle without being asked to (pickle can run code).

The rule pie must keep: **no code path opens a pickle unless ``--allow-pickle`` was given.**
Weights are safetensors, run state is JSON, and anything torch reads back (accelerate's
checkpoints on ``pie finetune --resume``) is read with ``torch.load(..., weights_only=True)``.

Each row runs one command in-process with ``pickle.load``/``pickle.loads`` replaced by a
recorder that refuses, and ``torch.load`` wrapped to record how it was called; the row asserts
that no pickle was opened and that every ``torch.load`` was a weights-only load. (torch's
weights-only loader has its own unpickler, so a weights-only load never reaches
``pickle.load``; a ``torch.load`` without ``weights_only`` counts as weights-only only where
torch itself would default to it.) The last row gives ``--allow-pickle`` on a pickle-only model:
there pickle weights may be loaded, and the run must work.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import colour_folder, finetune_argv, manifest, simulate_argv
from tests.refusals import check_ok


@dataclass
class Opened:
    pickles: list[str] = field(default_factory=list)  # pickle.load / pickle.loads calls
    torch_loads: list[tuple[str, object, bool]] = field(
        default_factory=list
    )  # (file, weights_only, effective)

    def unsafe(self) -> list[tuple[str, object, bool]]:
        return [call for call in self.torch_loads if not call[2]]


def _weights_only(weights_only, pickle_module) -> bool:
    """Whether a ``torch.load`` call loads weights only (None: what this torch defaults to)."""
    if weights_only is not None:
        return bool(weights_only)
    import torch

    default = getattr(torch.serialization, "_default_to_weights_only", None)
    return bool(default(pickle_module)) if default is not None else False


@contextmanager
def watching(refuse: bool = True):
    """Record every pickle and torch.load call (and refuse pickle.load/loads when ``refuse``)."""
    import torch

    opened = Opened()
    real_torch_load = torch.load

    def recorder(name: str, real: Callable) -> Callable:
        def call(*args, **kwargs):
            opened.pickles.append(name)
            if refuse:
                raise pickle.UnpicklingError(f"test: {name} refused (no pickle without --allow-pickle)")
            return real(*args, **kwargs)

        return call

    def torch_load(f, *args, **kwargs):
        pickle_module = kwargs.get("pickle_module", args[1] if len(args) > 1 else None)
        weights_only = kwargs.get("weights_only")
        opened.torch_loads.append((str(f), weights_only, _weights_only(weights_only, pickle_module)))
        return real_torch_load(f, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pickle, "load", recorder("pickle.load", pickle.load))
        patch.setattr(pickle, "loads", recorder("pickle.loads", pickle.loads))
        patch.setattr(torch, "load", torch_load)
        patch.setattr(torch.serialization, "load", torch_load)
        yield opened


# --------------------------------------------------------------------------- the rows


def _fresh_simulate(cli, tmp: Path, tiny: Path, inputs) -> list:
    return simulate_argv(inputs["image"], tmp / "run", model=tiny, mask=inputs["mask"])


def _simulate_resume(cli, tmp: Path, tiny: Path, inputs) -> list:
    import torch

    from pie_cli.runs.manifest import encode_state

    out = tmp / "run"
    check_ok(cli(*simulate_argv(inputs["image"], out, model=tiny, mask=inputs["mask"], steps=2)))
    data = manifest(out)  # as a kill after step 1 leaves it
    data.update(
        status="interrupted",
        last_complete_frame=1,
        rng_states=[encode_state(torch.Generator("cpu").manual_seed(42).get_state())],
    )
    data["frames"] = [f for f in data["frames"] if f["index"] <= 1]
    (out / "frame_002.png").unlink()
    (out / "manifest.json").write_text(json.dumps(data))
    return ["simulate", "--resume", "--out", out]


def _finetune_checkpointed(cli, tmp: Path, tiny: Path, inputs) -> list:
    data = colour_folder(tmp / "data", n=2)
    return finetune_argv(data, tiny, tmp / "ft", "--checkpoint-every", "1", batch_size=1, max_steps=2)


def _finetune_resume(cli, tmp: Path, tiny: Path, inputs) -> list:
    out = tmp / "ft"
    check_ok(cli(*_finetune_checkpointed(cli, tmp, tiny, inputs)))
    assert (out / "checkpoints" / "step_000002").is_dir()
    return ["finetune", "--out", out, "--resume", "latest", "--max-steps", "3", "--allow-schedule-change"]


def _evaluate_demo(cli, tmp: Path, tiny: Path, inputs) -> list:
    run = tmp / "run"
    run.mkdir()
    for n in range(3):
        shutil.copy(inputs["image"], run / f"frame_{n:03d}.png")
    shutil.copy(inputs["mask"], run / "mask.png")
    (run / "manifest.json").write_text(json.dumps({"parameters": {"prompt": "left pleural effusion"}}))
    return ["evaluate", run, "--classifier", "demo"]


def _doctor(cli, tmp: Path, tiny: Path, inputs) -> list:
    return ["doctor", "--self-test"]


ROWS = [
    pytest.param(_fresh_simulate, id="simulate"),
    pytest.param(_simulate_resume, id="simulate --resume"),
    pytest.param(_finetune_checkpointed, id="finetune with a checkpoint"),
    pytest.param(_finetune_resume, id="finetune --resume latest"),
    pytest.param(_evaluate_demo, id="evaluate --classifier demo"),
    pytest.param(_doctor, id="doctor --self-test"),
]


@pytest.mark.parametrize("prepare", ROWS)
def test_no_pickle_is_opened_without_allow_pickle(prepare, cli, tiny_model, inputs, tmp_path):
    argv = prepare(cli, tmp_path, tiny_model, inputs)  # its setup runs unwatched
    with watching() as opened:
        result = cli(*argv)
    assert not opened.pickles, f"pickle opened: {opened.pickles}\n{result.stderr}"
    assert not opened.unsafe(), f"torch.load without weights_only=True: {opened.unsafe()}"
    check_ok(result)


def test_allow_pickle_loads_a_pickle_only_model(cli, tiny_model, inputs, tmp_path):
    import torch
    from safetensors.torch import load_file

    model = Path(shutil.copytree(tiny_model, tmp_path / "pickled"))
    for part, safe, pickled in (
        ("unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
        ("vae", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
        ("text_encoder", "model.safetensors", "pytorch_model.bin"),
    ):
        torch.save(load_file(model / part / safe), model / part / pickled)
        (model / part / safe).unlink()
    argv = simulate_argv(
        inputs["image"], tmp_path / "run", "--allow-pickle", model=model, mask=inputs["mask"]
    )
    with watching(refuse=False) as opened:
        result = cli(*argv)
    check_ok(result)
    assert manifest(tmp_path / "run")["status"] == "complete"
    loaded = {Path(f).name for f, _, _ in opened.torch_loads}
    assert {"diffusion_pytorch_model.bin", "pytorch_model.bin"} <= loaded, (
        f"pickle weights not loaded: {loaded}"
    )
    assert os.path.isdir(tmp_path / "run")
