"""The console script: every subcommand answers --help with its options and defaults."""

import subprocess
import sys

import pytest

from catneuron.cli import SUBCOMMANDS, main


def test_top_level_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


def test_unknown_command_fails_with_one_line(capsys):
    assert main(["nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("catneuron: unknown command 'nosuch'\n")


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_subcommand_help_shows_defaults(name):
    out = subprocess.run(
        [sys.executable, "-m", "catneuron", name, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout and "--" in out.stdout
    options = [line for line in out.stdout.splitlines() if line.strip().startswith("--")]
    if options:  # a command with only a positional argument has no default to show
        assert "default" in out.stdout, f"{name} --help does not show defaults"
