"""Two hosts with their own addresses: network namespaces joined by a veth pair, one
`catneuron train --node-rank R` (DeepSpeed's --no_ssh mode) in each, meeting only over the
"network" between them, as two machines of a cluster would.

Needs root and iproute2 (`ip netns`); skipped with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys

import pytest
from cluster_support import REPO, log_records, quiet_env, tiny_config, write_shards

pytestmark = pytest.mark.slow


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def two_hosts():
    """Namespaces `cnA<pid>`/`cnB<pid>` at 10.231.0.1 and 10.231.0.2, veth between them."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 ('ip') is not installed")
    tag = str(os.getpid() % 100000)
    hosts = [(f"cnA{tag}", f"va{tag}", "10.231.0.1"), (f"cnB{tag}", f"vb{tag}", "10.231.0.2")]
    probe = _ip("netns", "add", hosts[0][0], check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {probe.stderr.strip()}")
    try:
        _ip("netns", "add", hosts[1][0])
        _ip("link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1])
        for namespace, device, address in hosts:
            _ip("link", "set", device, "netns", namespace)
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", device)
            _ip("-n", namespace, "link", "set", device, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
        yield hosts
    finally:
        for namespace, _, _ in hosts:
            pids = _ip("netns", "pids", namespace, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", namespace, check=False)


def test_two_nodes_in_network_namespaces_train_together(two_hosts, tmp_path):
    config = tiny_config(
        tmp_path,
        write_shards(tmp_path / "data"),
        "netns",
        stages={"steps": 10},
        logging={"every": 5},
    )
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{address} slots=1\n" for _, _, address in two_hosts))
    master = two_hosts[0][2]
    nodes = []
    for rank, (namespace, device, _) in enumerate(two_hosts):
        # gloo would otherwise take the address of the machine's hostname, outside the namespace
        env = quiet_env(GLOO_SOCKET_IFNAME=device)
        command = ["ip", "netns", "exec", namespace, sys.executable, "-m", "catneuron", "train"]
        command += [str(config), "--hostfile", str(hostfile), "--node-rank", str(rank)]
        command += ["--master-addr", master, "--master-port", "29500"]
        nodes.append(
            subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "on 2 rank(s)" in outputs[0]
    run = tmp_path / "runs" / "netns"
    assert [r["step"] for r in log_records(run)] == [5, 10]
    assert (run / "exports" / "step_10" / "model.safetensors").is_file()
