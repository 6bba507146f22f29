"""The research features of `pie finetune`: held-out loss and best checkpoint, EMA, the loss mask's
weighting, trackers, loss.png and the dry run's effective configuration and probe."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import colour_folder, finetune_argv

FAST = ["--checkpoint-every", "1000"]


def metrics(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def val_losses(out: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["val_loss"]) for r in metrics(out) if r["val_loss"]}


def summary(out: Path) -> dict:
    return json.loads((out / "training_summary.json").read_text())


# --------------------------------------------------------------------------- the held-out split


def test_the_split_is_chosen_by_the_seed_alone_and_never_trained_on():
    from pie_cli.training.validation import split_records

    records = list(range(40))
    train, held = split_records(records, 0.1, seed=3)
    assert len(held) == 4 and len(train) == 36
    assert sorted(train + held) == records and not set(train) & set(held)
    assert split_records(records, 0.1, seed=3) == (train, held)  # reproducible
    assert split_records(records, 0.1, seed=4)[1] != held  # another seed, another split
    assert split_records(records, 0.0, seed=3) == (records, [])
    assert len(split_records(records[:3], 0.1, seed=3)[1]) == 1  # at least one example


def test_a_split_that_leaves_nothing_to_train_on_is_refused(cli, tiny_model, tmp_path):
    data = colour_folder(tmp_path / "data", n=1)
    result = cli(*finetune_argv(data, tiny_model, tmp_path / "ft", "--validation-split", "0.5", "--dry-run"))
    assert result.exit_code == 2
    assert (
        "--validation-split 0.5 of 1 examples leaves none to train on; give more examples or a smaller split."
        in result.stderr
    )
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--validation-split", "0.6"],
            "--validation-split must be a fraction in [0, 0.5] of the examples, got 0.6.",
        ),
        (
            ["--validation-split", "nan"],
            "--validation-split must be a fraction in [0, 0.5] of the examples, got nan.",
        ),
        (["--validation-loss-every", "2"], "--validation-loss-every needs --validation-split"),
        (
            ["--validation-split", "0.2", "--validation-loss-every", "0"],
            "--validation-loss-every must be at least 1, got 0.",
        ),
        (["--ema-decay", "1"], "--ema-decay must be in (0, 1), got 1."),
        (["--report-to", "mlflow"], "--report-to must be one of none, tensorboard, wandb; got 'mlflow'."),
    ],
)
def test_refusals(cli, tiny_model, tmp_path, args, message):
    data = colour_folder(tmp_path / "data", n=4)
    result = cli(*finetune_argv(data, tiny_model, tmp_path / "ft", *args, "--dry-run", "--no-probe"))
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "ft").exists()


def test_held_out_loss_is_reproducible_logged_at_checkpoints_and_names_the_best_kept_checkpoint(
    cli, tiny_model, tmp_path
):
    data = colour_folder(tmp_path / "data", n=8)
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        argv = finetune_argv(
            data,
            tiny_model,
            out,
            "--validation-split",
            "0.25",
            "--checkpoint-every",
            "2",
            "--keep-checkpoints",
            "1",
            "--lr",
            "0.05",
            max_steps=6,
        )
        result = cli(*argv)
        assert result.exit_code == 0, result.output
        runs.append(out)
    a, b = runs
    assert list(val_losses(a)) == [2, 4, 6]  # at each checkpoint (and the last step)
    assert val_losses(a) == val_losses(b)  # same seed: the same values
    assert len(set(val_losses(a).values())) == 3  # and they move with the weights
    record = summary(a)["validation"]
    assert record["examples"] == 2 and summary(a)["data"]["held_out"] == 2
    assert summary(a)["data"]["examples"] == 6
    step, loss = min(val_losses(a).items(), key=lambda kv: (kv[1], kv[0]))
    assert record["best"]["step"] == step
    assert record["best"]["val_loss"] == pytest.approx(loss, abs=1e-6)
    assert record["best"]["checkpoint"] == f"checkpoints/step_{step:06d}"
    kept = sorted(p.name for p in (a / "checkpoints").iterdir())
    assert kept == sorted({f"step_{step:06d}", "step_000006"})  # the best outlives --keep-checkpoints 1


def test_the_best_checkpoint_is_spared_by_pruning(tmp_path):
    from pie_cli.training.checkpoints import COMPLETE, prune

    for step in (1, 2, 3, 4):
        folder = tmp_path / "checkpoints" / f"step_{step:06d}"
        folder.mkdir(parents=True)
        (folder / COMPLETE).write_text(json.dumps({"step": step}))
    prune(tmp_path, keep=1, step=4, keep_also=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    prune(tmp_path, keep=1, step=4)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000004"]


def test_held_out_loss_does_not_depend_on_the_example_order_or_batch(tiny_model, tmp_path):
    """The value is a function of the weights and the examples: two calls agree, and the noise differs
    per example and timestep (an implementation reusing one noise draw would give equal terms)."""
    from diffusers import DDPMScheduler

    from pie_cli.core.loading import load_parts
    from pie_cli.core.registry import resolve
    from pie_cli.training.config import TrainSpec
    from pie_cli.training.data import load_data
    from pie_cli.training.dataset import PairDataset
    from pie_cli.training.validation import HeldOut, _noise_seed, heldout_loss

    data_dir = colour_folder(tmp_path / "data", n=4)
    spec = TrainSpec(data=str(data_dir), out=str(tmp_path / "o"), resolution=32)
    data = load_data(spec)
    unet, vae, te, tok = load_parts(resolve(str(tiny_model)))
    sched = DDPMScheduler.from_pretrained(tiny_model, subfolder="scheduler")
    ds = PairDataset(data, data.records, tok, 32, True, False, 0)
    one = heldout_loss(HeldOut(ds, 0), unet.eval(), vae, te, sched, torch.device("cpu"))
    two = heldout_loss(HeldOut(ds, 0), unet, vae, te, sched, torch.device("cpu"))
    assert one == two and np.isfinite(one)
    assert heldout_loss(HeldOut(ds, 1), unet, vae, te, sched, torch.device("cpu")) != one  # the seed's noise
    assert len({_noise_seed(0, i, t) for i in range(4) for t in (100, 300, 500)}) == 12


# --------------------------------------------------------------------------- EMA


def test_ema_weights_differ_from_the_trained_ones_are_saved_and_are_what_validation_scored(
    cli, tiny_model, tmp_path
):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file

    from pie_cli.core.loading import load_parts
    from pie_cli.core.registry import resolve
    from pie_cli.training.config import TrainSpec
    from pie_cli.training.data import load_data
    from pie_cli.training.dataset import PairDataset
    from pie_cli.training.validation import HeldOut, heldout_loss, split_records

    data = colour_folder(tmp_path / "data", n=8)
    out = tmp_path / "ft"
    argv = finetune_argv(
        data,
        tiny_model,
        out,
        "--method",
        "full",
        "--use-ema",
        "--ema-decay",
        "0.9",
        "--lr",
        "0.01",
        "--validation-split",
        "0.25",
        "--checkpoint-every",
        "4",
        max_steps=4,
    )
    result = cli(*argv)
    assert result.exit_code == 0, result.output
    checkpoint = out / "checkpoints" / "step_000004"
    raw = load_file(checkpoint / "model.safetensors")  # the trained weights (what a resume continues)
    saved = UNet2DConditionModel.from_pretrained(out / "unet")
    averaged = saved.state_dict()
    shadow = load_file(checkpoint / "ema.safetensors")
    assert len(shadow) == len(raw)
    differing = [k for k in raw if not torch.equal(raw[k], averaged[k])]
    assert len(differing) > len(raw) // 2  # EMA weights are not the raw ones...
    names = [n for n, _ in saved.named_parameters()]
    for i, name in enumerate(names):  # ...and the saved unet/ is exactly the average
        assert torch.equal(shadow[f"shadow.{i:05d}"], averaged[name]), name
    assert json.loads((checkpoint / "ema.json").read_text())["optimization_step"] == 4
    assert summary(out)["validation"]["weights"] == "ema"

    # The logged held-out loss is the averaged weights' (recomputed independently), not the raw ones'.
    spec = TrainSpec(data=str(data), out=str(out), resolution=32)
    records = load_data(spec).records
    _, held = split_records(records, 0.25, 42)
    _, vae, te, tok = load_parts(resolve(str(tiny_model)))
    sched = DDPMScheduler.from_pretrained(tiny_model, subfolder="scheduler")
    ds = PairDataset(load_data(spec), held, tok, 32, True, False, 42)
    trained = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    trained.load_state_dict(raw)
    with_ema = heldout_loss(HeldOut(ds, 42), saved.eval(), vae, te, sched, torch.device("cpu"))
    with_raw = heldout_loss(HeldOut(ds, 42), trained.eval(), vae, te, sched, torch.device("cpu"))
    logged = val_losses(out)[4]
    assert logged == pytest.approx(with_ema, abs=2e-6)
    assert abs(with_raw - with_ema) > 1e-4 and logged != pytest.approx(with_raw, abs=1e-5)


def test_ema_resumes_exactly(cli, tiny_model, tmp_path):
    from safetensors.torch import load_file

    data = colour_folder(tmp_path / "data", n=8)
    common = ["--use-ema", "--ema-decay", "0.8", "--lr", "0.01", "--checkpoint-every", "2"]
    straight = tmp_path / "straight"
    assert cli(*finetune_argv(data, tiny_model, straight, *common, max_steps=4)).exit_code == 0
    split = tmp_path / "split"
    assert cli(*finetune_argv(data, tiny_model, split, *common, max_steps=2)).exit_code == 0
    resumed = cli(
        *finetune_argv(
            data, tiny_model, split, *common, "--resume", "latest", "--allow-schedule-change", max_steps=4
        )
    )
    assert resumed.exit_code == 0, resumed.output
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(split / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_with_ema_from_a_checkpoint_without_it_is_refused(cli, tiny_model, tmp_path):
    data = colour_folder(tmp_path / "data", n=4)
    out = tmp_path / "ft"
    assert cli(*finetune_argv(data, tiny_model, out, "--checkpoint-every", "1", max_steps=1)).exit_code == 0
    result = cli(*finetune_argv(data, tiny_model, out, "--use-ema", "--resume", "latest", max_steps=1))
    assert result.exit_code == 2
    assert "has no usable EMA weights" in result.stderr and "saved without --use-ema" in result.stderr


# --------------------------------------------------------------------------- the loss mask's weighting


def test_masked_loss_is_zero_where_the_mask_is_zero_and_normalised_by_its_area():
    from pie_cli.training.validation import latent_mask, masked_mean

    error = torch.zeros(2, 4, 4, 4)
    error[:, :, :, :2] = 5.0  # error only in the left half
    right = torch.zeros(2, 1, 32, 32)
    right[..., 16:] = 1.0
    weight = latent_mask(right, (4, 4))
    assert weight.shape == (2, 1, 4, 4) and torch.equal(weight[..., 2:], torch.ones(2, 1, 4, 2))
    assert torch.equal(masked_mean(error, weight), torch.zeros(2))  # nothing counted outside the mask
    assert torch.allclose(masked_mean(error, 1 - weight), torch.full((2,), 5.0))  # a mean over the mask
    assert torch.allclose(masked_mean(error, None), torch.full((2,), 2.5))  # no mask: the plain mean
    assert torch.equal(masked_mean(error, torch.zeros(2, 1, 4, 4)), torch.zeros(2))  # an empty mask: 0
    partial = torch.zeros(1, 1, 32, 32)
    partial[..., :4, :4] = 1.0  # a quarter of the first latent cell
    assert latent_mask(partial, (4, 4))[0, 0, 0, 0] == pytest.approx(0.25)


def test_the_training_loss_ignores_what_lies_outside_the_mask(tiny_model, tmp_path):
    """Trainer.loss with a loss mask: zero mask, zero loss and zero gradient; the gradient of the UNet's
    prediction vanishes exactly on the latent cells outside the mask."""
    from pie_cli.core.registry import resolve
    from pie_cli.reporting import SILENT
    from pie_cli.training.config import TrainSpec
    from pie_cli.training.data import load_data
    from pie_cli.training.loop import Trainer

    data_dir = colour_folder(tmp_path / "data", n=2)
    spec = TrainSpec(
        data=str(data_dir), out=str(tmp_path / "o"), resolution=32, batch_size=2, num_workers=0, max_steps=1
    )
    trainer = Trainer(spec, resolve(str(tiny_model)), load_data(spec), None, tmp_path / "o", SILENT)
    trainer.setup()
    batch = next(iter(trainer.loader))
    captured = {}
    forward = trainer.unet.forward

    def spy(*args, **kwargs):
        output = forward(*args, **kwargs)
        output.sample.retain_grad()
        captured["pred"] = output.sample
        return output

    trainer.unet.forward = spy
    mask = torch.zeros(2, 1, 32, 32)
    loss = trainer.loss({**batch, "loss_mask": mask})
    assert float(loss.detach()) == 0.0
    mask[..., :, 16:] = 1.0  # the right half only
    loss = trainer.loss({**batch, "loss_mask": mask})
    loss.backward()
    grad = captured["pred"].grad
    assert float(loss.detach()) > 0
    assert torch.count_nonzero(grad[..., :2]) == 0  # latent columns 0-1 lie outside the mask
    assert torch.count_nonzero(grad[..., 2:]) == grad[..., 2:].numel()


# --------------------------------------------------------------------------- trackers and loss.png


def test_tensorboard_gets_every_logged_value(cli, tiny_model, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = colour_folder(tmp_path / "data", n=8)
    out = tmp_path / "ft"
    argv = finetune_argv(
        data, tiny_model, out, "--report-to", "tensorboard", "--validation-split", "0.25",
        "--validation-loss-every", "2", *FAST, max_steps=4,
    )  # fmt: skip
    result = cli(*argv)
    assert result.exit_code == 0, result.output
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events
    scalars: dict[str, dict[int, float]] = {}
    for event_file in events:
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    rows = metrics(out)
    assert scalars["loss"] == pytest.approx({int(r["step"]): float(r["loss"]) for r in rows}, abs=1e-5)
    assert scalars["val_loss"] == pytest.approx(val_losses(out), abs=1e-5)
    assert set(scalars["val_loss"]) == {2, 4}
    again = cli(*finetune_argv(data, tiny_model, out, "--overwrite", *FAST, max_steps=1))
    assert again.exit_code == 0, again.output
    assert not list((out / "logs").rglob("events.*"))  # --overwrite removed the logs pie wrote


def test_a_tracker_whose_package_is_missing_is_refused_before_anything_loads(
    cli, tiny_model, tmp_path, monkeypatch
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    data = colour_folder(tmp_path / "data", n=4)
    result = cli(*finetune_argv(data, tiny_model, tmp_path / "ft", "--report-to", "wandb", max_steps=1))
    assert result.exit_code == 2
    assert (
        "--report-to wandb needs the wandb package: pip install wandb (or --report-to none; metrics.csv and "
        "loss.png are written either way)." in result.stderr
    )
    assert not (tmp_path / "ft").exists()


def test_loss_png_shows_the_loss_and_the_held_out_loss(cli, tiny_model, tmp_path):
    from pie_cli.training.outputs import _HELD, _SMOOTH, PLOT_SIZE

    data = colour_folder(tmp_path / "data", n=8)
    plain, held = tmp_path / "plain", tmp_path / "held"
    assert cli(*finetune_argv(data, tiny_model, plain, *FAST, max_steps=3)).exit_code == 0
    argv = finetune_argv(data, tiny_model, held, "--validation-split", "0.25", *FAST, max_steps=3)
    assert cli(*argv).exit_code == 0

    def colours(path: Path) -> set[tuple[int, int, int]]:
        img = Image.open(path)
        assert img.size == PLOT_SIZE
        return {tuple(c) for c in np.asarray(img.convert("RGB")).reshape(-1, 3)}

    assert _SMOOTH in colours(plain / "loss.png")
    assert _HELD not in colours(plain / "loss.png")  # no held-out curve, no legend entry for one
    assert {_SMOOTH, _HELD} <= colours(held / "loss.png")


# --------------------------------------------------------------------------- the dry run


def test_dry_run_shows_every_value_with_its_source_the_schedule_and_a_probe(cli, tiny_model, tmp_path):
    data = colour_folder(tmp_path / "data", n=8)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rank: 4\nwarmup_steps: 1\n")
    out = tmp_path / "ft"
    argv = finetune_argv(
        data, tiny_model, out, "--config", recipe, "--epochs", "3", "--dry-run", max_steps=None
    )
    result = cli(*argv)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()

    def row(name: str) -> list[str]:
        found = [line.split() for line in lines if line.split()[:1] == [name]]
        assert len(found) == 1, (name, result.stdout)
        return found[0]

    assert row("rank")[1:] == ["4", "config", "file"]
    assert row("batch_size")[1:] == ["2", "command", "line"]
    assert row("lr")[1:] == ["0.0001", "default", "(derived)"]
    assert row("alpha")[1:] == ["4.0", "default", "(derived)"]
    assert row("seed")[1:] == ["42", "default"]
    from pie_cli.training.config import OPTION_NAMES

    shown = {line.split()[0] for line in lines if line.startswith("  ") and line.split()}
    assert set(OPTION_NAMES) - {"sources", "allow_schedule_change"} <= shown
    assert (
        "schedule: 12 optimizer steps of 2 examples (batch 2 x grad-accum 1); 4 steps per epoch, so 3 epochs"
        in result.stdout
    )
    probe = [line for line in lines if line.startswith("probe on cpu (4 examples): ")]
    assert (
        len(probe) == 1
        and "s per optimizer step, so about" in probe[0]
        and "peak RSS of the process" in probe[0]
    )
    trainable = [line for line in lines if line.startswith("trainable parameters: ")]
    # LoRA rank 4 on to_q/to_k/to_v/to_out.0 of the tiny UNet, counted independently
    from diffusers import UNet2DConditionModel

    from pie_cli.training.lora import add_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    add_lora(unet, 4, 4.0, 0.0, ("to_q", "to_k", "to_v", "to_out.0"))
    expected = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert trainable == [f"trainable parameters: {expected:,} of {sum(p.numel() for p in unet.parameters()):,} "
                         f"({100 * expected / sum(p.numel() for p in unet.parameters()):.2f} %; lora)"]  # fmt: skip
    assert not out.exists()  # nothing written, not even by the probe


def test_dry_run_without_the_probe_loads_no_model(cli, tiny_model, tmp_path):
    data = colour_folder(tmp_path / "data", n=8)
    argv = finetune_argv(
        data, tiny_model, tmp_path / "ft", "--validation-split", "0.25", "--dry-run", "--no-probe"
    )
    result = cli(*argv)
    assert result.exit_code == 0, result.output
    assert (
        "6 examples (folder: " in result.stdout
        and ", 2 more held out by --validation-split)" in result.stdout
    )
    assert "probe: skipped (--no-probe)" in result.stdout
    assert (
        "schedule: 1000 optimizer steps of 2 examples (batch 2 x grad-accum 1); 3 steps per epoch"
        in result.stdout
    )
    assert "trainable parameters" not in result.stdout


def test_empty_masks_make_every_training_and_held_out_loss_zero(cli, tiny_model, tmp_path):
    """--loss-mask data reaches the loop and the held-out loss: with masks that are empty everywhere,
    nothing is trained on (loss 0 at every step, weights unchanged) and the held-out loss is 0 too."""
    from safetensors.torch import load_file

    data = colour_folder(tmp_path / "data", n=8)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        Image.new("L", (32, 32), 0).save(data / f"mask-{row['file_name']}")
        row["mask"] = f"mask-{row['file_name']}"
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ft"
    argv = finetune_argv(
        data, tiny_model, out, "--loss-mask", "data", "--validation-split", "0.25", "--checkpoint-every", "2",
        max_steps=2,
    )  # fmt: skip
    result = cli(*argv)
    assert result.exit_code == 0, result.output
    assert [float(r["loss"]) for r in metrics(out)] == [0.0, 0.0]
    assert val_losses(out) == {2: 0.0}
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    up = [v for k, v in lora.items() if "lora_B" in k or "lora.up" in k]  # zero-initialised, never trained
    assert up and all(torch.count_nonzero(v) == 0 for v in up)
    assert summary(out)["loss_mask"] == {"kind": "data", "no_lungs_found": None}


WANDB_STAND_IN = '''"""A stand-in for wandb: records what accelerate's WandBTracker calls, in calls.json beside it."""
import json
from pathlib import Path

_calls = []
_file = Path(__file__).with_name("calls.json")


def _record(*entry):
    _calls.append(list(entry))
    _file.write_text(json.dumps(_calls))


class _Config:
    def update(self, values, allow_val_change=False):
        _record("config", values)


config = _Config()


class _Run:
    def log(self, values, step=None, **kwargs):
        _record("log", values, step)

    def finish(self):
        _record("finish")


def init(project=None, **kwargs):
    _record("init", project, kwargs)
    return _Run()
'''


def test_wandb_gets_the_run_through_accelerates_tracker(tiny_model, tmp_path):
    """accelerate's WandBTracker driven by pie (a stand-in package records the calls: wandb itself would
    need an account or its service process): the project, the log folder, every step's values, finish."""
    site = tmp_path / "site"
    (site / "wandb").mkdir(parents=True)
    (site / "wandb" / "__init__.py").write_text(WANDB_STAND_IN)
    (site / "wandb-0.99.0.dist-info").mkdir()
    (site / "wandb-0.99.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: wandb\nVersion: 0.99.0\n"
    )
    data = colour_folder(tmp_path / "data", n=8)
    out = tmp_path / "ft"
    argv = finetune_argv(
        data, tiny_model, out, "--report-to", "wandb", "--validation-split", "0.25", "--validation-loss-every",
        "3", *FAST, max_steps=3,
    )  # fmt: skip
    # A fresh process: accelerate decides which trackers exist when it is first imported.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "pie_cli", *map(str, argv)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    calls = json.loads((site / "wandb" / "calls.json").read_text())
    assert calls[0] == ["init", "pie-finetune", {"dir": str(out / "logs")}]
    config = next(c[1] for c in calls if c[0] == "config")
    assert config["validation_split"] == 0.25 and config["report_to"] == "wandb" and config["lr"] == 0.0001
    logged = {c[2]: c[1] for c in calls if c[0] == "log"}
    rows = {int(r["step"]): r for r in metrics(out)}
    assert sorted(logged) == [1, 2, 3]
    for step, values in logged.items():
        assert values["loss"] == pytest.approx(float(rows[step]["loss"]), abs=1e-6)
    assert "val_loss" not in logged[2] and logged[3]["val_loss"] == pytest.approx(
        val_losses(out)[3], abs=1e-6
    )
    assert calls[-1] == ["finish"]


def test_a_wandb_folder_that_is_no_installed_package_is_refused_as_accelerate_would_ignore_it(
    cli, tiny_model, tmp_path, monkeypatch
):
    site = tmp_path / "site"
    (site / "wandb").mkdir(parents=True)
    (site / "wandb" / "__init__.py").write_text("")  # importable, but no package metadata
    monkeypatch.syspath_prepend(str(site))
    data = colour_folder(tmp_path / "data", n=4)
    result = cli(*finetune_argv(data, tiny_model, tmp_path / "ft", "--report-to", "wandb", max_steps=1))
    assert result.exit_code == 2
    assert "--report-to wandb needs the wandb package: pip install wandb" in result.stderr
    assert not (tmp_path / "ft").exists()
