"""Shared fixtures: hermetic user/HF directories, Ctrl-C semantics, one tiny SD model per session,
inputs, a CLI runner, a fake Hugging Face cache, child processes.

The layout mirrors ``pie_cli/`` (one file per command or subsystem); plain helpers (images,
the tiny ``simulate_argv``/``finetune_argv`` command lines, ``colour_folder``, the ``Child``
process and its ``PARK`` shim) live in ``tests/helpers.py``::

    conftest.py, helpers.py
    test_architecture.py     the layer rules of docs/ARCHITECTURE.md, on the import graph
    test_bad_input.py        the error contract of every command: one table, plus fuzzing
    cli/         test_app.py (help, version, startup cost), test_mask.py, test_export_gif.py,
                 test_models.py (`pie models`, user aliases, concurrent adds)
    core/        test_progression.py (the algorithm through the API, an independent oracle),
                 test_registry.py (model references, the HF cache), test_loading.py (--lora,
                 --unet, pickle weights), test_cuda.py (only with a GPU)
    imaging/     test_media.py, test_masks.py, test_morphology.py, test_dicom.py (DICOM and
                 16-bit PNG/TIFF input)
    runs/        test_locks.py (.pie.lock)
    simulate/    test_simulate.py (one run end to end: files, manifest, schedules, provenance,
                 failures), test_spec.py (one parameter definition, one validated builder),
                 test_trajectories.py, test_cohort.py, test_resume.py (signals, kills, --resume)
    training/    conftest.py (the ``data`` folder), test_finetune.py (LoRA and full training, their
                 outputs, options, bad input, torchrun), test_data.py (dataset formats),
                 test_config.py (recipes, precedence), test_checkpoints.py (kills, signals,
                 NaN, --resume)
    evaluation/  test_evaluate.py
    doctor/      test_doctor.py
    demo/        test_demo.py (phantoms, `pie demo`), test_demo_model.py (the built-in model)

Error messages of one command are asserted in that command's file; the contract every
command keeps (exit status, one line, no files) is ``test_bad_input.py``.

Hidden shared state (what one test can leave for the next):

- The session-scoped ``components`` and the process-global loader cache
  (``pie_cli.core.loading._CACHE``, filled by every in-process ``pie simulate``) share
  *mutable* model objects across tests: patch their methods with ``monkeypatch`` only, and
  never change their weights or scheduler in place.
- accelerate keeps process-wide singletons (``AcceleratorState``, ``GradientState``).
  ``hermetic_env`` resets them only at teardown, so several in-process ``pie finetune`` runs
  inside *one* test share them.
- Module-scoped reference runs (``reference`` in simulate/test_resume.py, ``straight`` in
  training/test_checkpoints.py) are built by whichever test asks first.

Signals: ``terminal_signals`` gives every test SIGINT's default Python handler (Ctrl-C raises
``KeyboardInterrupt``) even when pytest was started with SIGINT ignored (a background job of
a non-interactive shell, ``nohup``, some CI runners); every child a test starts resets SIGINT
and SIGTERM to their defaults before exec (``helpers.reset_signals``). Tests that signal a
child park it at a known point first (``helpers.PARK``) and never race it.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pie_cli.cli.app import app
from tests.helpers import HF_COMMIT, Child


@pytest.fixture(autouse=True)
def hermetic_env(tmp_path_factory, monkeypatch):
    """Never read or write the real user's pie registry or Hugging Face cache; never go online."""
    home = tmp_path_factory.mktemp("pie_home")
    hf = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("PIE_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(hf))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("PIE_MODEL", "PIE_DEVICE", "PIE_DTYPE", "PIE_SEED", "PIE_PROGRESS_INTERVAL"):
        monkeypatch.delenv(var, raising=False)
    # Off a terminal (as here) `auto` prints log lines; tests that assert stderr want none unless they
    # ask (`--progress plain|auto`, tests/cli/test_progress_log.py). Child processes inherit it.
    monkeypatch.setenv("PIE_PROGRESS", "off")
    from pie_cli.cli.console import PROGRESS_INTERVAL, ui

    ui.debug, ui.quiet, ui.progress, ui.progress_interval = False, False, "off", PROGRESS_INTERVAL
    yield
    _reset_accelerate()


@pytest.fixture(autouse=True)
def terminal_signals():
    """Ctrl-C semantics for every test, even when pytest itself was started with SIGINT ignored.

    SIGINT gets Python's default handler (``KeyboardInterrupt``) and an ignored SIGTERM its
    default; both are restored after the test. A child started meanwhile gets SIG_DFL by exec.
    """
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
        signal.SIGTERM: signal.getsignal(signal.SIGTERM),
    }
    if previous[signal.SIGTERM] == signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _reset_accelerate() -> None:
    """accelerate keeps one process-wide state (e.g. mixed precision); a CLI process trains once,
    but the test process runs many trainings in a row."""
    import sys

    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny randomly initialised SD-1.x-shaped model in diffusers layout (built once)."""
    from pie_cli.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def components(tiny_model):
    """The tiny model loaded through the registry and loader, like the CLI does."""
    from pie_cli.core.devices import choose_placement
    from pie_cli.core.loading import load
    from pie_cli.core.registry import resolve

    return load(resolve(str(tiny_model)), choose_placement("cpu", "fp32"))


@pytest.fixture(scope="session")
def phantom():
    """(image, right-lung mask, left-lung mask) of the synthetic chest phantom, 64 x 64."""
    from pie_cli.demo.phantom import chest_phantom

    return chest_phantom(64, seed=0)


@pytest.fixture
def inputs(tmp_path, phantom) -> dict[str, Path]:
    """The phantom chest and its left-lung mask as files: {"image": chest.png, "mask": left-lung.png}."""
    image, _right, left = phantom
    paths = {"image": tmp_path / "chest.png", "mask": tmp_path / "left-lung.png"}
    image.save(paths["image"])
    left.save(paths["mask"])
    return paths


class Cli:
    """Runs `pie` in-process; keeps stdout and stderr apart."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str | Path):
        return self.runner.invoke(app, [str(a) for a in args], catch_exceptions=True)


@pytest.fixture
def cli() -> Cli:
    return Cli()


@pytest.fixture(scope="session")
def tiny_lora(tiny_model, tmp_path_factory) -> Path:
    """A diffusers-format LoRA for the tiny UNet, with non-zero weights so it changes results."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("lora") / "effusion-lora"
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_unet_variant(tiny_model, tmp_path_factory) -> Path:
    """A "fine-tuned" UNet: the tiny UNet with perturbed weights, saved as DIR/unet."""
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(2)
        for param in unet.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    out = tmp_path_factory.mktemp("finetuned") / "ft"
    unet.save_pretrained(out / "unet", safe_serialization=True)
    return out


@pytest.fixture
def hf_snapshot():
    """Lay a model out in the (hermetic) HF cache the way huggingface_hub caches a download:
    ``models--ORG--NAME/refs/main`` naming ``snapshots/<commit>/``. Returns the snapshot folder.

    ``like_hub=True`` lays it out exactly as huggingface_hub does (``blobs/<etag>``, the snapshot's
    files symlinks into them, ``refs/<each of refs>``; ``tests/hf_cache.py``) instead of copying.
    """

    def put(
        model: Path, repo_id: str, commit: str = HF_COMMIT, *, like_hub: bool = False, refs: tuple = ("main",)
    ) -> Path:
        if like_hub:
            from tests.hf_cache import lay_out

            files = {
                p.relative_to(model).as_posix(): p.read_bytes() for p in Path(model).rglob("*") if p.is_file()
            }
            return lay_out(repo_id, files, commit=commit, refs=refs)
        repo = Path(os.environ["HF_HUB_CACHE"]) / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / commit
        shutil.copytree(model, snapshot)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return snapshot

    return put


@pytest.fixture
def child(tmp_path):
    """Start ``pie ARGV`` in a child process (``helpers.Child``); whatever still runs is killed after the test."""
    started: list[Child] = []

    def start(argv: list, park: str | None = None, **popen) -> Child:
        started.append(Child(argv, tmp_path / f"child{len(started)}", park=park, **popen))
        return started[-1]

    yield start
    for c in started:
        c.close()
