"""Stand-ins for `sbatch`, `srun` and `scontrol` that run a Slurm job's nodes as processes here.

`install(bin_dir, state_dir)` writes three executables. The job's node list comes from
`STANDIN_NODELIST` (comma separated; `scontrol show hostnames` expands it the same way).
- `sbatch SCRIPT ARGS`: runs the batch script now (not queued) with the job's SLURM_*
  environment, its pid in `state/batch.pid`; when the script asked for a requeue, runs it
  again with SLURM_RESTART_COUNT + 1, as Slurm would once the job is scheduled again.
- `srun [--nodes N] [-w NODE] [--kill-on-bad-exit=1] CMD`: one task per node, each with
  SLURM_NODEID / SLURM_PROCID / SLURMD_NODENAME, each launch logged to `state/srun.jsonl`;
  forwards SIGTERM/SIGINT to the tasks; with --kill-on-bad-exit a failed task ends the others.
- `scontrol show hostnames LIST` and `scontrol requeue JOBID` (appended to `state/requeue`).
"""

from __future__ import annotations

import sys
from pathlib import Path

SRUN = r"""
import json, os, signal, subprocess, sys, time
args, nodes, only, kill_on_bad = sys.argv[1:], os.environ["SLURM_JOB_NODELIST"].split(","), None, False
while args and args[0].startswith("-"):
    flag = args.pop(0)
    if flag in ("-w", "--nodelist"):
        only = args.pop(0)
    elif flag.startswith("--kill-on-bad-exit"):
        kill_on_bad = not flag.endswith("=0")
    elif flag in ("--nodes", "-N", "--ntasks", "-n", "--ntasks-per-node"):
        args.pop(0)
selected = [(i, n) for i, n in enumerate(nodes) if only is None or n == only][: 1 if only else None]
tasks = []
for proc, (node_id, node) in enumerate(selected):
    env = dict(os.environ, SLURM_NODEID=str(node_id), SLURM_PROCID=str(proc), SLURMD_NODENAME=node,
               SLURM_STEP_NUM_NODES=str(len(selected)))
    with open(os.path.join(STATE, "srun.jsonl"), "a") as log:
        log.write(json.dumps({"node": node, "node_id": node_id, "argv": args}) + "\n")
    tasks.append(subprocess.Popen(args, env=env, start_new_session=True))

def end(tasks, sig):
    for t in tasks:
        if t.poll() is None:
            try:
                os.killpg(t.pid, sig)
            except ProcessLookupError:
                pass

def forward(signum, frame):
    end(tasks, signal.SIGTERM)
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
code = 0
while any(t.poll() is None for t in tasks):
    failed = [t.returncode for t in tasks if t.returncode not in (None, 0)]
    if failed and kill_on_bad:
        end(tasks, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while any(t.poll() is None for t in tasks) and time.monotonic() < deadline:
            time.sleep(0.1)
        end(tasks, signal.SIGKILL)
        break
    time.sleep(0.1)
for t in tasks:
    t.wait()
failed = [t.returncode for t in tasks if t.returncode != 0]
code = failed[0] if failed else 0
sys.exit(code if code >= 0 else 128 - code)
"""

SCONTROL = r"""
import sys
if sys.argv[1:3] == ["show", "hostnames"]:
    print("\n".join(sys.argv[3].split(",")))
elif sys.argv[1] == "requeue":
    with open(STATE + "/requeue", "a") as f:
        f.write(sys.argv[2] + "\n")
else:
    sys.exit("scontrol stand-in: unsupported: " + " ".join(sys.argv[1:]))
"""

SBATCH = r"""
import os, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):
    args.pop(0)
requeue = os.path.join(STATE, "requeue")
nodes = os.environ["STANDIN_NODELIST"]
restarts = 0
while True:
    before = open(requeue).read().count("\n") if os.path.exists(requeue) else 0
    env = dict(os.environ, SLURM_JOB_ID=os.environ.get("STANDIN_JOB_ID", "4242"),
               SLURM_JOB_NODELIST=nodes, SLURM_JOB_NUM_NODES=str(len(nodes.split(","))),
               SLURM_SUBMIT_DIR=os.getcwd(), SLURM_RESTART_COUNT=str(restarts))
    batch = subprocess.Popen(["bash", *args], env=env)
    with open(os.path.join(STATE, "batch.pid"), "w") as f:
        f.write(str(batch.pid))
    code = batch.wait()
    after = open(requeue).read().count("\n") if os.path.exists(requeue) else 0
    if after == before or restarts >= 3:
        sys.exit(code if code >= 0 else 128 - code)
    restarts += 1
"""


def install(bin_dir: Path, state_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for name, body in {"srun": SRUN, "scontrol": SCONTROL, "sbatch": SBATCH}.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\nSTATE = {str(state_dir)!r}\n{body}")
        path.chmod(0o755)
