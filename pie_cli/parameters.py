"""The parameters of one PIE progression and their ranges (no torch: commands check them first)."""

from __future__ import annotations

from dataclasses import dataclass


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

    def problems(self) -> list[tuple[str, str]]:
        """(parameter, what is wrong) for every parameter out of range; empty when all are fine."""
        found = []
        if self.steps < 1:
            found.append(("steps", f"must be at least 1, got {self.steps}"))
        if not 0.0 < self.strength <= 1.0:
            found.append(("strength", f"must be in (0, 1], got {self.strength:g}"))
        elif self.inference_steps >= 1 and denoise_count(self.inference_steps, self.strength) < 1:
            found.append(
                (
                    "strength",
                    f"{self.strength:g} with {self.inference_steps} inference steps leaves no denoising step "
                    f"(int({self.inference_steps} * {self.strength:g}) = 0); raise either",
                )
            )
        if self.inference_steps < 1:
            found.append(("inference_steps", f"must be at least 1, got {self.inference_steps}"))
        if self.guidance_scale < 0:
            found.append(("guidance_scale", f"must be >= 0, got {self.guidance_scale:g}"))
        for name, value in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0.0 <= value <= 1.0:
                found.append((name, f"must be in [0, 1], got {value:g}"))
        if self.resolution < 8 or self.resolution % 8:
            found.append(("resolution", f"must be a positive multiple of 8, got {self.resolution}"))
        return found

    def check(self) -> None:
        """Raise ``ValueError`` naming the first parameter out of range."""
        for name, problem in self.problems():
            raise ValueError(f"{name} {problem}")
