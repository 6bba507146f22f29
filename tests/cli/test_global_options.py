"""The global options (--debug, -q/--quiet, --progress, --progress-interval) after a command's name.

`pie simulate ... --progress plain` means `pie --progress plain simulate ...`, in any group, as
long as the option is in option position: an option's value (`--prompt -q`) and whatever
follows `--` are left alone, because the command-line parser itself reads them.
"""

from __future__ import annotations

import pytest
import typer
from PIL import Image

from pie_cli.cli.app import app
from pie_cli.cli.console import ui
from tests.helpers import manifest, simulate_argv

GLOBAL = ("--debug", "-q", "--quiet", "--progress", "--progress-interval")


def below(group):
    for command in getattr(group, "commands", {}).values():
        yield command
        yield from below(command)


def test_every_command_and_group_takes_the_global_options_once():
    commands = list(below(typer.main.get_command(app)))
    assert {c.name for c in commands} >= {
        "simulate",
        "finetune",
        "mask",
        "make",
        "models",
        "list",
        "demo",
        "case",
    }
    for command in commands:
        names = [name for param in command.params for name in param.opts]
        assert [names.count(name) for name in GLOBAL] == [1] * len(GLOBAL), command.name


def test_simulate_help_lists_them(cli):
    result = cli("simulate", "--help")
    assert result.exit_code == 0, result.output
    for text in ("--debug", "-q, --quiet", "--progress <auto|on|plain|off>", "--progress-interval SECONDS"):
        assert result.stdout.count(text) == 1, text
    assert "As `pie --quiet`: only results on stdout." in result.stdout


def test_root_help_says_they_work_after_the_command(cli):
    result = cli("--help")
    assert "they also work after a command's name" in result.stdout
    assert "PIE_PROGRESS_INTERVAL" in result.stdout


# --------------------------------------------------------------------------- `pie demo data`: progress lines


def demo_data(cli, out, *options):
    return cli("demo", "data", "-n", "20", "--out", out, *options)


def counts(stderr: str) -> list[int]:
    """The item counts of the phantom progress lines."""
    return [
        int(line.split("  ")[1].split("/")[0])
        for line in stderr.splitlines()
        if line.startswith("phantoms  ")
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["--progress", "plain", "demo", "data", "-n", "20", "--out", "{out}"],  # before: the reference
        ["demo", "data", "-n", "20", "--out", "{out}", "--progress", "plain"],
        ["demo", "data", "-n", "20", "--out", "{out}", "--progress=plain"],
        ["demo", "data", "--progress", "plain", "-n", "20", "--out", "{out}"],
        ["demo", "--progress", "plain", "data", "-n", "20", "--out", "{out}"],  # on the group
        [
            "--progress",
            "off",
            "demo",
            "data",
            "-n",
            "20",
            "--out",
            "{out}",
            "--progress",
            "plain",
        ],  # last wins
    ],
)
def test_progress_anywhere(cli, tmp_path, argv):
    out = tmp_path / "d"
    result = cli(*(str(out) if a == "{out}" else a for a in argv))
    assert result.exit_code == 0, result.output
    assert counts(result.stderr) == list(range(2, 21, 2))  # plain: every n // 10 and the last
    assert result.stderr.splitlines()[-1] == f"demo data: 20 phantoms (effusion) -> {out}/metadata.jsonl"
    assert result.stdout == f"{out}\n"


@pytest.mark.parametrize(
    ("interval", "expected"), [("0", list(range(1, 21))), ("1e9", [1, *range(2, 21, 2)])]
)
def test_progress_interval_after_the_command(cli, tmp_path, interval, expected):
    """auto off a terminal: the first item, every n // 10, the last, and one per interval (0: each)."""
    result = demo_data(cli, tmp_path / "d", "--progress", "auto", "--progress-interval", interval)
    assert result.exit_code == 0, result.output
    assert counts(result.stderr) == expected


@pytest.mark.parametrize("quiet", ["-q", "--quiet"])
def test_quiet_after_the_command(cli, tmp_path, quiet):
    out = tmp_path / "d"
    result = demo_data(cli, out, "--progress", "plain", quiet)
    assert result.exit_code == 0, result.output
    assert (result.stdout, result.stderr) == (f"{out}\n", "")
    assert (out / "metadata.jsonl").is_file()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (
            ["--progress", "sideways"],
            "Invalid value for '--progress': Value error, 'sideways' is not one of 'auto', 'on', 'plain', 'off'.",
        ),
        (
            ["--progress-interval", "-1"],
            "Invalid value for '--progress-interval': Input should be greater than or equal to 0",
        ),
        (
            ["--progress-interval", "soon"],
            "Invalid value for '--progress-interval': Input should be a valid number, unable to parse string as a number",
        ),
    ],
)
def test_a_bad_value_after_the_command_is_one_line_and_writes_nothing(cli, tmp_path, option, message):
    out = tmp_path / "d"
    result = demo_data(cli, out, *option)
    assert result.exit_code == 2
    assert result.stderr == f"Error: {message}\n"
    assert result.stdout == "" and not out.exists()


@pytest.mark.parametrize("where", ["command", "group"])
def test_debug_after_the_command_shows_the_traceback(cli, tmp_path, monkeypatch, where):
    import pie_cli.demo.data

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(pie_cli.demo.data, "write_dataset", broken)
    plain = demo_data(cli, tmp_path / "a")
    assert plain.exit_code == 1
    assert (
        plain.stderr == "Error: internal error: RuntimeError: boom (rerun with --debug for the traceback).\n"
    )
    ui.debug = False
    if where == "command":
        debug = demo_data(cli, tmp_path / "b", "--debug")
    else:
        debug = cli("demo", "--debug", "data", "-n", "20", "--out", tmp_path / "b")
    assert isinstance(debug.exception, RuntimeError) and str(debug.exception) == "boom"
    assert "internal error" not in debug.stderr


# --------------------------------------------------------------------------- nested groups


def test_quiet_after_a_mask_command(cli, tmp_path):
    Image.new("L", (64, 64), 100).save(tmp_path / "img.png")
    argv = [
        "mask",
        tmp_path / "img.png",
        "--out",
        tmp_path / "m.png",
        "--box",
        "0,0,0.5,0.5",
        "--resolution",
        "64",
    ]
    loud = cli(*argv)
    assert loud.exit_code == 0, loud.output
    assert loud.stderr == f"mask: 64x64, 25.0% of pixels -> {tmp_path / 'm.png'}\n"
    for quiet in (["-q"], ["--quiet"]):
        result = cli(*argv, "--overwrite", *quiet)
        assert result.exit_code == 0, result.output
        assert (result.stdout, result.stderr) == (f"{tmp_path / 'm.png'}\n", "")
    result = cli("mask", "make", "-q", *argv[1:], "--overwrite")  # the subcommand named
    assert (result.exit_code, result.stderr) == (0, "")


def test_models_list_and_demo_case_take_them(cli, tmp_path):
    listed = cli("models", "list", "--json", "-q", "--progress", "plain")
    assert listed.exit_code == 0 and listed.stdout.startswith("[") and listed.stderr == ""
    assert (ui.quiet, ui.progress) == (True, "plain")
    case = cli("demo", "case", "--out", tmp_path / "case", "--quiet")
    assert case.exit_code == 0, case.output
    assert (case.stdout, case.stderr) == (f"{tmp_path / 'case'}\n", "")


# --------------------------------------------------------------------------- values and `--` are not options


@pytest.mark.parametrize("prompt", ["-q", "--quiet", "--progress"])
def test_an_option_value_that_looks_like_a_global_option_stays_a_value(
    cli, inputs, tiny_model, tmp_path, prompt
):
    out = tmp_path / "run"
    result = cli(*simulate_argv(inputs["image"], out, model=tiny_model, prompt=prompt))
    assert result.exit_code == 0, result.output
    assert manifest(out)["parameters"]["prompt"] == prompt
    assert result.stderr.startswith("pie: 1 progression steps in ")  # not quiet
    assert (ui.quiet, ui.progress) == (False, "off")


def test_after_double_dash_it_is_an_argument(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("L", (64, 64), 100).save(tmp_path / "-q", format="PNG")  # an image named -q
    result = cli("mask", "--out", "m.png", "--box", "0,0,0.5,0.5", "--resolution", "64", "--", "-q")
    assert result.exit_code == 0, result.output
    assert result.stderr == "mask: 64x64, 25.0% of pixels -> m.png\n"  # not quiet: -q was the image
    assert Image.open(tmp_path / "m.png").size == (64, 64) and not ui.quiet
    result = cli("mask", "--out", "m2.png", "--box", "0,0,0.5,0.5", "--resolution", "64", "-q", "--", "-q")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "m2.png\n", "")  # the first -q is quiet
