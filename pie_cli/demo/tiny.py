"""Build a tiny, randomly initialised Stable-Diffusion-1.x-shaped model in diffusers layout.

Same components and file layout as a real SD 1.x checkpoint (``model_index.json``,
``unet/``, ``vae/`` with an 8x down-sampling factor, ``text_encoder/``, ``tokenizer/``,
``scheduler/`` with SD's PNDM configuration, safetensors weights), only a few hundred
kilobytes. Tests and the offline demo load it through the same registry and
``from_pretrained`` path as real checkpoints. Its outputs are noise, not medicine.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pie_cli.demo.vocab import BOS, EOS, write_clip_vocab

# SD 1.x scheduler configuration (PNDM, scaled-linear betas, PLMS only).
SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def build_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny SD-shaped model into ``directory`` (created) and return its path."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    transformers.utils.logging.disable_progress_bar()

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)

    vocab_size, vocab = write_tokenizer(root / "tokenizer", max_length=77)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab_size,
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                projection_dim=32,
                hidden_act="quick_gelu",
                bos_token_id=vocab[BOS],
                eos_token_id=vocab[EOS],
                pad_token_id=vocab[EOS],
            )
        )
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            # Four blocks: three 2x down-samplings, the same 8x factor as SD's VAE.
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 32, 32, 32),
            layers_per_block=1,
            norm_num_groups=16,
            latent_channels=4,
            sample_size=64,
            scaling_factor=0.18215,
        )
        # A trained VAE has a narrow posterior; a random one has std ~1, which would
        # drown the image in sampling noise. Pin log-variance low (std ~ 5e-5).
        with torch.no_grad():
            vae.quant_conv.weight[4:].zero_()
            vae.quant_conv.bias[4:].fill_(-20.0)

    text_encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    write_pipeline_files(root)
    (root / "README.md").write_text(
        "# tiny random SD-1.x-shaped model\n\nBuilt by `pie_cli.demo.tiny.build_tiny_model` "
        f"(seed {seed}). Randomly initialised: for tests and demos of the machinery only.\n"
    )
    return root


def write_tokenizer(directory: Path, max_length: int = 77) -> tuple[int, dict[str, int]]:
    """A CLIP tokenizer folder with the locally learnt vocabulary; returns (size, vocab)."""
    vocab_size = write_clip_vocab(directory)
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    write_tokenizer_configs(directory, max_length)
    return vocab_size, vocab


def write_tokenizer_configs(directory: Path, max_length: int = 77) -> None:
    """tokenizer_config.json and special_tokens_map.json of a CLIP tokenizer folder (SD 1.x's layout)."""
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def write_pipeline_files(root: Path) -> None:
    """SD 1.x's PNDM scheduler config and a model_index.json without safety checker."""
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD1_SCHEDULER, indent=2))
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": _diffusers_version(),
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(model_index, indent=2))


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
