#!/usr/bin/env bash
# Multi-node DeepSpeed training from a hostfile ('host slots=N' lines, see
# cluster/hostfile.example).
#
#   launch/train_multinode.sh --hostfile F CONFIG [overrides]
#       from node 0: the DeepSpeed launcher starts every node over ssh (pdsh)
#   launch/train_multinode.sh --hostfile F --no-ssh [--node-rank R] [--master-addr H] CONFIG [overrides]
#       on every node, for schedulers that start one process per node themselves; the node
#       rank defaults to $NODE_RANK or $SLURM_NODEID, the master to $MASTER_ADDR or the
#       hostfile's first host
#
# Environment: MAX_RESTARTS (ssh mode 3, --no-ssh 0: there the scheduler restarts the step),
# MASTER_PORT (default 29500), NUM_GPUS (ranks per node; -1 = the hostfile's slots), CATNEURON.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

hostfile="" no_ssh=0 node_rank="${NODE_RANK:-${SLURM_NODEID:-}}" master_addr="${MASTER_ADDR:-}"
rest=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --hostfile) [[ $# -ge 2 ]] || die "--hostfile needs a file"; hostfile="$2"; shift 2 ;;
        --no-ssh) no_ssh=1; shift ;;
        --node-rank) [[ $# -ge 2 ]] || die "--node-rank needs a number"; node_rank="$2"; shift 2 ;;
        --master-addr) [[ $# -ge 2 ]] || die "--master-addr needs a host"; master_addr="$2"; shift 2 ;;
        -h | --help) print_usage; exit 0 ;;
        *) rest+=("$1"); shift ;;
    esac
done
[[ -n "$hostfile" ]] || { print_usage >&2; die "--hostfile is required"; }
[[ -f "$hostfile" ]] || die "$hostfile: no such hostfile"
[[ ${#rest[@]} -ge 1 ]] || die "a run config is required"
find_catneuron

common=(--hostfile "$hostfile" --master-port "${MASTER_PORT:-29500}" --num-gpus "${NUM_GPUS:--1}")
if [[ $no_ssh -eq 1 ]]; then
    [[ "$node_rank" =~ ^[0-9]+$ ]] || die "--no-ssh needs --node-rank (or NODE_RANK / SLURM_NODEID)"
    [[ -n "$master_addr" ]] || master_addr="$(first_host "$hostfile")"
    exec "${CATNEURON_CMD[@]}" train "${common[@]}" --max-restarts "${MAX_RESTARTS:-0}" \
        "${rest[@]}" --node-rank "$node_rank" --master-addr "$master_addr"
fi
command -v pdsh >/dev/null 2>&1 || die "pdsh: not found (the launcher reaches the nodes with it; or use --no-ssh on every node)"
[[ -n "$master_addr" ]] || master_addr="$(first_host "$hostfile")"
exec "${CATNEURON_CMD[@]}" train "${common[@]}" --max-restarts "${MAX_RESTARTS:-3}" \
    "${rest[@]}" --master-addr "$master_addr"
