"""`catneuron cluster up | status | down`: a local Ray head that stays up between commands.

`up` runs `ray start --head` on 127.0.0.1 only (GCS, raylet, dashboard and job API all
bind loopback; Ray has no authentication beyond loopback here, so nothing listens
outward; Ray's token authentication is on, its token in ~/.ray/auth_token) and records the cluster in ~/.catneuron/cluster.json ($CATNEURON_CLUSTER_FILE).
`catneuron shard`, `train --ray`, `submit`, the evals' Ray paths and the demo find that
record when given no `--address` (or `--address auto`) and join the cluster instead of
starting their own, which saves Ray's start (seconds) on every command. An address in
$CATNEURON_RAY_ADDRESS comes before the record.

`down` ends exactly the processes of that cluster (each carries a marker variable; the
agents the raylet starts are found as its descendants), never other Ray instances on the
machine, as `ray stop` would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from data_pipeline.cli_help import HelpFormatter

MARKER = "CATNEURON_RAY_SESSION"  # the same variable as data_pipeline.ray_cluster.MARKER


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port on 127.0.0.1")


def _ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="catneuron cluster",
        description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="{up,status,down}")
    up = sub.add_parser(
        "up",
        help="start the head (a no-op when it already runs)",
        formatter_class=HelpFormatter,
    )
    up.add_argument(
        "--num-cpus", type=int, default=os.cpu_count() or 1, help="CPUs the head offers"
    )
    up.add_argument("--port", type=int, default=6379, help="GCS port (a free one if taken)")
    up.add_argument(
        "--dashboard-port",
        type=int,
        default=8265,
        help="dashboard/job API port (a free one if taken)",
    )
    up.add_argument("--object-store-mb", type=int, default=512, help="object store size in MiB")
    sub.add_parser("status", help="say whether it runs, and where")
    sub.add_parser("down", help="stop it and remove its record")
    return p.parse_args(argv)


def _pids_of(token: str) -> list[int]:
    """The cluster's processes: those carrying the marker, and all their descendants."""
    import psutil

    roots, children = [], {}
    for process in psutil.process_iter(["pid", "ppid"]):
        children.setdefault(process.info["ppid"], []).append(process.info["pid"])
        try:
            if process.environ().get(MARKER) == token:
                roots.append(process.pid)
        except psutil.Error:
            pass
    found, frontier = set(roots), list(roots)
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in found:
                found.add(child)
                frontier.append(child)
    found.discard(os.getpid())
    return sorted(found)


def up(args: argparse.Namespace) -> int:
    from data_pipeline.ray_cluster import read_state, running_cluster, state_file

    state = running_cluster()
    if state:
        print(f"catneuron cluster: already up at {state['gcs_address']} ({state['dashboard_url']})")
        return 0
    stale = read_state()
    if stale and stale.get("token"):
        _stop(stale["token"])
    token = uuid.uuid4().hex
    port, dashboard = _free_port(args.port), _free_port(args.dashboard_port)
    env = {
        **os.environ,
        # jobs run `python -m catneuron ...`: this interpreter, whatever PATH says
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
        "RAY_AUTH_MODE": "token",  # Ray's token authentication, as for a one-shot cluster
        MARKER: token,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node IP stays 127.0.0.1; servers bind it
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    command = [
        _ray_executable(), "start", "--head",
        "--node-ip-address", "127.0.0.1",
        "--port", str(port),
        "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard),
        "--include-dashboard", "true",
        # the job agent's HTTP port: Ray's fixed default (52365) is taken by any other head
        "--dashboard-agent-listen-port", str(_free_port(0)),
        "--num-cpus", str(args.num_cpus),
        "--object-store-memory", str(args.object_store_mb * 2**20),
        "--disable-usage-stats",
    ]  # fmt: skip
    started = time.perf_counter()
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        subprocess.run(  # ~/.ray/auth_token, made once if missing (drivers read it there)
            [_ray_executable(), "get-auth-token", "--generate"], env=env, capture_output=True
        )
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        tail = (run.stderr or run.stdout).strip().splitlines()[-5:]
        print("catneuron cluster: ray start failed:\n  " + "\n  ".join(tail), file=sys.stderr)
        _stop(token)
        return 1
    state = {
        "gcs_address": f"127.0.0.1:{port}",
        "dashboard_url": f"http://127.0.0.1:{dashboard}",
        "num_cpus": args.num_cpus,
        "auth": "token",
        "token": token,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = Path(state_file())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)
    print(
        f"catneuron cluster: up at {state['gcs_address']} in {time.perf_counter() - started:.1f} s; "
        f"dashboard and job API {state['dashboard_url']}; record {path}"
    )
    print(
        "  catneuron shard/train --ray/submit/demo join it; plain Ray: "
        f"RAY_AUTH_MODE=token ray job submit --address {state['dashboard_url']} ...\n"
        "  stop it: catneuron cluster down"
    )
    return 0


def status(args: argparse.Namespace) -> int:
    from data_pipeline.ray_cluster import _answers, read_state, state_file

    state = read_state()
    if not state:
        print(f"catneuron cluster: down (no record at {state_file()})")
        return 1
    gcs = _answers(state["gcs_address"])
    api = _answers(state["dashboard_url"])
    if not gcs:
        print(f"catneuron cluster: down (recorded at {state['gcs_address']}, not answering)")
        return 1
    pids = _pids_of(state["token"]) if state.get("token") else []
    print(
        f"catneuron cluster: up at {state['gcs_address']}, {state['num_cpus']} CPUs, "
        f"since {state['started']}, {len(pids)} processes\n"
        f"  dashboard and job API: {state['dashboard_url']} ({'answering' if api else 'NOT answering'})"
    )
    return 0


def _stop(token: str, grace: float = 3.0) -> int:
    import psutil

    processes = []
    for pid in _pids_of(token):
        with contextlib.suppress(psutil.Error):
            processes.append(psutil.Process(pid))
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=grace)
    return len(processes)


def down(args: argparse.Namespace) -> int:
    from data_pipeline.ray_cluster import read_state, state_file

    state = read_state()
    if not state:
        print(f"catneuron cluster: nothing to stop (no record at {state_file()})")
        return 0
    n = _stop(state["token"]) if state.get("token") else 0
    Path(state_file()).unlink(missing_ok=True)
    print(f"catneuron cluster: stopped {state['gcs_address']} ({n} processes)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return {"up": up, "status": status, "down": down}[args.action](args)


if __name__ == "__main__":
    raise SystemExit(main())
