"""The fine-tuning loop on accelerate: LoRA (peft) or full UNet, checkpoints that truly resume.

Reproducibility: every random draw of the loop (posterior samples, noise, timesteps) comes
from one CPU ``torch.Generator`` that is checkpointed with the weights, the optimizer, the
LR scheduler and accelerate's RNG states; the data order and augmentations are seeded by
(seed, epoch, example). So weights after 2 steps + resume + 2 steps equal 4 straight steps.

Surviving kills: a checkpoint is written into a hidden ``.step_N.tmp`` folder, completed by a
marker file and only then renamed to ``step_N``, so a run killed at any moment (even SIGKILL
while saving) leaves every ``step_*`` folder either complete or without its marker, and
``latest_checkpoint`` only ever picks a complete one. SIGINT and SIGTERM during the step loop
stop training after the current optimizer step with a checkpoint of that step (see
``StopSignals``); a NaN/inf loss or non-finite weights stop it before anything is saved.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pie_cli.cli.console import ui
from pie_cli.core.registry import ModelSource
from pie_cli.errors import NumericalError
from pie_cli.training.config import TEXT_LORA_TARGETS, TrainSpec
from pie_cli.training.data import Record, TrainingData
from pie_cli.training.dataset import EpochSampler, PairDataset, PairedBatches, collate
from pie_cli.training.lora import (
    LORA_FILE,
    add_lora,
    link_or_copy,
    load_checkpoint_lora,
    save_checkpoint_lora,
    save_final_lora,
)

CHECKPOINTS = "checkpoints"
COMPLETE = "checkpoint_complete.json"  # written last: a checkpoint folder without it is incomplete
SAMPLES = "samples"
METRICS = "metrics.csv"
SUMMARY = "training_summary.json"
DEFAULT_MAX_STEPS = 1000


@dataclass
class TrainResult:
    steps: int
    seconds: float
    last_loss: float | None
    weights: Path


class LoopState:
    """Step counter and the loop's random generator, saved in every checkpoint."""

    def __init__(self, seed: int) -> None:
        self.step = 0
        self.generator = torch.Generator("cpu").manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the loop at an optimizer step, with a checkpoint of that step."""

    def __init__(self, step: int, checkpoint: Path, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.step = step
        self.checkpoint = checkpoint
        self.signum = signum


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM while training, installed for that time and restored after.

    Outside the step loop (loading, caching latents, final save) a signal interrupts at once,
    as KeyboardInterrupt. Inside it (``deferring``) the first one is only recorded: the loop
    finishes its optimizer step, saves a checkpoint of it and raises ``TrainingInterrupted``,
    so a resume continues exactly there. A second signal interrupts at once; the last complete
    checkpoint stays. A signal the process inherited as ignored (a background job of a
    non-interactive shell, nohup) stays ignored.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.deferring = False
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopSignals:
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                previous = signal.getsignal(sig)
                if previous is None or previous == signal.SIG_IGN:
                    continue
                self._previous[sig] = previous
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        self.deferring = False

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked data worker, before it ignores SIGINT: the main decides
            return
        if self.deferring and self.received is None:
            self.received = signum
            if not ui.quiet:  # a raw write: safe inside a signal handler
                again = "press Ctrl-C again" if signum == signal.SIGINT else "send it again"
                name = signal.Signals(signum).name
                note = (
                    f"\n{name}: stopping after this step and saving a checkpoint ({again} to stop at once).\n"
                )
                with contextlib.suppress(OSError):
                    os.write(2, note.encode())
            return
        self.received = self.received or signum
        raise KeyboardInterrupt


_STEP_DIR = re.compile(r"step_(\d+)")


def checkpoint_step(path: Path) -> int | None:
    """N of a ``step_N`` checkpoint folder (None for anything else)."""
    match = _STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def _step_dirs(out: Path) -> list[Path]:
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of the run in ``out`` (incomplete folders are skipped)."""
    complete = [p for p in _step_dirs(out) if is_complete(p)]
    return complete[-1] if complete else None


def incomplete_checkpoints(out: Path) -> list[Path]:
    """``step_*`` folders without their completion marker: what a kill while saving leaves."""
    return [p for p in _step_dirs(out) if not is_complete(p)]


# Temporary names pie writes in a run directory (atomic writes); a killed run can leave them.
_LEFTOVER = re.compile(
    r"\.(metrics\.csv|training_summary\.json|training_config\.yaml|unet|text_encoder)(\.\d+)?\.tmp|\.lora-.*"
)


def remove_leftovers(out: Path) -> None:
    """Remove what a killed run left half-written: temporary files and checkpoint folders."""
    places = [(out, _LEFTOVER), (out / CHECKPOINTS, re.compile(r"\.step_\d+\.tmp"))]
    for folder, pattern in places:
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if pattern.fullmatch(path.name):
                _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        (path / COMPLETE).unlink(missing_ok=True)  # first: a folder half-removed is never "complete"
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush a checkpoint's files and its folder to disk before a rename publishes it."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        _fsync(path)
    _fsync(folder)


def _isolated(batches):
    """Yield batches fetched without touching the global CPU RNG.

    Starting an epoch's iterator draws a seed from the global RNG (torch's DataLoader),
    and a resumed run starts one where the uninterrupted run did not: isolating the
    fetches keeps dropout and everything else on the checkpointed random stream.
    """
    iterator = iter(batches)
    while True:
        with torch.random.fork_rng(devices=[]):
            try:
                batch = next(iterator)
            except StopIteration:
                return
        yield batch


def _ignore_interrupts(worker_id: int) -> None:
    """Data workers ignore SIGINT: Ctrl-C reaches the whole process group, and a worker that
    quit on it would fail the main process's next fetch before its step is checkpointed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _precision_dtype(spec: TrainSpec) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(spec.mixed_precision, torch.float32)


class Trainer:
    def __init__(
        self,
        spec: TrainSpec,
        source: ModelSource,
        data: TrainingData,
        prior: list[Record] | None,
        out: Path,
        display: Any,
        log: Any,
    ) -> None:
        self.spec = spec
        self.source = source
        self.data = data
        self.prior = prior
        self.out = out
        self.display = display
        self.log = log  # callable(str) for notes on stderr
        self.signals = StopSignals()  # the caller installs it around setup() and run()

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from pie_cli.cli.console import warn
        from pie_cli.core.loading import require_safetensors

        spec = self.spec
        from pie_cli.core.distributed import cpu_processes

        self.accelerator = acc = Accelerator(
            cpu=cpu_processes(),  # see pie_cli/distributed.py
            gradient_accumulation_steps=spec.grad_accum,
            mixed_precision=spec.mixed_precision,
            project_config=ProjectConfiguration(project_dir=str(self.out)),
        )
        set_seed(spec.seed)  # LoRA initialisation and dropout: the same run for the same seed
        root = self.source.path
        unet_dir = self.source.unet or (root / "unet")
        ref = self.source.reference

        def common(folder: Path, what: str) -> dict:
            safe = require_safetensors(folder, what, spec.allow_pickle, warn)
            return {"local_files_only": True, "use_safetensors": safe}

        self.tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
        self.text_encoder = CLIPTextModel.from_pretrained(
            root, subfolder="text_encoder", **common(root / "text_encoder", f"model {ref}: text_encoder")
        )
        self.vae = AutoencoderKL.from_pretrained(
            root, subfolder="vae", **common(root / "vae", f"model {ref}: vae")
        )
        self.unet = UNet2DConditionModel.from_pretrained(unet_dir, **common(unet_dir, f"model {ref}: unet"))
        self.noise_scheduler = DDPMScheduler.from_pretrained(
            root, subfolder="scheduler", local_files_only=True
        )
        self.inference_scheduler_dir = root

        lora = spec.method == "lora"
        self.train_te = spec.train_text_encoder
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.unet.requires_grad_(not lora)
        if lora:
            add_lora(self.unet, spec.rank, spec.lora_alpha, spec.lora_dropout, spec.target_modules)
            if self.train_te:
                add_lora(self.text_encoder, spec.rank, spec.lora_alpha, spec.lora_dropout, TEXT_LORA_TARGETS)
        elif self.train_te:
            self.text_encoder.requires_grad_(True)
        if spec.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.train_te:
                self.text_encoder.gradient_checkpointing_enable()

        weight_dtype = _precision_dtype(spec)
        device = acc.device
        vae_dtype = (
            torch.float32 if weight_dtype == torch.float16 and self.vae.config.force_upcast else weight_dtype
        )
        self.vae.to(device, dtype=vae_dtype)
        self.text_encoder.to(device, dtype=torch.float32 if (self.train_te and not lora) else weight_dtype)
        self.unet.to(device, dtype=weight_dtype if lora else torch.float32)
        if lora and weight_dtype != torch.float32:
            from diffusers.training_utils import cast_training_params

            # Trainable LoRA parameters stay fp32, so fp16 gradients always unscale.
            cast_training_params(
                [self.unet, self.text_encoder] if self.train_te else [self.unet], torch.float32
            )

        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        if self.train_te:
            self.params += [p for p in self.text_encoder.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=spec.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
        )

        self.dataset = PairDataset(
            self.data,
            self.data.records,
            self.tokenizer,
            spec.resolution,
            spec.center_crop,
            spec.random_flip,
            spec.seed,
        )
        self.dataset.with_pixels = not spec.cache_latents
        dataset: Any = self.dataset
        if self.prior:
            self.prior_dataset = PairDataset(
                self.data,
                self.prior,
                self.tokenizer,
                spec.resolution,
                spec.center_crop,
                spec.random_flip,
                spec.seed + 1,
            )
            self.prior_dataset.with_pixels = not spec.cache_latents
            dataset = PairedBatches(self.dataset, self.prior_dataset)
        self.train_dataset = dataset
        self.sampler = EpochSampler(len(dataset), spec.seed)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=spec.batch_size,
            sampler=self.sampler,
            collate_fn=collate,
            num_workers=spec.num_workers,
            worker_init_fn=_ignore_interrupts if spec.num_workers else None,
            drop_last=False,
        )
        self.cache = self._cache_latents() if spec.cache_latents else None

        self.steps_per_epoch = math.ceil(len(loader) / spec.grad_accum)
        if spec.max_steps is not None:
            self.total_steps = spec.max_steps
        elif spec.epochs is not None:
            self.total_steps = spec.epochs * self.steps_per_epoch
        else:
            self.total_steps = DEFAULT_MAX_STEPS
        from diffusers.optimization import get_scheduler

        n = acc.num_processes
        self.lr_scheduler = get_scheduler(
            spec.lr_scheduler,
            self.optimizer,
            num_warmup_steps=spec.warmup_steps * n,
            num_training_steps=self.total_steps * n,
        )
        models = [self.unet, self.text_encoder] if self.train_te else [self.unet]
        prepared = acc.prepare(*models, self.optimizer, loader, self.lr_scheduler)
        if self.train_te:
            self.unet, self.text_encoder, self.optimizer, self.loader, self.lr_scheduler = prepared
        else:
            self.unet, self.optimizer, self.loader, self.lr_scheduler = prepared
        self.trainables = models if not self.train_te else [self.unet, self.text_encoder]
        self.state = LoopState(spec.seed)
        acc.register_for_checkpointing(self.state)
        if lora:
            acc.register_save_state_pre_hook(self._save_hook)
            acc.register_load_state_pre_hook(self._load_hook)

    def _save_hook(self, models, weights, output_dir) -> None:
        if self.accelerator.is_main_process:
            te = self.accelerator.unwrap_model(self.text_encoder) if self.train_te else None
            save_checkpoint_lora(Path(output_dir), self.accelerator.unwrap_model(self.unet), te)
        weights.clear()  # adapters only: accelerate must not write the whole base model

    def _load_hook(self, models, input_dir) -> None:
        te = self.accelerator.unwrap_model(self.text_encoder) if self.train_te else None
        load_checkpoint_lora(Path(input_dir), self.accelerator.unwrap_model(self.unet), te)
        models.clear()

    # ------------------------------------------------------------------ latents
    def _posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.accelerator.device, dtype=self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def _cache_latents(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Posterior mean and std of every image, encoded once (sampled afresh at each use)."""
        cache = {}
        sets = [("instance", self.dataset)] + ([("prior", self.prior_dataset)] if self.prior else [])
        total = sum(len(ds) for _, ds in sets)
        done = 0
        with self.display.status(f"caching latents of {total} images"):
            for name, ds in sets:
                means, stds = [], []
                for start in range(0, len(ds), 8):
                    pixels = torch.stack([ds.image(i) for i in range(start, min(len(ds), start + 8))])
                    mean, std = self._posterior(pixels)
                    means.append(mean.cpu())
                    stds.append(std.cpu())
                    done += len(pixels)
                cache[name] = (torch.cat(means), torch.cat(stds))
        return cache

    # ------------------------------------------------------------------ one step
    def _randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.state.generator).to(self.accelerator.device)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        spec = self.spec
        device = self.accelerator.device
        ids = batch["input_ids"]
        if self.cache is not None:
            index = batch["index"].cpu()
            mean, std = (t[index].to(device) for t in self.cache["instance"])
            if self.prior:
                pmean, pstd = (t[index % len(self.prior_dataset)].to(device) for t in self.cache["prior"])
                mean, std = torch.cat([mean, pmean]), torch.cat([std, pstd])
        else:
            pixels = batch["pixel_values"]
            if self.prior:
                pixels = torch.cat([pixels, batch["prior_pixel_values"]])
            mean, std = self._posterior(pixels)
        if self.prior:
            ids = torch.cat([ids, batch["prior_input_ids"]])
        latents = (mean + std * self._randn(mean.shape)) * self.vae.config.scaling_factor
        noise = self._randn(latents.shape)
        if spec.noise_offset:
            noise = noise + spec.noise_offset * self._randn((latents.shape[0], latents.shape[1], 1, 1))
        timesteps = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (latents.shape[0],),
            generator=self.state.generator,
        ).to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.set_grad_enabled(self.train_te):
            embeddings = self.text_encoder(ids.to(device))[0]
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        pred = self.unet(noisy, timesteps, embeddings).sample
        per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if spec.snr_gamma is not None:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.noise_scheduler, timesteps)
            weight = torch.clamp(snr, max=spec.snr_gamma)
            weight = (
                weight / (snr + 1)
                if self.noise_scheduler.config.prediction_type == "v_prediction"
                else weight / snr
            )
            per_example = per_example * weight
        if self.prior:
            half = per_example.shape[0] // 2
            return per_example[:half].mean() + spec.prior_loss_weight * per_example[half:].mean()
        return per_example.mean()

    # ------------------------------------------------------------------ the loop
    def run(self, resume_from: Path | None) -> TrainResult:
        acc = self.accelerator
        spec = self.spec
        if resume_from is not None:
            acc.load_state(str(resume_from))
            self.log(f"resumed from {resume_from} at step {self.state.step}")
        step = self.state.step
        if step >= self.total_steps:
            self.log(f"already at step {step} of {self.total_steps}; nothing to train.")
        metrics = self._open_metrics(step)
        epoch = step // self.steps_per_epoch
        skip = (step % self.steps_per_epoch) * spec.grad_accum
        started = time.perf_counter()
        step_started = started
        micro_losses: list[torch.Tensor] = []
        smoothed = None
        last_loss = None
        for model in self.trainables:
            model.train()
        self.display.start(self.total_steps, "finetune", completed=step)
        self.signals.deferring = True
        try:
            while step < self.total_steps:
                self.train_dataset.epoch = epoch
                self.sampler.set_epoch(epoch)
                batches = acc.skip_first_batches(self.loader, skip) if skip else self.loader
                if hasattr(batches, "set_epoch"):
                    # accelerate's loader sets the sampler's epoch to its own pass counter when
                    # iterated, and that counter restarts at 0 in a resumed run (or a skipping
                    # loader): without this a resume past an epoch replays epoch 0's order.
                    batches.set_epoch(epoch)
                skip = 0
                for batch in _isolated(batches):
                    with acc.accumulate(*self.trainables):
                        loss = self.loss(batch)
                        acc.backward(loss)
                        if acc.sync_gradients:
                            acc.clip_grad_norm_(self.params, spec.max_grad_norm)
                        self.optimizer.step()
                        self.lr_scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    micro_losses.append(loss.detach())
                    if not acc.sync_gradients:
                        continue
                    step += 1
                    self.state.step = step
                    last_loss = float(acc.reduce(torch.stack(micro_losses).mean(), "mean"))
                    micro_losses.clear()
                    if not math.isfinite(last_loss):
                        good = latest_checkpoint(self.out)
                        raise NumericalError(
                            f"the training loss became {last_loss} at step {step}; stopped. "
                            f"Last good checkpoint: {good or 'none'}. Try a lower --lr or --mixed-precision no."
                        )
                    now = time.perf_counter()
                    lr = self.lr_scheduler.get_last_lr()[0]
                    if acc.is_main_process:
                        metrics.writerow([step, f"{last_loss:.6f}", f"{lr:.6g}", f"{now - step_started:.4f}"])
                        self._metrics_file.flush()
                    smoothed = last_loss if smoothed is None else 0.9 * smoothed + 0.1 * last_loss
                    self.display.advance(
                        step,
                        now - step_started,
                        f"loss {smoothed:.4f}  lr {lr:.2e}",
                        every=max(1, self.total_steps // 20),
                    )
                    step_started = now
                    saved = None
                    if step % spec.checkpoint_every == 0 or step == self.total_steps:
                        saved = self.checkpoint(step)
                    if self._stop_requested():
                        saved = saved or self.checkpoint(step)
                        raise TrainingInterrupted(step, saved, self.signals.received or signal.SIGINT)
                    if spec.validation_every and (
                        step % spec.validation_every == 0 or step == self.total_steps
                    ):
                        self.validate(step)
                    if step >= self.total_steps:
                        break
                epoch += 1
        finally:
            self.signals.deferring = False
            if acc.is_main_process and self._metrics_file:
                self._metrics_file.close()
        acc.wait_for_everyone()
        weights = self.save_final()
        return TrainResult(step, time.perf_counter() - started, last_loss, weights)

    def _stop_requested(self) -> bool:
        """A SIGINT/SIGTERM arrived (on any process: all of them stop at the same step)."""
        requested = self.signals.received is not None
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(requested)], device=self.accelerator.device)
            requested = bool(self.accelerator.reduce(flag, "sum").item() > 0)
        return requested

    def _open_metrics(self, step: int):
        """metrics.csv with the rows up to ``step`` (a resumed run replaces the ones after it)."""
        self._metrics_file = None
        if not self.accelerator.is_main_process:
            return None
        path = self.out / METRICS
        header = ["step", "loss", "lr", "seconds"]
        kept: list[list[str]] = []
        if path.exists() and step > 0:
            with open(path, newline="") as fh:
                kept = [row for row in csv.reader(fh)][1:]
            # A row cut short by a kill is dropped, as are the steps after the checkpoint.
            kept = [
                row for row in kept if len(row) == len(header) and row[0].isdigit() and int(row[0]) <= step
            ]
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", newline="") as fh:  # rewritten beside, then swapped: never half a history
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(kept)
        os.replace(tmp, path)
        self._metrics_file = open(path, "a", newline="")  # noqa: SIM115 - written through the loop, closed after it
        return csv.writer(self._metrics_file)

    # ------------------------------------------------------------------ outputs
    def _check_finite(self, step: int) -> None:
        """Refuse to save weights that hold NaN/inf (a checkpoint must be one worth resuming)."""
        if not self.params:
            return
        finite = torch.stack([torch.isfinite(p.detach()).all() for p in self.params]).all()
        if not bool(finite):
            good = latest_checkpoint(self.out)
            raise NumericalError(
                f"the trained weights became NaN/inf at step {step}; stopped without saving them. "
                f"Last good checkpoint: {good or 'none'}. Try a lower --lr or --mixed-precision no."
            )

    def checkpoint(self, step: int) -> Path:
        """checkpoints/step_N, published complete or not at all (write beside, mark, rename)."""
        acc = self.accelerator
        self._check_finite(step)
        path = self.out / CHECKPOINTS / f"step_{step:06d}"
        tmp = path.with_name(f".{path.name}.tmp")
        if acc.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            marker = {
                "step": step,
                "total_steps": self.total_steps,
                "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / COMPLETE).write_text(json.dumps(marker) + "\n")
            _fsync_tree(tmp)
            if path.exists():  # an older save of this step (resumed from an earlier one) or a broken one
                _remove(path)
            os.rename(tmp, path)
            _fsync(path.parent)  # the rename itself
            self._prune(step)
        acc.wait_for_everyone()
        return path

    def _prune(self, step: int) -> None:
        """Keep the newest --keep-checkpoints complete checkpoints; drop broken ones before ``step``."""
        dirs = _step_dirs(self.out)
        complete = [p for p in dirs if is_complete(p)]
        for old in complete[: -self.spec.keep_checkpoints]:
            _remove(old)
        for broken in (p for p in dirs if not is_complete(p)):
            if (checkpoint_step(broken) or 0) < step:
                _remove(broken)

    def _inference_components(self):
        from pie_cli.core.progression import Components

        unet = self.accelerator.unwrap_model(self.unet)
        te = self.accelerator.unwrap_model(self.text_encoder)
        import diffusers

        cfg = json.loads((self.inference_scheduler_dir / "scheduler" / "scheduler_config.json").read_text())
        sched_cls = getattr(diffusers, cfg.get("_class_name", "PNDMScheduler"), diffusers.PNDMScheduler)
        scheduler = sched_cls.from_pretrained(
            self.inference_scheduler_dir, subfolder="scheduler", local_files_only=True
        )
        return Components(unet, self.vae, te, self.tokenizer, scheduler)

    def validate(self, step: int) -> None:
        """Samples with the current weights under DIR/samples: text-to-image and/or a short PIE run."""
        if not self.accelerator.is_main_process:
            return
        from pie_cli.core.loading import as_pipeline
        from pie_cli.core.progression import progress
        from pie_cli.imaging.animation import write_grid
        from pie_cli.imaging.media import open_image, save_png

        spec = self.spec
        samples = self.out / SAMPLES
        samples.mkdir(exist_ok=True)
        components = self._inference_components()
        for model in self.trainables:
            model.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                pipe = as_pipeline(components)
                for k, prompt in enumerate(spec.validation_prompt):
                    gen = torch.Generator("cpu").manual_seed(spec.seed + k)
                    image = pipe(
                        prompt,
                        num_inference_steps=20,
                        guidance_scale=7.5,
                        generator=gen,
                        height=spec.resolution,
                        width=spec.resolution,
                    ).images[0]
                    save_png(image, samples / f"step_{step:06d}_prompt{k}.png")
                if spec.validation_image:
                    img = open_image(Path(spec.validation_image), "--validation-image")
                    mask = open_image(Path(spec.validation_mask), "--validation-mask")
                    prompt = (
                        spec.validation_prompt[0] if spec.validation_prompt else self.data.records[0].prompt
                    )
                    frames = [
                        f.image
                        for f in progress(
                            components,
                            img,
                            mask,
                            prompt=prompt,
                            steps=3,
                            inference_steps=20,
                            resolution=spec.resolution,
                            seed=spec.seed,
                        )
                    ]
                    write_grid(frames, samples / f"step_{step:06d}_pie.png")
        finally:
            for model in self.trainables:
                model.train()

    def save_final(self) -> Path:
        acc = self.accelerator
        self._check_finite(self.state.step)
        if not acc.is_main_process:
            return self.out
        unet = acc.unwrap_model(self.unet)
        te = acc.unwrap_model(self.text_encoder) if self.train_te else None
        if self.spec.method == "lora":
            return save_final_lora(self.out, unet, te)
        for name, module in (("unet", unet), ("text_encoder", te)):
            if module is None:
                continue
            tmp = self.out / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            module.save_pretrained(tmp, safe_serialization=True)
            shutil.rmtree(self.out / name, ignore_errors=True)
            tmp.rename(self.out / name)
        # The rest of the base model (hard-linked), so DIR is a complete model: --model DIR works.
        root = self.source.path
        for name in ("vae", "tokenizer", "scheduler") + (() if te is not None else ("text_encoder",)):
            if not (self.out / name).exists():
                link_or_copy(root / name, self.out / name)
        index_file = root / "model_index.json"
        index = json.loads(index_file.read_text()) if index_file.is_file() else {}
        index.update(
            {
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
            }
        )
        (self.out / "model_index.json").write_text(json.dumps(index, indent=2))
        return self.out / "unet"


__all__ = [
    "COMPLETE",
    "LORA_FILE",
    "StopSignals",
    "Trainer",
    "TrainResult",
    "TrainingInterrupted",
    "incomplete_checkpoints",
    "is_complete",
    "latest_checkpoint",
    "remove_leftovers",
]
