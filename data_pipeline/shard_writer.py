"""One task's shards: webdataset's ShardWriter, with temporary names and a checksum per shard.

Each shard is written as `<name>.tar.tmp` and renamed to `<name>.tar` only once it is
complete, so a reader that lists the directory never opens a partial shard, and a killed
task leaves only `.tmp` files that the next run deletes. Tar headers carry fixed times
and owners, so the same samples always give the same bytes (and the same sha256).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds

TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard, as `manifest/shards.parquet` lists it (path relative to the output)."""

    path: str
    n_samples: int
    bytes: int
    sha256: str


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def remove_shards(shard_dir: Path, prefix: str) -> None:
    """Delete every shard of `prefix`, finished or not: a group is always written from scratch."""
    for path in shard_dir.glob(f"{prefix}-*.tar*"):
        path.unlink(missing_ok=True)


class GroupShardWriter:
    """Writes samples into `<shard_dir>/<prefix>-000000.tar`, `-000001.tar`, ...

    A new shard starts when the current one holds `max_count` samples or `max_bytes` of
    payload. A shard that would stay empty (a group whose videos all failed) is deleted
    rather than published.
    """

    def __init__(
        self, shard_dir: Path, prefix: str, out_dir: Path, *, max_bytes: int, max_count: int
    ) -> None:
        self.out_dir = out_dir
        self.records: list[ShardRecord] = []
        self._n_in_shard = 0
        shard_dir.mkdir(parents=True, exist_ok=True)
        self._writer = wds.ShardWriter(
            str(shard_dir / f"{prefix}-%06d.tar"),
            maxcount=max_count,
            maxsize=max_bytes,
            post=self._publish,
            verbose=0,
            opener=lambda name: name + TMP_SUFFIX,
            encoder=False,
            mtime=0.0,
        )

    @property
    def current_shard(self) -> str:
        """Path (relative to the output) of the shard the next sample goes to, as far as it is known."""
        return os.path.relpath(self._writer.fname, self.out_dir)

    def write(self, sample: dict[str, Any]) -> str:
        """Write one sample; return the path of the shard it went into."""
        self._writer.write(sample)
        self._n_in_shard += 1
        return self.current_shard

    def _publish(self, name: str) -> None:
        temporary, final = Path(name + TMP_SUFFIX), Path(name)
        if self._n_in_shard == 0:
            temporary.unlink(missing_ok=True)
            return
        os.replace(temporary, final)
        self.records.append(
            ShardRecord(
                path=os.path.relpath(final, self.out_dir),
                n_samples=self._n_in_shard,
                bytes=final.stat().st_size,
                sha256=file_sha256(final),
            )
        )
        self._n_in_shard = 0

    def close(self) -> list[ShardRecord]:
        """Finish the last shard; return every shard this writer published."""
        self._writer.close()
        return self.records
