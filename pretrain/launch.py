"""`catneuron train`: start `python -m pretrain.train` on every rank through the DeepSpeed launcher.

One machine: `--num-gpus N` ranks on the local GPUs, or N CPU ranks with gloo where there
is no GPU. A cluster: `--hostfile` (the DeepSpeed launcher reaches the nodes over ssh),
or one `catneuron train ... --node-rank R --master-addr HOST` per node where ssh is not
available (the launcher's `--no_ssh` mode; every node gets the same hostfile).

SIGTERM, SIGUSR1 or Ctrl-C stop the run at a step boundary with a checkpoint there and exit
75 (`pretrain.stop.EXIT_PREEMPTED`); the same command resumes at that step.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
from pathlib import Path

from data_pipeline.cli_help import RawHelpFormatter
from pretrain.config import ConfigError, describe, load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="catneuron train",
        description="Pretrain a model from frame shards with DeepSpeed on every local device (or CPU ranks).",
        formatter_class=RawHelpFormatter,
        epilog="config keys (YAML sections, or key.sub=value on the command line):\n" + describe(),
    )
    parser.add_argument("config", type=Path, help="run config YAML (see configs/)")
    parser.add_argument(
        "overrides", nargs="*", help="key.sub=value overrides, values parsed as YAML"
    )
    parser.add_argument(
        "--num-gpus", type=int, default=-1, help="ranks per node (GPUs, or CPU ranks); -1: all"
    )
    parser.add_argument(
        "--num-nodes", type=int, default=-1, help="nodes to use from the hostfile; -1: all"
    )
    parser.add_argument(
        "--hostfile", type=Path, default=None, help="DeepSpeed hostfile ('host slots=N' lines)"
    )
    parser.add_argument("--master-addr", default=None, help="address of node rank 0 (multi-node)")
    parser.add_argument(
        "--master-port",
        type=int,
        default=None,
        help="rendezvous port on node rank 0 (one machine: a free port; a cluster: 29500)",
    )
    parser.add_argument(
        "--node-rank",
        type=int,
        default=None,
        help="launch only this node's ranks, without ssh (run once per node)",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="relaunch the ranks from the latest checkpoint when one dies, up to N times"
        " (config errors and non-finite losses are never retried); with --ray: Ray Train's max_failures",
    )
    parser.add_argument(
        "--ray",
        action="store_true",
        help="train on a Ray cluster with Ray Train instead (its options: python -m pretrain.ray_train --help)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the launcher command and exit"
    )
    return parser.parse_intermixed_args(argv)


def launcher_command(args: argparse.Namespace) -> list[str]:
    """The `deepspeed` launcher invocation (as `python -m pretrain.ds_runner`, DeepSpeed's runner
    that reads a node launcher killed by a signal as a failure; same venv)."""
    port = args.master_port or (free_port() if args.hostfile is None else 29500)
    cmd = [sys.executable, "-u", "-m", "pretrain.ds_runner", "--master_port", str(port)]
    if args.hostfile is not None:
        cmd += ["--hostfile", str(args.hostfile)]
    if args.num_nodes > 0:
        cmd += ["--num_nodes", str(args.num_nodes)]
    if args.num_gpus > 0:
        cmd += ["--num_gpus", str(args.num_gpus)]
    if args.master_addr:
        cmd += ["--master_addr", args.master_addr]
    if args.node_rank is not None:
        cmd += ["--no_ssh", "--node_rank", str(args.node_rank)]
    cmd += ["--module", "pretrain.train", "--config", str(args.config.resolve()), *args.overrides]
    return cmd


def free_port() -> int:
    """A port free on this machine now, so that two jobs on one machine do not collide on 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(num_local_ranks: int) -> dict[str, str]:
    """The ranks' environment: the package importable from any working directory, and
    CPU threads split between local ranks so that N CPU ranks do not oversubscribe cores."""
    env = dict(os.environ)
    source_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(num_local_ranks, 1)))
    return env


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Ray Train has its own options (workers, storage); Ray is imported only on this path
    if "--ray" in argv:
        from pretrain import ray_train

        return ray_train.main([a for a in argv if a != "--ray"])
    args = parse_args(argv)
    from pretrain.preflight import check_all  # torch: only once the arguments parse

    try:  # fail here, once, instead of on every rank
        config = load_config(args.config, args.overrides)
        if args.node_rank is None or args.node_rank == 0:  # other nodes may not see node 0's disk
            check_all(config, args.num_gpus, args.hostfile)
    except ConfigError as e:
        print(f"catneuron train: {e}", file=sys.stderr)
        return 2
    if args.node_rank is not None and (args.hostfile is None or not args.master_addr):
        print("catneuron train: --node-rank needs --hostfile and --master-addr", file=sys.stderr)
        return 2
    cmd = launcher_command(args)
    print("+ " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    from pretrain.restart import run_with_restarts  # also forwards stop signals to the ranks

    checkpoints = config.run_dir / "checkpoints"
    return run_with_restarts(cmd, rank_environment(args.num_gpus), args.max_restarts, checkpoints)


if __name__ == "__main__":
    raise SystemExit(main())
