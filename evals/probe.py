"""`python -m evals.probe`: the same command as `catneuron probe` (evals.probes.cli).

Kept as a module of its own because `python -m evals.probe` is a public entry point;
the command itself lives in the probes room.
"""

from evals.probes.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
