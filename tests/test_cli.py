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


def test_unknown_and_planned_commands_fail_with_one_line(capsys):
    assert main(["nosuch"]) == 2
    assert main(["probe"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'nosuch'" in err and "'probe' is not available yet" in err


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
    assert "default" in out.stdout, f"{name} --help does not show defaults"
