"""`catneuron submit`: run a catneuron command as a job on a running Ray cluster.

This is `ray job submit` through Ray's job API (`JobSubmissionClient`): the working
directory travels as the job's runtime environment, without run directories, shards or
virtual environments (Ray refuses large working directories, and they are data, not
code). The job's driver runs on the head node, where `catneuron shard` and
`catneuron train --ray` join the cluster they run in. The command prints the job id and
the commands that follow its logs and stop it; `--wait` follows the logs itself and
exits 0 only when the job SUCCEEDED.

Ray's dashboard (the job API) listens on 127.0.0.1:8265 of the head node by default:
reach it over an ssh tunnel (`ssh -L 8265:127.0.0.1:8265 HEAD`), never by opening it to
a network. Token authentication is used as Ray finds it (`RAY_AUTH_TOKEN`,
`RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from data_pipeline.cli_help import RawHelpFormatter

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [
    "runs/",
    "shards/",
    ".venv/",
    "venv/",
    ".git/",
    "demo/",
    "__pycache__/",
    "*.tar",
    "*.egg-info/",
    ".pytest_cache/",
    ".ruff_cache/",
]
"""Left out of the uploaded working directory (gitignore syntax, as Ray reads it)."""
JOIN_CLUSTER = {"shard": "--address"}
"""Subcommands that would start a local Ray instance unless told which cluster to join."""
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="catneuron submit",
        description=__doc__.splitlines()[0],
        formatter_class=RawHelpFormatter,
        epilog="examples:\n"
        "  catneuron submit -- shard /shared/videos --out /shared/frames\n"
        "  catneuron submit --wait -- train configs/conv_ae.yaml --ray --num-workers 8 "
        "--storage-path /shared/runs",
    )
    p.add_argument(
        "--address",
        default=None,
        help="the cluster's dashboard (job API) address; default $RAY_ADDRESS, else the "
        f"`catneuron cluster up` head's, else {DEFAULT_ADDRESS} (the local tunnel)",
    )
    p.add_argument(
        "--working-dir",
        type=Path,
        default=Path("."),
        help="directory shipped as the job's working directory (the command runs inside it)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        help=f"more paths to leave out of the working directory (always: {' '.join(EXCLUDES)})",
    )
    p.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="environment variables"
    )
    p.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks one)")
    p.add_argument(
        "--wait", action="store_true", help="follow the logs; exit 0 only if the job succeeded"
    )
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="a catneuron subcommand and its arguments (or any command), after --",
    )
    return p.parse_args(argv)


def entrypoint(command: list[str]) -> str:
    """The job's shell command: catneuron subcommands run as `python -m catneuron ...` from the
    uploaded directory, and those that take a cluster address join the job's cluster."""
    from catneuron.cli import SUBCOMMANDS

    if command and command[0] in SUBCOMMANDS:
        flag = JOIN_CLUSTER.get(command[0])
        if flag and not any(a == flag or a.startswith(flag + "=") for a in command):
            command = [*command, flag, "auto"]
        command = ["python", "-m", "catneuron", *command]
    return shlex.join(command)


def _fail(message: str) -> int:
    print(f"catneuron submit: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        return _fail("no command to submit (catneuron submit [options] -- COMMAND ...)")
    if not args.working_dir.is_dir():
        return _fail(f"{args.working_dir}: no such working directory")
    env_vars = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            return _fail(f"--env {item}: not of the form KEY=VALUE")
        env_vars[key] = value

    if args.address is None:
        from data_pipeline.ray_cluster import loopback_client_env, running_cluster

        state = running_cluster()
        args.address = os.environ.get("RAY_ADDRESS") or (
            state["dashboard_url"] if state else DEFAULT_ADDRESS
        )
        if state and not os.environ.get("RAY_ADDRESS"):
            loopback_client_env()  # its token, before Ray is imported
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(args.address)
    except Exception as e:  # ConnectionError, or Ray's own on a bad token
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return _fail(f"{args.address}: cannot reach the Ray job API ({first})")
    runtime_env = {
        "working_dir": str(args.working_dir.resolve()),
        "excludes": [*EXCLUDES, *args.exclude],
    }
    if env_vars:
        runtime_env["env_vars"] = env_vars
    job_id = client.submit_job(
        entrypoint=entrypoint(command), runtime_env=runtime_env, submission_id=args.submission_id
    )
    where = f"--address {args.address}"
    print(f"submitted job {job_id} to {args.address}: {entrypoint(command)}")
    print(f"  follow: ray job logs {where} --follow {job_id}")
    print(f"  status: ray job status {where} {job_id}")
    print(f"  stop:   ray job stop {where} {job_id}", flush=True)
    if not args.wait:
        return 0
    return follow(client, job_id)


def follow(client, job_id: str, poll_s: float = 1.0) -> int:
    """Print the job's log as it grows until the job ends; 0 only if it SUCCEEDED."""
    shown = 0
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[shown:])
        sys.stdout.flush()
        shown = len(logs)
        if status in TERMINAL:
            print(f"job {job_id}: {status}")
            return 0 if status == "SUCCEEDED" else 1
        time.sleep(poll_s)


if __name__ == "__main__":
    raise SystemExit(main())
