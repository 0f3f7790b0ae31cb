# shellcheck shell=bash
# Sourced by the launch scripts: where catneuron is, and one-line errors.
#
# CATNEURON overrides the command (for example "python -m catneuron" or a path);
# by default the repository's .venv/bin/catneuron, else `catneuron` on PATH.

CATNEURON_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The catneuron command as an array in CATNEURON_CMD (used by the sourcing script).
# shellcheck disable=SC2034
find_catneuron() {
    if [[ -n "${CATNEURON:-}" ]]; then
        read -r -a CATNEURON_CMD <<<"$CATNEURON"
    elif [[ -x "$CATNEURON_REPO/.venv/bin/catneuron" ]]; then
        CATNEURON_CMD=("$CATNEURON_REPO/.venv/bin/catneuron")
    elif command -v catneuron >/dev/null 2>&1; then
        CATNEURON_CMD=(catneuron)
    else
        die "catneuron: not found (install it, or set CATNEURON=/path/to/catneuron)"
    fi
}

# die MESSAGE: the one-line error of a usage mistake, exit status 2.
die() {
    echo "$(basename "$0"): $1" >&2
    exit 2
}

# first_host HOSTFILE: the first host of a DeepSpeed hostfile ('host slots=N' lines, # comments).
first_host() {
    local host
    host="$(sed -e 's/#.*//' "$1" | awk 'NF { print $1; exit }')"
    [[ -n "$host" ]] || die "$1: no host in this hostfile"
    echo "$host"
}

# print_usage: the script's header comment (every line after the shebang up to the first
# line that is not a comment).
print_usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}
