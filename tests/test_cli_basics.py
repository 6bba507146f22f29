"""The command surface: help, version, startup cost."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pie_cli import __version__

COMMANDS = [
    [],
    ["simulate"],
    ["models"],
    ["models", "list"],
    ["models", "add"],
    ["models", "remove"],
    ["models", "info"],
    ["models", "pull"],
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
        [sys.executable, "-m", "pie_cli", "--version"], capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == f"pie {__version__}"


@pytest.mark.parametrize(
    "argv", [["--help"], ["simulate", "--help"], ["models", "list"], ["models", "--help"]]
)
def test_light_commands_do_not_import_torch(argv):
    """`pie --help` and registry listing must start without torch, diffusers or transformers."""
    code = (
        "import sys\n"
        "from pie_cli.cli import app\n"
        f"try:\n    app({argv!r}, prog_name='pie')\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate') if m in sys.modules)\n"
        "print('HEAVY:' + ','.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip().endswith("HEAVY:")
