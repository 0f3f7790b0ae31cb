#!/usr/bin/env bash
# Repeat a short 2-rank training N times and count unclean exits: the hunt for the rare
# "terminate called without an active exception" seen once at process exit in bench/train.py.
# usage: bench/two_rank_exits.sh SHARDS [N=30] [CONFIG=configs/tiny/vae.yaml]
set -euo pipefail
shards=${1:?usage: bench/two_rank_exits.sh SHARDS [N] [CONFIG]}
runs=${2:-30}
config=${3:-configs/tiny/vae.yaml}
python=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0 terminated=0
for i in $(seq 1 "$runs"); do
  log="$work/run-$i.log"
  if ! "$python" -m catneuron train "$config" "data.source=$shards" "run.output_dir=$work/runs" \
      "run.name=r$i" stages.steps=30 logging.image_every=0 --num-gpus 2 >"$log" 2>&1; then
    failed=$((failed + 1))
    tail -n 3 "$log"
  fi
  if grep -q "terminate called" "$log"; then
    terminated=$((terminated + 1))
    cp "$log" "./two-rank-exit-$i.log"
  fi
  rm -rf "$work/runs"
done
echo "$runs runs of $config on 2 ranks: $failed non-zero exits, $terminated 'terminate called'"
