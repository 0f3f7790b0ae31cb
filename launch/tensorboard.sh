#!/usr/bin/env bash
# TensorBoard for a run (or a directory of runs), bound to 127.0.0.1 unless told otherwise.
#
#   launch/tensorboard.sh RUN_DIR [--host ADDRESS] [--port PORT] [other tensorboard options]
#
# From your laptop: ssh -L 6006:127.0.0.1:6006 NODE, then open http://127.0.0.1:6006.
# --host 0.0.0.0 serves every network the machine is on: only on a private network.
# Environment: TENSORBOARD_HOST, TENSORBOARD_PORT, TENSORBOARD (the command).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    print_usage
    [[ $# -ge 1 ]] && exit 0 || exit 2
fi
logdir="$1"
shift
[[ -d "$logdir" ]] || die "$logdir: no such run directory"
host="${TENSORBOARD_HOST:-127.0.0.1}" port="${TENSORBOARD_PORT:-6006}"
rest=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --host) [[ $# -ge 2 ]] || die "--host needs an address"; host="$2"; shift 2 ;;
        --port) [[ $# -ge 2 ]] || die "--port needs a number"; port="$2"; shift 2 ;;
        *) rest+=("$1"); shift ;;
    esac
done
if [[ -n "${TENSORBOARD:-}" ]]; then
    read -r -a tensorboard <<<"$TENSORBOARD"
elif [[ -x "$CATNEURON_REPO/.venv/bin/tensorboard" ]]; then
    tensorboard=("$CATNEURON_REPO/.venv/bin/tensorboard")
else
    tensorboard=(tensorboard)
fi
echo "tensorboard: http://$host:$port (logdir $logdir)" >&2
exec "${tensorboard[@]}" --logdir "$logdir" --host "$host" --port "$port" ${rest[@]+"${rest[@]}"}
