"""What `catneuron shard` is pointed at, expanded lazily into one video source at a time.

An input is a directory (searched recursively for video extensions), a glob, a text
file with one path or URL per line, a parquet or CSV table with a `source` column, or a
video itself; any of them local or behind an fsspec URL. Inputs are expanded as they
are consumed, so a list of millions of videos never sits whole on the driver; the
order is deterministic (sorted listings, file order in lists), because the position of
a video in this stream decides which task and which shard it lands in.

A source is named in one canonical form, the string its `video_id` hashes: a local
file (plain path or `file://` URL) becomes its absolute path with symlinks resolved;
any other URL is kept as written.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the workers need only `video_id`
    import fsspec

VIDEO_EXTENSIONS = frozenset(
    [
        ".mp4",
        ".m4v",
        ".mov",
        ".mkv",
        ".webm",
        ".avi",
        ".mpg",
        ".mpeg",
        ".ts",
        ".mts",
        ".m2ts",
        ".flv",
        ".wmv",
        ".3gp",
        ".ogv",
    ]
)
TABLE_EXTENSIONS = frozenset({".parquet", ".csv"})
_GLOB_CHARS = frozenset("*?[")


def is_url(name: str) -> bool:
    return "://" in name


def canonical_source(name: str) -> str:
    """The one spelling of a source that keys, manifests and labels all use."""
    if name.startswith("file://"):
        name = name[len("file://") :]
    if is_url(name):
        return name
    return str(Path(name).expanduser().resolve())


def video_id(source: str) -> str:
    """First 16 hex digits of the SHA-1 of the canonical source: stable across reruns and machines."""
    return hashlib.sha1(source.encode()).hexdigest()[:16]


def looks_like_video(name: str) -> bool:
    """A video extension, or a URL with none (a stream endpoint): FFmpeg opens even a
    `.txt` as a video, so a name is the first filter, before any byte is read."""
    extension = _extension(name)
    return extension in VIDEO_EXTENSIONS or (is_url(name) and not extension)


def _url_path(name: str) -> str:
    """The path part of a URL without query or fragment, where the extension lives."""
    return name.split("?", 1)[0].split("#", 1)[0] if is_url(name) else name


def _extension(name: str) -> str:
    return posixpath.splitext(_url_path(name))[1].lower()


def _join(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    """An fsspec-internal path turned back into a name in the user's form (URL or local)."""
    return fs.unstrip_protocol(path) if is_url(like) and not like.startswith("file://") else path


def _walk_videos(fs: fsspec.AbstractFileSystem, root: str, like: str) -> Iterator[str]:
    """Video files under `root`, one directory at a time, in sorted order."""
    for folder, dirs, files in fs.walk(root, topdown=True):
        dirs.sort()
        for name in sorted(files):
            if _extension(name) in VIDEO_EXTENSIONS:
                yield _join(fs, posixpath.join(folder, name), like)


def _listed_sources(fs: fsspec.AbstractFileSystem, path: str, like: str) -> Iterator[str]:
    """Entries of a list file or table; relative entries are taken from the list's folder."""
    folder = posixpath.dirname(path)
    if _extension(path) == ".parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f)
            if "source" not in table.schema_arrow.names:
                raise ValueError(f"{like}: no 'source' column")
            for batch in table.iter_batches(columns=["source"], batch_size=4096):
                yield from _resolve_entries(fs, folder, like, batch.column(0).to_pylist())
    elif _extension(path) == ".csv":
        import pyarrow.csv as pa_csv

        with fs.open(path, "rb") as f:
            reader = pa_csv.open_csv(
                f, convert_options=pa_csv.ConvertOptions(include_columns=["source"])
            )
            for batch in reader:
                yield from _resolve_entries(fs, folder, like, batch.column(0).to_pylist())
    else:
        with fs.open(path, "rt", encoding="utf-8") as f:
            lines = (line.strip() for line in f)
            yield from _resolve_entries(
                fs, folder, like, (x for x in lines if x and not x.startswith("#"))
            )


def _resolve_entries(
    fs: fsspec.AbstractFileSystem, folder: str, like: str, entries: Iterable[str | None]
) -> Iterator[str]:
    for entry in entries:
        if not entry:
            continue
        if is_url(entry) or posixpath.isabs(entry):
            yield entry
        else:
            yield _join(fs, posixpath.join(folder, entry), like)


def expand_input(name: str) -> Iterator[str]:
    """The video sources one command-line input stands for, lazily, in a stable order.

    A name that does not exist (and is no glob) is passed on as a source: it becomes a
    `failed` row with the reason, rather than stopping the job.
    """
    import fsspec

    fs, path = fsspec.core.url_to_fs(name)
    if _GLOB_CHARS & set(path):
        for match in sorted(fs.glob(path)):
            yield from expand_input(_join(fs, match, name))
    elif fs.isdir(path):
        yield from _walk_videos(fs, path, name)
    elif _extension(name) in VIDEO_EXTENSIONS or not fs.isfile(path):
        yield name
    else:
        yield from _listed_sources(fs, path, name)


def iter_sources(inputs: Iterable[str]) -> Iterator[str]:
    """Every video source of every input, in canonical form."""
    for name in inputs:
        for source in expand_input(os.fspath(name)):
            yield canonical_source(source)
