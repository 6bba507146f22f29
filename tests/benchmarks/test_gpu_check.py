"""benchmarks/gpu: the GPU check's CPU rehearsal and its wheel install, so the script cannot rot
between lent GPU machines (CI has none; the device run itself is benchmarks/gpu/README.md's)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "benchmarks" / "gpu" / "check.py"
SECTIONS = (
    "environment",
    "correctness_tiny",
    "nan_guard",
    "sd_model",
    "speed_fp32",
    "speed_half",
    "training",
    "speed_compiled",
    "speed_cudagraphs",
    "trajectories",
    "cuda_tests",
)


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def probe_wheel(folder: Path) -> Path:
    """A tiny pure-Python wheel, with a module under NAME.data/purelib as some wheels have."""
    folder.mkdir(parents=True, exist_ok=True)
    info = "pie_gpu_probe-0.1.dist-info"
    files = {
        "pie_gpu_probe/__init__.py": "VALUE = 17\n",
        "pie_gpu_probe-0.1.data/purelib/pie_gpu_probe_extra.py": "EXTRA = 18\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: pie-gpu-probe\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    wheel = folder / "pie_gpu_probe-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return wheel


def run_check(*args: str, tmp: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHONPATH")}
    env.update(PIE_HOME=str(tmp / "pie-home"), HF_HOME=str(tmp / "hf-home"), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(CHECK), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`check.py --smoke --device cpu` once, with a local wheel to install (no download)."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    probe_wheel(tmp / "wheels")
    proc = run_check(
        "--smoke",
        "--device",
        "cpu",
        "--budget",
        "600",  # a loaded CI machine must not skip sections: the budget logic has its own test
        "--out",
        str(tmp / "out"),
        "--wheels",
        str(tmp / "wheels"),
        "--target",
        str(tmp / "deps"),
        tmp=tmp,
    )
    data = json.loads((tmp / "out" / "gpu-smoke.json").read_text()) if (tmp / "out").is_dir() else None
    return proc, data, tmp


@pytest.mark.slow
def test_rehearsal_passes_and_writes_both_files(smoke):
    proc, data, tmp = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp / "out").iterdir()) == ["gpu-smoke.json", "gpu-smoke.md"]
    md = (tmp / "out" / "gpu-smoke.md").read_text()
    assert "| check | passed | measured | tolerance |" in md and "**NO**" not in md
    assert data["meta"]["smoke"] is True and data["meta"]["device"] == "cpu"
    assert "installed 1 wheels with pip" in proc.stdout


@pytest.mark.slow
def test_every_section_ran_or_says_why_not(smoke):
    _, data, _ = smoke
    sections = data["sections"]
    assert tuple(sections) == SECTIONS
    assert sections["cuda_tests"]["status"] == "skipped: cpu"
    for name in SECTIONS[:-1]:
        assert sections[name]["status"] == "ok", (name, sections[name])
    modes = data["modes"]
    assert set(modes) == {
        "a_baseline_fp32",
        "b_pie_fp32",
        "c_pie_bf16",
        "c_pie_bf16_tuned",
        "d_bf16_compile",
        "e_bf16_cudagraphs",
    }
    for mode, r in modes.items():
        assert r["seconds"] > 0 and r["peak_mb"] > 0, mode
    assert sections["speed_half"]["c_pie_fp16"] == "skipped: cpu"
    assert sections["speed_cudagraphs"]["cudagraphs"].startswith("skipped: cpu")
    # pie encodes the text once and the initial image once; the baseline re-encodes them every step.
    steps = data["meta"]["sizes"]["steps"]
    assert modes["b_pie_fp32"]["calls"]["text_encoder"] == 1
    assert modes["b_pie_fp32"]["calls"]["vae_encode"] == steps
    assert modes["a_baseline_fp32"]["calls"]["text_encoder"] == steps
    assert modes["a_baseline_fp32"]["calls"]["vae_encode"] == 4 * steps
    k = sections["trajectories"]["k"]
    assert set(k) == {"1", "2"} and all(v["frames_per_s"] > 0 for v in k.values())
    training = sections["training"]
    for run in ("lora", "lora_gradient_checkpointing", "full"):
        assert training[run]["steps_per_s"] > 0 and training[run]["peak_mb"] > 0, run
        assert training[run]["steps"] == (1 if run == "full" else 2)
    assert training["lora_gradient_checkpointing"]["gradient_checkpointing"] is True
    assert training["full"]["method"] == "full"
    assert data["meta"]["targets"]["fastest_mode"] in modes


@pytest.mark.slow
def test_correctness_checks_passed_on_the_cpu(smoke):
    _, data, _ = smoke
    checks = data["checks"]
    assert all(c["passed"] for c in checks.values()), {n: c for n, c in checks.items() if not c["passed"]}
    assert checks["tiny fp32: 2 batched trajectories = 2 single runs"]["measured"] <= 0.5
    assert checks["tiny: trajectories are independent"]["measured"] >= 10
    vae = checks["NaN guard: a forced vae overflow raises NumericalError"]["measured"]
    unet = checks["NaN guard: a forced unet overflow raises NumericalError"]["measured"]
    assert vae.startswith("progression step 1: the VAE decoded NaN or infinite pixels")
    assert unet.startswith("progression step 1 produced NaN or infinite latents")
    assert data["sections"]["nan_guard"]["vae"]["frames_yielded"] == 1
    for name in ("d_bf16_compile frames = eager bf16 frames", "e_bf16_cudagraphs frames = eager bf16 frames"):
        assert checks[name]["passed"]
    assert "bf16 frames close to fp32 frames" in checks
    assert any(n.endswith("2 batched trajectories = 2 single runs") and "tiny" not in n for n in checks)


@pytest.mark.slow
def test_carried_wheels_are_installed_and_imported_first(smoke):
    _, data, tmp = smoke
    env = data["sections"]["environment"]
    assert env["install"]["method"] == "pip" and env["install"]["wheels"] == 1
    assert env["install_result"] == {"carried": {"pie-gpu-probe": "0.1"}, "shadowed": []}
    assert (tmp / "deps" / "pie_gpu_probe" / "__init__.py").is_file()
    assert (tmp / "deps" / "pie_gpu_probe_extra.py").is_file()
    assert env["packages"]["diffusers"]["from"] == "machine"


def test_unzip_installs_when_pip_cannot(tmp_path, monkeypatch):
    check = load("gpu_check", CHECK)
    probe_wheel(tmp_path / "wheels")
    real_run = subprocess.run

    def failing_pip(cmd, *args, **kwargs):
        if cmd[1:4] == ["-m", "pip", "install"]:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no pip here")
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(check.subprocess, "run", failing_pip)
    record = check.install_wheels(tmp_path / "wheels", tmp_path / "deps")
    assert record["method"] == "unzip" and record["pip_error"] == "ERROR: no pip here"
    assert (tmp_path / "deps" / "pie_gpu_probe_extra.py").read_text() == "EXTRA = 18\n"
    assert not list((tmp_path / "deps").glob("*.data"))
    monkeypatch.syspath_prepend(str(tmp_path / "deps"))
    assert check.carried_packages(tmp_path / "deps") == {"carried": {"pie-gpu-probe": "0.1"}, "shadowed": []}
    found = importlib.util.find_spec("pie_gpu_probe")
    assert Path(found.origin).parent == tmp_path / "deps" / "pie_gpu_probe"


def test_a_module_found_elsewhere_first_is_reported_shadowed(tmp_path, monkeypatch):
    check = load("gpu_check", CHECK)
    probe_wheel(tmp_path / "wheels")
    check.install_wheels(tmp_path / "wheels", tmp_path / "deps", use_pip=False)
    (tmp_path / "other" / "pie_gpu_probe").mkdir(parents=True)
    (tmp_path / "other" / "pie_gpu_probe" / "__init__.py").write_text("VALUE = 0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "deps"))
    monkeypatch.syspath_prepend(str(tmp_path / "other"))
    assert check.carried_packages(tmp_path / "deps")["shadowed"] == ["pie-gpu-probe: pie_gpu_probe"]


def test_out_of_budget_every_section_is_skipped_and_recorded(tmp_path):
    proc = run_check(
        "--smoke", "--device", "cpu", "--budget", "0", "--out", str(tmp_path / "out"), tmp=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "gpu-smoke.json").read_text())
    assert data["sections"]["environment"]["status"] == "ok"
    statuses = {n: s["status"] for n, s in data["sections"].items() if n != "environment"}
    assert statuses == {
        **dict.fromkeys(("correctness_tiny", "sd_model", "cuda_tests"), "skipped: budget"),
        "nan_guard": "skipped: needs correctness_tiny",
        **dict.fromkeys(("speed_fp32", "speed_half", "trajectories", "training"), "skipped: needs sd_model"),
        **dict.fromkeys(("speed_compiled", "speed_cudagraphs"), "skipped: needs speed_half"),
    }
    assert "| correctness_tiny | skipped: budget |" in (tmp_path / "out" / "gpu-smoke.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--wheels", "missing-folder"], "--wheels missing-folder is not a folder."),
        (["--wheels", "."], "--wheels . holds no .whl files; run `make gpu-wheels` first."),
        (["--budget", "-1"], "--budget must be at least 0 seconds."),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    ],
)
def test_bad_options_exit_2_naming_the_option_and_write_nothing(tmp_path, args, message):
    proc = run_check("--smoke", "--out", str(tmp_path / "out"), *args, tmp=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_the_wheel_list_is_pies_runtime_closure_at_the_pinned_versions():
    wheels = load("gpu_wheels", ROOT / "benchmarks" / "gpu" / "wheels.py")
    names = wheels.wanted()
    pins = wheels.pins()
    for needed in (
        "diffusers",
        "transformers",
        "tokenizers",
        "accelerate",
        "peft",
        "pydicom",
        "typer",
        "pyyaml",
    ):
        assert names[needed] == pins[needed], needed
    # The machine's CUDA torch and what only it needs stay; numpy is built against that torch.
    for mine in ("torch", "numpy", "sympy", "networkx", "hf-xet"):
        assert mine not in names
    assert not [n for n in names if n.startswith(("nvidia-", "triton"))]
    assert "pytest" not in names and "ruff" not in names  # dev tools are not runtime dependencies


def test_a_needed_package_without_a_pin_is_refused():
    wheels = load("gpu_wheels", ROOT / "benchmarks" / "gpu" / "wheels.py")
    with pytest.raises(SystemExit, match="requirements/dev.txt pins no version of it"):
        wheels.closure(["diffusers==0.42.1"], {"diffusers": "0.42.1"})  # it needs huggingface_hub...
