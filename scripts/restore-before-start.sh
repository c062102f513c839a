#!/usr/bin/env bash
# restore-before-start.sh - a container entry point: restore the database from
# the bucket if it is missing, then run the application.
#
# Usage: restore-before-start.sh [RESTORE OPTIONS] DB_PATH -- COMMAND [ARGS...]
#
#   DB_PATH present (non-empty file, or a non-empty DB_PATH-wal):
#       runs COMMAND at once; the bucket is not contacted.
#   DB_PATH missing, the bucket holds a replica:
#       restores it to DB_PATH (bottomless-cli restore), then runs COMMAND.
#   DB_PATH missing, no replica in the bucket (or no such bucket):
#       runs COMMAND, which starts a new database.
#   A restore was needed and failed (S3 unreachable, wrong credentials, a
#   corrupt object, ...): exits with bottomless-cli's code (non-zero) and does
#   NOT run COMMAND, so the application never starts on an empty database
#   while its data sits in the bucket.
#
# RESTORE OPTIONS go to `bottomless-cli restore`: -e/-b/-d, --utc-time,
# -g, --parallel. Without them the usual environment applies
# (LIBSQL_BOTTOMLESS_ENDPOINT, LIBSQL_BOTTOMLESS_BUCKET,
# LIBSQL_BOTTOMLESS_DATABASE_ID — default: DB_PATH's file name — and the AWS
# variables/files). COMMAND runs through `exec`, so it gets the script's PID
# (signals reach it directly) and its exit code is the container's.
#
# A restored file carries a note (DB_PATH-bottomless) of what it was restored
# from: the extension, opening it untouched, starts a new generation whose
# parent is the restored one, so the history continues without loss.
#
# Environment:
#   BOTTOMLESS_CLI   path of bottomless-cli (default: on PATH, else ../build/ next to this script)
#
# Logs go to stderr, one line each, prefixed "restore-before-start:".
# docs/CLI.md has a container example.
set -euo pipefail

log() { printf 'restore-before-start: %s\n' "$*" >&2; }
usage() {
    echo "usage: $0 [RESTORE OPTIONS] DB_PATH -- COMMAND [ARGS...]" >&2
    exit 2
}

opts=()
while [[ $# -gt 0 && $1 != "--" ]]; do
    opts+=("$1")
    shift
done
[[ $# -gt 0 ]] || usage          # no "--"
shift
[[ $# -gt 0 ]] || usage          # no command
[[ ${#opts[@]} -gt 0 ]] || usage # no DB_PATH
db=${opts[-1]}
unset 'opts[-1]'
[[ -n $db ]] || usage

cli=${BOTTOMLESS_CLI:-}
if [[ -z $cli ]]; then
    if command -v bottomless-cli >/dev/null 2>&1; then
        cli=$(command -v bottomless-cli)
    else
        cli="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/build/bottomless-cli"
    fi
fi

if [[ -s $db || -s $db-wal ]]; then
    log "$db exists ($(stat -c %s "$db" 2>/dev/null || echo 0) bytes): starting '$1' without a restore"
    exec "$@"
fi

if [[ ! -x $cli ]]; then
    log "error: $db is missing and bottomless-cli was not found (set BOTTOMLESS_CLI): not starting '$1'"
    exit 1
fi
mkdir -p "$(dirname "$db")"
log "$db is missing: restoring it from the bucket"
start=$(date +%s.%N)
rc=0
# The report goes to stderr with the rest of our logs; COMMAND's stdout stays its own.
"$cli" restore -o "$db" --if-db-not-exists --if-replica-exists "${opts[@]}" >&2 || rc=$?
if [[ $rc -ne 0 ]]; then
    log "error: restoring $db failed (bottomless-cli exit $rc, see above): not starting '$1'"
    exit "$rc"
fi
if [[ -s $db ]]; then
    log "restored $db in $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }') s: starting '$1'"
else
    log "the bucket holds no replica of $db: starting '$1' with a new database"
fi
exec "$@"
