"""Stops that lose nothing: SIGTERM, SIGUSR1 or SIGINT end a run at a step boundary, saved.

Each rank's handler only sets a host-side flag; after every step the ranks all-reduce it
(MAX of one int, on a gloo group: a CPU tensor, no device sync), so all of them see the
stop at the same step, checkpoint there (data position included) and exit with
`EXIT_PREEMPTED`. One signal to one rank is enough; more signals change nothing.

`catneuron train` runs the DeepSpeed launcher in its own session and forwards the
signals to the ranks only: DeepSpeed's launcher would kill them on SIGTERM/SIGINT, and
dies of SIGUSR1. The launcher inherits SIGUSR1 ignored, so a signal can never kill it.
A Ray Train worker cannot install handlers (its loop runs in a thread), so the driver
writes `STOP_FILE` in the run directory and the workers read it at each step.
"""

from __future__ import annotations

import signal
from pathlib import Path

EXIT_PREEMPTED = 75
"""Every rank saved a checkpoint at the step where a stop signal arrived: run the same
command again to resume there (EX_TEMPFAIL). The restart loop and `train.sbatch` read it
as "resume later", never as a failure."""

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
STOP_FILE = "STOP"
"""Written in the run directory to stop Ray Train workers (which cannot take signals)."""


class StopFlag:
    """The host-side flag that a stop signal sets, and the step-boundary agreement on it."""

    def __init__(self, stop_file: Path | None = None) -> None:
        self.signum: int | None = None
        self.stop_file = stop_file
        self._group = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopFlag:
        """Handlers for SIGTERM, SIGUSR1, SIGINT (main thread only; elsewhere the stop file serves)."""
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        except ValueError:  # not the main thread (Ray Train)
            self._previous = {}
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def ignore(self) -> None:
        """Ignore the stop signals from now on (SIG_IGN outlives the interpreter's shutdown,
        which puts Python handlers back to the default: die)."""
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        self._previous = {}

    def _handle(self, signum: int, _frame: object) -> None:
        self.signum = self.signum or signum

    @property
    def requested(self) -> bool:
        if self.signum is None and self.stop_file is not None and self.stop_file.exists():
            self.signum = signal.SIGTERM
        return self.signum is not None

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it at every step)."""
        import torch
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.requested
        if self._group is None:
            gloo = dist.get_backend() == "gloo"
            self._group = dist.group.WORLD if gloo else dist.new_group(backend="gloo")
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def prepare_group(self) -> None:
        """Create the gloo group now (a collective every rank must reach in the same order)."""
        self.agreed()


def ignore_usr1() -> None:
    """`preexec_fn` of the launcher: SIGUSR1 ignored (inherited by the launchers and the ranks
    until a rank installs its handler), so that a forwarded or stray SIGUSR1 kills nothing."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def stopped_line(step: int, signum: int | None, tag: str | None) -> str:
    name = signal.Signals(signum).name if signum else "a stop signal to another rank"
    return (
        f"catneuron train: {name}: stopped at step {step}, checkpoint {tag} saved; "
        f"run the same command again to resume (exit {EXIT_PREEMPTED})"
    )
