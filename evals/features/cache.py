"""The feature cache on disk: per layer `.npy` parts + `index.json`, verified on every read.

One directory per cache key (see `evals.features.cache_key`):
`index.json` and per part `part-NNNNN.<array>.npy` (`pooled`, `unit_max`, `unit_mean`,
`unit_argmax`, `labels`) and `part-NNNNN.keys.json`; the index lists every file with its
size and sha256 and the inputs the key hashes. No pickle anywhere (`allow_pickle=False`).
Whoever extracts a part (the caller or a Ray task) writes its files into a build
directory; the index goes in last and the directory is renamed to its final name, so a
reader finds a whole cache entry or none. Reads check the index against the expected
inputs, every file's size and sha256, and the keys and labels against the dataset's; any
mismatch means "rebuild", never "trust".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CACHE_VERSION = 1
ARRAYS = ("pooled", "unit_max", "unit_mean", "unit_argmax")
INDEX = "index.json"
STALE_BUILD_S = 24 * 3600  # a build directory untouched this long belongs to a killed run


def content_hash(*parts: Any) -> str:
    """sha256 of a JSON rendering of `parts` (keys sorted): for cache keys and fake weights."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path) -> dict:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def part_name(part: int) -> str:
    return f"part-{part:05d}"


def load_layer(
    directory: Path, expected: dict, keys: Sequence[str], labels: np.ndarray
) -> dict | None:
    """A cached layer's arrays, or None if anything (index, sizes, hashes, keys) does not match."""
    try:
        return _load_layer(directory, expected, keys, labels)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # a damaged index or file
        return None


def _load_layer(
    directory: Path, expected: dict, keys: Sequence[str], labels: np.ndarray
) -> dict | None:
    try:
        index = json.loads((directory / INDEX).read_text())
    except (OSError, ValueError):
        return None
    if any(index.get(k) != v for k, v in json.loads(json.dumps(expected)).items()):
        return None
    pieces: dict[str, list] = {name: [] for name in (*ARRAYS, "labels", "keys")}
    for part in index.get("parts", []):
        for name, entry in part["files"].items():
            path = directory / entry["file"]
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                return None
            if file_sha256(path) != entry["sha256"]:
                return None
            if name == "keys":
                pieces[name] += json.loads(path.read_text())
            else:
                pieces[name].append(np.load(path, allow_pickle=False))
    if pieces["keys"] != list(keys) or any(not pieces[name] for name in (*ARRAYS, "labels")):
        return None
    arrays = {name: np.concatenate(pieces[name]) for name in (*ARRAYS, "labels")}
    if not np.array_equal(arrays["labels"], labels) or any(
        len(arrays[name]) != len(keys) for name in ARRAYS
    ):
        return None
    return arrays


class PartWriter:
    """One part's arrays for one layer, written in place by row position (memory-mapped .npy)."""

    def __init__(self, directory: Path, part: int, start: int, stop: int) -> None:
        self.directory, self.part, self.start, self.n = directory, part, start, stop - start
        self.arrays: dict[str, np.ndarray] = {}
        self.filled = np.zeros(self.n, dtype=bool)
        self.keys: list[str | None] = [None] * self.n
        self.labels = np.full(self.n, -1, dtype=np.int64)

    def _path(self, name: str, suffix: str = ".npy") -> Path:
        return self.directory / f"{part_name(self.part)}.{name}{suffix}"

    def write(self, rows: np.ndarray, keys: list[str], labels: np.ndarray, values: dict) -> None:
        """Rows `rows` (positions within the part) of every array; batches may come in any order."""
        if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
            rows = slice(int(rows[0]), int(rows[0]) + len(rows))  # the usual case: a plain copy
        for name, value in values.items():
            if name not in self.arrays:
                self.arrays[name] = np.lib.format.open_memmap(
                    self._path(name), mode="w+", dtype=value.dtype, shape=(self.n, *value.shape[1:])
                )
            self.arrays[name][rows] = value
        self.filled[rows] = True
        self.labels[rows] = labels
        if isinstance(rows, slice):
            self.keys[rows] = keys
        else:
            for row, key in zip(rows.tolist(), keys, strict=True):
                self.keys[row] = key

    def close(self) -> dict:
        if not self.filled.all():
            missing = int((~self.filled).sum())
            raise RuntimeError(f"part {self.part}: {missing} of {self.n} rows never arrived")
        files = {}
        # No msync: the rename makes the files visible through the same page cache, and a
        # crash before write-back leaves a file whose sha256 no longer matches the index.
        self.arrays.clear()
        for name in ARRAYS:
            if (path := self._path(name)).exists():
                files[name] = file_entry(path)
        if self.n:
            np.save(self._path("labels"), self.labels)
            self._path("keys", ".json").write_text(json.dumps(self.keys))
            files["labels"] = file_entry(self._path("labels"))
            files["keys"] = file_entry(self._path("keys", ".json"))
        return {"name": part_name(self.part), "rows": self.n, "files": files}


def publish(build: Path, final: Path, index: dict) -> None:
    """index.json last, then the whole directory renamed into place (over a stale one)."""
    tmp_index = build / f".{INDEX}.tmp"
    tmp_index.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp_index, build / INDEX)
    if final.exists():
        shutil.rmtree(final)
    try:
        os.rename(build, final)
    except OSError:  # another extraction published the same key meanwhile: keep theirs
        shutil.rmtree(build, ignore_errors=True)


def remove_stale_builds(cache_root: Path, max_age_s: float = STALE_BUILD_S) -> None:
    """Delete build directories a killed extraction left behind (none is ever read)."""
    now = time.time()
    for build in cache_root.glob(".*.build-*"):
        try:
            if now - build.stat().st_mtime > max_age_s:
                shutil.rmtree(build, ignore_errors=True)
        except FileNotFoundError:  # its own extraction finished meanwhile
            pass
