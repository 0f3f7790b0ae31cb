"""The pipelined extraction (decode ahead, reduce and write behind, in threads) writes the
same cache, byte for byte, as the serial pass, and raises what its threads raise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evals.features import extractor as F
from evals.features.sources import open_dataset
from pretrain import build_model
from pretrain.export import write_export

PRE = {"resize": 48, "crop": 48, "grayscale": False, "mean": [0.5], "std": [0.25]}


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_pipelined_cache_is_byte_identical_to_serial(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_model("conv_ae", channels=[4, 8], greedy=False)
    export = write_export(
        model.state_dict(), model.spec, tmp_path / "exports" / "step_1",
        stage=0, step=1, config_hash="test", preprocess=PRE,
    )  # fmt: skip
    source = F.from_export(export)
    dataset = open_dataset("synth:shapes?n=30&size=56")
    assert F._pipelined(source)
    F.extract(source, dataset, cache_root=tmp_path / "piped", batch_size=7, progress=False)
    monkeypatch.setenv(F.SERIAL_ENV, "1")
    assert not F._pipelined(source)
    F.extract(source, dataset, cache_root=tmp_path / "serial", batch_size=7, progress=False)
    piped, serial = _files(tmp_path / "piped"), _files(tmp_path / "serial")
    assert piped and piped.keys() == serial.keys()
    for name in piped:
        assert piped[name] == serial[name], name


def test_threads_raise_in_the_caller():
    def broken():
        yield 1
        raise ValueError("decode failed")

    got = []
    with pytest.raises(ValueError, match="decode failed"):
        for item in F._ahead(broken()):
            got.append(item)
    assert got == [1]

    def write(item):
        if item == 2:
            raise OSError("disk full")

    behind = F._Behind(write)
    with pytest.raises(OSError, match="disk full"):
        for item in range(5):
            behind.put(item)
        behind.close()
