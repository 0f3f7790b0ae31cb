"""One task's shards: WebDataset tar files, with temporary names and a checksum per shard.

The tars are written with the standard library's `tarfile`, not webdataset's
`ShardWriter`/`TarWriter`: importing webdataset imports torch (1.2 s of every worker's
start on the 2-core VM, and memory), and a worker that decodes video and writes tars has
no use for torch. The format is what `TarWriter` writes: one member per field,
`<key>.<field>`, the fields of a sample contiguous and in sorted order.

Each shard is written as a local `<name>.tar.tmp` and published under `<name>.tar` only
once it is complete (see `storage.Store.publish`: a rename locally, an upload to an
object store), so a reader never opens a partial shard, and a killed task leaves only
`.tmp` files that the next attempt deletes. Tar headers carry fixed times and owners,
and the checksum is taken as the bytes are written, so the same samples always give the
same bytes and the same sha256.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from dataclasses import dataclass
from typing import Any, BinaryIO

from data_pipeline.storage import Store

TMP_SUFFIX = ".tmp"
SHARD_DIR = "shards"


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard, as `manifest/shards.parquet` lists it (path relative to the output)."""

    path: str
    n_samples: int
    bytes: int
    sha256: str


def remove_shards(store: Store, prefix: str) -> None:
    """Delete every shard of `prefix`, finished or not: a group is always written from scratch."""
    for rel in store.glob(f"{SHARD_DIR}/{prefix}-*.tar*"):
        store.remove(rel)


class _HashingFile:
    """A write-only file that keeps the sha256 and length of what went through it."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.digest, self.size = file, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.file.write(data)


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uname = info.gname = "bigdata"
    return info, io.BytesIO(data)


class GroupShardWriter:
    """Writes samples into `shards/<prefix>-000000.tar`, `-000001.tar`, ... of `store`.

    A new shard starts when the current one holds `max_count` samples or `max_bytes` of
    payload. A shard is opened at its first sample, so none is ever left empty.
    """

    def __init__(self, store: Store, prefix: str, *, max_bytes: int, max_count: int) -> None:
        self.store, self.prefix = store, prefix
        self.max_bytes, self.max_count = max_bytes, max_count
        self.records: list[ShardRecord] = []
        self._staging = store.staging_dir(SHARD_DIR)
        self._index = 0
        self._file: BinaryIO | None = None
        self._hashing: _HashingFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._count = self._payload = 0

    @property
    def current_shard(self) -> str:
        """Path (relative to the output) of the shard being written."""
        return f"{SHARD_DIR}/{self.prefix}-{self._index:06d}.tar"

    def _local(self) -> str:
        return os.path.join(self._staging, os.path.basename(self.current_shard) + TMP_SUFFIX)

    def write(self, sample: dict[str, Any]) -> str:
        """Write one sample (`__key__` and bytes fields); return the shard it went into."""
        if self._tar is not None and (
            self._count >= self.max_count or self._payload >= self.max_bytes
        ):
            self._finish()
        if self._tar is None:
            self._file = open(self._local(), "wb")  # noqa: SIM115 (closed in _finish)
            self._hashing = _HashingFile(self._file)
            self._tar = tarfile.open(  # noqa: SIM115 (closed in _finish)
                fileobj=self._hashing, mode="w|", format=tarfile.GNU_FORMAT
            )
        key = sample["__key__"]
        for field in sorted(k for k in sample if not k.startswith("__")):
            data = sample[field]
            self._tar.addfile(*_member(f"{key}.{field}", data))
            self._payload += len(data)
        self._count += 1
        return self.current_shard

    def _finish(self) -> None:
        self._tar.close()
        self._file.close()
        self.store.publish(self._local(), self.current_shard)
        self.records.append(
            ShardRecord(
                self.current_shard,
                self._count,
                self._hashing.size,
                self._hashing.digest.hexdigest(),
            )
        )
        self._tar = self._file = self._hashing = None
        self._count = self._payload = 0
        self._index += 1

    def close(self) -> list[ShardRecord]:
        """Finish the last shard; return every shard this writer published."""
        if self._tar is not None:
            self._finish()
        if not self.store.is_local:
            os.rmdir(self._staging)
        return self.records

    def abort(self) -> None:
        """Drop the shard being written (an error stopped the group)."""
        if self._file is not None:
            self._file.close()
            os.unlink(self._local())
            self._tar = self._file = self._hashing = None
        if not self.store.is_local:
            shutil.rmtree(self._staging, ignore_errors=True)
