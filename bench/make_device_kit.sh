#!/usr/bin/env bash
# Build, here, what bench/gpu.sh needs on the device machine: bench/out/device/{whl,shards}.
#
#   bash bench/make_device_kit.sh [KIT_DIR]      (default bench/out/device; about 1-2 minutes)
#
# The device has torch, pyarrow, tensorboard, safetensors, Pillow, PyYAML, tqdm, fsspec, numpy,
# psutil, msgpack, ninja, py-cpuinfo, einops, nvidia-ml-py (KINDS.md), but no registry to install
# from. What training and the bench import beyond that travels as wheels for its Python 3.12
# (the device README's recipe): DeepSpeed (an sdist on PyPI: built here into a pure-Python
# wheel, no ops prebuilt; the engine JIT-builds none on this path) and its pydantic/hjson,
# webdataset with braceexpand, and wids. Versions are the ones installed in .venv, so the device
# runs what the tests ran. Ray and PyAV stay behind: only `catneuron shard` needs them, the shards
# are made here instead (decoding on the device would spend its minutes), and Ray's wheel alone
# (~70 MiB) is over the 64 MiB a call carries.
#
# bench/out/ is git-ignored, so the kit travels only when named: carry ["bench/out/device"].
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${1:-bench/out/device}
PY=${PYTHON:-.venv/bin/python}
LIMIT_MIB=56  # the call carries 64 MiB in all, the repository's own files included

version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

WHEELS=(pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson
        webdataset braceexpand wids)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done

rm -rf "$KIT.tmp" && mkdir -p "$KIT.tmp/whl"
pins=()
for name in "${WHEELS[@]}"; do pins+=("$name==$(version "$name")"); done
echo "+ wheels: ${pins[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$KIT.tmp/whl" "${pins[@]}"

ds=$(version deepspeed)
echo "+ deepspeed==$ds: sdist, built into a wheel"
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$KIT.tmp/src" "deepspeed==$ds"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$KIT.tmp/whl" \
  "$KIT.tmp/src"/deepspeed-*.tar.gz
rm -rf "$KIT.tmp/src"

echo "+ shards: 1536 still frames of 256 px"
OMP_NUM_THREADS=1 "$PY" -m bench.gpu_shards "$KIT.tmp/shards" --frames 1536 --size 256 --per-shard 64

mib=$(du -sm "$KIT.tmp" | cut -f1)
if (( mib > LIMIT_MIB )); then
  echo "make_device_kit.sh: $KIT is $mib MiB, over $LIMIT_MIB MiB: fewer frames" >&2
  exit 1
fi
rm -rf "$KIT" && mv "$KIT.tmp" "$KIT"
ls -l "$KIT/whl"
echo "$KIT: $mib MiB (carry it: [\"$KIT\"])"
