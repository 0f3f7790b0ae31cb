#!/usr/bin/env bash
# The whole GPU check of issue 13 in one run of at most 8 minutes on the device machine.
#
#   bash bench/gpu.sh [--out DIR] [--kit DIR] [--budget-s S]      on the device ($OUT by default)
#   bash bench/gpu.sh --dry-run [--full] [--out DIR]              here, on CPU, tiny sizes
#   ... [--only KEY]...   just these runs (keys in bench/gpu_bench.py's PLAN, or "loop"): reruns
#
# On the device: installs the carried wheels (bench/make_device_kit.sh builds them and the
# shards into bench/out/device, which the `run` call carries), records the machine, then runs
# `python -m bench.gpu_bench` (see its docstring for every measurement) against the carried
# shards within a time budget. Figures land in DIR: results.json, results.md, profile.txt,
# runs.log (every launch's output), env.txt and log.txt (this script's output).
#
# --dry-run: the same driver on CPU (CUDA hidden), tiny sizes (3 steps, 32 px, batch 4,
# fp32), shards made on the spot, no wheel install; only the runs marked for it (--full: all).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

dry_run=0 full=0 out="${OUT:-$REPO/bench/out/gpu}" kit="$REPO/bench/out/device" budget="" only=()
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --full) full=1 ;;
    --out) out=$2; shift ;;
    --kit) kit=$2; shift ;;
    --budget-s) budget=$2; shift ;;
    --only) only+=("$2"); shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/catneuron-gpu-sh.XXXXXX")
trap 'rm -rf "$work"' EXIT

if ((dry_run)); then
  PY=${PYTHON:-$REPO/.venv/bin/python}
  [[ -x $PY ]] || PY=python3
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -m bench.gpu_shards "$work/shards" --frames 96 --size 32 --per-shard 8
  shards=$work/shards
else
  PY=${PYTHON:-python3}
  if ! compgen -G "$kit/whl/*.whl" >/dev/null || [[ ! -d $kit/shards ]]; then
    echo "bench/gpu.sh: $kit: no wheels or shards; run bench/make_device_kit.sh here and carry it" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$work/site" "$kit"/whl/*.whl
  export PYTHONPATH="$work/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  export DS_ACCELERATOR=cuda  # the wheel was built on a CPU machine: no guessing
  shards=$kit/shards
fi

{
  date -u +%FT%TZ
  uname -m
  echo "cores: $(nproc)"
  nvidia-smi 2>&1 || echo "no nvidia-smi"
  "$PY" - <<'EOF' 2>&1
import importlib.metadata as m, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("deepspeed", "webdataset", "wids", "pydantic", "numpy", "Pillow", "pyarrow"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "missing")
EOF
} >"$out/env.txt" || true  # a broken environment shows there; the driver records each failure
cat "$out/env.txt"

args=(--out "$out" --shards "$shards")
((dry_run)) && args+=(--dry-run)
((full)) && args+=(--full)
[[ -n $budget ]] && args+=(--budget-s "$budget")
((${#only[@]})) && args+=(--only "${only[@]}")
set +e
TMPDIR=$work "$PY" -u -m bench.gpu_bench "${args[@]}" 2>&1 | tee "$out/log.txt"
rc=${PIPESTATUS[0]}
set -e
echo "bench/gpu.sh: exit $rc; figures in $out (results.md, results.json)"
exit "$rc"
