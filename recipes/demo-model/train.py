"""Train pie's built-in demo model and phantom classifier from scratch, on CPU, in about two hours.

    python recipes/demo-model/train.py            # or: make demo-model
    python recipes/demo-model/train.py --quick    # a few minutes, for checking the script itself

Stages (each cached under --work, so a rerun continues where it stopped; --force redoes all):
1. phantoms: N healthy / effusion chest phantoms at 64 px (pie_cli.demo.phantom, seeds 0..N-1);
2. VAE: AutoencoderKL 32/64/64 channels (factor 4: 16 x 16 x 4 latents), trained to reconstruct
   from the posterior mean with a tiny KL term, its log-variance then pinned low so that
   sampling the posterior (what pie does) returns the mean;
3. UNet + text encoder, jointly, on cached latents: DDPM epsilon loss, 10 % empty prompts for
   classifier-free guidance, an EMA of the weights is what is saved;
3b. severity: two rounds of more of the same on fresh phantoms that are 90 % effusions, at a lower
   rate (halved in round 2), so the model learns "small", "moderate" and "large" apart;
4. classifier: a tiny CNN for effusion left/right and cardiomegaly on fresh phantoms (half of
   them through the VAE, so it knows the look of decoded frames);
5. assembly: diffusers layout with SD 1.x's PNDM scheduler config, a README with the command,
   the times and the metrics;
6. probe: text-to-image from "<small|moderate|large> left pleural effusion", 12 seeds each, graded
   by the classifier (target: >= 80 % exact grade), into the README's metrics.

--start-from pie_cli/demo/model takes stages 2-3 (and the classifier) from a model built before,
so only 3b and the probe run (about 50 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pie_cli.demo import classifier as clf  # noqa: E402
from pie_cli.demo.phantom import render, sample_findings  # noqa: E402
from pie_cli.demo.tiny import SD1_SCHEDULER, write_pipeline_files, write_tokenizer  # noqa: E402
from pie_cli.demo.vocab import BOS, EOS  # noqa: E402

SIZE = 64
TOKENS = 32


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def warmup_cosine(opt, steps: int, warmup: int):
    """Linear warm-up, then cosine decay to 5 % of the peak learning rate."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def to_rgb_tensor(grey: np.ndarray) -> torch.Tensor:
    """[N, H, W] uint8 -> [N, 3, H, W] in [-1, 1] (SD models are RGB)."""
    x = torch.from_numpy(grey.astype(np.float32) / 127.5 - 1.0)[:, None]
    return x.repeat(1, 3, 1, 1)


# --------------------------------------------------------------------------- 1. phantoms


def make_phantoms(
    work: Path,
    n: int,
    kinds: tuple[str, ...],
    seed0: int,
    name: str,
    varied: bool = False,
    healthy: float = 0.4,
) -> dict:
    path = work / f"{name}.npz"
    if path.exists():
        data = np.load(path, allow_pickle=False)
        return {k: data[k] for k in data.files}
    rng = np.random.default_rng(seed0)
    images, reports, labels = [], [], []
    for i in range(n):
        findings = sample_findings(rng, kinds, healthy)
        ph = render(findings, seed=seed0 + i, size=SIZE, varied=varied)
        images.append(np.asarray(ph.image))
        reports.append(ph.report)
        labels.append([findings.effusion_left, findings.effusion_right, findings.cardiomegaly])
    data = {
        "images": np.stack(images),
        "reports": np.array(reports),
        "labels": np.array(labels, dtype=np.int64),
    }
    np.savez_compressed(path, **data)
    return data


# --------------------------------------------------------------------------- 2. VAE


def train_vae(work: Path, images: np.ndarray, steps: int, batch: int) -> tuple:
    from diffusers import AutoencoderKL

    out = work / "vae"
    if (out / "config.json").exists():
        return AutoencoderKL.from_pretrained(out), json.loads((work / "vae_metrics.json").read_text())
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=SIZE,
    )
    held = to_rgb_tensor(images[-64:])
    train = images[:-64]
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = warmup_cosine(opt, steps, warmup=max(1, steps // 20))
    g = torch.Generator().manual_seed(1)
    started = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(train), (batch,), generator=g)
        x = to_rgb_tensor(train[idx.numpy()])
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.mean).sample
        kl = 0.5 * (dist.mean**2 + dist.var - 1 - dist.logvar).mean()
        loss = F.mse_loss(recon, x) + 1e-8 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            log(f"vae step {step}/{steps} mse {loss.item():.5f}")
    vae.eval()
    with torch.no_grad():
        recon = vae.decode(vae.encode(held).latent_dist.mean).sample.clamp(-1, 1)
        mse = F.mse_loss((recon + 1) / 2, (held + 1) / 2).item()
        # Pin the posterior's log-variance low: pie samples the posterior, which then is its mean.
        vae.quant_conv.weight[4:].zero_()
        vae.quant_conv.bias[4:].fill_(-20.0)
        latents = torch.cat(
            [
                vae.encode(to_rgb_tensor(images[i : i + 256])).latent_dist.mean
                for i in range(0, len(images), 256)
            ]
        )
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    metrics = {
        "vae_psnr_db": round(10 * math.log10(1 / mse), 2),
        "vae_steps": steps,
        "vae_minutes": round((time.time() - started) / 60, 1),
        "scaling_factor": round(scaling, 5),
    }
    vae.save_pretrained(out, safe_serialization=True)
    (work / "vae_metrics.json").write_text(json.dumps(metrics))
    log(f"vae done: {metrics}")
    return vae, metrics


# --------------------------------------------------------------------------- 3. UNet + text encoder


def build_text(work: Path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = work / "tokenizer"
    size, vocab = write_tokenizer(tok_dir, max_length=TOKENS)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    config = CLIPTextConfig(
        vocab_size=size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKENS,
        projection_dim=64,
        hidden_act="quick_gelu",
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    return tokenizer, CLIPTextModel(config)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def train_unet(work: Path, vae, data: dict, steps: int, batch: int) -> tuple:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    out = work / "unet_stage"
    torch.manual_seed(0)
    tokenizer, text_encoder = build_text(work)
    if (out / "unet" / "config.json").exists():
        return (
            tokenizer,
            CLIPTextModel.from_pretrained(out / "text_encoder"),
            UNet2DConditionModel.from_pretrained(out / "unet"),
            json.loads((work / "unet_metrics.json").read_text()),
        )
    unet = build_unet()
    metrics = fit(unet, text_encoder, tokenizer, vae, data, steps, batch, lr=5e-4, seed=2, name="unet")
    unet.save_pretrained(out / "unet", safe_serialization=True)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    (work / "unet_metrics.json").write_text(json.dumps(metrics))
    log(f"unet done: {metrics}")
    return tokenizer, text_encoder, unet, metrics


def fit(
    unet, text_encoder, tokenizer, vae, data: dict, steps: int, batch: int, lr: float, seed: int, name: str
) -> dict:
    """Train UNet + text encoder jointly on the phantoms' latents; the EMA of the weights is kept."""
    from diffusers import DDPMScheduler

    sf = vae.config.scaling_factor
    with torch.no_grad():
        latents = (
            torch.cat(
                [
                    vae.encode(to_rgb_tensor(data["images"][i : i + 256])).latent_dist.mean
                    for i in range(0, len(data["images"]), 256)
                ]
            )
            * sf
        )
    reports = [str(r) for r in data["reports"]]
    ids = tokenizer(
        reports, padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    empty = tokenizer([""], padding="max_length", max_length=TOKENS, return_tensors="pt").input_ids
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = warmup_cosine(opt, steps, warmup=max(1, steps // 30))
    g = torch.Generator().manual_seed(seed)
    started = time.time()
    recent = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        z = latents[idx]
        cond = ids[idx].clone()
        drop = torch.rand(batch, generator=g) < 0.1  # empty prompts teach the unconditional branch
        cond[drop] = empty
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        noisy = scheduler.add_noise(z, noise, t)
        pred = unet(noisy, t, text_encoder(cond)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        recent.append(loss.item())
        if step % 50 == 0 or step == steps:
            log(f"{name} step {step}/{steps} loss {np.mean(recent[-50:]):.4f}")
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)
    return {
        f"{name}_steps": steps,
        f"{name}_batch": batch,
        f"{name}_final_loss": round(float(np.mean(recent[-100:])), 4),
        f"{name}_minutes": round((time.time() - started) / 60, 1),
    }


def train_severity(
    work: Path, vae, tokenizer, text_encoder, unet, n: int, steps: int, batch: int, rounds: int = 2
) -> dict:
    """Stage 3b: go on training on phantoms that are mostly effusions, evenly graded, at a lower rate.

    After stage 3 alone the model draws an effusion but not its grade ("small", "moderate" and
    "large" give the same picture); this stage is what teaches the severity words. Each round
    draws fresh phantoms and halves the rate; each is cached on its own.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    total: dict = {"severity_rounds": rounds, "severity_steps": 0, "severity_minutes": 0.0}
    for r in range(1, rounds + 1):
        suffix = "" if r == 1 else f"_{r}"
        out = work / f"severity_stage{suffix}"
        record = work / f"severity_metrics{suffix}.json"
        if (out / "unet" / "config.json").exists():
            unet.load_state_dict(UNet2DConditionModel.from_pretrained(out / "unet").state_dict())
            text_encoder.load_state_dict(CLIPTextModel.from_pretrained(out / "text_encoder").state_dict())
            metrics = json.loads(record.read_text())
        else:
            data = make_phantoms(
                work, n, ("effusion",), 400_000 + 100_000 * r, f"severity_phantoms{suffix}", healthy=0.1
            )
            torch.manual_seed(3 + r)
            lr = 2e-4 / 2 ** (r - 1)
            metrics = fit(
                unet, text_encoder, tokenizer, vae, data, steps, batch, lr=lr, seed=4 + r, name="severity"
            )
            metrics["severity_phantoms"] = n
            unet.save_pretrained(out / "unet", safe_serialization=True)
            text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
            record.write_text(json.dumps(metrics))
            log(f"severity round {r} done: {metrics}")
        total["severity_steps"] += metrics["severity_steps"]
        total["severity_minutes"] = round(total["severity_minutes"] + metrics["severity_minutes"], 1)
        total["severity_batch"] = metrics["severity_batch"]
        total[f"severity_round_{r}_final_loss"] = metrics["severity_final_loss"]
        total["severity_phantoms"] = n
    return total


def probe_severity(vae, tokenizer, text_encoder, unet, classifier: Path, seeds: int = 12) -> dict:
    """Text-to-image from "<word> left pleural effusion": the share of images the demo classifier grades as meant."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    scheduler = PNDMScheduler.from_config(SD1_SCHEDULER)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    model = clf.load(classifier)
    column = list(model.labels).index("effusion_left_severity")
    exact = {}
    for grade, word in ((1, "small"), (2, "moderate"), (3, "large")):
        images = pipe(
            [f"{word} left pleural effusion"] * seeds,
            height=SIZE,
            width=SIZE,
            num_inference_steps=30,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(0),
        ).images
        grades = np.rint(clf.predict(model, images)[:, column] * 3).astype(int)
        exact[word] = round(float((grades == grade).mean()), 3)
        log(f"probe {word}: classifier grades {grades.tolist()}")
    exact["all"] = round(float(np.mean([exact[w] for w in ("small", "moderate", "large")])), 3)
    return {"text_to_image_exact_grade": exact}


def start_from(work: Path, model: Path) -> None:
    """Seed the VAE and UNet stages (and the classifier's metrics) from an already built demo model."""
    import ast

    table = {}
    for line in (model / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] not in ("metric", "---"):
            try:
                table[cells[0]] = ast.literal_eval(cells[1])
            except (ValueError, SyntaxError):
                table[cells[0]] = cells[1]
    stages = {
        "vae_metrics.json": ("vae_psnr_db", "vae_steps", "vae_minutes", "scaling_factor"),
        "unet_metrics.json": ("unet_steps", "unet_batch", "unet_final_loss", "unet_minutes"),
        "classifier_metrics.json": (
            "classifier_accuracy",
            "classifier_steps",
            "classifier_minutes",
            "classifier_examples",
        ),
    }
    for name, keys in stages.items():
        if not (work / name).exists():
            (work / name).write_text(json.dumps({k: table[k] for k in keys}))
    if not (work / "vae" / "config.json").exists():
        shutil.copytree(model / "vae", work / "vae")
    for part in ("unet", "text_encoder"):
        if not (work / "unet_stage" / part / "config.json").exists():
            shutil.copytree(model / part, work / "unet_stage" / part)
    log(f"stages 2-3 taken from {model}")


# --------------------------------------------------------------------------- 4. classifier


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur, noise, contrast and brightness jitter: decoded frames are softer or noisier than drawings."""
    b = x.shape[0]
    sigma = torch.rand(b, generator=g) * 1.2
    out = []
    for img, s in zip(x, sigma, strict=True):
        if s > 0.2:
            taps = torch.exp(-0.5 * (torch.arange(-2, 3, dtype=torch.float32) / s) ** 2)
            taps = taps / taps.sum()
            img = F.conv2d(F.pad(img[None], (2, 2, 2, 2), mode="replicate"), taps.view(1, 1, 1, 5))
            img = F.conv2d(img, taps.view(1, 1, 5, 1))[0]
        out.append(img)
    x = torch.stack(out)
    contrast = 1 + (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.3
    bright = (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.2
    noise = torch.randn(x.shape, generator=g) * torch.rand(b, 1, 1, 1, generator=g) * 0.06
    return (x * contrast + bright + noise).clamp(-1, 1)


def train_classifier(work: Path, vae, n: int, steps: int, out: Path) -> dict:
    if (out / clf.WEIGHTS).exists() and (work / "classifier_metrics.json").exists():
        return json.loads((work / "classifier_metrics.json").read_text())
    data = make_phantoms(
        work, n, ("effusion", "cardiomegaly"), 1_000_000, "classifier_phantoms_varied", varied=True
    )
    images = data["images"]
    with torch.no_grad():  # half of the examples are VAE round trips: how decoded frames look
        recon = []
        for i in range(0, len(images), 256):
            x = to_rgb_tensor(images[i : i + 256])
            r = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1).mean(dim=1)
            recon.append(((r + 1) * 127.5).round().to(torch.uint8).numpy())
        recon = np.concatenate(recon)
    grades = torch.from_numpy(data["labels"].astype(np.int64))  # [N, findings]: grades 0-3
    grey = torch.from_numpy(np.concatenate([images, recon]).astype(np.float32) / 127.5 - 1)[:, None]
    targets = torch.cat([grades, grades])
    held = np.arange(len(grey)) % 10 == 0
    train_x, train_y = grey[~held], targets[~held]
    torch.manual_seed(0)
    model = clf.FindingNet()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-3)
    g = torch.Generator().manual_seed(3)
    started = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(train_x), (64,), generator=g)
        logits = model(augment(train_x[idx], g))  # [B, findings, grades]
        loss = F.cross_entropy(logits.reshape(-1, clf.GRADES), train_y[idx].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps:
            log(f"classifier step {step}/{steps} cross-entropy {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        grade = model(grey[held]).argmax(dim=-1)
    truth = targets[held]
    presence = ((grade > 0) == (truth > 0)).float().mean(dim=0).tolist()
    exact = (grade == truth).float().mean(dim=0).tolist()
    metrics = {
        "classifier_accuracy": {
            f: {"presence": round(p, 4), "grade": round(e, 4)}
            for f, p, e in zip(clf.FINDINGS, presence, exact, strict=True)
        },
        "classifier_steps": steps,
        "classifier_minutes": round((time.time() - started) / 60, 1),
        "classifier_examples": int(len(train_x)),
    }
    clf.save(
        model,
        out,
        {
            "trained_on": f"{n} phantoms (+ their VAE round trips), pie_cli.demo.phantom",
            "held_out_accuracy": metrics["classifier_accuracy"],
        },
    )
    (work / "classifier_metrics.json").write_text(json.dumps(metrics))
    log(f"classifier done: {metrics}")
    return metrics


# --------------------------------------------------------------------------- 5. assembly


def _drop_call_state(path: Path) -> None:
    """A fast tokenizer saves the padding and truncation of its last call; the model ships without them."""
    if path.is_file():
        data = json.loads(path.read_text())
        data["truncation"] = data["padding"] = None
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def assemble(out: Path, work: Path, vae, tokenizer, text_encoder, unet, metrics: dict, command: str) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(out / "tokenizer")
    _drop_call_state(out / "tokenizer" / "tokenizer.json")
    write_pipeline_files(out)
    size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    metrics["size_mb"] = round(size_mb, 1)
    lines = [
        "# pie demo model",
        "",
        "A small Stable-Diffusion-1.x-shaped model trained from scratch on synthetic chest-X-ray phantoms",
        "(`pie_cli.demo.phantom`: healthy, and pleural effusion left/right of grade 1-3) at 64 x 64 px.",
        "It exists so that pie can be tried, tested and evaluated offline. It knows nothing about real",
        "radiographs. Built-in alias: `demo`.",
        "",
        "- VAE: AutoencoderKL 32/64/64, factor 4 (16 x 16 x 4 latents), posterior log-variance pinned low.",
        "- UNet: 32/64/64 channels with cross-attention (64-d); text encoder: CLIP, 2 layers, 64 wide,",
        f"  {TOKENS} tokens, vocabulary learnt locally (pie_cli/demo/vocab.py); scheduler: SD 1.x PNDM.",
        "",
        f"Trained with: `{command}`",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in metrics.items()],
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
    log(f"model written to {out} ({size_mb:.1f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "pie_cli" / "demo" / "model")
    parser.add_argument("--classifier-out", type=Path, default=ROOT / "pie_cli" / "demo" / "classifier")
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "demo-train")
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--vae-steps", type=int, default=900)
    parser.add_argument("--unet-steps", type=int, default=2100)
    parser.add_argument("--severity-steps", type=int, default=2000, help="steps per severity round")
    parser.add_argument("--severity-rounds", type=int, default=2)
    parser.add_argument("--severity-n", type=int, default=2000)
    parser.add_argument("--classifier-steps", type=int, default=1500)
    parser.add_argument(
        "--start-from",
        type=Path,
        help="a demo model folder whose VAE and UNet stand for stages 2-3 (the classifier is kept)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check the script")
    parser.add_argument("--force", action="store_true", help="redo every stage")
    args = parser.parse_args()
    if args.quick:
        args.n, args.vae_steps, args.unet_steps, args.classifier_steps = 200, 20, 30, 30
        args.severity_n, args.severity_steps = 200, 30
        args.work = args.work.with_name(args.work.name + "-quick")
    torch.set_num_threads(args.threads)
    if args.force and args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.start_from:
        start_from(args.work, args.start_from.resolve())
    data = make_phantoms(args.work, args.n, ("effusion",), 0, "phantoms")
    log(f"{len(data['images'])} phantoms")
    vae, vae_metrics = train_vae(args.work, data["images"], args.vae_steps, 32)
    tokenizer, text_encoder, unet, unet_metrics = train_unet(args.work, vae, data, args.unet_steps, 64)
    severity_metrics = train_severity(
        args.work,
        vae,
        tokenizer,
        text_encoder,
        unet,
        args.severity_n,
        args.severity_steps,
        64,
        args.severity_rounds,
    )
    classifier_metrics = train_classifier(
        args.work, vae, 3000 if not args.quick else 200, args.classifier_steps, args.classifier_out
    )
    metrics = {
        "phantoms": args.n,
        **vae_metrics,
        **unet_metrics,
        **severity_metrics,
        **classifier_metrics,
        **probe_severity(vae, tokenizer, text_encoder, unet, args.classifier_out),
        "training_minutes": round(
            vae_metrics["vae_minutes"]
            + unet_metrics["unet_minutes"]
            + severity_metrics["severity_minutes"]
            + classifier_metrics["classifier_minutes"],
            1,
        ),
        "machine": f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
    }
    command = "python recipes/demo-model/train.py " + " ".join(sys.argv[1:])
    assemble(args.out, args.work, vae, tokenizer, text_encoder, unet, metrics, command.strip())


if __name__ == "__main__":
    main()
