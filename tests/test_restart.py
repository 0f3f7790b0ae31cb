"""`catneuron train --max-restarts N`: the restart loop, on stand-in launchers and on the real one.

The fast tests drive `pretrain.restart.run_with_restarts` with small Python commands that
exit the way the DeepSpeed launcher does; the slow one SIGKILLs a real training rank.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from cluster_support import (
    free_port,
    latest_step,
    log_records,
    quiet_env,
    tiny_config,
    wait_for,
    write_shards,
)

from pretrain.restart import describe_exit, run_with_restarts


def launcher(tmp_path: Path, codes: list[int]) -> list[str]:
    """A stand-in launcher that exits with `codes[i]` on its i-th run (counted in a file)."""
    script = tmp_path / "launcher.py"
    script.write_text(
        "import pathlib, sys\n"
        f"count = pathlib.Path({str(tmp_path / 'runs.txt')!r})\n"
        "n = len(count.read_text()) if count.exists() else 0\n"
        "count.write_text('x' * (n + 1))\n"
        f"codes = {codes!r}\n"
        "sys.exit(codes[min(n, len(codes) - 1)])\n"
    )
    return [sys.executable, str(script)]


def launches(tmp_path: Path) -> int:
    return len((tmp_path / "runs.txt").read_text())


def test_a_dead_rank_is_relaunched_from_the_latest_checkpoint(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "latest").write_text("step_20")
    lines: list[str] = []
    code = run_with_restarts(
        launcher(tmp_path, [247, 1, 0]), dict(os.environ), 3, checkpoints, lines.append
    )
    assert code == 0 and launches(tmp_path) == 3
    assert len(lines) == 2
    assert re.fullmatch(
        r"catneuron train: launcher exit status 247 \(a rank was killed by SIGKILL\) after \d+ s; "
        r"restart 1 of 3, resuming from checkpoint step_20 \(step 20\)",
        lines[0],
    ), lines[0]
    assert lines[1].startswith("catneuron train: launcher exit status 1 after")
    assert lines[1].endswith("restart 2 of 3, resuming from checkpoint step_20 (step 20)")


def test_restarts_are_bounded(tmp_path):
    lines: list[str] = []
    code = run_with_restarts(launcher(tmp_path, [1]), dict(os.environ), 2, tmp_path, lines.append)
    assert code == 1 and launches(tmp_path) == 3  # the first run and 2 restarts
    assert "resuming from the start (no checkpoint yet)" in lines[0]
    assert lines[-1].endswith("2 restart(s) used up, giving up")


@pytest.mark.parametrize(("code", "reason"), [(2, "a config error"), (3, "a non-finite loss")])
def test_config_errors_and_non_finite_losses_are_not_retried(tmp_path, code, reason):
    lines: list[str] = []
    assert (
        run_with_restarts(
            launcher(tmp_path, [code, 0]), dict(os.environ), 5, tmp_path, lines.append
        )
        == code
    )
    assert launches(tmp_path) == 1
    assert lines == [lines[0]] and lines[0].endswith(f": {reason}, not restarting")


def test_exit_status_in_words():
    assert describe_exit(-15) == "the launcher was killed by SIGTERM"
    assert describe_exit(247) == "launcher exit status 247 (a rank was killed by SIGKILL)"
    assert describe_exit(1) == "launcher exit status 1"


def test_sigterm_stops_the_ranks_and_the_loop(tmp_path):
    """A stopped job (scancel, Ctrl-C) is not a failure to cure: the group gets the signal, no relaunch."""
    child = tmp_path / "child.py"
    child.write_text(
        "import pathlib, time\n"
        f"p = pathlib.Path({str(tmp_path / 'starts')!r})\n"
        "p.write_text(p.read_text() + 'x' if p.exists() else 'x')\n"
        "time.sleep(60)\n"
    )
    wrapper = (
        "import sys, os\n"
        "from pretrain.restart import run_with_restarts\n"
        f"sys.exit(run_with_restarts([sys.executable, {str(child)!r}], dict(os.environ), 5, "
        f"__import__('pathlib').Path({str(tmp_path)!r})))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", wrapper], env=quiet_env())
    wait_for(lambda: (tmp_path / "starts").exists(), 30, "the stand-in launcher")
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 10
    assert (tmp_path / "starts").read_text() == "x"


# --------------------------------------------------------------------------- the real launcher


def rank_processes(root: psutil.Process) -> dict[int, psutil.Process]:
    """Training ranks below `root`, by local rank (the launcher passes `--local_rank=N`)."""
    ranks = {}
    for process in root.children(recursive=True):
        try:
            cmdline = process.cmdline()
        except psutil.Error:
            continue
        if "pretrain.train" in cmdline:
            flag = next((a for a in cmdline if a.startswith("--local_rank=")), None)
            if flag:
                ranks[int(flag.split("=")[1])] = process
    return ranks


@pytest.mark.slow
def test_sigkilled_rank_is_restarted_and_the_run_finishes(tmp_path):
    shards = write_shards(tmp_path / "data")
    config = tiny_config(
        tmp_path,
        shards,
        "restart",
        stages={"steps": 30},
        checkpoint={"every": 10, "keep_last": 2},
        logging={"every": 1},
    )
    run = tmp_path / "runs" / "restart"
    log = (tmp_path / "train.log").open("w")
    command = [sys.executable, "-m", "catneuron", "train", str(config), "--num-gpus", "2"]
    command += ["--max-restarts", "2", "--master-port", str(free_port())]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=quiet_env())
    try:
        wait_for(lambda: latest_step(run) == 10, 240, "checkpoint step_10")
        victim = rank_processes(psutil.Process(process.pid))[1]
        victim.send_signal(signal.SIGKILL)
        killed_at = time.time()
        checkpoint_at_kill = latest_step(run)
        steps_at_kill = max(r["step"] for r in log_records(run))
        assert process.wait(timeout=240) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    output = (tmp_path / "train.log").read_text()
    restarts = re.findall(r"catneuron train: (.*); restart (\d) of 2, resuming (.*)", output)
    assert len(restarts) == 1, output[-3000:]
    why, _, where = restarts[0]
    # DeepSpeed's launch.py reports the first failed rank its 1 s poll finds: the killed
    # rank (247, named as SIGKILL) or the survivor, whose gloo peer vanished (exit 1).
    pattern = r"launcher exit status (247 \(a rank was killed by SIGKILL\)|1) after \d+ s"
    assert re.fullmatch(pattern, why), why
    assert where == f"from checkpoint step_{checkpoint_at_kill} (step {checkpoint_at_kill})"
    assert (run / "exports" / "step_30" / "model.safetensors").is_file()
    records = log_records(run)
    resumed = [r for r in records if r["time"] > killed_at]
    # steps since the last checkpoint were redone; none before it
    assert resumed[0]["step"] == checkpoint_at_kill + 1
    assert [r["step"] for r in resumed] == list(range(checkpoint_at_kill + 1, 31))
    lost = steps_at_kill - checkpoint_at_kill
    assert 0 <= lost < 10
    print(
        f"\nrestart: {lost} step(s) lost; first step after the kill {resumed[0]['time'] - killed_at:.1f} s later"
    )


@pytest.mark.parametrize(
    ("error", "code"), [("non_finite", 3), ("config", 2)], ids=["non-finite", "config-error"]
)
def test_ray_train_workers_report_final_failures_instead_of_raising(monkeypatch, error, code):
    """Ray Train retries whatever a worker raises; these two must end the run, with their code."""
    import ray.train

    from pretrain import ray_train
    from pretrain import train as trainer
    from pretrain.config import ConfigError

    def failing_train(config):
        raise (
            trainer.NonFiniteLoss("non-finite loss at step 7")
            if error == "non_finite"
            else ConfigError("bad")
        )

    class Context:
        def get_world_rank(self) -> int:
            return 0

    reports: list[dict] = []
    monkeypatch.setattr(trainer, "train", failing_train)
    monkeypatch.setattr(ray.train, "report", reports.append)
    monkeypatch.setattr(ray.train, "get_context", Context)
    monkeypatch.setattr("pretrain.config.from_dict", lambda raw: raw)
    ray_train.train_worker({"config": {}})  # returns: nothing raised for Ray to retry
    assert [r["exit_code"] for r in reports] == [code]
