"""The pace measures on curves whose answers are known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from pie_cli.evaluation.pace import describe, pace, ranks, spearman


def test_a_switch():
    """What PIE's defaults do: nearly all of the change at step 1, then flat."""
    m = pace([0.0, 0.95, 0.97, 1.0, 1.0, 1.0])
    assert m["first_step_share"] == 0.95 and m["steps_to_90"] == 1 and m["flat_after"] == 3
    assert m["largest_backward_step"] == 0.0
    assert describe(m, "the severity") == (
        "95 % of the severity at step 1, flat after step 3, Spearman(step, value) 0.94 (steady)."
    )


def test_a_linear_ramp():
    m = pace(np.linspace(0.1, 0.9, 11))
    assert m["first_step_share"] == 0.1 and m["steps_to_90"] == 9 and m["spearman"] == 1.0
    assert m["flat_after"] == 10 and m["final_change"] == pytest.approx(0.8)
    assert describe(m) == "10 % of the change at step 1, 90 % by step 9, Spearman(step, value) 1.00 (steady)."


def test_a_curve_that_goes_back():
    m = pace([0.0, 0.5, 0.2, 0.8, 1.0])
    assert m["largest_backward_step"] == pytest.approx(0.3) and m["steps_to_90"] == 4
    assert "the largest step back undoes 30 %" in describe(m)
    assert m["spearman"] == pytest.approx(0.9)  # ranks 1,3,2,4,5 against 1..5


def test_a_falling_curve_is_measured_against_its_own_direction():
    m = pace([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    assert m["first_step_share"] == pytest.approx(0.2) and m["steps_to_90"] == 5 and m["spearman"] == -1.0
    assert "(not a progression)" in describe(m)


def test_no_change_and_bad_input():
    m = pace([0.3, 0.3, 0.3])
    assert m["first_step_share"] is None and m["spearman"] is None
    assert describe(m) == "The change is the same in the last frame as in frame 0: no progression."
    for bad in ([], [1.0], [0.0, float("nan")], [[0.0, 1.0]]):
        with pytest.raises(ValueError, match="pace needs two or more finite values"):
            pace(bad)


def test_ranks_share_ties_and_spearman_matches_the_definition():
    assert ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 5, 12).astype(float), rng.normal(size=12)
        rx, ry = ranks(x), ranks(y)
        expected = np.corrcoef(rx, ry)[0, 1] if rx.std() else None
        got = spearman(x, y)
        assert (got is None and expected is None) or got == pytest.approx(expected)
