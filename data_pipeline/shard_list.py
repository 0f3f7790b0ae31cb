"""Turn what a user points the loader at into shards and their sample counts.

Exact, hang-free splitting over ranks and workers needs the number of samples in every
shard before the first one is opened. `catneuron shard` writes them to
`manifest/shards.parquet`; without a manifest each shard is read once to count them,
which is fine for a test set and slow for a large one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import webdataset as wds

MANIFEST = Path("manifest") / "shards.parquet"


@dataclass(frozen=True)
class Shard:
    url: str
    n_samples: int


def _is_url(name: str) -> bool:
    return "://" in name or name.startswith("pipe:")


def count_samples(url: str) -> int:
    """Samples in one shard, grouped by key exactly as the training pipeline groups them."""
    return sum(1 for _ in wds.tarfile_samples([{"url": url}]))


def read_manifest(path: Path) -> list[Shard]:
    """Shards of a `shards.parquet`, with relative paths taken from its output directory."""
    try:
        table = pq.read_table(path, columns=["path", "n_samples"])
    except (OSError, ValueError, KeyError) as exn:
        raise ValueError(
            f"{path}: not a shard manifest (needs columns path, n_samples): {exn}"
        ) from None
    out_dir = path.parent.parent
    shards = []
    for name, n in zip(table["path"].to_pylist(), table["n_samples"].to_pylist(), strict=True):
        url = name if _is_url(name) or os.path.isabs(name) else str(out_dir / name)
        shards.append(Shard(url, int(n)))
    return shards


def _tars_in(directory: Path) -> list[str]:
    """`*.tar` directly in `directory`, else in its `shards/` (the `catneuron shard` layout)."""
    for folder in (directory, directory / "shards"):
        tars = sorted(str(p) for p in folder.glob("*.tar"))
        if tars:
            return tars
    raise ValueError(f"{directory}: no {MANIFEST} and no *.tar shards")


def _expand(source: str | os.PathLike | Sequence[str]) -> list[Shard] | list[str]:
    """Shards with counts when a manifest gives them, else the bare shard names."""
    if not isinstance(source, (str, os.PathLike)):
        return [os.fspath(name) for name in source]
    name = os.fspath(source)
    if "{" in name:
        return wds.shardlists.expand_urls(name)
    if _is_url(name):
        return [name]
    path = Path(name)
    if path.is_dir():
        return read_manifest(path / MANIFEST) if (path / MANIFEST).is_file() else _tars_in(path)
    if path.suffix == ".parquet":
        if not path.is_file():
            raise ValueError(f"{path}: manifest not found")
        return read_manifest(path)
    return [name]


def resolve_shards(source: str | os.PathLike | Sequence[str]) -> list[Shard]:
    """Every non-empty shard of `source` with its sample count, in a stable order.

    `source` is a shard directory, a `shards.parquet` manifest, a brace pattern
    (`dir/g-{000000..000009}.tar`), or a list of shard paths or URLs. Empty shards are
    dropped (ShardWriter can leave one behind); a missing local shard is an error here
    rather than a hang in the middle of an epoch.
    """
    expanded = _expand(source)
    if not expanded:
        raise ValueError(f"{source}: no shards")
    shards = []
    for item in expanded:
        url = item.url if isinstance(item, Shard) else item
        if not _is_url(url) and not os.path.isfile(url):
            raise ValueError(f"{url}: shard not found")
        shards.append(item if isinstance(item, Shard) else Shard(url, count_samples(url)))
    shards = [s for s in shards if s.n_samples > 0]
    if not shards:
        raise ValueError(f"{source}: the shards hold no samples")
    return shards
