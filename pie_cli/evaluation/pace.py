"""How a progression moves, from one number per frame (numpy only).

``pace(values)`` measures a curve v_0 .. v_N (a classifier's severity per frame, or the change
inside the mask): how much of the final change step 1 already made, how many steps it takes to
reach 90 % of it, Spearman's rank correlation of step and value, the largest step backwards, and
where the curve goes flat; ``describe`` turns that into one plain sentence.
"""

from __future__ import annotations

import math

import numpy as np

REACHED = 0.9  # "steps to 90 %"
FLAT = 0.02  # a step that moves less than 2 % of the final change is flat


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank (what Spearman's coefficient needs)."""
    order = np.argsort(values, kind="mergesort")
    out = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        out[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho (Pearson's correlation of the ranks); None when either side is constant."""
    rx, ry = ranks(np.asarray(x, dtype=np.float64)), ranks(np.asarray(y, dtype=np.float64))
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    if denominator == 0:
        return None
    return float((dx * dy).sum() / denominator)


def pace(values: list[float] | np.ndarray) -> dict:
    """Measures of the curve ``values`` (frame 0 first); shares are of the final change v_N - v_0.

    - ``first_step_share``: (v_1 - v_0) / (v_N - v_0);
    - ``steps_to_90``: the first step n with v_n - v_0 >= 90 % of the final change (and, for a
      falling curve, <=);
    - ``spearman``: Spearman(step, value) over frames 0..N (None for a constant curve);
    - ``largest_backward_step``: the largest move against the final change's direction, as a
      share of it (0 when the curve never goes back);
    - ``flat_after``: the last step that moved more than 2 % of the final change (None when
      none did).

    Without a final change (v_N == v_0) the shares are None.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) < 2 or not np.isfinite(v).all():
        raise ValueError("pace needs two or more finite values, frame 0 first")
    total = float(v[-1] - v[0])
    n = len(v) - 1
    out: dict = {
        "steps": n,
        "first": round(float(v[0]), 6),
        "final": round(float(v[-1]), 6),
        "final_change": round(total, 6),
        "spearman": None,
        "first_step_share": None,
        "steps_to_90": None,
        "largest_backward_step": None,
        "flat_after": None,
    }
    rho = spearman(np.arange(len(v)), v)
    out["spearman"] = None if rho is None else round(rho, 4)
    if total == 0:
        return out
    share = (v - v[0]) / total  # 0 at frame 0, 1 at the last frame
    moves = np.diff(share)
    out["first_step_share"] = round(float(share[1]), 4)
    out["steps_to_90"] = int(np.argmax(share >= REACHED - 1e-12))
    out["largest_backward_step"] = round(float(max(0.0, -moves.min())), 4)
    moving = np.nonzero(np.abs(moves) > FLAT)[0]
    out["flat_after"] = int(moving[-1] + 1) if len(moving) else None
    return out


def describe(measures: dict, what: str = "the change") -> str:
    """One plain sentence about ``pace``'s measures, e.g. "95 % of the change at step 1, flat after step 2"."""
    n = measures["steps"]
    if measures["first_step_share"] is None:
        return f"{what[0].upper()}{what[1:]} is the same in the last frame as in frame 0: no progression."
    share = measures["first_step_share"]
    parts = [f"{share * 100:.0f} % of {what} at step 1"]
    if measures["steps_to_90"] is not None and measures["steps_to_90"] > 1:
        parts.append(f"90 % by step {measures['steps_to_90']}")
    flat = measures["flat_after"]
    if flat is not None and flat < n:
        parts.append(f"flat after step {flat}")
    back = measures["largest_backward_step"]
    if back and back > FLAT:
        parts.append(f"the largest step back undoes {back * 100:.0f} %")
    rho = measures["spearman"]
    if rho is not None:
        kind = "steady" if rho >= 0.9 else "uneven" if rho >= 0.5 else "not a progression"
        parts.append(f"Spearman(step, value) {rho:.2f} ({kind})")
    sentence = ", ".join(parts)
    return sentence[0].upper() + sentence[1:] + "."
