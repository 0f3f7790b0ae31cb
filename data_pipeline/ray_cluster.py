"""One way to reach Ray for every catneuron command: `--address`, or a local cluster.

`catneuron shard`, the evals' `--num-workers` extraction and the neuron reductions all
call `ray_session`. Without an address it starts a local, loopback-only cluster sized to
the work and stops it on exit; with one it joins that cluster and leaves it running.
Ray's own start-up chatter goes to its session logs, not to the user's console.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[bool]:
    """Ray initialized for the block; yields True when this call started (and will stop) it."""
    import ray

    if ray.is_initialized():
        yield False
        return
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **quiet)
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count() or 1,
            object_store_memory=200 * 2**20,
            _node_ip_address="127.0.0.1",
            **quiet,
        )
    try:
        yield True
    finally:
        ray.shutdown()
