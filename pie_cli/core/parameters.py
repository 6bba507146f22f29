"""The parameters of one PIE progression, their ranges, and pie's other limits and choice lists.

A PIE parameter is defined once, as a field of :class:`PieConfig` with its default; the
simulate command's options, the spec, the manifest's recorded parameters and the cohort
columns all derive from these fields (``TUNABLE``). No torch: commands check values first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

# The working resolution's limits are geometry, owned by imaging; re-exported beside pie's other limits.
from pie_cli.imaging.geometry import FIT_CHOICES, LATENT_FACTOR, MAX_RESOLUTION, resolution_problem

# Upper bounds that keep a typo from hanging or exhausting the machine (no real run comes near them):
# SD 1.x schedulers have 1000 training timesteps, and a progression of 10000 frames is far beyond
# any disease course anyone simulates (the resolution's limit is imaging.media.MAX_RESOLUTION).
MAX_STEPS = 10_000
MAX_INFERENCE_STEPS = 1_000
MAX_TRAJECTORIES = 64
# Seeds: torch generators take any 64-bit value (simulate adds the trajectory index, so stay below 2^63);
# training also seeds numpy (accelerate's set_seed), whose seeds must be below 2^32.
MAX_SEED = 2**63
MAX_TRAINING_SEED = 2**32

# Choice lists (the CLI's enums are built from these tuples).
DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")
SCHEDULER_CHOICES = ("model", "pndm", "ddim", "dpm++", "euler")
# A prompt longer than the text encoder's window (77 tokens for SD 1.x): "truncate" reads its first
# 77 (the original's), "chunk" encodes all of it in windows whose embeddings are concatenated.
LONG_PROMPT_CHOICES = ("truncate", "chunk")


def denoise_count(inference_steps: int, strength: float) -> int:
    """k = min(int(T * g), T): how many schedule entries a progression step re-runs."""
    return min(int(inference_steps * strength), inference_steps)


@dataclass(frozen=True)
class PieConfig:
    """The parameters of one progression (defaults are the paper's)."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 10  # N: progression steps (frames after frame 0)
    strength: float = 0.5  # g: fraction of the schedule re-noised at each step
    guidance_scale: float = 7.5  # w: classifier-free guidance
    beta1: float = 0.01  # b1: blend weight outside the mask
    beta2: float = 0.75  # b2: blend weight inside the mask
    inference_steps: int = 50  # T: scheduler steps of a full schedule
    resolution: int = 512  # R: frames are R x R
    # Optional per-step values (index n-1 for progression step n); empty = the single value above.
    prompt_schedule: tuple[str, ...] = ()
    strength_schedule: tuple[float, ...] = ()
    guidance_schedule: tuple[float, ...] = ()
    beta2_schedule: tuple[float, ...] = ()  # b2 per step: how much of each step's edit the frame shows
    mask_growth: str = (
        ""  # "" = the whole mask every step (the original); "rise", "dilate:0.2" (imaging.growth)
    )
    # How the image becomes the model's canvas (imaging.geometry): "crop" (the original), "pad", "native".
    fit: str = "crop"
    # Opt-in, not the original's: after each decode the frame is frame 0 outside the mask, blended
    # across a feather of preserve_feather pixels (None: one latent cell, 8 px at the working size).
    preserve_outside: bool = False
    preserve_feather: int | None = None
    # Opt-in, not the original's: "chunk" encodes every token of a long prompt (core.progression.encode_text).
    long_prompt: str = "truncate"

    def prompt_at(self, n: int) -> str:
        return self.prompt_schedule[n - 1] if self.prompt_schedule else self.prompt

    def strength_at(self, n: int) -> float:
        return self.strength_schedule[n - 1] if self.strength_schedule else self.strength

    def guidance_at(self, n: int) -> float:
        return self.guidance_schedule[n - 1] if self.guidance_schedule else self.guidance_scale

    def beta2_at(self, n: int) -> float:
        return self.beta2_schedule[n - 1] if self.beta2_schedule else self.beta2

    def prompts(self) -> list[str]:
        """Every distinct prompt of the run, in order of first use."""
        return list(dict.fromkeys(self.prompt_at(n) for n in range(1, self.steps + 1)))

    def problems(self) -> list[tuple[str, str]]:
        """(parameter, what is wrong) for every parameter out of range; empty when all are fine."""
        found = []
        if self.steps < 1:
            found.append(("steps", f"must be at least 1, got {self.steps}"))
        if self.steps > MAX_STEPS:
            found.append(("steps", f"must be at most {MAX_STEPS}, got {self.steps}"))
            return found  # the per-step checks below would take forever
        for name, schedule in (
            ("prompt_schedule", self.prompt_schedule),
            ("strength_schedule", self.strength_schedule),
            ("guidance_schedule", self.guidance_schedule),
            ("beta2_schedule", self.beta2_schedule),
        ):
            if schedule and len(schedule) != self.steps:
                found.append((name, f"has {len(schedule)} entries but --steps is {self.steps}"))
        strengths = self.strength_schedule or (self.strength,)
        for g in strengths:
            name = "strength_schedule" if self.strength_schedule else "strength"
            if not 0.0 < g <= 1.0:
                found.append((name, f"must be in (0, 1], got {g:g}"))
                break
            if self.inference_steps >= 1 and denoise_count(self.inference_steps, g) < 1:
                found.append(
                    (
                        name,
                        f"{g:g} with {self.inference_steps} inference steps leaves no denoising step "
                        f"(int({self.inference_steps} * {g:g}) = 0); raise either",
                    )
                )
                break
        if not 1 <= self.inference_steps <= MAX_INFERENCE_STEPS:
            found.append(
                ("inference_steps", f"must be in 1..{MAX_INFERENCE_STEPS}, got {self.inference_steps}")
            )
        for w in self.guidance_schedule or (self.guidance_scale,):
            if not (math.isfinite(w) and w >= 0):
                name = "guidance_schedule" if self.guidance_schedule else "guidance_scale"
                found.append((name, f"must be a finite number >= 0, got {w:g}"))
                break
        for name, value in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0.0 <= value <= 1.0:
                found.append((name, f"must be in [0, 1], got {value:g}"))
        for value in self.beta2_schedule:
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                found.append(("beta2_schedule", f"values must be in [0, 1], got {value:g}"))
                break
        if self.mask_growth:
            from pie_cli.imaging.growth import problem as growth_problem  # numpy: not at import time

            wrong = growth_problem(self.mask_growth)
            if wrong is not None:
                found.append(("mask_growth", wrong))
        problem = resolution_problem(self.resolution)
        if problem is not None:
            found.append(("resolution", problem))
        if self.fit not in FIT_CHOICES:
            found.append(("fit", f"must be one of {', '.join(FIT_CHOICES)}, got {self.fit!r}"))
        if self.preserve_feather is not None and not 0 <= self.preserve_feather <= MAX_RESOLUTION:
            found.append(
                ("preserve_feather", f"must be in 0..{MAX_RESOLUTION} pixels, got {self.preserve_feather}")
            )
        if self.long_prompt not in LONG_PROMPT_CHOICES:
            found.append(
                ("long_prompt", f"must be one of {', '.join(LONG_PROMPT_CHOICES)}, got {self.long_prompt!r}")
            )
        return found

    def feather_pixels(self) -> int:
        """The preservation feather in working pixels (default: one latent cell)."""
        return LATENT_FACTOR if self.preserve_feather is None else self.preserve_feather

    def check(self) -> None:
        """Raise ``ValueError`` naming the first parameter out of range."""
        for name, problem in self.problems():
            raise ValueError(f"{name} {problem}")


# The per-run parameters a user sets directly, one option each (``--strength`` is ``strength``);
# the prompt and the per-step schedules are read from their own options and files.
SCHEDULES = ("prompt_schedule", "strength_schedule", "guidance_schedule", "beta2_schedule")
TUNABLE = tuple(f.name for f in fields(PieConfig) if f.name != "prompt" and f.name not in SCHEDULES)
DEFAULTS = PieConfig(prompt="")
