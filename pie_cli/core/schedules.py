"""Per-step schedules for `pie simulate`: prompts from a file, numbers from lists or ramps."""

from __future__ import annotations

import re
from pathlib import Path

from pie_cli.errors import UserError

_STEP_LINE = re.compile(r"^\s*(\d+)\s*:\s*(.*\S)\s*$")


def parse_numbers(text: str, steps: int, option: str) -> tuple[float, ...]:
    """``"0.3,0.4,0.5"`` (one value per step) or ``"0.3:0.6"`` (a linear ramp over the steps)."""
    text = text.strip()
    try:
        if ":" in text and "," not in text:
            start, end = (float(v) for v in text.split(":"))
            if steps == 1:
                return (start,)
            return tuple(round(start + (end - start) * (n / (steps - 1)), 10) for n in range(steps))
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{option} {text!r} must be a comma list of numbers or a START:END ramp.") from None
    if len(values) != steps:
        raise UserError(f"{option} {text!r} has {len(values)} values but --steps is {steps}.")
    return values


def read_prompts(path: Path, steps: int, default: str | None) -> tuple[str, ...]:
    """One prompt per step, from a file of N lines or of ``step: prompt`` lines.

    ``step: prompt`` lines hold from that step until the next one; steps before the first
    take ``--prompt``. Blank lines and ``#`` comments are ignored.
    """
    from pie_cli.imaging.files import read_text_file

    path = Path(path)
    lines = [ln.strip() for ln in read_text_file(path, "--prompt-schedule").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise UserError(f"--prompt-schedule {path} holds no prompt.")
    keyed = [_STEP_LINE.match(ln) for ln in lines]
    if all(keyed):
        by_step = {}
        for m in keyed:
            n = int(m.group(1))
            if not 1 <= n <= steps:
                raise UserError(f"--prompt-schedule {path}: step {n} is outside 1..{steps} (--steps).")
            by_step[n] = m.group(2)
        out, current = [], default
        for n in range(1, steps + 1):
            current = by_step.get(n, current)
            if current is None:
                raise UserError(
                    f"--prompt-schedule {path} starts at step {min(by_step)}; give --prompt for the steps before."
                )
            out.append(current)
        return tuple(out)
    if any(keyed):
        raise UserError(
            f"--prompt-schedule {path} mixes 'step: prompt' lines with plain lines; use one form."
        )
    if len(lines) != steps:
        raise UserError(f"--prompt-schedule {path} has {len(lines)} prompts but --steps is {steps}.")
    return tuple(lines)
