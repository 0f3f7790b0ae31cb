"""`python -m pretrain.ds_runner ARGS`: DeepSpeed's launcher (`deepspeed ARGS`), read honestly.

DeepSpeed's runner exits 0 when the per-node launcher it started was killed by a signal
(it passes on only positive statuses), so a node whose launcher was SIGKILLed would read
as a success to the restart loop and to Slurm. This runs the same runner and exits
`128 + signal` in that case.
"""

from __future__ import annotations

import subprocess
import sys


class _Recorded(subprocess.Popen):
    started: list[subprocess.Popen] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _Recorded.started.append(self)


def main() -> int:
    from deepspeed.launcher import runner

    runner.subprocess.Popen = _Recorded  # the runner's one child: the node's launcher
    runner.main()
    killed = [p.returncode for p in _Recorded.started if (p.returncode or 0) < 0]
    return 128 - killed[0] if killed else 0


if __name__ == "__main__":
    sys.exit(main())
