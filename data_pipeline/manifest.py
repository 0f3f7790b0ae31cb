"""The manifests of a shard output, and the per-group parts they are built from.

Layout under the output `OUT` (a local folder or any fsspec URL, see `storage`):
- `shards/<group>-<k:06d>.tar`: the shards of one input group. A group is named by its
  content, `g` + 12 hex digits of the SHA-1 of its sources (see `groups`), so the name
  does not depend on where in the input list the group sits.
- `manifest/groups/<group>.shards.parquet`, then `...videos.parquet`: one group's rows,
  each written whole once all its shards are published. The videos part is written
  last, so its presence is what marks the group done. A rerun skips a done group (its
  name is its sources), failed videos included: a failure is remembered, not retried,
  unless `--retry-failed` asks for it.
- `manifest/videos.parquet`, `manifest/shards.parquet`: every group's parts of this run,
  consolidated at the end (written whole), in input order. Shard paths are relative to
  `OUT`. Parts and shards of groups that this run's input no longer holds are deleted.
- `manifest/index.wids.json`: the same shard list for `wids.ShardListDataset`, with URLs
  relative to the index file as wids resolves them.
- `manifest/options.json`: the options that decide keys and shard contents, and the
  group size chosen on the first run; a rerun with different ones must say `--overwrite`.

pyarrow is imported only where a table is read or written: the workers import this
module for `VideoRow` and should not pay for pyarrow.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any

from data_pipeline.shard_writer import SHARD_DIR, ShardRecord, remove_shards
from data_pipeline.storage import Store

DONE_STATUSES = frozenset({"ok", "skipped"})
PARTS = "manifest/groups"


@cache
def schemas() -> tuple[Any, Any]:
    """(videos, shards) parquet schemas."""
    import pyarrow as pa

    videos = pa.schema(
        [("source", pa.string()), ("video_id", pa.string()), ("status", pa.string()), ("error", pa.string()),
         ("n_frames", pa.int64()), ("duration", pa.float64()), ("shards", pa.list_(pa.string())),
         ("src_width", pa.int32()), ("src_height", pa.int32()), ("fps", pa.float64())]
    )  # fmt: skip
    shards = pa.schema(
        [("path", pa.string()), ("n_samples", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string())]
    )  # fmt: skip
    return videos, shards


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
    shard_bytes: list[int]

    @property
    def n_shards(self) -> int:
        return len(self.shard_bytes)

    @property
    def n_bytes(self) -> int:
        return sum(self.shard_bytes)


def table_bytes(rows: list[dict], schema: Any) -> bytes:
    """`rows` as parquet bytes, built through pyarrow's JSON reader.

    Why not `Table.from_pylist`: pyarrow's Python-object constructors (`from_pylist`,
    `pa.array`) import pandas whenever it is installed (Ray's dependencies install it), a
    third of a second in every `catneuron shard` driver. The JSON reader is C++ and takes
    the schema as given; the parquet bytes are the same (tests/test_shard_balance.py).
    """
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    try:
        lines = b"".join(json.dumps(row, allow_nan=False).encode() + b"\n" for row in rows)
    except ValueError:  # a NaN or infinity, which JSON cannot say: the slow path
        import pyarrow as pa

        table = pa.Table.from_pylist(rows, schema=schema)
    else:
        table = (
            pa_json.read_json(
                io.BytesIO(lines),
                read_options=pa_json.ReadOptions(
                    use_threads=False, block_size=max(len(lines), 1 << 20)
                ),
                parse_options=pa_json.ParseOptions(explicit_schema=schema),
            )
            if rows
            else schema.empty_table()
        )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def read_table(data: bytes, schema: Any) -> Any:
    """A parquet table from its bytes. `ParquetFile`, not `pq.read_table`: the latter goes
    through the dataset API, which imports pandas (see `table_bytes`)."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(io.BytesIO(data)).read()
    return table if table.schema.equals(schema) else table.cast(schema)


class Manifest:
    """Reads and writes the manifests of one output."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _part(self, group: str, kind: str) -> str:
        return f"{PARTS}/{group}.{kind}.parquet"

    def progress_file(self, group: str) -> str:
        """Touched by a running group task: which video it is on, and (mtime) when it last moved."""
        return f"{PARTS}/{group}.progress"

    def saved_options(self) -> dict[str, Any] | None:
        if not self.store.exists("manifest/options.json"):
            return None
        return json.loads(self.store.read_bytes("manifest/options.json"))

    def prepare(self, options: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
        """Check that the output can be written and was not made with other options.

        Returns the options saved by an earlier run (None for a new output). `group_size`
        is compared by the caller, who knows whether the user asked for one.
        """
        if overwrite:
            self.remove_outputs()
        for folder in ("manifest", PARTS, SHARD_DIR):
            self.store.makedirs(folder)
        self.store.check_writable()
        before = self.saved_options()
        if before is not None:
            changed = sorted(
                k
                for k in (before.keys() | options.keys()) - {"group_size"}
                if before.get(k) != options.get(k)
            )
            if changed:
                raise ValueError(
                    f"{self.store.root} was sharded with other options ({', '.join(changed)}): "
                    "pass --overwrite to start over, or choose another --out"
                )
        return before

    def save_options(self, options: dict[str, Any]) -> None:
        self.store.write_bytes(
            "manifest/options.json", json.dumps(options, indent=1, sort_keys=True).encode()
        )

    def remove_outputs(self) -> None:
        for rel in [*self.store.glob(f"{SHARD_DIR}/g*-*.tar*"), *self.store.glob(f"{PARTS}/g*.*")]:
            self.store.remove(rel)
        for name in ("videos.parquet", "shards.parquet", "index.wids.json", "options.json"):
            self.store.remove(f"manifest/{name}")

    def done_statuses(self, group: str) -> list[str] | None:
        """Statuses of a finished group's videos; None when the group is not done."""
        rel = self._part(group, "videos")
        if not self.store.exists(rel):
            return None
        return read_table(self.store.read_bytes(rel), schemas()[0])["status"].to_pylist()

    def write_group(self, group: str, videos: list[VideoRow], shards: list[ShardRecord]) -> None:
        """Record a finished group; the videos part goes last, as the mark that it is done."""
        video_schema, shard_schema = schemas()
        rows = [asdict(s) for s in shards]
        self.store.write_bytes(self._part(group, "shards"), table_bytes(rows, shard_schema))
        rows = [asdict(v) for v in videos]
        self.store.write_bytes(self._part(group, "videos"), table_bytes(rows, video_schema))
        self.store.remove(self.progress_file(group))

    def forget_groups_except(self, groups: set[str]) -> None:
        """Delete parts and shards of groups this run's input does not hold (a changed list)."""
        stale = {
            posixpath.basename(rel).split(".", 1)[0]
            for pattern in (f"{PARTS}/g*.parquet", f"{SHARD_DIR}/g*-*.tar*")
            for rel in self.store.glob(pattern)
        }
        for group in sorted({name.split("-", 1)[0] for name in stale} - groups):
            for kind in ("videos", "shards"):
                self.store.remove(self._part(group, kind))
            remove_shards(self.store, group)

    def consolidate(self, groups: list[str]) -> Totals:
        """Write videos.parquet, shards.parquet and the wids index from `groups`, in order."""
        import pyarrow.parquet as pq

        self.forget_groups_except(set(groups))
        video_schema, shard_schema = schemas()
        statuses: Counter = Counter()
        n_frames, shard_rows = 0, []
        buffer = io.BytesIO()
        with pq.ParquetWriter(buffer, video_schema) as videos:
            for group in groups:
                table = read_table(self.store.read_bytes(self._part(group, "videos")), video_schema)
                videos.write_table(table)
                statuses.update(table["status"].to_pylist())
                n_frames += sum(table["n_frames"].to_pylist())
                part = self.store.read_bytes(self._part(group, "shards"))
                shard_rows += read_table(part, shard_schema).to_pylist()
        self.store.write_bytes("manifest/videos.parquet", buffer.getvalue())
        self.store.write_bytes("manifest/shards.parquet", table_bytes(shard_rows, shard_schema))
        index = {
            "__kind__": "wids-shard-index-v1",
            "wids_version": 1,
            "name": posixpath.basename(self.store.root),
            "shardlist": [
                {"url": posixpath.relpath(row["path"], "manifest"), "nsamples": row["n_samples"]}
                for row in shard_rows
            ],
        }
        self.store.write_bytes("manifest/index.wids.json", json.dumps(index, indent=1).encode())
        return Totals(statuses, n_frames, [row["bytes"] for row in shard_rows])
