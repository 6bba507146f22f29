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


# loss.png: the size of the chart and its colours (training loss, its running mean, held-out loss).
PLOT_SIZE = (720, 360)
_RAW, _SMOOTH, _HELD = (170, 190, 215), (31, 119, 180), (214, 39, 40)


def read_metrics(path: Path) -> list[dict[str, float | None]]:
    """metrics.csv as rows of numbers (an empty or unreadable cell is None)."""
    import csv

    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            rows.append({k: _number(v) for k, v in row.items() if k})
    return rows


def _number(text: str | None) -> float | None:
    import math

    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def write_loss_plot(metrics: Path, path: Path) -> Path | None:
    """loss.png from metrics.csv: the training loss per step, its running mean and the held-out loss.

    Drawn with PIL (no plotting library needed); written atomically. None when there is no step yet.
    """
    from PIL import Image, ImageDraw, ImageFont

    from pie_cli.imaging.files import save_png

    rows = [r for r in read_metrics(metrics) if r.get("step") is not None and r.get("loss") is not None]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    smooth, value = [], None
    window = max(1, len(losses) // 20)
    alpha = 2 / (window + 1)
    for loss in losses:
        value = loss if value is None else (1 - alpha) * value + alpha * loss
        smooth.append(value)
    held = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    values = losses + [v for _, v in held]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    first, last = steps[0], max(steps[-1], steps[0] + 1)
    width, height = PLOT_SIZE
    left, right, top, bottom = 64, width - 16, 36, height - 40
    img = Image.new("RGB", PLOT_SIZE, "white")
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=13)
    except (TypeError, OSError):
        font = ImageFont.load_default()

    def xy(step: float, y: float) -> tuple[float, float]:
        return (
            left + (right - left) * (step - first) / (last - first),
            bottom - (bottom - top) * (y - lo) / (hi - lo),
        )

    draw.rectangle((left, top, right, bottom), outline=(180, 180, 180))
    draw.text((left, 8), "pie finetune: training loss", fill="black", font=font)
    legend = [("loss", _RAW), ("running mean", _SMOOTH)] + ([("held-out loss", _HELD)] if held else [])
    x = right - 120 * len(legend)
    for name, colour in legend:
        draw.line((x, 16, x + 18, 16), fill=colour, width=3)
        draw.text((x + 24, 9), name, fill="black", font=font)
        x += 120
    draw.text((4, top - 6), f"{hi:.4g}", fill=(90, 90, 90), font=font)
    draw.text((4, bottom - 8), f"{lo:.4g}", fill=(90, 90, 90), font=font)
    draw.text((left, bottom + 8), f"step {int(first)}", fill=(90, 90, 90), font=font)
    draw.text((right - 80, bottom + 8), f"step {int(steps[-1])}", fill=(90, 90, 90), font=font)
    for series, colour, w in ((losses, _RAW, 1), (smooth, _SMOOTH, 2)):
        coords = [xy(s, y) for s, y in zip(steps, series, strict=True)]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=w)
        else:
            cx, cy = coords[0]
            draw.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=colour)
    held_xy = [xy(s, v) for s, v in held]
    if len(held_xy) > 1:
        draw.line(held_xy, fill=_HELD, width=2)
    for cx, cy in held_xy:
        draw.ellipse((cx - 3.5, cy - 3.5, cx + 3.5, cy + 3.5), fill=_HELD)
    save_png(img, path)
    return path
