"""The training configuration: one frozen record, its YAML form, and precedence.

Every ``pie finetune`` option is a field here with the same name (``--grad-accum`` is
``grad_accum``). Values come, in order of precedence, from flags given on the command
line, ``--config recipe.yaml``, the run's saved ``training_config.yaml`` when resuming,
and the defaults below. Torch-free: checked before any heavy import.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pie_cli.core.parameters import MAX_TRAINING_SEED, resolution_problem
from pie_cli.errors import UserError

# "auto" and the names of training.formats.FORMATS, in its order (checked when that module loads).
DATA_FORMATS = ("auto", "folder", "ham10000", "eyepacs", "chexpert", "mimic-cxr", "hf", "jsonl", "csv")
METHODS = ("lora", "full")
LR_SCHEDULERS = ("constant", "cosine", "linear", "constant_with_warmup")
# Training steps when neither --max-steps nor --epochs is given.
DEFAULT_MAX_STEPS = 1000
PRECISIONS = ("no", "fp16", "bf16")
VIEWS = ("frontal", "lateral", "all")
UNCERTAIN = ("negative", "positive")
# MIMIC-CXR prompts: a report section (falling back to the other, then to the labels) or the labels.
REPORT_SECTIONS = ("impression", "findings", "both", "labels")
REPORT_TO = ("none", "tensorboard", "wandb")
LOSS_MASKS = ("data", "lungs")
DEFAULT_BUCKET_STEP = 64
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class TrainSpec:
    # data
    data: str | None = None
    data_format: str = "auto"
    image_column: str | None = None
    caption_column: str | None = None
    mask_column: str | None = None  # --loss-mask data: the mask column (default: mask, mask_file, mask_path)
    prompt_template: str = "{instance}, {labels}"
    instance_prompt: str | None = None  # default per data format
    view: str = "frontal"  # CheXpert, MIMIC-CXR
    uncertain: str = "negative"  # CheXpert (and MIMIC-CXR) -1 labels
    split: str = "train"  # Hugging Face datasets; MIMIC-CXR: train, validate, test
    max_samples: int | None = None
    # MIMIC-CXR: the report section the prompt comes from. IMPRESSION by default: short, the
    # radiologist's summary (the style of PIE's prompts), and it mostly fits CLIP's 77 tokens.
    report_section: str = "impression"
    reports: str | None = None  # MIMIC-CXR: the folder of the sSTUDY.txt reports (default: DATA/files)
    # model and method
    model: str = "sd-v1-5"
    model_config: str | None = None  # the configs describing a single-file --model (default: built-in SD 1.x)
    allow_pickle: bool = False  # load .bin/.ckpt weights of the base model (they can run code)
    allow_schedule_change: bool = False  # --resume with another schedule length (max steps, epochs, warmup)
    out: str | None = None
    method: str = "lora"
    rank: int = 8
    alpha: float | None = None  # default: = rank
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = UNET_LORA_TARGETS
    train_text_encoder: bool = False
    class_data: str | None = None
    class_prompt: str | None = None
    prior_loss_weight: float = 1.0
    # optimisation
    resolution: int = 512
    fit: str = "crop"  # how an image becomes a training example: as `pie simulate --fit` (imaging.geometry)
    # --fit native in batches: each image covers the bucket canvas nearest its own (training.buckets),
    # whose long side is a multiple of bucket_step (64: kohya's and diffusers' step for SD 1.x).
    buckets: bool = False
    bucket_step: int = DEFAULT_BUCKET_STEP
    # Weight the loss by each image's mask: "data" (the table's mask column) or "lungs" (auto_masks).
    loss_mask: str | None = None
    center_crop: bool = True
    random_flip: bool = False
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None  # default: 1e-4 for LoRA, 5e-5 for full
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    max_steps: int | None = None
    epochs: int | None = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    # The empty prompt instead of the report, with this probability per example and epoch (seeded), so the
    # unconditional branch of classifier-free guidance, which PIE uses at every step, learns the domain too.
    caption_dropout: float = 0.0
    cache_latents: bool = False
    # An exponential moving average of the trained weights (diffusers' EMAModel): validated and saved
    # instead of the raw weights. The decay warms up as (1 + step) / (10 + step), capped at ema_decay.
    use_ema: bool = False
    ema_decay: float = 0.9999
    max_grad_norm: float = 1.0
    num_workers: int = 2
    seed: int = 42
    # checkpoints and validation
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validation_prompt: tuple[str, ...] = ()
    validation_every: int | None = None
    validation_image: str | None = None
    validation_mask: str | None = None
    # Held-out examples (this fraction, chosen by the seed) scored by their denoising loss at fixed
    # timesteps and noise every validation_loss_every steps (default: at each checkpoint).
    validation_split: float = 0.0
    validation_loss_every: int | None = None
    report_to: str = "none"  # tensorboard or wandb (accelerate's trackers), logs under DIR/logs
    # not options: how each value was set (flag, config file, saved run, default)
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------------ derived values
    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.method == "lora" else 5e-5)

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else float(self.rank)

    def to_yaml_dict(self) -> dict[str, Any]:
        """Every value as the run uses it: derived defaults (lr, alpha, max steps) written out, never null."""
        data = asdict(self)
        data.pop("sources")
        data.pop("allow_schedule_change")  # a permission for one resume, not part of the run
        data["lr"] = self.learning_rate
        if self.method == "lora":
            data["alpha"] = self.lora_alpha
        if self.max_steps is None and self.epochs is None:
            data["max_steps"] = DEFAULT_MAX_STEPS
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """One ``UserError`` naming the first option out of range or in conflict."""
        choices = {
            "data_format": DATA_FORMATS,
            "method": METHODS,
            "lr_scheduler": LR_SCHEDULERS,
            "mixed_precision": PRECISIONS,
            "view": VIEWS,
            "uncertain": UNCERTAIN,
            "report_section": REPORT_SECTIONS,
            "report_to": REPORT_TO,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(
                    f"--{_flag(name)} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}."
                )
        if not self.data:
            raise UserError(
                "--data is required: an image folder, a CSV/JSONL file, a dataset or a dataset root."
            )
        if not self.out:
            raise UserError("--out is required: the directory for the weights, checkpoints and samples.")
        positive = ("rank", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}.")
        for name in ("max_steps", "epochs", "validation_every", "validation_loss_every", "max_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{_flag(name)} must be at least 1, got {value}.")
        for name in ("warmup_steps", "num_workers"):
            if getattr(self, name) < 0:
                raise UserError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}.")
        problem = resolution_problem(self.resolution)
        if problem is not None:
            raise UserError(f"--resolution {problem}.")
        if not 0 <= self.seed < MAX_TRAINING_SEED:
            raise UserError(f"--seed must be in [0, 2^32), got {self.seed}.")
        # "not x > 0" rather than "x <= 0": NaN fails every comparison and must be refused too.
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a finite positive number, got {self.lr:g}.")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout:g}.")
        for name in ("alpha", "snr_gamma", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UserError(f"--{_flag(name)} must be a finite positive number, got {value:g}.")
        for name in ("noise_offset", "prior_loss_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"--{_flag(name)} must be a finite number >= 0, got {value:g}.")
        if not (math.isfinite(self.caption_dropout) and 0 <= self.caption_dropout <= 1):
            raise UserError(
                f"--caption-dropout must be a probability in [0, 1], got {self.caption_dropout:g}."
            )
        if not (math.isfinite(self.ema_decay) and 0 < self.ema_decay < 1):
            raise UserError(f"--ema-decay must be in (0, 1), got {self.ema_decay:g}.")
        if not (math.isfinite(self.validation_split) and 0 <= self.validation_split <= 0.5):
            raise UserError(
                f"--validation-split must be a fraction in [0, 0.5] of the examples, got {self.validation_split:g}."
            )
        if self.validation_loss_every is not None and not self.validation_split:
            raise UserError(
                "--validation-loss-every needs --validation-split (the held-out examples it scores)."
            )
        if self.max_steps is not None and self.epochs is not None:
            raise UserError("give --max-steps or --epochs, not both.")
        from pie_cli.imaging.geometry import FIT_CHOICES, MAX_RESOLUTION

        if self.fit not in FIT_CHOICES:
            raise UserError(f"--fit must be one of {', '.join(FIT_CHOICES)}, got {self.fit!r}.")
        if self.buckets and self.fit != "native":
            raise UserError(
                f"--buckets groups whole images by aspect, which needs --fit native (--fit {self.fit} makes "
                f"every example {self.resolution}x{self.resolution}: one bucket)."
            )
        if not (8 <= self.bucket_step <= MAX_RESOLUTION and self.bucket_step % 8 == 0):
            raise UserError(
                f"--bucket-step must be a positive multiple of 8 (the latent cell), got {self.bucket_step}."
            )
        if self.bucket_step != DEFAULT_BUCKET_STEP and not self.buckets:
            raise UserError("--bucket-step sizes the buckets of --buckets: add --buckets, or leave it out.")
        if self.buckets and self.cache_latents:
            raise UserError(
                "--buckets trains images of several sizes, which --cache-latents cannot batch yet: give one of them."
            )
        if self.loss_mask is not None and self.loss_mask not in LOSS_MASKS:
            raise UserError(f"--loss-mask must be one of {', '.join(LOSS_MASKS)}; got {self.loss_mask!r}.")
        if self.mask_column and self.loss_mask != "data":
            raise UserError("--mask-column names the masks of --loss-mask data: add --loss-mask data.")
        if self.fit == "native" and self.batch_size > 1 and not self.buckets:
            raise UserError(
                "--fit native trains each image at its own aspect, so a batch holds one image: give "
                f"--batch-size 1 (and --grad-accum {self.batch_size} for the same effective batch), or --fit pad."
            )
        if self.fit == "native" and self.class_data and not self.buckets:
            raise UserError(
                "--fit native gives each image its own canvas, and a class image's differs from its instance's: "
                "add --buckets (class images then cover their instance's canvas) or use --fit pad."
            )
        if self.fit != "crop" and not self.center_crop:
            raise UserError(f"--random-crop crops; --fit {self.fit} keeps the whole image: give one of them.")
        if self.cache_latents and (self.random_flip or not self.center_crop):
            raise UserError(
                "--cache-latents encodes each image once, so it needs --center-crop and no --random-flip."
            )
        if bool(self.class_data) != bool(self.class_prompt):
            raise UserError("prior preservation needs both --class-data and --class-prompt.")
        if bool(self.validation_image) != bool(self.validation_mask):
            raise UserError("--validation-image and --validation-mask go together.")
        if self.validation_every is not None and not (self.validation_prompt or self.validation_image):
            raise UserError("--validation-every needs --validation-prompt or --validation-image.")
        if not self.target_modules:
            raise UserError("--target-modules is empty.")


def _flag(name: str) -> str:
    return name.replace("_", "-")


OPTION_NAMES = tuple(f.name for f in fields(TrainSpec) if f.name != "sources")
# Names used by the diffusers training scripts, for "did you mean" in recipe errors.
SYNONYMS = {
    "learning_rate": "lr",
    "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "max_train_steps": "max_steps",
    "num_train_epochs": "epochs",
    "lr_warmup_steps": "warmup_steps",
    "pretrained_model_name_or_path": "model",
    "output_dir": "out",
    "train_data_dir": "data",
    "dataset_name": "data",
    "checkpointing_steps": "checkpoint_every",
    "checkpoints_total_limit": "keep_checkpoints",
    "instance_data_dir": "data",
    "class_data_dir": "class_data",
    "validation_steps": "validation_every",
    "network_dim": "rank",
    "network_alpha": "alpha",
    "lora_alpha": "alpha",
    "lora_rank": "rank",
}


def _field_type(name: str) -> Any:
    hints = typing.get_type_hints(TrainSpec)
    return hints[name]


def coerce(name: str, value: Any, where: str) -> Any:
    """A YAML value -> the field's type, or a ``UserError`` naming the key and the file."""
    hint = _field_type(name)
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise UserError(f"{where}: {name} cannot be empty.")
    base = (
        next((a for a in args if a is not type(None)), hint)
        if args and typing.get_origin(hint) in (typing.Union, types.UnionType)
        else hint
    )
    origin = typing.get_origin(base)
    try:
        if origin is tuple:
            items = value if isinstance(value, (list, tuple)) else [value]
            return tuple(str(v) for v in items)
        if base is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        pass
    kind = getattr(base, "__name__", str(base))
    raise UserError(f"{where}: {name} must be {kind}, got {value!r}.")


def _no_alias_loader():
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        """yaml's safe loader, refusing aliases: a few lines of anchors can expand to gigabytes."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, "aliases (*name) are not allowed in a pie recipe", event.start_mark
                )
            return super().compose_node(parent, index)

    return NoAliasLoader


def read_yaml(path: Path, what: str = "--config") -> dict[str, Any]:
    import yaml

    from pie_cli.imaging.files import read_text_file

    path = Path(path)
    text = read_text_file(path, what, limit=1 << 20)
    try:
        data = yaml.load(text, Loader=_no_alias_loader()) or {}  # a SafeLoader without aliases
    except (yaml.YAMLError, RecursionError) as exc:
        raise UserError(f"{what} {path} is not valid YAML ({str(exc).splitlines()[0]}).") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must be a mapping of option names to values.")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in OPTION_NAMES:
            close = (
                [SYNONYMS[name]] if name in SYNONYMS else difflib.get_close_matches(name, OPTION_NAMES, n=1)
            )
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{what} {path}: unknown key {key!r}{hint}.")
        out[name] = coerce(name, value, f"{what} {path}")
    return out


def merge(
    flags: dict[str, Any],
    explicit: set[str] | dict[str, str],
    recipe: dict[str, Any] | None = None,
    saved: dict[str, Any] | None = None,
) -> TrainSpec:
    """Options given (command line or environment) > recipe file > saved run config > defaults.

    ``explicit`` names the options that were given, or maps each to where it came from
    (``"command line"``, ``"environment ($PIE_MODEL)"``); ``spec.sources`` records it.
    """
    given = dict(explicit) if isinstance(explicit, dict) else dict.fromkeys(explicit, "command line")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for layer, source in ((saved or {}, "saved run"), (recipe or {}, "config file")):
        for key, value in layer.items():
            values[key] = value
            sources[key] = source
    for key, source in given.items():
        values[key] = flags[key]
        sources[key] = source
    spec = replace(TrainSpec(), **values)
    return replace(spec, sources={name: sources.get(name, "default") for name in OPTION_NAMES})


def write_yaml(spec: TrainSpec, path: Path) -> None:
    import yaml

    from pie_cli.imaging.files import write_text

    header = (
        "# Effective pie finetune configuration (flags > --config file > defaults). Reusable with --config.\n"
    )
    write_text(path, header + yaml.safe_dump(spec.to_yaml_dict(), sort_keys=False, allow_unicode=True))
