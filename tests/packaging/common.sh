# Shared by the tests/packaging/test_*.sh scripts (sourced, not run).
# Each test works in its own scratch directory and bucket and removes both.

set -euo pipefail

TEST_NAME=${TEST_NAME:-$(basename "$0" .sh)}
log() { printf '%s: %s\n' "$TEST_NAME" "$*" >&2; }
fail() {
    log "FAIL: $*"
    exit 1
}
# check DESCRIPTION COMMAND...: runs COMMAND, fails the test with DESCRIPTION if it fails.
check() {
    local what=$1
    shift
    "$@" || fail "$what"
}

SCRATCH=$(mktemp -d "/tmp/bottomless-$TEST_NAME.XXXXXX")
CLEANUPS=()
cleanup() {
    local i
    for ((i = ${#CLEANUPS[@]} - 1; i >= 0; i--)); do eval "${CLEANUPS[i]}" || true; done
    rm -rf "$SCRATCH"
}
trap cleanup EXIT
on_exit() { CLEANUPS+=("$1"); }

# The test S3 server's endpoint and keys come from the environment
# (scripts/test.sh exports them; or eval "$(scripts/s3-server.sh env)").
need_s3() {
    [[ -n ${LIBSQL_BOTTOMLESS_ENDPOINT:-} && -n ${AWS_ACCESS_KEY_ID:-} ]] ||
        fail "LIBSQL_BOTTOMLESS_ENDPOINT/AWS_ACCESS_KEY_ID are not set: run scripts/test.sh, or" \
            "scripts/s3-server.sh start && eval \"\$(scripts/s3-server.sh env)\""
    BUCKET="pkg-$TEST_NAME-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
    BUCKET=${BUCKET//_/-}
    export LIBSQL_BOTTOMLESS_BUCKET=$BUCKET
    on_exit "delete_bucket"
}

# Removes every generation of the database ids written (CLI_FOR_CLEANUP, IDS)
# and then the bucket; best effort, a leftover bucket on the test server is harmless.
IDS=()
delete_bucket() {
    local id
    [[ -z ${BUCKET_DELETED:-} ]] || return 0
    BUCKET_DELETED=1
    for id in "${IDS[@]}"; do
        "${CLI_FOR_CLEANUP:-bottomless-cli}" -d "$id" rm --keep 0 --force -q >/dev/null 2>&1 || true
    done
    # curl signs the payload hash header only when given (RGW requires it): that of an empty body.
    curl -fsS -o /dev/null -X DELETE --aws-sigv4 "aws:amz:${AWS_REGION:-us-east-1}:s3" \
        -H "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" \
        --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" "$LIBSQL_BOTTOMLESS_ENDPOINT/$BUCKET" 2>/dev/null ||
        log "note: bucket $BUCKET was not removed"
}

# restore_and_query CLI ID OUT SQL: restores database ID to OUT with CLI, checks
# PRAGMA integrity_check, and prints what SQL returns on the restored file.
restore_and_query() {
    local cli=$1 id=$2 out=$3 sql=$4
    "$cli" -d "$id" restore -o "$out" -q >/dev/null || fail "bottomless-cli restore of $id failed"
    [[ $(sqlite3 "$out" 'PRAGMA integrity_check') == ok ]] || fail "restored $id fails integrity_check"
    sqlite3 "$out" "$sql"
}
