#!/usr/bin/env bash
# One node, every local GPU (CPU ranks with gloo where there is none), through the DeepSpeed
# launcher, relaunched from the latest checkpoint when a rank dies.
#
#   launch/train.sh CONFIG [key.sub=value ...] [catneuron train options]
#
# Environment: NUM_GPUS (ranks; default -1 = every GPU), MAX_RESTARTS (default 3),
# MASTER_PORT (default 29500), CATNEURON (the catneuron command).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    print_usage
    [[ $# -ge 1 ]] && exit 0 || exit 2
fi
find_catneuron
# the defaults first: options given on the command line come later and win
exec "${CATNEURON_CMD[@]}" train \
    --num-gpus "${NUM_GPUS:--1}" \
    --max-restarts "${MAX_RESTARTS:-3}" \
    --master-port "${MASTER_PORT:-29500}" \
    "$@"
