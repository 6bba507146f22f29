"""The fine-tuning loop on accelerate: LoRA (peft) or full UNet, checkpoints that truly resume.

Reproducibility: every random draw of the loop (posterior samples, noise, timesteps) comes
from one CPU ``torch.Generator`` that is checkpointed with the weights, the optimizer, the
LR scheduler and accelerate's RNG states; the data order and augmentations are seeded by
(seed, epoch, example). So weights after 2 steps + resume + 2 steps equal 4 straight steps.

Surviving kills: checkpoints are complete or absent (``checkpoints.py``). SIGINT and SIGTERM
during the step loop stop training after the current optimizer step with a checkpoint of that
step (``pie_cli.signals.StopSignals``); a NaN/inf loss or non-finite weights stop it before
anything is saved. Validation samples and the final weights are ``outputs.py``'s.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pie_cli.core.registry import ModelSource
from pie_cli.errors import NumericalError
from pie_cli.imaging.files import temp_path
from pie_cli.imaging.ownership import Ledger
from pie_cli.reporting import Reporter
from pie_cli.signals import StopSignals, TrainingInterrupted
from pie_cli.training.checkpoints import (
    CHECKPOINTS,
    LOGS,
    LOSS_PLOT,
    METRICS,
    METRICS_COLUMNS,
    LoopState,
    latest_checkpoint,
    save_checkpoint,
)
from pie_cli.training.config import (
    DEFAULT_MAX_STEPS,
    TEXT_LORA_TARGETS,
    TrainSpec,
)
from pie_cli.training.data import Record, TrainingData
from pie_cli.training.dataset import isolated, training_batches
from pie_cli.training.lora import add_lora, load_checkpoint_lora, save_checkpoint_lora, save_final_lora
from pie_cli.training.validation import HeldOut, best_of, heldout_loss, latent_mask, masked_mean

EMA_FILE = (
    "ema.safetensors"  # in a checkpoint with --use-ema: the averaged weights (and ema.json, its counters)
)
EMA_STATE = "ema.json"


@dataclass
class TrainResult:
    steps: int
    seconds: float
    last_loss: float | None
    weights: Path


def _precision_dtype(spec: TrainSpec) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(spec.mixed_precision, torch.float32)


class Trainer:
    """One training run: :meth:`setup` (accelerate, the model, data, optimizer), then :meth:`run`."""

    def __init__(
        self,
        spec: TrainSpec,
        source: ModelSource,
        data: TrainingData,
        prior: list[Record] | None,
        out: Path,
        reporter: Reporter,
        heldout: list[Record] | None = None,
    ) -> None:
        self.spec = spec
        self.heldout_records = heldout or []
        self.source = source
        self.data = data
        self.prior = prior
        self.out = out
        self.reporter = reporter
        self.signals = StopSignals(quiet=reporter.quiet)  # the caller installs it around setup() and run()
        self.ledger = Ledger(out)  # every file this run writes is recorded: --overwrite removes only those

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed
        from diffusers import DDPMScheduler

        from pie_cli.core.distributed import cpu_processes
        from pie_cli.core.loading import load_parts, load_scheduler

        spec = self.spec
        self.accelerator = acc = Accelerator(
            cpu=cpu_processes(),  # see pie_cli/core/distributed.py
            gradient_accumulation_steps=spec.grad_accum,
            mixed_precision=spec.mixed_precision,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / LOGS)),
            log_with=None if spec.report_to == "none" else spec.report_to,
        )
        set_seed(spec.seed)  # LoRA initialisation and dropout: the same run for the same seed
        # The same loader as inference (fp32 here; the parts are cast below).
        self.unet, self.vae, self.text_encoder, self.tokenizer = load_parts(
            self.source, allow_pickle=spec.allow_pickle, warn=self.reporter.warn
        )
        self.noise_scheduler = DDPMScheduler.from_pretrained(
            self.source.path, subfolder="scheduler", local_files_only=True
        )
        # Validation samples use the model's own inference scheduler, under `pie simulate`'s policy.
        self.inference_scheduler = load_scheduler(self.source) if spec.validation_every else None

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
        self.ema = None
        if spec.use_ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=spec.ema_decay)
            self.ema.to(device)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=spec.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
        )

        batches = training_batches(spec, self.data, self.prior, self.tokenizer)
        self.dataset, self.prior_dataset = batches.instance, batches.prior
        self.train_dataset, self.sampler, loader = batches.dataset, batches.sampler, batches.loader
        self.cache = self._cache_latents() if spec.cache_latents else None
        self.heldout = self._heldout_set()
        self.val_history: list[tuple[int, float]] = []

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
        # After prepare: under several processes accumulate() needs the wrapped modules to skip syncs.
        self.trainables = [self.unet, self.text_encoder] if self.train_te else [self.unet]
        self.state = LoopState(spec.seed)
        if spec.report_to != "none":
            self._start_trackers()
        if lora:
            acc.register_save_state_pre_hook(self._save_hook)
            acc.register_load_state_pre_hook(self._load_hook)

    def _save_hook(self, models, weights, output_dir) -> None:
        if self.accelerator.is_main_process:
            te = self.accelerator.unwrap_model(self.text_encoder) if self.train_te else None
            unet = self.accelerator.unwrap_model(self.unet)
            save_checkpoint_lora(Path(output_dir), unet, te)
            # Also the diffusers format, so `pie simulate --lora CHECKPOINT` can compare checkpoints
            # (the averaged weights with --use-ema: what the run would save at this step).
            with self.averaged_weights():
                save_final_lora(Path(output_dir), unet, te)
        weights.clear()  # adapters only: accelerate must not write the whole base model

    def _load_hook(self, models, input_dir) -> None:
        te = self.accelerator.unwrap_model(self.text_encoder) if self.train_te else None
        load_checkpoint_lora(Path(input_dir), self.accelerator.unwrap_model(self.unet), te)
        models.clear()

    # ------------------------------------------------------------------ EMA, held-out loss, trackers
    @contextmanager
    def averaged_weights(self):
        """The EMA weights in the trained parameters for the duration (a no-op without --use-ema)."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def _save_ema(self, folder: Path) -> None:
        from safetensors.torch import save_file

        state = self.ema.state_dict()
        tensors = {
            f"shadow.{i:05d}": t.detach().cpu().contiguous() for i, t in enumerate(state["shadow_params"])
        }
        save_file(tensors, str(Path(folder) / EMA_FILE))
        counters = {k: v for k, v in state.items() if k != "shadow_params"}
        (Path(folder) / EMA_STATE).write_text(json.dumps(counters) + "\n", encoding="utf-8")

    def _load_ema(self, folder: Path) -> None:
        from safetensors.torch import load_file

        from pie_cli.errors import UserError

        folder = Path(folder)
        try:
            tensors = load_file(str(folder / EMA_FILE))
            counters = json.loads((folder / EMA_STATE).read_text(encoding="utf-8"))
            shadow = [tensors[f"shadow.{i:05d}"] for i in range(len(tensors))]
            if len(shadow) != len(self.ema.shadow_params) or any(
                a.shape != b.shape for a, b in zip(shadow, self.ema.shadow_params, strict=True)
            ):
                raise ValueError("the averaged weights do not match the model")
            device = self.ema.shadow_params[0].device if shadow else "cpu"
            self.ema.load_state_dict({**counters, "shadow_params": [t.to(device) for t in shadow]})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(
                f"--resume: checkpoint {folder} has no usable EMA weights ({EMA_FILE}, {EMA_STATE}: "
                f"{exc}); it was saved without --use-ema, so resume without it or start over."
            ) from None

    def _save_extra(self, folder: Path) -> None:
        """The loop's own files of a checkpoint (main process): loop state, and the EMA weights."""
        self.state.save(folder)
        if self.ema is not None:
            self._save_ema(folder)

    def _heldout_set(self) -> HeldOut | None:
        if not self.heldout_records:
            return None
        import dataclasses

        from pie_cli.training.dataset import PairDataset

        spec = self.spec
        # Its own bucket plan (the training one is cached on the data); the lung masks are shared.
        data = dataclasses.replace(self.data, records=list(self.heldout_records))
        data.lung_masks = self.data.lung_masks  # computed for the held-out records too (prepare_examples)
        buckets = None
        if spec.buckets:
            from pie_cli.training.buckets import plan_buckets

            buckets = plan_buckets(data, spec)
        # Centre crop (or the run's --fit), no flip, no caption dropout: each example scored the same way,
        # weighted by its loss mask like the training loss.
        ds = PairDataset(
            data,
            data.records,
            self.tokenizer,
            spec.resolution,
            True,
            False,
            spec.seed,
            fit=spec.fit,
            loss_mask=spec.loss_mask,
            buckets=buckets,
        )
        return HeldOut(ds, spec.seed)

    def _validation_loss_due(self, step: int) -> bool:
        if self.heldout is None:
            return False
        every = self.spec.validation_loss_every or self.spec.checkpoint_every
        return step % every == 0 or step == self.total_steps

    def validation_loss(self, step: int) -> float | None:
        """The held-out loss of the current (EMA, with --use-ema) weights; main process only, else None."""
        acc = self.accelerator
        if not acc.is_main_process or self.heldout is None:
            return None
        unet = acc.unwrap_model(self.unet)
        text_encoder = acc.unwrap_model(self.text_encoder)
        for model in self.trainables:
            model.eval()
        try:
            with self.averaged_weights(), acc.autocast():
                value = heldout_loss(
                    self.heldout, unet, self.vae, text_encoder, self.noise_scheduler, acc.device
                )
        finally:
            for model in self.trainables:
                model.train()
        self.val_history.append((step, value))
        return value

    def best(self) -> tuple[int, float] | None:
        """(step, held-out loss) of the best evaluation so far."""
        return best_of(self.val_history)

    def _start_trackers(self) -> None:
        from pie_cli.errors import UserError
        from pie_cli.training.checkpoints import RUN_NAME

        names = {str(getattr(t, "value", t)).lower() for t in (self.accelerator.log_with or [])}
        if self.spec.report_to not in names:  # accelerate drops a tracker it cannot use with a mere warning
            raise UserError(
                f"--report-to {self.spec.report_to}: accelerate finds no usable {self.spec.report_to} "
                f"installation (pip install {self.spec.report_to}); or --report-to none."
            )

        config = {
            k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in self.spec.to_yaml_dict().items()
        }
        self.accelerator.init_trackers(
            RUN_NAME, config=config, init_kwargs={"wandb": {"dir": str(self.out / LOGS)}}
        )
        self._tracking = True

    def _end_trackers(self) -> None:
        if getattr(self, "_tracking", False):
            self._tracking = False
            self.accelerator.end_training()
            if self.accelerator.is_main_process:
                self.record_outputs(LOGS)

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
        with self.reporter.status(f"caching latents of {total} images"):
            for name, ds in sets:
                means, stds = [], []
                for start in range(0, len(ds), 8):
                    pixels = torch.stack([ds.image(i) for i in range(start, min(len(ds), start + 8))])
                    mean, std = self._posterior(pixels)
                    means.append(mean.cpu())
                    stds.append(std.cpu())
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
        weight = None
        if "loss_mask" in batch:  # --loss-mask: each latent cell weighted by the share of the mask it holds
            weight = latent_mask(batch["loss_mask"].to(device), tuple(latents.shape[-2:]))
            if self.prior:  # class images train on their whole area
                weight = torch.cat([weight, torch.ones_like(weight)])
        per_example = masked_mean(F.mse_loss(pred.float(), target.float(), reduction="none"), weight)
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
            try:
                acc.load_state(str(resume_from))
            except MemoryError:
                raise
            except Exception as exc:  # torch, safetensors and accelerate each raise their own kinds
                from pie_cli.errors import UserError, one_line

                raise UserError(
                    f"--resume: checkpoint {resume_from} cannot be loaded ({one_line(exc)})."
                ) from None
            self.state.load(resume_from)
            if self.ema is not None:
                self._load_ema(resume_from)
            self.reporter.note(f"resumed from {resume_from} at step {self.state.step}")
        step = self.state.step
        if step >= self.total_steps:
            self.reporter.note(f"already at step {step} of {self.total_steps}; nothing to train.")
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
        self.reporter.start(self.total_steps, "finetune", completed=step)
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
                for batch in isolated(batches):
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
                    if self.ema is not None:
                        self.ema.step(self.params)
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
                    val_loss = self.validation_loss(step) if self._validation_loss_due(step) else None
                    if acc.is_main_process:
                        val = "" if val_loss is None else f"{val_loss:.6f}"
                        metrics.writerow(
                            [step, f"{last_loss:.6f}", f"{lr:.6g}", f"{now - step_started:.4f}", val]
                        )
                        self._metrics_file.flush()
                    if spec.report_to != "none":
                        logged = {"loss": last_loss, "lr": lr}
                        if val_loss is not None:
                            logged["val_loss"] = val_loss
                        acc.log(logged, step=step)
                    smoothed = last_loss if smoothed is None else 0.9 * smoothed + 0.1 * last_loss
                    self.reporter.advance(
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
            self._end_trackers()
        acc.wait_for_everyone()
        weights = self.save_final()
        if acc.is_main_process:
            from pie_cli.training.outputs import write_loss_plot

            plot = write_loss_plot(self.out / METRICS, self.out / LOSS_PLOT)
            if plot is not None:
                self.ledger.record(plot)
        return TrainResult(step, time.perf_counter() - started, last_loss, weights)

    def probe(self) -> tuple[float, int, str]:
        """Two optimizer steps on the first batches, nothing saved: (seconds of the second, peak memory in
        bytes, what the peak measures). `pie finetune --dry-run`'s estimate."""
        import resource

        acc = self.accelerator
        cuda = acc.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(acc.device)
        for model in self.trainables:
            model.train()
        times: list[float] = []
        started = time.perf_counter()

        def batches():
            for _ in range(2 * self.spec.grad_accum + 2):  # epochs of a dataset smaller than two steps
                yield from isolated(self.loader)

        for batch in batches():
            with acc.accumulate(*self.trainables):
                loss = self.loss(batch)
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(self.params, self.spec.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            if acc.sync_gradients:
                if cuda:
                    torch.cuda.synchronize(acc.device)
                now = time.perf_counter()
                times.append(now - started)
                started = now
                if len(times) == 2:
                    break
        if cuda:
            return times[-1], int(torch.cuda.max_memory_allocated(acc.device)), "CUDA peak allocated"
        return times[-1], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the process"

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
        header = list(METRICS_COLUMNS)
        kept: list[list[str]] = []
        if path.exists() and step > 0:
            with open(path, newline="") as fh:
                kept = [row for row in csv.reader(fh)][1:]
            # A row cut short by a kill is dropped, as are the steps after the checkpoint (rows of
            # pie 0.1, without val_loss, are kept with an empty one).
            kept = [row + [""] * (len(header) - len(row)) for row in kept if len(row) in (4, len(header))]
            kept = [row for row in kept if row[0].isdigit() and int(row[0]) <= step]
            self.val_history = [(int(row[0]), float(row[4])) for row in kept if _is_number(row[4])]
        tmp = temp_path(path)
        with open(tmp, "w", newline="") as fh:  # rewritten beside, then swapped: never half a history
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(kept)
        os.replace(tmp, path)
        self.ledger.record(path, growing=True)  # a log: pie's while it only grows
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
        """checkpoints/step_N of this step (weights checked finite first), then older ones pruned."""
        self._check_finite(step)
        best = self.best()
        path = save_checkpoint(
            self.accelerator,
            self.out,
            step,
            self.total_steps,
            self.spec.keep_checkpoints,
            extra=self._save_extra,
            keep_also=best[0] if best else None,  # the best held-out checkpoint outlives pruning
        )
        if self.accelerator.is_main_process:
            self.record_outputs(CHECKPOINTS)
            if getattr(self, "_tracking", False):
                self.record_outputs(LOGS)
        return path

    def record_outputs(self, *folders: str) -> None:
        """Record the files now under ``folders`` of the run, and forget those gone (pruned checkpoints)."""
        prefixes = tuple(f"{f}/" for f in folders)
        gone = [
            rel for rel in self.ledger.files if rel.startswith(prefixes) and not (self.out / rel).exists()
        ]
        self.ledger.forget(*gone, save=False)
        new = [p for f in folders for p in (self.out / f).rglob("*") if p.is_file()]
        self.ledger.record(*new)

    def validate(self, step: int) -> None:
        """Samples with the current weights under DIR/samples (main process only)."""
        if not self.accelerator.is_main_process:
            return
        from pie_cli.training.outputs import write_samples

        for model in self.trainables:
            model.eval()
        try:
            with self.averaged_weights():
                write_samples(self, step)
        finally:
            for model in self.trainables:
                model.train()

    def save_final(self) -> Path:
        """The trained weights in the run folder (LoRA file, or a complete model for full fine-tuning).

        With --use-ema the averaged weights are the ones saved (copied in for good: the run is over).
        """
        if self.ema is not None:
            self.ema.copy_to(self.params)
        self._check_finite(self.state.step)
        if not self.accelerator.is_main_process:
            return self.out
        from pie_cli.training.outputs import save_weights

        return save_weights(self)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False
