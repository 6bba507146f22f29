"""What a training run leaves for people and for `pie simulate`: validation samples and the final weights.

Samples (``samples/step_N_promptK.png``, ``samples/step_N_pie.png``) are drawn with the current
weights: text-to-image for each ``--validation-prompt`` and a short PIE progression of
``--validation-image``. The final weights are ``pytorch_lora_weights.safetensors`` (LoRA, the
diffusers format) or ``unet/`` (+ ``text_encoder/``) with hard links to the base model's other
parts and a ``model_index.json``, so ``--model DIR`` and ``--unet DIR`` both work.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pie_cli.imaging.files import temp_path, write_text
from pie_cli.training.checkpoints import SAMPLES
from pie_cli.training.lora import link_or_copy, save_final_lora

if TYPE_CHECKING:
    from pie_cli.training.loop import Trainer

# Validation samples: text-to-image steps and guidance, and the length of the PIE check.
SAMPLE_INFERENCE_STEPS = 20
SAMPLE_GUIDANCE = 7.5
SAMPLE_PIE_STEPS = 3


def write_samples(trainer: Trainer, step: int) -> None:
    """Samples with the trainer's current weights under DIR/samples (call with the models in eval mode)."""
    from pie_cli.core.loading import as_pipeline
    from pie_cli.core.progression import Components, fresh_scheduler, progress
    from pie_cli.imaging.animation import write_grid
    from pie_cli.imaging.files import save_png
    from pie_cli.imaging.media import open_image

    spec = trainer.spec
    acc = trainer.accelerator
    samples = trainer.out / SAMPLES
    samples.mkdir(exist_ok=True)
    components = Components(
        acc.unwrap_model(trainer.unet),
        trainer.vae,
        acc.unwrap_model(trainer.text_encoder),
        trainer.tokenizer,
        trainer.inference_scheduler,
    )
    components.scheduler = fresh_scheduler(components)
    with torch.no_grad(), acc.autocast():
        pipe = as_pipeline(components)
        for k, prompt in enumerate(spec.validation_prompt):
            gen = torch.Generator("cpu").manual_seed(spec.seed + k)
            image = pipe(
                prompt,
                num_inference_steps=SAMPLE_INFERENCE_STEPS,
                guidance_scale=SAMPLE_GUIDANCE,
                generator=gen,
                height=spec.resolution,
                width=spec.resolution,
            ).images[0]
            save_png(image, samples / f"step_{step:06d}_prompt{k}.png")
            trainer.ledger.record(samples / f"step_{step:06d}_prompt{k}.png")
        if spec.validation_image:
            img = open_image(Path(spec.validation_image), "--validation-image")
            mask = open_image(Path(spec.validation_mask), "--validation-mask")
            prompt = spec.validation_prompt[0] if spec.validation_prompt else trainer.data.records[0].prompt
            frames = [
                f.image
                for f in progress(
                    components,
                    img,
                    mask,
                    prompt=prompt,
                    steps=SAMPLE_PIE_STEPS,
                    inference_steps=SAMPLE_INFERENCE_STEPS,
                    resolution=spec.resolution,
                    fit=spec.fit,
                    seed=spec.seed,
                )
            ]
            write_grid(frames, samples / f"step_{step:06d}_pie.png")
            trainer.ledger.record(samples / f"step_{step:06d}_pie.png")


def save_weights(trainer: Trainer) -> Path:
    """The trained weights in the run folder; returns the LoRA file or the ``unet/`` folder."""
    acc = trainer.accelerator
    out = trainer.out
    unet = acc.unwrap_model(trainer.unet)
    te = acc.unwrap_model(trainer.text_encoder) if trainer.train_te else None
    if trainer.spec.method == "lora":
        weights = save_final_lora(out, unet, te)
        trainer.ledger.record(weights)
        return weights
    for name, module in (("unet", unet), ("text_encoder", te)):
        if module is None:
            continue
        tmp = temp_path(out / name)
        shutil.rmtree(tmp, ignore_errors=True)
        module.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(out / name, ignore_errors=True)
        os.replace(tmp, out / name)
    # The rest of the base model (hard-linked), so DIR is a complete model: --model DIR works.
    root = trainer.source.path
    for name in ("vae", "tokenizer", "scheduler") + (() if te is not None else ("text_encoder",)):
        if not (out / name).exists():
            link_or_copy(root / name, out / name)
    index_file = root / "model_index.json"
    index = json.loads(index_file.read_text(encoding="utf-8")) if index_file.is_file() else {}
    index.update(
        {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    )
    write_text(out / "model_index.json", json.dumps(index, indent=2))
    trainer.ledger.record(out / "model_index.json", save=False)
    trainer.record_outputs("unet", "text_encoder", "vae", "tokenizer", "scheduler")
    return out / "unet"
