"""The manifests of a shard directory, and the per-group parts they are built from.

Layout under the output directory `OUT`:
- `shards/g<group:06d>-<k:06d>.tar`: the shards of input group `group`.
- `manifest/groups/g<group:06d>.shards.parquet`, then `...videos.parquet`: one group's
  rows, each written atomically once all its shards are renamed into place. The videos
  part is written last, so its presence is what marks the group done; a rerun skips a
  done group whose sources are the same and all `ok` or `skipped`, and redoes any other.
- `manifest/videos.parquet`, `manifest/shards.parquet`: every group's parts, consolidated
  at the end of a run (atomically), in group order. Shard paths are relative to `OUT`.
- `manifest/index.wids.json`: the same shard list for `wids.ShardListDataset`, with
  URLs relative to the index file as wids resolves them.
- `manifest/options.json`: the options that decide keys and shard contents; a rerun
  with different ones must say `--overwrite`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.shard_writer import ShardRecord, remove_shards

VIDEO_SCHEMA = pa.schema(
    [("source", pa.string()), ("video_id", pa.string()), ("status", pa.string()), ("error", pa.string()),
     ("n_frames", pa.int64()), ("duration", pa.float64()), ("shards", pa.list_(pa.string())),
     ("src_width", pa.int32()), ("src_height", pa.int32()), ("fps", pa.float64())]
)  # fmt: skip
SHARD_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("n_samples", pa.int64()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
    ]
)
DONE_STATUSES = frozenset({"ok", "skipped"})


@dataclass
class VideoRow:
    source: str
    video_id: str
    status: str = "ok"
    error: str | None = None
    n_frames: int = 0
    duration: float | None = None
    shards: list[str] = field(default_factory=list)
    src_width: int | None = None
    src_height: int | None = None
    fps: float | None = None


@dataclass(frozen=True)
class Totals:
    """What the consolidated manifests hold, for the summary line."""

    statuses: Counter
    n_frames: int
    n_shards: int
    n_bytes: int


def group_name(group: int) -> str:
    return f"g{group:06d}"


class Manifest:
    """Reads and writes the manifests of one output directory."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.shard_dir = out_dir / "shards"
        self.dir = out_dir / "manifest"
        self.parts_dir = self.dir / "groups"

    def _part(self, group: int, kind: str) -> Path:
        return self.parts_dir / f"{group_name(group)}.{kind}.parquet"

    def progress_file(self, group: int) -> Path:
        """Touched by a running group task: which video it is on, and (mtime) when it last moved."""
        return self.parts_dir / f"{group_name(group)}.progress"

    def prepare(self, options: dict[str, Any], overwrite: bool) -> None:
        """Create the layout; refuse to mix shards made with different options."""
        if overwrite:
            self.remove_outputs()
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        saved = self.dir / "options.json"
        if saved.exists():
            before = json.loads(saved.read_text())
            changed = sorted(
                k for k in before.keys() | options.keys() if before.get(k) != options.get(k)
            )
            if changed:
                raise ValueError(
                    f"{self.out_dir} was sharded with other options ({', '.join(changed)}): "
                    "pass --overwrite to start over, or choose another --out"
                )
        else:
            _write_atomic(saved, json.dumps(options, indent=1, sort_keys=True).encode())

    def remove_outputs(self) -> None:
        for path in [*self.shard_dir.glob("g*-*.tar*"), *self.parts_dir.glob("g*.*")]:
            path.unlink()
        for name in ("videos.parquet", "shards.parquet", "index.wids.json", "options.json"):
            (self.dir / name).unlink(missing_ok=True)

    def group_is_done(self, group: int, sources: list[str]) -> bool:
        path = self._part(group, "videos")
        if not path.exists():
            return False
        table = pq.read_table(path, columns=["source", "status"])
        same_sources = table["source"].to_pylist() == sources
        return same_sources and set(table["status"].to_pylist()) <= DONE_STATUSES

    def write_group(self, group: int, videos: list[VideoRow], shards: list[ShardRecord]) -> None:
        """Record a finished group; the videos part goes last, as the mark that it is done."""
        shard_table = pa.Table.from_pylist([asdict(s) for s in shards], schema=SHARD_SCHEMA)
        _write_table_atomic(shard_table, self._part(group, "shards"))
        video_table = pa.Table.from_pylist([asdict(v) for v in videos], schema=VIDEO_SCHEMA)
        _write_table_atomic(video_table, self._part(group, "videos"))
        self.progress_file(group).unlink(missing_ok=True)

    def forget_groups_from(self, n_groups: int) -> None:
        """Remove parts and shards of groups past the end of this run's input (a shorter list)."""
        for path in sorted(self.parts_dir.glob("g*.videos.parquet")):
            group = int(path.name[1:7])
            if group >= n_groups:
                for kind in ("videos", "shards"):
                    self._part(group, kind).unlink(missing_ok=True)
                remove_shards(self.shard_dir, group_name(group))

    def consolidate(self, n_groups: int) -> Totals:
        """Write videos.parquet, shards.parquet and the wids index from groups 0..n_groups-1."""
        self.forget_groups_from(n_groups)
        statuses: Counter = Counter()
        n_frames, shard_rows = 0, []
        with _AtomicParquet(self.dir / "videos.parquet", VIDEO_SCHEMA) as videos:
            for group in range(n_groups):
                table = pq.read_table(self._part(group, "videos"), schema=VIDEO_SCHEMA)
                videos.write(table)
                statuses.update(table["status"].to_pylist())
                n_frames += sum(table["n_frames"].to_pylist())
                shard_rows += pq.read_table(
                    self._part(group, "shards"), schema=SHARD_SCHEMA
                ).to_pylist()
        _write_table_atomic(
            pa.Table.from_pylist(shard_rows, schema=SHARD_SCHEMA), self.dir / "shards.parquet"
        )
        index = {
            "__kind__": "wids-shard-index-v1",
            "wids_version": 1,
            "name": self.out_dir.name,
            "shardlist": [
                {
                    "url": os.path.relpath(self.out_dir / row["path"], self.dir),
                    "nsamples": row["n_samples"],
                }
                for row in shard_rows
            ],
        }
        _write_atomic(self.dir / "index.wids.json", json.dumps(index, indent=1).encode())
        return Totals(statuses, n_frames, len(shard_rows), sum(row["bytes"] for row in shard_rows))


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_bytes(data)
    os.replace(partial, path)


def _write_table_atomic(table: pa.Table, path: Path) -> None:
    partial = path.with_name(path.name + ".tmp")
    pq.write_table(table, partial)
    os.replace(partial, path)


class _AtomicParquet:
    """A ParquetWriter that appears under its name only when closed without error."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path, self.partial = path, path.with_name(path.name + ".tmp")
        self.writer = pq.ParquetWriter(self.partial, schema)

    def __enter__(self) -> pq.ParquetWriter:
        return self.writer

    def __exit__(self, exc_type, *_) -> None:
        self.writer.close()
        if exc_type is None:
            os.replace(self.partial, self.path)
        else:
            self.partial.unlink(missing_ok=True)
