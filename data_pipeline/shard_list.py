"""Turn what a user points the loader at into shards and their sample counts.

Exact, hang-free splitting over ranks and workers needs the number of samples in every
shard before the first one is opened. `catneuron shard` writes them to
`manifest/shards.parquet`; without a manifest each shard is read once to count them,
which is fine for a test set and slow for a large one.

Everything here takes local paths and fsspec URLs alike (`s3://bucket/frames`, its
`manifest/shards.parquet`, a brace pattern of URLs). webdataset opens only a few URL
schemes itself (through command-line tools), so shards behind a URL are opened with
fsspec (`shard_samples`), with the credentials fsspec's backend finds in the
environment, `~/.aws` or its config.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import webdataset as wds

MANIFEST = Path("manifest") / "shards.parquet"


@dataclass(frozen=True)
class Shard:
    url: str
    n_samples: int


def _is_url(name: str) -> bool:
    return "://" in name or name.startswith("pipe:")


def _is_fsspec_url(name: str) -> bool:
    return "://" in name and not name.startswith(("pipe:", "file://"))


def shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard, grouped by key as the training pipeline groups them."""
    if not _is_fsspec_url(url):
        yield from wds.tarfile_samples([{"url": url.removeprefix("file://")}])
        return
    import fsspec

    with fsspec.open(url, "rb") as stream:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
        yield from wds.tariterators.group_by_keys(files)


def tar_samples(shards: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A pipeline stage like `wds.tarfile_to_samples()` that also opens fsspec URLs."""
    for shard in shards:
        yield from shard_samples(shard["url"])


def count_samples(url: str) -> int:
    """Samples in one shard."""
    return sum(1 for _ in shard_samples(url))


def _read_bytes(name: str) -> bytes:
    if _is_fsspec_url(name):
        import fsspec

        with fsspec.open(name, "rb") as f:
            return f.read()
    with open(name.removeprefix("file://"), "rb") as f:
        return f.read()


def read_manifest(path: str | os.PathLike) -> list[Shard]:
    """Shards of a `shards.parquet`, with relative paths taken from its output root."""
    name = os.fspath(path)
    try:
        table = pq.read_table(io.BytesIO(_read_bytes(name)), columns=["path", "n_samples"])
    except FileNotFoundError:
        raise ValueError(f"{name}: manifest not found") from None
    except (OSError, ValueError, KeyError) as exn:
        raise ValueError(
            f"{name}: not a shard manifest (needs columns path, n_samples): {exn}"
        ) from None
    if _is_fsspec_url(name):
        root = name.rsplit("/", 2)[0]
        join = lambda rel: f"{root}/{rel}"  # noqa: E731
    else:
        root_path = Path(name.removeprefix("file://")).parent.parent
        join = lambda rel: str(root_path / rel)  # noqa: E731
    shards = []
    for rel, n in zip(table["path"].to_pylist(), table["n_samples"].to_pylist(), strict=True):
        url = rel if _is_url(rel) or os.path.isabs(rel) else join(rel)
        shards.append(Shard(url, int(n)))
    return shards


def _tars_in(directory: Path) -> list[str]:
    """`*.tar` directly in `directory`, else in its `shards/` (the `catneuron shard` layout)."""
    for folder in (directory, directory / "shards"):
        tars = sorted(str(p) for p in folder.glob("*.tar"))
        if tars:
            return tars
    raise ValueError(f"{directory}: no {MANIFEST} and no *.tar shards")


def _expand_url(url: str) -> list[Shard] | list[str]:
    """A shard, a manifest, or an output root (its manifest, else its `*.tar`) behind a URL."""
    if url.endswith(".tar") or url.startswith("pipe:"):
        return [url]
    if url.endswith(".parquet"):
        return read_manifest(url)
    import fsspec

    root = url.rstrip("/")
    fs, fs_root = fsspec.core.url_to_fs(root)
    if fs.exists(f"{fs_root}/{MANIFEST.as_posix()}"):
        return read_manifest(f"{root}/{MANIFEST.as_posix()}")
    for folder in (fs_root, f"{fs_root}/shards"):
        tars = sorted(fs.glob(f"{folder}/*.tar"))
        if tars:
            return [fs.unstrip_protocol(t) for t in tars]
    raise ValueError(f"{url}: no {MANIFEST} and no *.tar shards")


def _expand(source: str | os.PathLike | Sequence[str]) -> list[Shard] | list[str]:
    """Shards with counts when a manifest gives them, else the bare shard names."""
    if not isinstance(source, (str, os.PathLike)):
        return [os.fspath(name) for name in source]
    name = os.fspath(source)
    if "{" in name:
        return wds.shardlists.expand_urls(name)
    if _is_fsspec_url(name) or name.startswith("pipe:"):
        return _expand_url(name)
    path = Path(name.removeprefix("file://"))
    if path.is_dir():
        return read_manifest(path / MANIFEST) if (path / MANIFEST).is_file() else _tars_in(path)
    if path.suffix == ".parquet":
        if not path.is_file():
            raise ValueError(f"{path}: manifest not found")
        return read_manifest(path)
    return [name]


def resolve_shards(source: str | os.PathLike | Sequence[str]) -> list[Shard]:
    """Every non-empty shard of `source` with its sample count, in a stable order.

    `source` is a shard directory or output root (local or URL), a `shards.parquet`
    manifest, a brace pattern (`dir/g-{000000..000009}.tar`), or a list of shard paths or
    URLs. Empty shards are dropped; a missing local shard is an error here rather than a
    hang in the middle of an epoch.
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
