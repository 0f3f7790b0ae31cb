"""How `catneuron shard` cuts its input stream into groups, one Ray task each.

Two needs pull apart here:
- Balance. A job of N videos on W workers keeps all W busy only if there are several
  groups per worker: the group size is chosen from the input count, about
  N / (TASKS_PER_WORKER x W), between 1 and MAX_GROUP_SIZE, and recorded in the
  output's options, so a rerun (even with another --num-workers) cuts the same groups.
  As few groups as balance allows also means shards of a useful size: each group
  writes its own shards, so many small groups of short clips make many tiny shards.
- Stability. Groups of "the next g videos" shift every later group when one video is
  inserted near the start of the list, and each shifted group is redone. Here a group
  ends after a video whose SHA-1 is 0 modulo g (content-defined cuts, as in rsync or
  restic), or once it holds 2g videos. An inserted or removed video changes its own
  group, and at most the groups up to the next content cut; every other group keeps its
  sources and hence its name (the hash of those sources) and its finished shards.

Group sizes are then geometric with mean about g and at most 2g; the tail of a job is
at most one group long.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator

TASKS_PER_WORKER = 8  # mean; content cuts make sizes uneven, so aim high
# Shards are written per group, so the group size is also what keeps shards from being
# tiny when clips are short: 10^4 two-second clips on 2 workers make groups of 256
# (about 40 groups, shards of a few MB) rather than 625 groups of 16 (0.2 MB shards).
# The price of a large group: a crashed or interrupted task redoes up to 2g videos.
MAX_GROUP_SIZE = 256


def auto_group_size(n_inputs: int, n_workers: int) -> int:
    """Videos per group so that every worker gets about TASKS_PER_WORKER groups."""
    target = math.ceil(n_inputs / (TASKS_PER_WORKER * max(1, n_workers)))
    return max(1, min(MAX_GROUP_SIZE, target))


def _cuts_after(source: str, group_size: int) -> bool:
    digest = hashlib.sha1(source.encode()).digest()
    return int.from_bytes(digest[:8], "big") % group_size == 0


def group_name(sources: list[str]) -> str:
    """`g` + 12 hex digits naming a group by its sources (and their order)."""
    return "g" + hashlib.sha1("\n".join(sources).encode()).hexdigest()[:12]


def cut_groups(sources: Iterable[str], group_size: int) -> Iterator[list[str]]:
    """Consecutive runs of `sources`, cut by content (see the module docstring)."""
    group: list[str] = []
    for source in sources:
        group.append(source)
        if group_size == 1 or len(group) >= 2 * group_size or _cuts_after(source, group_size):
            yield group
            group = []
    if group:
        yield group


def named_groups(sources: Iterable[str], group_size: int) -> Iterator[tuple[str, list[str]]]:
    """(name, sources) of each group; a name that repeats (duplicate inputs) gets a suffix."""
    seen: dict[str, int] = {}
    for group in cut_groups(sources, group_size):
        name = group_name(group)
        count = seen.get(name, 0)
        seen[name] = count + 1
        yield (f"{name}x{count}" if count else name), group
