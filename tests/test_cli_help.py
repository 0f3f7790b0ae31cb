"""`--help` answers before anything heavy loads: no torch, Ray, PyAV, DeepSpeed or pyarrow.

Each subcommand's parser is built in a fresh interpreter (through the dispatcher, exactly
as `catneuron <command> --help` does), then `sys.modules` is read. Not a timed test: what
it checks is what makes the help fast (bench/cli_help.py times it).
"""

import json
import subprocess
import sys

import pytest

from catneuron.cli import SUBCOMMANDS

HEAVY = ("torch", "ray", "av", "deepspeed", "pyarrow")

PROBE = """
import contextlib, io, json, sys
from catneuron.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = main([sys.argv[1], "--help"])
    except SystemExit as e:
        code = e.code
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[2])))
print(json.dumps({"code": code, "loaded": loaded, "usage": "usage:" in out.getvalue()}))
"""

# data_pipeline/synth.py imports PyAV and pyarrow at its top (LABEL_SCHEMA is built at
# import); it is being edited for issue 17, so its imports move there, not here.
PENDING = {"synth": "data_pipeline/synth.py imports av and pyarrow at module level"}


def _cases():
    for name in sorted(SUBCOMMANDS):
        marks = [pytest.mark.xfail(reason=PENDING[name], strict=False)] if name in PENDING else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", _cases())
def test_help_imports_nothing_heavy(name):
    run = subprocess.run(
        [sys.executable, "-c", PROBE, name, json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["code"] == 0 and result["usage"], result
    assert result["loaded"] == [], f"catneuron {name} --help imports {result['loaded']}"


def test_dispatcher_imports_nothing_heavy():
    code = (
        "import sys, catneuron.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in %r))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code % (HEAVY,)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


HELP = """
import contextlib, io, sys
from catneuron.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main([sys.argv[1], "--help"])
    except SystemExit:
        pass
print(out.getvalue())
"""


def option_entries(help_text: str) -> list[str]:
    """The help of each argument, joined across its wrapped lines: an entry starts at a
    line indented by two spaces (`  -x, --xx X  text` or a positional's name)."""
    entries: list[str] = []
    for line in help_text.splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            entries.append(line.strip())
        elif line.startswith("   ") and entries:
            entries[-1] += " " + line.strip()
        elif entries and not line.strip():
            entries.append("")
    return [e for e in entries if e]


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_help_says_each_default_once(name):
    """No option reads "(default: all) (default: None)": its default is said at most once,
    in its own words or argparse's."""
    run = subprocess.run(
        [sys.executable, "-c", HELP, name], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    entries = option_entries(run.stdout)
    assert any(e.startswith("-h, --help") for e in entries), run.stdout
    twice = [e for e in entries if e.lower().count("default") > 1]
    assert not twice, f"catneuron {name} --help says a default twice:\n" + "\n".join(twice)
    empty = [e for e in entries if "(default: None)" in e or "(default: False)" in e]
    assert not empty, f"catneuron {name} --help shows an empty default:\n" + "\n".join(empty)
