"""``pie doctor --self-test``: build a tiny model, load it as the CLI does, run a short progression.

The frames must be whole, non-blank, of the working size, and change inside the mask far more
than outside it. The model is built in a temporary folder and forgotten by the loader's cache
afterwards.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from pie_cli.errors import one_line
from pie_cli.reporting import SILENT, Reporter

SELF_TEST_PROMPT = "large left pleural effusion"
SELF_TEST_SIZE = 64
SELF_TEST_STEPS = 2
# Pixels at least this far from the mask count as "outside" in the self-test check.
SELF_TEST_MARGIN = 8


def self_test(device: str, problems: list[str], reporter: Reporter = SILENT) -> dict[str, Any]:
    """Build a tiny model, load it like the CLI does, run a short progression and check its frames."""
    report: dict[str, Any] = {"ok": False, "device": device, "steps": SELF_TEST_STEPS, "error": None}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pie-doctor-", ignore_cleanup_errors=True) as tmp:
        try:
            report.update(_run(Path(tmp), device, reporter))
            report["ok"] = True
        except Exception as exc:
            report["error"] = one_line(exc)
            problems.append(f"self-test failed: {report['error']}")
            if reporter.verbose:
                report["traceback"] = traceback.format_exc()
        finally:
            from pie_cli.core.loading import forget

            forget(tmp)
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def _run(tmp: Path, device: str, reporter: Reporter) -> dict[str, Any]:
    import numpy as np

    from pie_cli.core.devices import choose_placement, dtype_name
    from pie_cli.core.loading import load
    from pie_cli.core.model_files import vae_force_upcast
    from pie_cli.core.progression import progress
    from pie_cli.core.registry import resolve
    from pie_cli.demo.phantom import chest_phantom
    from pie_cli.demo.tiny import build_tiny_model
    from pie_cli.imaging.morphology import dilate

    reporter.note("self-test: building a tiny model ...")
    t0 = time.perf_counter()
    path = build_tiny_model(tmp / "tiny-sd", seed=0)
    source = resolve(str(path))
    placement = choose_placement(device, "auto", vae_force_upcast(source.path))
    components = load(source, placement)
    t1 = time.perf_counter()
    reporter.note(f"self-test: {SELF_TEST_STEPS}-step progression on {placement.device} ...")
    image, _right, left = chest_phantom(SELF_TEST_SIZE, seed=0)
    frames = [
        f.image
        for f in progress(
            components,
            image,
            left,
            prompt=SELF_TEST_PROMPT,
            steps=SELF_TEST_STEPS,
            inference_steps=4,
            resolution=SELF_TEST_SIZE,
            seed=0,
        )
    ]
    t2 = time.perf_counter()
    if len(frames) != SELF_TEST_STEPS + 1:
        raise RuntimeError(f"the progression gave {len(frames)} frames, expected {SELF_TEST_STEPS + 1}")
    arrays = []
    for k, frame in enumerate(frames):
        if frame.size != (SELF_TEST_SIZE, SELF_TEST_SIZE):
            raise RuntimeError(
                f"frame {k} is {frame.size[0]}x{frame.size[1]}, expected {SELF_TEST_SIZE}x{SELF_TEST_SIZE}"
            )
        arr = np.asarray(frame.convert("RGB"), dtype=np.float32)
        if not np.isfinite(arr).all() or arr.max() == arr.min():
            raise RuntimeError(f"frame {k} is blank or not finite")
        arrays.append(arr)
    # The tiny model's VAE is random, so frame 0 -> 1 changes everywhere (its round trip is not
    # the identity); the mask's effect shows between progression steps: far from the mask the
    # image must change much less than inside it.
    mask = np.asarray(left) > 0
    far = ~dilate(mask, SELF_TEST_MARGIN)
    change = np.abs(arrays[-1] - arrays[1]).mean(axis=2)
    inside, outside = float(change[mask].mean()), float(change[far].mean())
    if not inside > 1.0:
        raise RuntimeError(f"the masked region did not change (mean change {inside:.2f} grey levels)")
    if not outside < 0.5 * inside:
        raise RuntimeError(
            f"pixels outside the mask changed too much ({outside:.1f} vs {inside:.1f} grey levels inside)"
        )
    return {
        "device": str(placement.device),
        "dtype": dtype_name(placement.dtype),
        "frames": len(frames),
        "size": [SELF_TEST_SIZE, SELF_TEST_SIZE],
        "change_inside": round(inside, 2),
        "change_outside": round(outside, 2),
        "build_load_seconds": round(t1 - t0, 2),
        "progression_seconds": round(t2 - t1, 2),
    }
