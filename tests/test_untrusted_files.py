"""Defect class 4: pie trusts a file it reads back (and item 5: races and resumes it gets wrong).

The rule pie must keep: **every file pie reads back is parsed against a schema; nothing in it is
trusted blindly.** A damaged file is one sentence naming it, never a traceback, an "internal
error", a hang or a silent misreading:

- ``$PIE_HOME/models.json``: damage to the file itself is one sentence naming ``models.json``
  (and built-in names and plain paths keep working without it); damage to one entry marks that
  entry "broken" (``pie models list`` still lists the good ones) and using it is refused.
- cohort CSVs: encodings, NUL bytes, duplicated or missing columns, ragged rows, huge fields and
  empty files are refused naming the CSV (and the row).
- ``--resume``: a manifest's generator states, the model behind an alias, a pickle permission
  and a scheduler config are checked, not assumed.
- a signal: ``pie export-gif``, ``pie evaluate`` and ``pie mask`` stopped by SIGTERM exit 130,
  leaving no partial file.

Item 5: two processes taking over one stale ``.pie.lock`` at once: exactly one holds the run
directory; ``pie simulate IMAGE ... --resume`` with the interrupted run's own options (a SLURM
requeue script) continues it, and one differing option is refused naming it.

Every refusal row: exit 2, nothing on stdout, one ``Error:`` line with the row's key words, and
no file created, changed or removed under the test's tmp folder (and ``$PIE_HOME``).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import manifest, simulate_argv
from tests.refusals import (
    TIMEOUT,
    ParkedChild,
    assert_unchanged,
    check_ok,
    check_refused,
    child_env,
    snapshot,
)


def home() -> Path:
    return Path(os.environ["PIE_HOME"])


def registry() -> Path:
    return home() / "models.json"


def entry(target, kind: str = "model", **extra) -> dict:
    return {
        "target": target,
        "kind": kind,
        "base": None,
        "weight": 1.0,
        "added": "2026-01-01T00:00:00",
        **extra,
    }


def write_registry(models: dict) -> Path:
    home().mkdir(parents=True, exist_ok=True)
    registry().write_text(json.dumps({"version": 1, "models": models}, indent=2))
    return registry()


# =========================================================================== A. models.json

FILE_DAMAGE = [
    pytest.param(b'{"version": 1, "models": {"caf\xe9": {"target": "x"}}}', id="not UTF-8"),
    pytest.param(b"{oops", id="not JSON"),
    pytest.param(b"[1, 2]", id="a JSON list"),
    pytest.param(b'{"version": 1, "models": [1, 2]}', id="models not an object"),
]


@pytest.mark.parametrize("damage", FILE_DAMAGE)
def test_a_damaged_registry_is_one_sentence_naming_it(damage, cli, tmp_path):
    home().mkdir(parents=True, exist_ok=True)
    registry().write_bytes(damage)
    before = snapshot(tmp_path, home())
    check_refused(cli("models", "list"), "models.json", before=before, roots=(tmp_path, home()))


@pytest.mark.parametrize("model", ["demo", "tiny model folder"])
@pytest.mark.parametrize("damage", FILE_DAMAGE)
def test_built_in_names_and_paths_work_despite_a_damaged_registry(
    damage, model, cli, tiny_model, inputs, tmp_path
):
    home().mkdir(parents=True, exist_ok=True)
    registry().write_bytes(damage)
    reference = "demo" if model == "demo" else tiny_model
    check_ok(cli(*simulate_argv(inputs["image"], tmp_path / "out", model=reference, mask=inputs["mask"])))
    assert manifest(tmp_path / "out")["status"] == "complete"
    assert registry().read_bytes() == damage, "pie changed the user's registry file"


def _nested(depth: int):
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


ENTRY_DAMAGE = [
    pytest.param(("odd-entry", lambda t, lora: {"odd-entry": entry(None)}), id="target null"),
    pytest.param(("odd-entry", lambda t, lora: {"odd-entry": entry(5)}), id="target a number"),
    pytest.param(("odd-entry", lambda t, lora: {"odd-entry": entry([str(t)])}), id="target a list"),
    pytest.param(("odd-entry", lambda t, lora: {"odd-entry": entry(str(t), kind="weird")}), id="kind weird"),
    pytest.param(
        ("odd-entry", lambda t, lora: {"odd-entry": entry(str(lora), kind="lora", base=str(t), weight="x")}),
        id="weight x",
    ),
    pytest.param(
        (
            "odd-entry",
            lambda t, lora: {"odd-entry": entry(str(lora), kind="lora", base=str(t), weight=float("nan"))},
        ),
        id="weight NaN",
    ),
    pytest.param(("odd-entry", lambda t, lora: {"odd-entry": 5}), id="entry not an object"),
    pytest.param(("odd-entry", lambda t, lora: {"odd-entry": entry(_nested(500))}), id="deeply nested value"),
    pytest.param(
        ("loop-a", lambda t, lora: {"loop-a": entry("loop-b"), "loop-b": entry("loop-a")}),
        id="alias loop a-b-a",
    ),
    pytest.param(("loop-a", lambda t, lora: {"loop-a": entry("loop-a")}), id="alias self-loop"),
    pytest.param(
        (
            "chain-00",
            lambda t, lora: {
                **{f"chain-{i:02d}": entry(f"chain-{i + 1:02d}") for i in range(39)},
                "chain-39": entry(str(t)),
            },
        ),
        id="chain of 40 aliases",
    ),
]


def _listed(cli) -> dict[str, str]:
    result = check_ok(cli("models", "list", "--json"))
    return {row["name"]: row["status"] for row in json.loads(result.stdout)}


@pytest.mark.parametrize("damage", ENTRY_DAMAGE)
def test_a_damaged_registry_entry_is_broken_and_the_rest_still_works(damage, cli, tiny_model, tiny_lora):
    name, make = damage
    write_registry({"good": entry(str(tiny_model)), **make(tiny_model, tiny_lora)})
    listed = _listed(cli)
    assert listed.get(name) == "broken", f"{name}: {listed.get(name)!r}"
    assert listed.get("good") == "ok", f"good: {listed.get('good')!r}"
    if name == "chain-00":
        assert listed.get("chain-39") == "ok"  # one hop to a model: nothing wrong with it


@pytest.mark.parametrize("damage", ENTRY_DAMAGE)
def test_using_a_damaged_registry_entry_is_refused(damage, cli, tiny_model, tiny_lora, inputs, tmp_path):
    name, make = damage
    write_registry({"good": entry(str(tiny_model)), **make(tiny_model, tiny_lora)})
    argv = simulate_argv(inputs["image"], tmp_path / "out", model=name, mask=inputs["mask"])
    before = snapshot(tmp_path, home())
    check_refused(cli(*argv), name, "models.json", before=before, roots=(tmp_path, home()))


# =========================================================================== B. cohort CSVs

GOOD_ROW = "chest.png,left-lung.png,left pleural effusion"
HEADER = "image,mask,prompt"

# (content, key words besides the CSV's name): a problem of one row names the row too. A NUL byte
# or a foreign encoding is the file's problem (it is not UTF-8 text), so only the file is required.
CSV_DAMAGE = [
    pytest.param(
        f"{HEADER}\nchest.png,left-lung.png,épanchement pleural\n".encode("latin-1"), (), id="Latin-1 bytes"
    ),
    pytest.param(
        f"{HEADER}\nchest.png,left-lung.png,left pleural\x00 effusion\n".encode(), (), id="NUL byte"
    ),
    pytest.param(b"image,prompt,prompt\nchest.png,effusion,cardiomegaly\n", (), id="duplicated column"),
    pytest.param(f"{HEADER}\n{GOOD_ROW},extra\n".encode(), ("row",), id="more values than the header"),
    pytest.param(
        f"{HEADER}\nchest.png,left-lung.png,{'effusion ' * 22_000}\n".encode(), ("row",), id="200 KB field"
    ),
    pytest.param(b"", (), id="empty file"),
    pytest.param(f"{HEADER}\n".encode(), (), id="header only"),
]


@pytest.mark.parametrize(("content", "keywords"), CSV_DAMAGE)
def test_a_damaged_cohort_csv_is_refused_naming_it(content, keywords, cli, tiny_model, inputs, tmp_path):
    table = tmp_path / "cases.csv"
    table.write_bytes(content)
    argv = simulate_argv(None, tmp_path / "out", "--cohort", table, model=tiny_model, prompt=None)
    before = snapshot(tmp_path)
    check_refused(cli(*argv), "cases.csv", *keywords, before=before, roots=(tmp_path,))


# =========================================================================== C. --resume on a run that changed


def stop(out: Path) -> Path:
    """Turn a finished 2-step run into one interrupted after step 1 (as a kill leaves it)."""
    import torch

    from pie_cli.runs.manifest import encode_state

    data = manifest(out)
    data.update(
        status="interrupted",
        last_complete_frame=1,
        rng_states=[encode_state(torch.Generator("cpu").manual_seed(42).get_state())],
    )
    data["frames"] = [f for f in data["frames"] if f["index"] <= 1]
    (out / "frame_002.png").unlink()
    (out / "progression.gif").unlink(missing_ok=True)
    (out / "manifest.json").write_text(json.dumps(data))
    return out


def stopped_run(cli, inputs, out: Path, model, *extra) -> Path:
    argv = simulate_argv(inputs["image"], out, *extra, model=model, mask=inputs["mask"], steps=2)
    check_ok(cli(*argv))
    return stop(out)


def _resume_refused(cli, out: Path, *keywords, roots: tuple) -> str:
    before = snapshot(*roots)
    return check_refused(cli("simulate", "--resume", "--out", out), *keywords, before=before, roots=roots)


def test_resume_refuses_generator_states_of_the_wrong_length(cli, tiny_model, inputs, tmp_path):
    out = stopped_run(cli, inputs, tmp_path / "run", tiny_model)
    data = manifest(out)
    data["rng_states"] = [base64.b64encode(b"\x01" * 10).decode()]  # valid base64, not a generator state
    (out / "manifest.json").write_text(json.dumps(data))
    line = _resume_refused(cli, out, "manifest.json", roots=(tmp_path,))
    assert any(w in line for w in ("generator", "rng_states", "random state")), line


def _other_model(tiny_model: Path, tiny_unet_variant: Path, where: Path) -> Path:
    """A model folder unlike the tiny one: its UNet replaced by the perturbed variant."""
    other = Path(shutil.copytree(tiny_model, where))
    shutil.rmtree(other / "unet")
    shutil.copytree(tiny_unet_variant / "unet", other / "unet")
    return other


def test_resume_refuses_an_alias_that_now_names_another_model(
    cli, tiny_model, tiny_unet_variant, inputs, tmp_path
):
    check_ok(cli("models", "add", "cxr", tiny_model))
    out = stopped_run(cli, inputs, tmp_path / "run", "cxr")
    other = _other_model(tiny_model, tiny_unet_variant, tmp_path / "other-model")
    check_ok(cli("models", "add", "cxr", other, "--force"))
    _resume_refused(cli, out, "model", "changed", roots=(tmp_path, home()))


def pickle_only(tiny_model: Path, where: Path) -> Path:
    """The tiny model with every weight file converted to a pickle (.bin) file."""
    import torch
    from safetensors.torch import load_file

    model = Path(shutil.copytree(tiny_model, where))
    for part, safe, pickled in (
        ("unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
        ("vae", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
        ("text_encoder", "model.safetensors", "pytorch_model.bin"),
    ):
        torch.save(load_file(model / part / safe), model / part / pickled)
        (model / part / safe).unlink()
    return model


def test_resume_needs_allow_pickle_again_for_a_pickle_model(cli, tiny_model, inputs, tmp_path, monkeypatch):
    import torch

    from pie_cli.core import loading

    model = pickle_only(tiny_model, tmp_path / "pickled")
    out = stopped_run(cli, inputs, tmp_path / "run", model, "--allow-pickle")
    assert manifest(out)["run"]["allow_pickle"] is True
    monkeypatch.setattr(loading, "_CACHE", {})  # nothing already in memory: a resume would load it
    opened = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        opened.append(args[0] if args else kwargs.get("f"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    _resume_refused(cli, out, "--allow-pickle", roots=(tmp_path,))
    assert not opened, f"pickle files were opened: {opened}"


def test_a_scheduler_config_naming_a_model_class_is_refused(cli, tiny_model, inputs, tmp_path):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    config_path = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = "UNet2DConditionModel"
    config_path.write_text(json.dumps(config))
    argv = simulate_argv(inputs["image"], tmp_path / "out", model=model, mask=inputs["mask"])
    before = snapshot(tmp_path)
    check_refused(cli(*argv), "scheduler", before=before, roots=(tmp_path,))


# =========================================================================== D. SIGTERM while working


def _fake_run(where: Path, image: Path, mask: Path) -> Path:
    where.mkdir(parents=True)
    for n in range(3):
        shutil.copy(image, where / f"frame_{n:03d}.png")
    shutil.copy(mask, where / "mask.png")
    (where / "manifest.json").write_text(json.dumps({"parameters": {"prompt": "left pleural effusion"}}))
    return where


SIGTERM_ROWS = [
    pytest.param(
        "pie_cli.imaging.animation:write",
        lambda work, image, run: ["export-gif", run, "--out", work / "a.gif"],
        id="export-gif (in animation.write)",
    ),
    pytest.param(
        "pie_cli.evaluation.evaluate:evaluate_run",
        lambda work, image, run: ["evaluate", run],
        id="evaluate (in evaluate_run)",
    ),
    pytest.param(
        "pie_cli.imaging.mask_regions:build_mask",
        lambda work, image, run: [
            "mask",
            image,
            "--out",
            work / "m.png",
            "--box",
            "0.1,0.1,0.6,0.6",
            "-r",
            "64",
        ],
        id="mask (in build_mask)",
    ),
]


@pytest.mark.parametrize(("where", "argv"), SIGTERM_ROWS)
def test_sigterm_while_working_exits_130_without_a_partial_file(where, argv, inputs, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    image = Path(shutil.copy(inputs["image"], work / "chest.png"))
    run = _fake_run(work / "run", inputs["image"], inputs["mask"])
    before = snapshot(work)
    child = ParkedChild(argv(work, image, run), where, tmp_path / "logs")
    try:
        child.wait_parked()
        child.signal(signal.SIGTERM)
        child.release()
        code = child.wait()
    finally:
        child.close()
    assert code == 130, (
        f"exit {code} (a negative number is death by that signal), expected 130:\n{child.stderr}"
    )
    assert "Traceback" not in child.stderr, child.stderr
    assert_unchanged(before, work)


# =========================================================================== E. item 5

# A child taking DirLock(dir) over from a dead owner. Once it has read the stale lock (its pid is
# sys.argv[2]) it parks: writes "P" to the ready pipe and waits for the release pipe to close. A
# child that never reads that stale lock writes "N" instead once it is done. Then it prints
# "HELD" (and holds the lock until its stdin closes) or "REFUSED <message>".
TAKEOVER = r"""
import os, sys
from pathlib import Path
directory, stale = Path(sys.argv[1]), int(sys.argv[2])
ready, release = (int(fd) for fd in os.environ.pop("PIE_TEST_PARK_FDS").split(","))
from pie_cli.errors import UserError
from pie_cli.runs import locks
real_read_owner = locks.read_owner
state = {"parked": False}

def parked_read_owner(path):
    owner = real_read_owner(path)
    if not state["parked"] and owner is not None and owner.get("pid") == stale:
        state["parked"] = True
        os.write(ready, b"P")
        os.close(ready)
        os.read(release, 1)
    return owner

locks.read_owner = parked_read_owner
try:
    lock = locks.DirLock(directory).acquire()
    verdict = "HELD"
except UserError as exc:
    lock, verdict = None, f"REFUSED {exc}"
if not state["parked"]:
    os.write(ready, b"N")
    os.close(ready)
print(verdict, flush=True)
if lock is not None:
    sys.stdin.read()
    lock.release()
"""


class Taker:
    def __init__(self, directory: Path, stale: int) -> None:
        self.ready, ready_w = os.pipe()
        release_r, self.release_w = os.pipe()
        env = child_env(PIE_TEST_PARK_FDS=f"{ready_w},{release_r}")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", TAKEOVER, str(directory), str(stale)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=(ready_w, release_r),
        )
        os.close(ready_w)
        os.close(release_r)

    def _wait(self, fd: int, what: str) -> None:
        if not select.select([fd], [], [], TIMEOUT)[0]:
            pytest.fail(f"a lock-taking child did not {what} within {TIMEOUT:g} s")

    def parked_or_done(self) -> bytes:
        self._wait(self.ready, "park")
        return os.read(self.ready, 1)

    def go(self) -> str:
        """Release it; its verdict line ("HELD" or "REFUSED ...")."""
        if self.release_w is not None:
            os.close(self.release_w)
            self.release_w = None
        self._wait(self.proc.stdout.fileno(), "decide")
        return self.proc.stdout.readline().strip()

    def close(self) -> str:
        """Let it go (it releases a lock it holds), wait for it; returns its stderr."""
        if self.release_w is not None:
            os.close(self.release_w)
            self.release_w = None
        os.close(self.ready)
        try:
            _, stderr = self.proc.communicate(timeout=TIMEOUT)  # closes stdin: a holder lets go
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, stderr = self.proc.communicate()
        return stderr


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_two_processes_taking_over_one_stale_lock_exactly_one_holds_it(tmp_path):
    from pie_cli.runs.locks import LOCK_NAME

    run = tmp_path / "run"
    run.mkdir()
    stale = dead_pid()
    lock = {"pid": stale, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+0000"}
    (run / LOCK_NAME).write_text(json.dumps(lock))
    first, second = Taker(run, stale), Taker(run, stale)
    try:
        # Both have read the stale lock (or, if they never read it, are done) before either goes on.
        first.parked_or_done()
        second.parked_or_done()
        verdicts = [first.go(), second.go()]  # the first takes over; the second acts on what it read
    finally:
        stderr = first.close() + second.close()
    held = [v for v in verdicts if v == "HELD"]
    refused = [v for v in verdicts if v.startswith("REFUSED")]
    assert len(held) == 1 and len(refused) == 1, f"exactly one must hold {run}: {verdicts}\n{stderr}"
    assert "in use" in refused[0], refused[0]


def _requeue_argv(inputs, out: Path, tiny_model, *extra) -> list:
    return simulate_argv(inputs["image"], out, *extra, model=tiny_model, mask=inputs["mask"], steps=2)


def test_resume_with_the_runs_own_options_continues_it(cli, tiny_model, inputs, tmp_path):
    out = stopped_run(cli, inputs, tmp_path / "run", tiny_model)
    check_ok(cli(*_requeue_argv(inputs, out, tiny_model, "--resume")))
    assert manifest(out)["status"] == "complete"
    assert sorted(p.name for p in out.glob("frame_*.png")) == [f"frame_{n:03d}.png" for n in range(3)]


@pytest.mark.parametrize(
    ("option", "value"), [("--strength", "0.6"), ("--seed", "43"), ("--guidance-scale", "5")]
)
def test_resume_with_one_differing_option_is_refused_naming_it(
    option, value, cli, tiny_model, inputs, tmp_path
):
    out = stopped_run(cli, inputs, tmp_path / "run", tiny_model)
    argv = _requeue_argv(inputs, out, tiny_model, option, value, "--resume")
    before = snapshot(tmp_path)
    check_refused(cli(*argv), option, before=before, roots=(tmp_path,))
