"""How evals publish what they write: JSON files, PNG bytes and whole output directories.

`catneuron probe` and `catneuron neurons` both build their output directory under a
hidden temporary name and rename it into place, so a reader (`catneuron report`, a
`--watch` deciding what is done) never sees half a result. The helpers live here, in a
module of their own, so that both rooms write the same way without importing each
other (the neurons CLI and its analysis once imported each other for them).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def write_json(path: Path, payload: dict, *, indent: int = 2) -> None:
    """`payload` as JSON (NaN allowed) plus a newline, through a temporary sibling: a
    crash leaves the old file or none, never a truncated one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=indent) + "\n")
    tmp.replace(path)


def build_dir(out: Path, tag: str = "build") -> Path:
    """A fresh, empty hidden sibling of `out` (`.<name>.<tag>-<pid>`) to build it in;
    a leftover of an earlier run of this process id is removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    build = out.with_name(f".{out.name}.{tag}-{os.getpid()}")
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir()
    return build


def replace_dir(build: Path, out: Path) -> None:
    """Make the finished `build` appear as `out`, replacing an older `out`; `out` never
    holds a partial result."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        build.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        build.rename(out)


def png_bytes(image) -> bytes:
    """A PIL image or (H, W[, 3]) uint8 array as PNG bytes, at zlib level 3.

    Not zlib's default 6 nor `optimize=True`: on the neuron report's grids, level 3
    encodes 2.5x faster than 6 and the files come out 5% smaller (flat panels and
    upscaled pixels are long runs that the faster levels find as well); `optimize=True`
    took 7 s of a 15 s `catneuron neurons` run for 9% smaller files (2-core VM).
    """
    import io

    from PIL import Image

    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()
