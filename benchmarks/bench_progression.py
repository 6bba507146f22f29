"""Why PIE's finding appears at once: the severity curve per step over a grid of settings.

On held-out demo phantoms (healthy, seeds the tests and the demo model's training never use), each
setting runs a progression with the built-in demo model and the demo classifier grades every frame
(severity = expected grade / 3 of the finding the prompt names). Per setting, over the phantoms:

- the share of the final change made at step 1, the steps to reach 90 % of it, Spearman(step,
  severity) (pie_cli.evaluation.pace), the largest step back;
- the share of all steps whose grade is within 0.5 of a straight line from frame 0's grade to
  grade 3 (what ``--pace linear`` aims at; for the closed loop the same classifier steers and
  grades, so this measures how well it steers, not an independent judgement);
- the mean severity curve, drawn in one plot.

The grid varies one setting at a time around the paper's defaults (strength 0.5, guidance 7.5,
b2 0.75, T 50, "large ..."), plus the opt-in b2 ramp. Writes benchmarks/results/progression.json,
progression.md (the table) and progression.png (the curves).

    python benchmarks/bench_progression.py            # 20 phantoms, the whole grid (CPU: long)
    python benchmarks/bench_progression.py --quick    # 3 phantoms, 3 settings, T 20: checks the script
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pie_cli.core.parameters import PieConfig  # noqa: E402
from pie_cli.evaluation.pace import pace  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
HELD_OUT_SEED = 900_000  # phantoms 900000.. : outside the demo model's (0..) and classifier's (1000000..)
SIDE = "left"


def settings(quick: bool) -> list[tuple[str, dict]]:
    """(name, PieConfig overrides): the defaults, then one setting changed at a time."""
    base = [("defaults", {})]
    if quick:
        return [
            *base,
            ("strength 0.3", {"strength": 0.3}),
            ("b2 ramp 0.1:0.9", {"beta2_ramp": (0.1, 0.9)}),
            ("closed loop --pace linear", {"pace": "linear"}),
        ]
    return [
        *base,
        *[(f"strength {g}", {"strength": g}) for g in (0.3, 0.4, 0.6)],
        *[(f"guidance {w}", {"guidance_scale": w}) for w in (3.0, 12.0)],
        *[(f"b2 {b}", {"beta2": b}) for b in (0.5, 0.9)],
        ("T 20", {"inference_steps": 20}),
        *[(f'"{word} ..."', {"word": word}) for word in ("small", "moderate")],
        ("b2 ramp 0.1:0.9", {"beta2_ramp": (0.1, 0.9)}),
        ("mask growth rise", {"mask_growth": "rise"}),
        ("rise + b2 ramp 0.1:0.9", {"mask_growth": "rise", "beta2_ramp": (0.1, 0.9)}),
        ("worded schedule small/moderate/large", {"worded": True}),
        ("worded schedule + b2 ramp 0.1:0.9", {"worded": True, "beta2_ramp": (0.1, 0.9)}),
        ("closed loop --pace linear", {"pace": "linear"}),
    ]


def config_for(overrides: dict, steps: int, inference_steps: int) -> PieConfig:
    word = overrides.get("word", "large")
    config = PieConfig(
        prompt=f"{word} {SIDE} pleural effusion", steps=steps, inference_steps=inference_steps, resolution=64
    )
    values = {k: v for k, v in overrides.items() if k not in ("word", "beta2_ramp", "pace", "worded")}
    config = replace(config, **values)
    if overrides.get("worded"):  # the first third "small", the next "moderate", the rest "large"
        words = [("small", "moderate", "large")[min(2, 3 * n // steps)] for n in range(steps)]
        config = replace(config, prompt_schedule=tuple(f"{w} {SIDE} pleural effusion" for w in words))
    if "beta2_ramp" in overrides:
        lo, hi = overrides["beta2_ramp"]
        ramp = tuple(round(lo + (hi - lo) * n / max(1, steps - 1), 10) for n in range(steps))
        config = replace(config, beta2_schedule=ramp)
    config.check()
    return config


def plot(curves: dict[str, list[float]], path: Path) -> None:
    """Mean severity (in grades) per step, one line per setting, drawn with PIL."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, left, right, top, bottom = 900, 520, 60, 640, 30, 470
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.rectangle((left, top, right, bottom), outline=(150, 150, 150))
    steps = max(len(c) for c in curves.values()) - 1
    for grade in range(4):
        y = bottom - (bottom - top) * grade / 3
        draw.line((left, y, right, y), fill=(225, 225, 225))
        draw.text((left - 40, y - 6), f"grade {grade}", fill="black", font=font)
    for n in range(steps + 1):
        x = left + (right - left) * n / steps
        draw.text((x - 3, bottom + 6), str(n), fill="black", font=font)
    draw.text(((left + right) // 2 - 40, bottom + 22), "progression step", fill="black", font=font)
    draw.text((left, 8), "demo classifier severity (mean over phantoms)", fill="black", font=font)
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    palette += [(227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (90, 90, 200)]
    for k, (name, curve) in enumerate(curves.items()):
        colour = palette[k % len(palette)]
        points = [
            (left + (right - left) * n / steps, bottom - (bottom - top) * (3 * v) / 3)
            for n, v in enumerate(curve)
        ]
        draw.line(points, fill=colour, width=2)
        draw.line((660, 40 + 18 * k, 690, 40 + 18 * k), fill=colour, width=3)
        draw.text((698, 34 + 18 * k), name, fill="black", font=font)
    img.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--inference-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", help="run only these settings (names as in the table)")
    args = parser.parse_args()
    if args.quick:
        args.phantoms, args.inference_steps = 3, 20
    torch.set_num_threads(args.threads)

    from pie_cli.core.devices import choose_placement
    from pie_cli.core.loading import load
    from pie_cli.core.progression import Pace, progress
    from pie_cli.core.registry import resolve
    from pie_cli.demo import classifier as clf
    from pie_cli.demo.phantom import Findings, render

    components = load(resolve("demo"), choose_placement("cpu", "fp32"))
    grader = clf.load(clf.builtin_dir())
    column = list(grader.labels).index(f"effusion_{SIDE}_severity")

    def score(images):
        return clf.predict(grader, images)[:, column]

    phantoms = [render(Findings(), seed=HELD_OUT_SEED + i) for i in range(args.phantoms)]
    results, curves = [], {}
    started = time.time()
    for name, overrides in settings(args.quick):
        if args.only and name not in args.only:
            continue
        config = config_for(overrides, args.steps, args.inference_steps)
        measures, severities, near = [], [], []
        steer = Pace(score) if overrides.get("pace") == "linear" else None
        for i, ph in enumerate(phantoms):
            frames = [
                f.image for f in progress(components, ph.image, ph.left_lung, config, seed=i, pace=steer)
            ]
            severity = clf.predict(grader, frames)[:, column]
            severities.append(severity)
            measures.append(pace(severity))
            line = severity[0] + (1 - severity[0]) * np.arange(1, args.steps + 1) / args.steps
            near += list(np.abs(3 * severity[1:] - 3 * line) <= 0.5)
        mean_curve = np.mean(severities, axis=0)
        curves[name] = [round(float(v), 4) for v in mean_curve]

        def median(key: str, found: list[dict] = measures) -> float | None:
            values = [m[key] for m in found if m[key] is not None]
            return round(float(np.median(values)), 3) if values else None

        row = {
            "setting": name,
            "first_step_share": median("first_step_share"),
            "steps_to_90": median("steps_to_90"),
            "spearman": median("spearman"),
            "spearman_at_least_0.9": round(
                float(np.mean([(m["spearman"] or 0) >= 0.9 for m in measures])), 3
            ),
            "largest_backward_step": median("largest_backward_step"),
            "final_grade": round(float(3 * mean_curve[-1]), 2),
            "steps_within_0.5_grade_of_linear": round(float(np.mean(near)), 3),
        }
        results.append(row)
        print(json.dumps(row), f"({time.time() - started:.0f} s)", flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "phantoms": args.phantoms,
        "held_out_seeds": f"{HELD_OUT_SEED}..{HELD_OUT_SEED + args.phantoms - 1}",
        "steps": args.steps,
        "inference_steps": args.inference_steps,
        "quick": args.quick,
        "machine": f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "minutes": round((time.time() - started) / 60, 1),
    }
    name = "progression-quick" if args.quick else "progression"
    path = RESULTS / f"{name}.json"
    if args.only and path.exists():  # a partial rerun replaces its settings' rows and keeps the others
        old = json.loads(path.read_text())
        same = {k: old.get(k) for k in ("phantoms", "steps", "inference_steps")}
        if same == {k: meta[k] for k in same}:
            mine = {r["setting"] for r in results}
            order = [s for s, _ in settings(args.quick)]
            rows = {r["setting"]: r for r in old["results"] if r["setting"] not in mine}
            rows.update({r["setting"]: r for r in results})
            results = [rows[s] for s in order if s in rows]
            curves = {s: {**old["curves"], **curves}[s] for s in order if s in {**old["curves"], **curves}}
            meta["minutes"] = f"{meta['minutes']} (this rerun of {', '.join(sorted(mine))})"
    path.write_text(json.dumps({**meta, "results": results, "curves": curves}, indent=2))
    header = (
        "| setting | step-1 share | steps to 90 % | Spearman | share Spearman >= 0.9 | largest step back "
        "| final grade | steps within 0.5 grade of linear |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in results:
        cells = [r.get(k) for k in list(results[-1])[1:]]
        lines.append(f"| {r['setting']} | " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    text = "\n".join(lines)
    (RESULTS / f"{name}.md").write_text(
        f"Medians over {args.phantoms} held-out phantoms ({meta})\n\n{text}\n"
    )
    plot(curves, RESULTS / f"{name}.png")
    print(text)


if __name__ == "__main__":
    main()
