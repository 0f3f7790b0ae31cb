"""The help formatter of every `catneuron` subcommand: each option's default, said once.

argparse's `ArgumentDefaultsHelpFormatter` appends "(default: X)" to every option, also
to those whose help already says the default in words ("comma-separated (default: all)"),
which then read "(default: all) (default: None)", and to required options and on/off
flags ("(default: None)", "(default: False)"). Here an option's help that mentions its
default keeps its own words, and options with nothing worth saying get nothing appended.
It lives in the lowest package, which imports nothing heavy, so that every command's
parser can use it and `--help` stays fast.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option with its default, once."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or "").lower():
            return action.help
        if action.required or action.default is None or isinstance(action.const, bool):
            return action.help  # a required option, an unset one or an on/off flag: no default
        return super()._get_help_string(action)


class RawHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`HelpFormatter`, with the description and epilog lines kept as written."""
