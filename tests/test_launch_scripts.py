"""launch/ and cluster/: every script parses and passes shellcheck, every cluster file has what
its tool requires, and the scripts assemble the commands they promise (checked with a
stand-in catneuron that prints its arguments, and once for real with `--dry-run`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cluster_support import REPO, quiet_env, tiny_config, write_shards

SCRIPTS = sorted((REPO / "launch").glob("*.sh")) + sorted(
    (REPO / "launch" / "slurm").glob("*.sbatch")
)
RAY_UP = [REPO / "cluster" / "ray" / "aws.yaml", REPO / "cluster" / "ray" / "gcp.yaml"]
KUBERAY = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))


def test_the_expected_scripts_and_cluster_files_exist():
    names = {p.relative_to(REPO).as_posix() for p in [*SCRIPTS, *RAY_UP, *KUBERAY]}
    assert {
        "launch/train.sh", "launch/train_multinode.sh", "launch/submit.sh", "launch/tensorboard.sh",
        "launch/slurm/train.sbatch", "launch/slurm/ray_cluster.sbatch", "cluster/ray/aws.yaml",
        "cluster/ray/gcp.yaml", "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob-shard.yaml",
        "cluster/kuberay/rayjob-train.yaml",
    } <= names  # fmt: skip
    assert all(os.access(p, os.X_OK) for p in SCRIPTS if p.name != "common.sh")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_parses_the_script(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(
    shutil.which("shellcheck") is None,
    reason="shellcheck is not installed (Debian package shellcheck)",
)
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_finds_nothing(script):
    done = subprocess.run(
        ["shellcheck", "-x", "--shell=bash", str(script)],
        cwd=script.parent, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout


# --------------------------------------------------------------------------- ray up configs


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_config_is_valid_for_ray(path):
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, schema)  # the schema `ray up` itself validates against
    assert config["provider"]["type"] == path.stem
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    assert all(
        0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in workers.values()
    )
    gpu = workers["gpu_worker"]["node_config"]
    assert gpu.get("guestAccelerators") or re.match(r"(g|p)\d", gpu.get("InstanceType", ""))
    # catneuron installed on every node; data and venvs never synced
    assert any("pip install" in c and "catneuron" in c for c in config["setup_commands"])
    assert {"runs/", "shards/", ".venv/"} <= set(config["rsync_exclude"])
    # the dashboard on loopback, token authentication on, on every node
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in config["file_mounts"]


# --------------------------------------------------------------------------- KubeRay


def _containers(template: dict) -> list[dict]:
    return template["template"]["spec"]["containers"]


def _check_cluster_spec(spec: dict) -> None:
    """The fields KubeRay's RayCluster spec requires, and catneuron's security defaults."""
    major, minor, *_ = (int(x) for x in spec["rayVersion"].split("."))
    assert (major, minor) >= (2, 52), "token authentication needs Ray 2.52+"
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert isinstance(head["rayStartParams"], dict)
    assert _containers(head) and all(c["image"] and c["name"] for c in _containers(head))
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(c["image"] for c in _containers(group))
        mounts = {m["mountPath"] for c in _containers(group) for m in c.get("volumeMounts", [])}
        assert "/shared" in mounts


def test_raycluster_manifest():
    documents = list(
        yaml.safe_load_all((REPO / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    )
    by_kind = {d["kind"]: d for d in documents}
    cluster = by_kind["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["name"]
    _check_cluster_spec(cluster["spec"])
    policy = by_kind["NetworkPolicy"]["spec"]
    label = {"ray.io/cluster": cluster["metadata"]["name"]}
    assert policy["podSelector"]["matchLabels"] == label
    assert [rule["from"][0]["podSelector"]["matchLabels"] for rule in policy["ingress"]] == [label]
    assert by_kind["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("name", ["rayjob-shard", "rayjob-train"])
def test_rayjob_manifest_runs_a_real_catneuron_command(name):
    job = yaml.safe_load((REPO / "cluster" / "kuberay" / f"{name}.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(spec["rayClusterSpec"])
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "catneuron"]
    command, rest = argv[3], argv[4:]
    # the entrypoint's options exist: parsed by the subcommand's own parser
    if command == "shard":
        from data_pipeline.shard import parse_args

        args = parse_args(rest)
        assert args.address == "auto"
    else:
        from pretrain.ray_train import parse_args

        assert command == "train" and "--ray" in rest
        args = parse_args([a for a in rest if a != "--ray"])
        assert (
            args.num_workers == 4 and args.max_failures == 3 and args.storage_path == "/shared/runs"
        )
        gpu_group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
        assert gpu_group["replicas"] == args.num_workers
        assert _containers(gpu_group)[0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_hostfile_example_reads_as_deepspeed_reads_it():
    from deepspeed.launcher.runner import fetch_hostfile

    hosts = fetch_hostfile(str(REPO / "cluster" / "hostfile.example"))
    assert dict(hosts) == {"node-0": 8, "node-1": 8}


# --------------------------------------------------------------------------- what the scripts run


@pytest.fixture
def echo_catneuron(tmp_path):
    """A stand-in catneuron that prints its arguments as JSON."""
    stand_in = tmp_path / "catneuron-args"
    stand_in.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    stand_in.chmod(0o755)
    return str(stand_in)


def launch(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(REPO / "launch" / script), *args],
        capture_output=True, text=True, timeout=120, env=quiet_env(**env),
    )  # fmt: skip


def test_train_sh_defaults_come_first_so_that_the_users_options_win(echo_catneuron):
    done = launch(
        "train.sh", "run.yaml", "data.batch_size=4", "--num-gpus", "2", CATNEURON=echo_catneuron
    )
    assert done.returncode == 0, done.stderr
    argv = json.loads(done.stdout)
    assert argv == [
        "train", "--num-gpus", "-1", "--max-restarts", "3", "--master-port", "29500",
        "run.yaml", "data.batch_size=4", "--num-gpus", "2",
    ]  # fmt: skip
    assert launch("train.sh").returncode == 2


def test_train_multinode_no_ssh_takes_the_node_rank_and_master_from_the_environment(
    tmp_path, echo_catneuron
):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\ngpu-a slots=4\ngpu-b slots=4\n")
    done = launch(
        "train_multinode.sh", "--hostfile", str(hostfile), "--no-ssh", "run.yaml",
        CATNEURON=echo_catneuron, SLURM_NODEID="1", MASTER_PORT="12345",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    argv = json.loads(done.stdout)
    assert argv[argv.index("--node-rank") + 1] == "1"
    assert argv[argv.index("--master-addr") + 1] == "gpu-a"
    assert argv[argv.index("--master-port") + 1] == "12345"
    assert argv[argv.index("--max-restarts") + 1] == "0"
    missing = launch(
        "train_multinode.sh",
        "--hostfile",
        str(hostfile),
        "--no-ssh",
        "run.yaml",
        CATNEURON=echo_catneuron,
        SLURM_NODEID="",
        NODE_RANK="",
    )
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert "--node-rank" in missing.stderr
    if shutil.which("pdsh") is None:
        ssh = launch(
            "train_multinode.sh", "--hostfile", str(hostfile), "run.yaml", CATNEURON=echo_catneuron
        )
        assert ssh.returncode == 2 and "pdsh: not found" in ssh.stderr


def test_tensorboard_binds_loopback_unless_told(tmp_path, echo_catneuron):
    run = tmp_path / "run"
    run.mkdir()
    done = launch("tensorboard.sh", str(run), TENSORBOARD=echo_catneuron)
    assert json.loads(done.stdout) == [
        "--logdir",
        str(run),
        "--host",
        "127.0.0.1",
        "--port",
        "6006",
    ]
    wide = launch(
        "tensorboard.sh",
        str(run),
        "--host",
        "10.0.0.5",
        "--port",
        "7007",
        TENSORBOARD=echo_catneuron,
    )
    assert json.loads(wide.stdout) == ["--logdir", str(run), "--host", "10.0.0.5", "--port", "7007"]
    assert (
        launch("tensorboard.sh", str(tmp_path / "nope"), TENSORBOARD=echo_catneuron).returncode == 2
    )


def test_submit_without_a_command_is_a_one_line_error():
    done = launch("submit.sh", "--address", "http://127.0.0.1:9")
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == "catneuron submit: no command to submit (catneuron submit [options] -- COMMAND ...)"
    )


def test_train_sh_runs_the_real_catneuron_train(tmp_path):
    """Through the repository's own catneuron: the options train.sh passes exist."""
    config = tiny_config(tmp_path, write_shards(tmp_path / "data", n_shards=2, per_shard=4), "dry")
    done = launch("train.sh", str(config), "--dry-run", CATNEURON=f"{sys.executable} -m catneuron")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "-m pretrain.ds_runner --master_port 29500" in done.stdout
