"""What one `pie simulate` case asks for, checked cheaply, and how it is recorded and read back.

:class:`SimulateSpec` is frozen and holds the options as given. Its PIE parameters are one
:class:`~pie_cli.core.parameters.PieConfig` (``spec.params``), so a parameter is defined once:
its default, its manifest record (:data:`RECORDED`) and its cohort column (:data:`COLUMNS`)
all come from ``PieConfig``'s fields. :func:`build_config` is the one validated way from a
spec to the parameters of a run, for a fresh run, a cohort case and a resumed run alike.
"""

from __future__ import annotations

import functools
import math
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pie_cli.core.parameters import (
    DEFAULTS,
    MAX_SEED,
    MAX_TRAJECTORIES,
    SCHEDULES,
    TUNABLE,
    PieConfig,
)
from pie_cli.errors import UserError

EXAMPLE_PROMPT = "large left pleural effusion"
MAX_THREADS = 1024  # --threads: far beyond any machine's cores, so a typo cannot stall the process


@dataclass(frozen=True)
class SimulateSpec:
    """One case of `pie simulate` as the user gave it (paths not yet read)."""

    image: Path | None
    prompt: str | None
    mask: Path | None
    model: str
    out: Path
    # The PIE parameters (steps, strength, guidance, blend weights, T, resolution, negative prompt).
    # Their prompt and per-step schedules stay empty here: build_config fills them in.
    params: PieConfig = field(default=DEFAULTS)
    scheduler: str = "model"
    seed: int = 42
    device: str = "auto"
    dtype: str = "auto"
    unet: Path | None = None
    lora: tuple[str, ...] = ()
    gif: bool = True
    overwrite: bool = False
    trajectories: int = 1
    prompt_schedule: Path | None = None  # a file of prompts
    strength_schedule: str | None = None  # "0.3,0.4" or "0.3:0.6"
    guidance_schedule: str | None = None
    beta2_schedule: str | None = None
    compile: bool = False
    threads: int | None = (
        None  # --threads: CPU intra-op threads (None: torch's default); not a result-shaping option
    )
    watermark: bool = False
    allow_pickle: bool = False
    model_config: str | None = None  # --model-config: the configs describing a single-file --model
    # Closed-loop pace (opt-in): each step keeps the candidate b2 whose frame --classifier scores
    # nearest the curve. pace: "linear", "linear:END", a comma list or a START:END ramp.
    pace: str | None = None
    classifier: str | None = None  # "demo", a classifier folder or file (what --pace follows)
    target: str | None = None  # the classifier's label; default: the one the prompt names
    pace_candidates: str | None = None  # the b2 values tried each step; default PACE_CANDIDATES
    # --full-res: frames at the input's size; a window around the mask (margin in image pixels) is edited.
    full_res: bool = False
    full_res_margin: int | None = None

    @property
    def steps(self) -> int:
        return self.params.steps

    @property
    def resolution(self) -> int:
        return self.params.resolution

    def with_values(self, **values: Any) -> SimulateSpec:
        """This spec with some options replaced, PIE parameters (``strength=...``) included."""
        pie = {k: values.pop(k) for k in list(values) if k in TUNABLE}
        return replace(self, params=replace(self.params, **pie), **values)

    def parameters(self) -> dict[str, Any]:
        """The values recorded in the manifest's ``parameters`` (what a resume reads back)."""
        out = {}
        for name in RECORDED:
            value = getattr(self.params, name) if name in TUNABLE else getattr(self, name)
            out[name] = str(value) if isinstance(value, Path) else value
        return out


# What a manifest records under "parameters": the prompt, every PIE parameter, and the run options
# that shape the frames. The schedules' parsed values are recorded beside them as "prompts",
# "strengths", "guidance_scales" and "beta2s".
PACE_OPTIONS = ("pace", "classifier", "target", "pace_candidates")
RUN_PARAMETERS = (
    "scheduler",
    "seed",
    "gif",
    "trajectories",
    *SCHEDULES,
    "compile",
    "watermark",
    *PACE_OPTIONS,
    "full_res",
    "full_res_margin",
)
PACE_CANDIDATES = "0:1"  # b2 = 0, 0.05, ..., 1: 21 candidates
RECORDED = ("prompt", *TUNABLE, *RUN_PARAMETERS)
SCHEDULE_RECORDS = {
    "prompt_schedule": "prompts",
    "strength_schedule": "strengths",
    "guidance_schedule": "guidance_scales",
    "beta2_schedule": "beta2s",
}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _hint(name: str) -> Any:
    return _hints(PieConfig if name in TUNABLE else SimulateSpec)[name]


def value_type(name: str) -> type:
    """The type of option ``name`` (a PIE parameter or a spec field), ``X | None`` read as ``X``."""
    hint = _hint(name)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args and typing.get_origin(hint) is not tuple else hint


# The columns a cohort CSV may have: where the case is and what it writes, the prompt and seed,
# and every per-case option (the PIE parameters, scheduler, trajectories, schedules).
COLUMNS: dict[str, type] = {
    "image": Path,
    "mask": Path,
    "prompt": str,
    "seed": int,
    "out": str,
    **{name: value_type(name) for name in TUNABLE},
    "scheduler": str,
    "trajectories": int,
    **{name: value_type(name) for name in SCHEDULES},
    "full_res": bool,
    "full_res_margin": int,
}


def recorded_value(name: str, value: Any, where: str) -> Any:
    """A value read back from a manifest, as option ``name``'s type, or a ``UserError`` naming ``where``."""
    if value is None and type(None) in typing.get_args(_hint(name)):
        return None
    kind = value_type(name)
    ok = (
        (kind is bool and isinstance(value, bool))
        or (kind is int and isinstance(value, int) and not isinstance(value, bool))
        or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (kind in (str, Path) and isinstance(value, str))
    )
    if not ok:
        raise UserError(f"{where} records {name} = {value!r}, which is not a {kind.__name__}.")
    return kind(value)


def build_config(
    spec: SimulateSpec,
    schedules: tuple[tuple[str, ...], tuple[float, ...], tuple[float, ...], tuple[float, ...]] | None = None,
) -> PieConfig:
    """The checked PIE parameters of ``spec``; a ``UserError`` naming the first bad option.

    The per-step schedules are read from the spec's options, or given as already parsed
    ``(prompts, strengths, guidance scales, beta2s)`` (a resumed run's recorded values).
    """
    from pie_cli.core.schedules import parse_numbers, read_prompts

    steps = spec.params.steps
    if schedules is not None:
        prompts, strengths, guidances, beta2s = schedules
    else:
        prompts = ()
        if steps >= 1 and spec.prompt_schedule is not None:
            prompts = read_prompts(spec.prompt_schedule, steps, spec.prompt)
        strengths = (
            parse_numbers(spec.strength_schedule, steps, "--strength-schedule")
            if spec.strength_schedule
            else ()
        )
        guidances = (
            parse_numbers(spec.guidance_schedule, steps, "--guidance-schedule")
            if spec.guidance_schedule
            else ()
        )
        beta2s = parse_numbers(spec.beta2_schedule, steps, "--beta2-schedule") if spec.beta2_schedule else ()
    if not prompts and not (spec.prompt or "").strip():
        raise UserError(f"--prompt is empty; describe the finding to simulate, e.g. {EXAMPLE_PROMPT!r}.")
    config = replace(
        spec.params,
        prompt=spec.prompt or (prompts[0] if prompts else ""),
        prompt_schedule=tuple(prompts),
        strength_schedule=tuple(strengths),
        guidance_schedule=tuple(guidances),
        beta2_schedule=tuple(beta2s),
    )
    for name, problem in config.problems():
        raise UserError(f"--{name.replace('_', '-')} {problem}.")
    if config.mask_growth and spec.mask is None and spec.image is not None:
        raise UserError("--mask-growth grows the mask over the steps: give --mask too.")
    if config.preserve_feather is not None and not config.preserve_outside:
        raise UserError(
            "--preserve-feather is the width of --preserve-outside's blend: give --preserve-outside too."
        )
    if config.preserve_outside and spec.mask is None and spec.image is not None:
        raise UserError("--preserve-outside keeps every pixel outside the mask: give --mask too.")
    if spec.full_res and spec.mask is None and spec.image is not None:
        raise UserError("--full-res edits a window around the mask: give --mask too (of the image's size).")
    if spec.full_res_margin is not None:
        if not spec.full_res:
            raise UserError("--full-res-margin sets --full-res's window: give --full-res too.")
        if spec.full_res_margin < 0:
            raise UserError(f"--full-res-margin must be >= 0 pixels, got {spec.full_res_margin}.")
    if any(getattr(spec, name) is not None for name in PACE_OPTIONS):
        pace_plan(spec)  # checked now, before anything is loaded
    if not 0 <= spec.seed < MAX_SEED:
        raise UserError(f"--seed must be in [0, 2^63), got {spec.seed}.")
    if spec.threads is not None and not 1 <= spec.threads <= MAX_THREADS:
        raise UserError(f"--threads must be in 1..{MAX_THREADS}, got {spec.threads}.")
    if not 1 <= spec.trajectories <= MAX_TRAJECTORIES:
        raise UserError(f"--trajectories must be in 1..{MAX_TRAJECTORIES}, got {spec.trajectories}.")
    return config


@dataclass(frozen=True)
class PacePlan:
    """What --pace asks for, parsed: the targets of steps 1..N (or a line to ``end``) and the candidates."""

    targets: tuple[float, ...]  # empty: a straight line from frame 0's score to ``end``
    end: float
    candidates: tuple[float, ...]


def pace_plan(spec: SimulateSpec) -> PacePlan:
    """The checked --pace, --classifier, --target and --pace-candidates of ``spec``; a ``UserError`` if wrong."""
    from pie_cli.core.schedules import parse_numbers

    if spec.pace is None:
        extra = "--classifier" if spec.classifier is not None else "--target"
        if spec.pace_candidates is not None:
            extra = "--pace-candidates"
        raise UserError(f"{extra} steers a closed-loop pace: give --pace too (e.g. --pace linear).")
    if spec.classifier is None:
        raise UserError(
            "--pace follows a classifier's score of each frame: give --classifier (e.g. --classifier demo)."
        )
    if spec.mask is None and spec.image is not None:
        raise UserError("--pace chooses how much of each step's edit the mask shows: give --mask too.")
    steps = spec.params.steps
    text = spec.pace.strip()
    end = 1.0
    targets: tuple[float, ...] = ()
    if text == "linear" or text.startswith("linear:"):
        if text != "linear":
            try:
                end = float(text.split(":", 1)[1])
            except ValueError:
                raise UserError(
                    f"--pace {spec.pace!r}: linear:END needs a number END, e.g. linear:0.67."
                ) from None
    else:
        try:
            targets = parse_numbers(text, steps, "--pace")
        except UserError as exc:
            raise UserError(f"{exc} Or give 'linear' (frame 0's score to 1) or 'linear:END'.") from None
    for value in (*targets, end):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise UserError(
                f"--pace {spec.pace!r}: targets are classifier scores in [0, 1] (severity = grade / 3), got {value:g}."
            )
    candidates = _candidates(spec.pace_candidates or PACE_CANDIDATES)
    return PacePlan(targets, end, candidates)


def _candidates(text: str) -> tuple[float, ...]:
    """``"0,0.5,1"`` or ``"0:1"`` (21 values, steps of 1/20): the blend weights b2 a paced step tries."""
    try:
        if ":" in text and "," not in text:
            start, stop = (float(v) for v in text.split(":"))
            values = tuple(round(start + (stop - start) * i / 20, 10) for i in range(21))
        else:
            values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(
            f"--pace-candidates {text!r} must be a comma list of blend weights or a START:END range."
        ) from None
    if not values:
        raise UserError("--pace-candidates is empty; give blend weights such as 0:1 or 0,0.25,0.5,0.75,1.")
    for value in values:
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise UserError(f"--pace-candidates values are blend weights in [0, 1], got {value:g}.")
    return tuple(sorted(set(values)))


def recorded_parameters(config: PieConfig, spec: SimulateSpec) -> dict[str, Any]:
    """The manifest's ``parameters``: the spec's options and the schedules' parsed values."""
    parameters = spec.parameters()
    for option, key in SCHEDULE_RECORDS.items():
        values = getattr(config, option)
        if values:
            parameters[key] = list(values)
    return parameters
