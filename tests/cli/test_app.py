"""The command surface: help, version, startup cost."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pie_cli import __version__
from tests.helpers import reset_signals

COMMANDS = [
    [],
    ["simulate"],
    ["mask"],
    ["mask", "make"],
    ["mask", "info"],
    ["export-gif"],
    ["finetune"],
    ["evaluate"],
    ["demo"],
    ["demo", "data"],
    ["demo", "case"],
    ["models"],
    ["models", "list"],
    ["models", "add"],
    ["models", "remove"],
    ["models", "info"],
    ["models", "pull"],
    ["doctor"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "pie")
def test_help_of_every_command(cli, command):
    result = cli(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage: pie" in result.stdout
    assert "Traceback" not in result.output


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"pie {__version__}"


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "pie_cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=reset_signals,
    )
    assert proc.stdout.strip() == f"pie {__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["simulate", "--help"],
        ["models", "list"],
        ["models", "--help"],
        ["mask", "--help"],
        ["mask", "info", "--help"],
        ["export-gif", "--help"],
        ["finetune", "--help"],
        ["evaluate", "--help"],
        ["demo", "--help"],
    ],
)
def test_light_commands_do_not_import_torch(argv):
    """`pie --help` and registry listing must start without torch, diffusers or transformers."""
    code = (
        "import sys\n"
        "from pie_cli.cli.app import app\n"
        f"try:\n    app({argv!r}, prog_name='pie')\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate') if m in sys.modules)\n"
        "print('HEAVY:' + ','.join(heavy))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, preexec_fn=reset_signals
    )
    assert proc.stdout.strip().endswith("HEAVY:")


def test_mask_and_export_never_import_torch(tmp_path):
    """Real work, not just --help: making a mask, describing it, exporting frames."""
    from PIL import Image

    Image.new("L", (96, 64), 120).save(tmp_path / "img.png")
    run = tmp_path / "run"
    run.mkdir()
    for k in range(3):
        Image.new("RGB", (64, 64), (40 * k, 40 * k, 40 * k)).save(run / f"frame_{k:03d}.png")
    code = (
        "import sys\n"
        "from pie_cli.cli.app import app\n"
        "def call(argv):\n"
        "    try:\n        app(argv, prog_name='pie')\n    except SystemExit as e:\n        assert not e.code, (argv, e.code)\n"
        f"call(['mask', {str(tmp_path / 'img.png')!r}, '--out', {str(run / 'mask.png')!r}, '--resolution', '64',"
        " '--box', '10,10,40,40', '--auto', 'foreground', '--feather', '2', '--preview',"
        f" {str(tmp_path / 'p.png')!r}])\n"
        f"call(['mask', 'info', {str(run / 'mask.png')!r}, '--json'])\n"
        f"call(['export-gif', {str(run)!r}, '--out', {str(tmp_path / 'a.gif')!r}, '--diff', '--mask-outline',"
        " '--caption', '{i}'])\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate') if m in sys.modules)\n"
        "print('HEAVY:' + ','.join(heavy))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=reset_signals
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("HEAVY:"), proc.stdout[-300:]
    assert (tmp_path / "a.gif").exists() and (tmp_path / "p.png").exists()
