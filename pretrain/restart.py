"""`catneuron train --max-restarts N`: relaunch the ranks from the latest checkpoint when one dies.

The DeepSpeed launcher kills every rank and exits non-zero as soon as one dies, and never
starts them again. This loop runs the launcher (in its own process group, so that no rank
outlives it), and when it fails for a reason a relaunch can cure (a rank killed, a crash,
a lost peer) starts it again; the trainer itself resumes from `checkpoints/latest`, so a
restart costs the steps since the last checkpoint. Two failures are final and never
retried: a config error (exit 2) and a non-finite loss (exit 3): a relaunch would fail
the same way. Ctrl-C, SIGTERM or SIGUSR1 to this process is forwarded to the ranks, which
finish their step, save a checkpoint at one step boundary and exit `EXIT_PREEMPTED` (75):
the loop ends with that code (no relaunch: whoever sent the signal wants the machine
back), and the next start resumes at that step with nothing lost. A launcher that was
killed (SIGKILL) reads as `128 + signal`, a failure, never as 0.

The loop runs in the `catneuron train` process, which only waits; the ranks and their
launcher are its children.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pretrain.stop import EXIT_PREEMPTED, ignore_usr1

EXIT_CONFIG_ERROR = 2
"""What `pretrain.train.main` returns on a config error (all ranks)."""
EXIT_NON_FINITE = 3
"""What `pretrain.train.main` returns on a non-finite loss (all ranks agree on it)."""
NOT_RETRIED = {EXIT_CONFIG_ERROR: "a config error", EXIT_NON_FINITE: "a non-finite loss"}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def describe_exit(code: int) -> str:
    """The launcher's exit status in words: it passes a rank's `-signal` on as `256 - signal`."""
    if code < 0:
        return f"the launcher was killed by {_signal_name(-code)}"
    if 128 < code < 256 and 256 - code < signal.NSIG:
        return f"launcher exit status {code} (a rank was killed by {_signal_name(256 - code)})"
    return f"launcher exit status {code}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def resume_point(checkpoint_dir: Path) -> str:
    """Where the trainer will continue: the checkpoint `latest` names, read without torch."""
    pointer = checkpoint_dir / "latest"
    tag = pointer.read_text().strip() if pointer.is_file() else ""
    if not tag:
        return "from the start (no checkpoint yet)"
    step = tag.removeprefix("step_")
    return f"from checkpoint {tag} (step {step})" if step.isdigit() else f"from checkpoint {tag}"


def rank_processes(root: int) -> list[object]:
    """The training ranks below process `root` (`python -m pretrain.train`; not the launchers,
    whose command lines name the module too)."""
    import psutil

    found = []
    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return found
    for process in children:
        try:
            cmdline = process.cmdline()
            if "-m" in cmdline and cmdline[cmdline.index("-m") + 1 :][:1] == ["pretrain.train"]:
                found.append(process)
        except psutil.Error:
            continue
    return found


class _Forwarder:
    """SIGINT/SIGTERM/SIGUSR1 to this process go to the training ranks, which save and stop.

    Never to DeepSpeed's launchers: they kill the ranks on SIGTERM/SIGINT before these can
    save. The ranks get SIGUSR1 (their stop signal; the launchers inherit it ignored), sent
    again every `RESEND_S` while the launcher runs, for a rank still starting up. Before
    any rank has started there is nothing to save: the whole group gets SIGTERM.
    """

    RESEND_S = 2.0

    def __init__(self) -> None:
        self.group: int | None = None
        self.stopped_by: int | None = None
        self.saw_ranks = False  # ranks that exited after saving are not "none started yet"
        self._sent = 0.0

    def __call__(self, signum: int, _frame: object) -> None:
        self.stopped_by = self.stopped_by or signum
        self._sent = 0.0
        self.forward()

    def forward(self) -> None:
        if self.group is None or self.stopped_by is None:
            return
        if time.monotonic() - self._sent < self.RESEND_S:
            return
        self._sent = time.monotonic()
        ranks = rank_processes(self.group)
        self.saw_ranks = self.saw_ranks or bool(ranks)
        if not self.saw_ranks:  # no rank started yet (or not a trainer): nothing to save
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.group, signal.SIGTERM)
        for process in ranks:
            with contextlib.suppress(Exception):
                process.send_signal(signal.SIGUSR1)

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Forwarder]:
        previous = {s: signal.signal(s, self) for s in (*STOP_SIGNALS,)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def run_once(cmd: list[str], env: dict[str, str], forwarder: _Forwarder) -> int:
    """Run the launcher in a new session and wait; whatever is left of the group is killed.

    Its own session: a terminal's Ctrl-C or a signal to this process group reaches only
    this process, which forwards it to the ranks. A launcher killed by a signal (negative
    status) reads as `128 + signal`, a failure.
    """
    process = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=ignore_usr1)
    forwarder.group, forwarder.saw_ranks = process.pid, False
    try:
        while True:
            try:
                code = process.wait(timeout=0.5)
                return code if code >= 0 else 128 - code
            except subprocess.TimeoutExpired:
                forwarder.forward()
            except KeyboardInterrupt:  # a handler installed by someone else; keep waiting
                continue
    finally:
        forwarder.group = None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # a rank that outlived its launcher


def run_with_restarts(
    cmd: list[str],
    env: dict[str, str],
    max_restarts: int,
    checkpoint_dir: Path,
    say: Callable[[str], None] | None = None,
) -> int:
    """Run `cmd` until it succeeds, fails for good, or has been restarted `max_restarts` times."""
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    restarts = 0
    with _Forwarder().installed() as forwarder:
        while True:
            started = time.monotonic()
            code = run_once(cmd, env, forwarder)
            if code == EXIT_PREEMPTED:  # saved at a step boundary (rank 0 said where): resume later
                return code
            if (
                forwarder.stopped_by is not None
            ):  # stopped before a save: 128 + signal, as shells say
                return 128 + forwarder.stopped_by
            if code == 0:
                return code
            why = f"{describe_exit(code)} after {time.monotonic() - started:.0f} s"
            if code in NOT_RETRIED:
                say(f"catneuron train: {why}: {NOT_RETRIED[code]}, not restarting")
                return code
            if restarts >= max_restarts:
                say(f"catneuron train: {why}; {max_restarts} restart(s) used up, giving up")
                return code
            restarts += 1
            say(
                f"catneuron train: {why}; restart {restarts} of {max_restarts}, "
                f"resuming {resume_point(checkpoint_dir)}"
            )
