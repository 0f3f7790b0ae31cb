"""The output of `catneuron shard`, on a local disk or behind any fsspec URL.

Object stores have no rename, and an object written piece by piece through fsspec can
be read half-written. So everything reaches its final name in one step:
- a shard is written to a local temporary file and then moved (local output: `os.replace`
  in the same folder) or uploaded (object store: `put_file`; s3fs sends a large file as
  a multipart upload, and S3 shows the object only once the upload is completed);
- a manifest part or small file is one `pipe_file`, a single PUT.

Credentials and endpoints come from wherever fsspec's backend looks (for S3: the
environment, `~/.aws`, `AWS_ENDPOINT_URL`, fsspec's config); none is passed here, so
none can end up in a manifest or a log line.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any


def is_url(name: str) -> bool:
    return "://" in name


def canonical_root(name: str | os.PathLike) -> str:
    """A local output as an absolute path; a URL as written, without a trailing slash."""
    name = os.fspath(name)
    if name.startswith("file://"):
        name = name[len("file://") :]
    if is_url(name):
        return name.rstrip("/")
    return str(Path(name).expanduser().resolve())


class Store:
    """Files under one output root, named by paths relative to it (`shards/x.tar`)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = canonical_root(root)
        self.is_local = not is_url(self.root)

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # sent to Ray tasks: no filesystem object inside
        return (Store, (self.root,))

    @cached_property
    def fs(self) -> Any:
        import fsspec

        return fsspec.core.url_to_fs(self.root)[0]

    @cached_property
    def _fs_root(self) -> str:
        import fsspec

        return fsspec.core.url_to_fs(self.root)[1]

    def url(self, rel: str) -> str:
        """What a reader opens: a local path or a full URL."""
        return os.path.join(self.root, rel) if self.is_local else f"{self.root}/{rel}"

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if self.is_local else f"{self._fs_root}/{rel}"

    def makedirs(self, rel: str) -> None:
        if self.is_local:
            os.makedirs(self._path(rel), exist_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """`data` under `rel`, appearing whole or not at all."""
        if self.is_local:
            path = self._path(rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            partial = path + ".tmp"
            with open(partial, "wb") as f:
                f.write(data)
            os.replace(partial, path)
        else:
            self.fs.pipe_file(self._path(rel), data)

    def read_bytes(self, rel: str) -> bytes:
        if self.is_local:
            with open(self._path(rel), "rb") as f:
                return f.read()
        return self.fs.cat_file(self._path(rel))

    def exists(self, rel: str) -> bool:
        if self.is_local:
            return os.path.exists(self._path(rel))
        return self.fs.exists(self._path(rel))

    def mtime(self, rel: str) -> float | None:
        """Modification time in seconds since the epoch; None when there is no such file."""
        if self.is_local:
            try:
                return os.stat(self._path(rel)).st_mtime
            except FileNotFoundError:
                return None
        try:
            modified = self.fs.modified(self._path(rel))
        except (FileNotFoundError, NotImplementedError, OSError):
            return None
        return modified.timestamp()

    def remove(self, rel: str) -> None:
        """Delete `rel` if it is there."""
        if self.is_local:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(rel))
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._path(rel))

    def glob(self, rel_pattern: str) -> list[str]:
        """Relative paths matching a glob pattern, sorted."""
        if self.is_local:
            base = Path(self.root)
            return sorted(str(p.relative_to(base)) for p in base.glob(rel_pattern))
        prefix = self._fs_root + "/"
        with contextlib.suppress(FileNotFoundError):
            self.fs.invalidate_cache()
        found = self.fs.glob(self._path(rel_pattern))
        return sorted(p[len(prefix) :] if p.startswith(prefix) else p for p in found)

    def staging_dir(self, rel_dir: str) -> str:
        """Where a shard is written before it is published: beside its final name when
        local (so that publishing is a rename), else a fresh local temporary folder."""
        if self.is_local:
            path = self._path(rel_dir)
            os.makedirs(path, exist_ok=True)
            return path
        return tempfile.mkdtemp(prefix="catneuron-shard-")

    def publish(self, local_path: str, rel: str) -> None:
        """Move a finished local file to `rel`; it appears there only once complete."""
        if self.is_local:
            os.replace(local_path, self._path(rel))
            return
        try:
            self.fs.put_file(local_path, self._path(rel))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(local_path)

    def check_writable(self) -> None:
        """Raise OSError naming the problem when the output cannot be written."""
        probe = posixpath.join("manifest", f".write-check-{os.getpid()}")
        try:
            self.write_bytes(probe, b"")
        except OSError:
            raise
        except Exception as error:  # an object store's own error types (auth, no bucket)
            raise OSError(f"{self.root}: cannot write: {type(error).__name__}: {error}") from None
        self.remove(probe)
