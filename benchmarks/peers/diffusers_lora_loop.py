"""The peer of `pie finetune` in benchmarks/bench_finetune.py: a LoRA training loop written the way
diffusers' examples/text_to_image/train_text_to_image_lora.py works, per step, with none of pie.

What it does, after that script's documented behaviour (our own code, not a copy of its source):

- tokenizer, DDPM noise scheduler, text encoder, VAE and UNet loaded with diffusers/transformers
  ``from_pretrained`` from the model folder's subfolders; all three models frozen and moved to the
  device in the precision of ``--mixed-precision`` (``no`` = fp32);
- UNet LoRA through ``unet.add_adapter(LoraConfig(r, lora_alpha, init_lora_weights="gaussian",
  target_modules=["to_k", "to_q", "to_v", "to_out.0"]))``, the trainable parameters kept fp32 under
  fp16 (``cast_training_params``), AdamW on them (betas 0.9/0.999, weight decay 1e-2, eps 1e-8);
- each example read and transformed when the loader asks for it: RGB, short side resized to the
  resolution (bilinear), centre crop, to a [0, 1] tensor, normalised to [-1, 1]; its caption
  tokenised to the tokenizer's max length. (torchvision is not installed here: PIL and numpy do
  what its Resize / CenterCrop / ToTensor / Normalize do to a PIL image.) A shuffling DataLoader;
- accelerate's Accelerator (that mixed precision; no trackers, i.e. ``--report_to none``), which
  prepares the UNet, optimizer, loader and LR scheduler (constant, no warm-up);
- per step: VAE posterior sample x scaling factor, Gaussian noise, a uniform timestep per example,
  ``add_noise``, text embeddings, the UNet's epsilon prediction, MSE against the noise (mean), the loss
  gathered across processes for logging, backward, gradient clipping at ``--max-grad-norm`` (the
  script's default 1.0) when gradients sync, optimizer and LR scheduler steps, zero_grad;
- at the end the UNet LoRA saved with ``StableDiffusionPipeline.save_lora_weights`` (safetensors).

Per-step times go to OUT/metrics.csv in the columns of pie's own (step, loss, lr, seconds, val_loss;
seconds from the end of one optimizer step to the end of the next, so the data loading of a step is
in it), so the benchmark takes the same median of both.

    python benchmarks/peers/diffusers_lora_loop.py --model DIR --data DIR --out DIR [--resolution 64] ...

DIR for --data holds images and a metadata.jsonl of {"file_name": ..., "text": ...} lines (the
layout of the datasets "imagefolder" loader the script uses by default).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(int) on a PIL image: the short side to ``size``, the long side scaled
    (truncated), bilinear."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_long = int(size * long / short)
    new = (size, new_long) if w <= h else (new_long, size)
    return img.resize(new, Image.Resampling.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's CenterCrop(size) (offsets rounded)."""
    w, h = img.size
    left = int(round((w - size) / 2.0))
    top = int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """ToTensor then Normalize([0.5], [0.5]): C x H x W float32 in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return (torch.from_numpy(arr).permute(2, 0, 1).contiguous() - 0.5) / 0.5


class CaptionedImages(torch.utils.data.Dataset):
    """An image folder with metadata.jsonl; each item decoded, transformed and tokenised on access."""

    def __init__(self, root: Path, tokenizer, resolution: int) -> None:
        self.root = root
        self.tokenizer = tokenizer
        self.resolution = resolution
        with open(root / "metadata.jsonl", encoding="utf-8") as fh:
            self.rows = [json.loads(line) for line in fh if line.strip()]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        with Image.open(self.root / row["file_name"]) as raw:
            img = raw.convert("RGB")
        img = center_crop(resize_short_side(img, self.resolution), self.resolution)
        ids = self.tokenizer(
            row["text"],
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids[0]
        return {"pixel_values": to_normalized_tensor(img), "input_ids": ids}


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    pixels = torch.stack([e["pixel_values"] for e in examples])
    return {
        "pixel_values": pixels.to(memory_format=torch.contiguous_format).float(),
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
    }


def train(args: argparse.Namespace) -> None:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(
        gradient_accumulation_steps=1,
        mixed_precision=args.mixed_precision,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    set_seed(args.seed)

    model = str(args.model)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    for frozen in (unet, vae, text_encoder):
        frozen.requires_grad_(False)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    device = accelerator.device
    unet.to(device, dtype=weight_dtype)
    vae.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    unet.add_adapter(
        LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha if args.alpha is not None else args.rank,
            init_lora_weights="gaussian",
            target_modules=UNET_TARGETS,
        )
    )
    if args.mixed_precision == "fp16":
        cast_training_params(unet, dtype=torch.float32)
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_params, lr=args.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    dataset = CaptionedImages(Path(args.data), tokenizer, args.resolution)
    loader = torch.utils.data.DataLoader(
        dataset, shuffle=True, collate_fn=collate, batch_size=args.batch_size, num_workers=args.num_workers
    )
    lr_scheduler = get_scheduler(
        "constant",
        optimizer=optimizer,
        num_warmup_steps=0,
        num_training_steps=args.max_steps * accelerator.num_processes,
    )
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    epochs = math.ceil(args.max_steps / len(loader))

    metrics_file = open(out / "metrics.csv", "w", newline="")  # noqa: SIM115 - closed after the loop
    metrics = csv.writer(metrics_file)
    metrics.writerow(["step", "loss", "lr", "seconds", "val_loss"])
    step = 0
    step_started = time.perf_counter()
    try:
        for _ in range(epochs):
            unet.train()
            for batch in loader:
                with accelerator.accumulate(unet):
                    latents = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample()
                    latents = latents * vae.config.scaling_factor
                    noise = torch.randn_like(latents)
                    timesteps = torch.randint(
                        0,
                        noise_scheduler.config.num_train_timesteps,
                        (latents.shape[0],),
                        device=latents.device,
                    ).long()
                    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                    embeddings = text_encoder(batch["input_ids"], return_dict=False)[0]
                    if noise_scheduler.config.prediction_type == "v_prediction":
                        target = noise_scheduler.get_velocity(latents, noise, timesteps)
                    else:
                        target = noise
                    pred = unet(noisy, timesteps, embeddings, return_dict=False)[0]
                    loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
                    logged = accelerator.gather(loss.repeat(args.batch_size)).mean().item()
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(lora_params, args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                step += 1
                now = time.perf_counter()
                if accelerator.is_main_process:
                    lr = lr_scheduler.get_last_lr()[0]
                    metrics.writerow([step, f"{logged:.6f}", f"{lr:.6g}", f"{now - step_started:.4f}", ""])
                    metrics_file.flush()
                step_started = now
                if step >= args.max_steps:
                    break
            if step >= args.max_steps:
                break
    finally:
        metrics_file.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(accelerator.unwrap_model(unet)))
        StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=layers, safe_serialization=True)
    accelerator.end_training()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--alpha", type=float, default=None, help="LoRA alpha (default: = rank, as the script)"
    )
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    train(parser.parse_args())


if __name__ == "__main__":
    main()
