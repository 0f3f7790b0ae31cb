#!/usr/bin/env bash
# Submit a catneuron job to a running Ray cluster (`ray job submit` with this directory as
# the runtime environment, without runs/, shards/ and .venv/); prints the job id and the
# commands to follow its logs and to stop it.
#
#   launch/submit.sh [--address http://127.0.0.1:8265] [--wait] [--] COMMAND [ARGS ...]
#   launch/submit.sh -- shard /shared/videos --out /shared/frames
#   launch/submit.sh -- train configs/conv_ae.yaml --ray --num-workers 8 --storage-path /shared/runs
#
# COMMAND is a catneuron subcommand (run as `python -m catneuron COMMAND`) or any command.
# The address defaults to $RAY_ADDRESS, else the dashboard on 127.0.0.1:8265 (an ssh tunnel
# to the head node: ssh -L 8265:127.0.0.1:8265 HEAD).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
find_catneuron
exec "${CATNEURON_CMD[@]}" submit "$@"
