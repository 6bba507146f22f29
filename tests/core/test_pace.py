"""The closed-loop pace (core.progression.Pace) on the tiny model: which frame a paced step keeps."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from pie_cli.core.progression import Pace, ResumePoint, progress, progress_batch
from tests.helpers import pixels

PROMPT = "large left pleural effusion"
PARAMS = {"prompt": PROMPT, "steps": 3, "inference_steps": 10, "resolution": 64}


def brightness(images):
    """A stand-in classifier score: the mean grey level of the image's left half, in [0, 1]."""
    return [float(pixels(img)[:, :32].mean() / 255) for img in images]


def frames_of(components, image, mask, seed=42, pace=None, **params):
    return list(progress(components, image, mask, seed=seed, pace=pace, **{**PARAMS, **params}))


def same(a, b) -> bool:
    return bool((pixels(a) == pixels(b)).all())


def test_a_tie_keeps_the_smallest_candidate_and_draws_what_an_unpaced_run_draws(components, phantom):
    """Every frame scores the same: each step keeps candidate b2 = 0.3, i.e. the run with --beta2 0.3."""
    image, _, left = phantom
    flat = Pace(lambda imgs: [0.5] * len(imgs), (0.6, 0.3), decode_batch=1)
    paced = frames_of(components, image, left, pace=flat)
    plain = frames_of(components, image, left, beta2=0.3)
    assert all(same(p.image, q.image) for p, q in zip(paced, plain, strict=True))
    assert [f.pace["beta2"] for f in paced[1:]] == [0.3, 0.3, 0.3]
    assert paced[0].pace is None
    # Candidates decoded together differ from one decode at a time by float rounding only.
    together = frames_of(components, image, left, pace=Pace(flat.score, (0.6, 0.3), decode_batch=4))
    assert all(
        np.abs(pixels(p.image) - pixels(q.image)).max() <= 2 for p, q in zip(together, plain, strict=True)
    )


def test_each_step_keeps_the_candidate_nearest_its_target(components, phantom):
    """Step 1 recomputed by hand: one unpaced step per candidate b2, scored; the nearest is kept."""
    image, _, left = phantom
    candidates = (0.0, 0.25, 0.5, 0.75, 1.0)
    per_candidate = [frames_of(components, image, left, steps=1, beta2=c)[1].image for c in candidates]
    scores = brightness(per_candidate)
    assert len({round(s, 6) for s in scores}) > 2  # the candidates really differ
    x0_score = brightness([frames_of(components, image, left, steps=1)[0].image])[0]
    # A target between two candidates' scores, nearer the second-lowest than anything else.
    order = np.argsort(scores)
    target = scores[order[1]] + 0.1 * (scores[order[2]] - scores[order[1]])
    assert abs(target - x0_score) > abs(target - scores[order[1]])
    paced = frames_of(
        components,
        image,
        left,
        steps=1,
        pace=Pace(brightness, candidates, (target,), decode_batch=1, refine=0),
    )
    best = int(order[1])
    assert same(paced[1].image, per_candidate[best])
    assert paced[1].pace == {
        "beta2": candidates[best],
        "score": round(scores[best], 6),
        "target": round(target, 6),
    }


def test_refinement_looks_between_the_candidates_that_straddle_the_target(components, phantom):
    """The target lies between two candidates' scores: a finer b2 between them is tried and kept,
    and the kept frame is exactly the unpaced frame of that b2."""
    image, _, left = phantom
    blends = [frames_of(components, image, left, steps=1, beta2=c)[1].image for c in (0.0, 0.5, 1.0)]
    base = pixels(blends[0])

    def change(images):  # how far each frame is from the b2 = 0 blend: grows with b2 (the blend is linear)
        return [float(np.abs(pixels(img) - base).mean() / 255) for img in images]

    scores = change(blends)
    assert scores[0] < scores[1] < scores[2]
    target = (scores[0] + scores[1]) / 2
    coarse = Pace(change, (0.0, 0.5, 1.0), (target,), decode_batch=1, refine=0)
    fine = Pace(change, (0.0, 0.5, 1.0), (target,), decode_batch=1, refine=7)
    a = frames_of(components, image, left, steps=1, pace=coarse)[1]
    b = frames_of(components, image, left, steps=1, pace=fine)[1]
    assert abs(b.pace["score"] - target) < abs(a.pace["score"] - target)
    assert b.pace["beta2"] in [round(0.5 * j / 8, 6) for j in range(1, 8)]
    plain = frames_of(components, image, left, steps=1, beta2=b.pace["beta2"])[1]
    assert same(b.image, plain.image)


def test_the_previous_frame_is_held_when_no_blend_comes_nearer(components, phantom):
    image, _, left = phantom
    x0 = frames_of(components, image, left, steps=1)[0].image
    hold = brightness([x0])[0]
    paced = frames_of(components, image, left, pace=Pace(brightness, (0.5, 1.0), (hold,) * 3))
    assert all(same(f.image, x0) for f in paced)
    assert [f.pace["beta2"] for f in paced[1:]] == [None, None, None]


def test_linear_targets_run_from_frame_zeros_score_to_the_end(components, phantom):
    image, _, left = phantom
    x0 = frames_of(components, image, left, steps=1)[0].image
    start = brightness([x0])[0]
    paced = frames_of(components, image, left, steps=4, pace=Pace(brightness, (0.5,), end=0.2))
    expected = [round(start + (0.2 - start) * n / 4, 6) for n in range(1, 5)]
    assert [f.pace["target"] for f in paced[1:]] == pytest.approx(expected, abs=1e-6)


def test_paced_runs_reproduce_and_resume_exactly(components, phantom):
    image, _, left = phantom
    pace = Pace(brightness, (0.0, 0.5, 1.0), end=0.9)
    a = frames_of(components, image, left, pace=pace)
    b = frames_of(components, image, left, pace=pace)
    assert all(same(x.image, y.image) and x.pace == y.pace for x, y in zip(a, b, strict=True))
    # Stop after step 1 (frames and generator state saved), go on: steps 2-3 as uninterrupted.
    g = torch.Generator("cpu").manual_seed(42)
    run = progress_batch(components, image, left, generators=[g], pace=pace, **PARAMS)
    next(run)
    first = next(run)
    state = g.get_state()
    run.close()
    g2 = torch.Generator("cpu").manual_seed(42)
    point = ResumePoint(1, [first[0].image], [state])
    rest = [
        f[0]
        for f in progress_batch(components, image, left, generators=[g2], pace=pace, resume=point, **PARAMS)
    ]
    assert [f.index for f in rest] == [2, 3]
    assert all(same(x.image, y.image) and x.pace == y.pace for x, y in zip(rest, a[2:], strict=True))


def test_trajectories_are_paced_one_by_one(components, phantom):
    image, _, left = phantom
    pace = Pace(brightness, (0.0, 0.5, 1.0), end=0.9)
    gens = [torch.Generator("cpu").manual_seed(s) for s in (42, 43)]
    batch = list(progress_batch(components, image, left, generators=gens, pace=pace, **PARAMS))
    single = frames_of(components, image, left, seed=43, pace=pace)
    assert batch[0][1].pace is None and single[0].pace is None
    for step, frame in zip(batch[1:], single[1:], strict=True):
        assert frame.pace["beta2"] == step[1].pace["beta2"]
        assert frame.pace["score"] == pytest.approx(step[1].pace["score"], abs=0.01)
        assert np.abs(pixels(step[1].image) - pixels(frame.image)).max() <= 2  # batch vs single: float noise


@pytest.mark.parametrize(
    ("pace", "mask", "message"),
    [
        (Pace(brightness, ()), True, "pace needs at least one candidate blend weight"),
        (Pace(brightness, (0.5, 1.5)), True, "pace candidates must be blend weights in [0, 1]"),
        (Pace(brightness, (0.5,), (0.1, 0.2)), True, "pace has 2 targets for 3 steps"),
        (Pace(brightness, (0.5,)), False, "pace chooses the blend weight inside the mask: give a mask"),
    ],
)
def test_bad_paces_are_refused(components, phantom, pace, mask, message):
    image, _, left = phantom
    with pytest.raises(ValueError, match=re.escape(message)):
        frames_of(components, image, left if mask else None, pace=pace)
