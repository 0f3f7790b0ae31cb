"""The `catneuron` command: one console script, one module per subcommand.

Each subcommand is a module with `main(argv) -> int` that is also runnable as
`python -m <module>`; this dispatcher imports it only when asked, so that
`catneuron shard --help` never pays for importing torch or DeepSpeed.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": (
        "data_pipeline.synth",
        "write procedurally generated sample videos (with a planted cat face)",
    ),
    "shard": ("data_pipeline.shard", "decode videos on a Ray cluster into WebDataset frame shards"),
    "train": ("pretrain.launch", "pretrain a model from shards with the DeepSpeed launcher"),
    "export": ("pretrain.export", "write model.safetensors + model.json from a run's checkpoint"),
    "neurons": (
        "evals.neurons.cli",
        "top inputs, selectivity vs random weights, optimal stimuli, invariance, HTML report",
    ),
    "cluster": (
        "catneuron.cluster",
        "a local Ray head (dashboard, job API) that shard, train --ray, submit and demo reuse",
    ),
    "submit": ("catneuron.submit", "run a catneuron command as a job on a running Ray cluster"),
    "probe": (
        "evals.probes.cli",
        "linear probe, kNN, k-means and fine-tuning of an export, beside its baselines",
    ),
    "report": ("catneuron.report", "write RUN/report.html: curves, probe and neuron headlines"),
    "demo": (
        "catneuron.demo",
        "the cat-neuron experiment end to end: synth, shard, train, probe, neurons, report",
    ),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [
        "usage: catneuron <command> [options]   (catneuron <command> --help for its options)",
        "",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name in ("-V", "--version"):
        from catneuron import __version__

        print(__version__)
        return 0
    if name not in SUBCOMMANDS:
        print(f"catneuron: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(SUBCOMMANDS[name][0])
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:  # Ctrl-C while torch/Ray load, or outside a command's own handler
        print(f"catneuron {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
