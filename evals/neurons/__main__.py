"""`python -m evals.neurons`: the same command as `catneuron neurons` (evals.neurons.cli)."""

from evals.neurons.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
