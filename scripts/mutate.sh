#!/usr/bin/env bash
# Mutation check: are the invariants of DESIGN.md guarded by tests?
#
# Applies, one at a time, a list of one-line changes to the code (each breaks
# one invariant: committed only, the chain check, the point-in-time boundary,
# sync refusal, the key checks, the trailer check, data before metadata, ...),
# rebuilds, runs the tests that should notice, and reports which mutations
# survived. Every listed mutation must be killed: a survivor is an invariant
# no test guards (add a test), a mutation that no longer applies means the
# code moved (update its pattern here and the table in docs/TESTING.md).
#
# It works in a scratch git worktree of a commit (never in your tree), with
# its own build directory, and needs the test S3 server (started for the run
# unless BOTTOMLESS_S3_DIR names one already running). Slow (about a minute
# per mutation on 2 cores): not run by CI.
#
#   scripts/mutate.sh                       # every mutation, on HEAD
#   scripts/mutate.sh chain-prev-sha pitr-segment   # only these
#   scripts/mutate.sh --list                # the list, nothing run
#
#   MUTATE_REF=<commit>   what to mutate (default HEAD: committed code only)
#   MUTATE_WT=/tmp/mutate-wt   the scratch worktree (created, reused, kept)
#   JOBS=2                build parallelism
#   MUTATE_TIMEOUT=900    seconds per test run; a hang counts as a kill
set -euo pipefail

ROOT="${MUTATE_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"  # MUTATE_ROOT: when run from a copy
REF="${MUTATE_REF:-HEAD}"
WT="${MUTATE_WT:-/tmp/mutate-wt}"
JOBS="${JOBS:-2}"
TIMEOUT="${MUTATE_TIMEOUT:-900}"

# ---- the mutations ----
# mut ID INVARIANT FILE FROM TO TESTS
#   FROM must occur exactly once in FILE (literal text); it is replaced by TO.
#   TESTS: "binary:filter" specs separated by ';' (Catch2 test names or tags;
#   names never hold ';'). The mutation is killed when one of them fails.
IDS=() INVS=() FILES=() FROMS=() TOS=() TESTS=()
mut() { IDS+=("$1"); INVS+=("$2"); FILES+=("$3"); FROMS+=("$4"); TOS+=("$5"); TESTS+=("$6"); }

# 1 committed only: a frame without a commit marker counts as a commit.
mut wal-commit-marker "1 committed only" replicator/wal.cpp \
    'if (db_size != 0) {' 'if (true) {' \
    'unit_tests:[wal]'
# 1 committed only, exclusive locking mode: every frame write is a commit boundary.
mut vfs-exclusive-commit "1 committed only" vfs/vfs.cpp \
    'bool commit = be32(p + 4) != 0;' 'bool commit = true;' \
    'vfs_tests:exclusive locking mode: commits seen without shared memory, WAL restarts staged;vfs_tests:committed only: a rolled-back transaction'"'"'s frames never reach the bucket'
# 1/3 the WAL checksum chain is not verified.
mut wal-frame-checksum "3 continuity (WAL checksums)" replicator/wal.cpp \
    'if (a != f.cksum1 || b != f.cksum2) return false;' '' \
    'unit_tests:[wal]'
# 2 nothing unshipped discarded: a WAL restart over unshipped frames is allowed.
mut vfs-restart-veto "2 nothing unshipped discarded" vfs/vfs.cpp \
    'if (!allowed) return SQLITE_BUSY;' '(void)allowed;' \
    'vfs_tests:S3 outage under async writes: no error to the app, everything durable afterwards;vfs_tests:exclusive locking mode: commits seen without shared memory, WAL restarts staged'
mut restart-over-memory-cap "2 nothing unshipped discarded" replicator/capture.cpp \
    'return !tee_.has_hole() && unshipped_bytes_.load() <= config_.max_pending_bytes;' 'return true;' \
    'vfs_tests:S3 outage under async writes: no error to the app, everything durable afterwards'
# 3 continuity: restore's chain check.
mut chain-all "3 continuity (restore)" replicator/restore.cpp \
    'if (sh.prev_sha256 != res.last_sha256 || !(sh.start == res.position))' 'if (false)' \
    'cli_tests:[chain]'
mut chain-prev-sha "3 continuity (restore)" replicator/restore.cpp \
    'if (sh.prev_sha256 != res.last_sha256 || !(sh.start == res.position))' 'if (!(sh.start == res.position))' \
    'cli_tests:[chain]'
mut chain-start "3 continuity (restore)" replicator/restore.cpp \
    'if (sh.prev_sha256 != res.last_sha256 || !(sh.start == res.position))' 'if (sh.prev_sha256 != res.last_sha256)' \
    'cli_tests:[chain]'
mut chain-missing-segment "3/5 continuity, a missing object is named" replicator/restore.cpp \
    '            if (e.kind == ErrorKind::NotFound)
                e = make_error(ErrorKind::Corrupt,
                               "segment "' \
    '            if (false)
                e = make_error(ErrorKind::Corrupt,
                               "segment "' \
    'cli_tests:[chain]'
mut segment-wrong-object "3/5 a segment under another key" replicator/restore.cpp \
    'if (sh.db_id != db_id || sh.generation != chosen.id || sh.seq != seq)' 'if (false)' \
    'cli_tests:[chain]'
# 3 continuity, writer side: a WAL changed behind bottomless's back.
mut foreign-writer "3 continuity (writer)" replicator/capture.cpp \
    'if (!same_epoch || mx_frame < last_noted_frame_) foreign_writer_.store(true);' \
    'if ((!same_epoch || mx_frame < last_noted_frame_) && false) foreign_writer_.store(true);' \
    'vfs_tests:a writer that bypasses bottomless never makes history vanish'
# 4 committed prefix at a point in time: a commit at exactly T is included.
mut pitr-segment ">= vs >: point in time (segments)" replicator/restore.cpp \
    'if (options.until_us && txn.commit_us > *options.until_us) break;' \
    'if (options.until_us && txn.commit_us >= *options.until_us) break;' \
    'cli_tests:[pitr]'
mut pitr-generation ">= vs >: point in time (library: generation id)" replicator/restore.cpp \
    'gen_time_us(g.id) > *options.until_us' 'gen_time_us(g.id) >= *options.until_us' \
    'cli_tests:[pitr]'
mut pitr-snapshot ">= vs >: point in time (library: snapshot)" replicator/restore.cpp \
    'snap->last_commit_us > *options.until_us' 'snap->last_commit_us >= *options.until_us' \
    'cli_tests:[pitr]'
mut pitr-cli-choice ">= vs >: point in time (CLI: generation choice)" cli/history.cpp \
    'if (g.snapshot_time_us() > *until_us) {' 'if (g.snapshot_time_us() >= *until_us) {' \
    'cli_tests:[pitr]'
# 4 sync mode: a COMMIT that could not be made durable is refused.
mut sync-refusal "4 sync: refused unless durable" replicator/capture.cpp \
    'if (!st || durable_index_.load() < idx) {' 'if (false) {' \
    'vfs_tests:sync mode: COMMIT is durable when it returns, refused when S3 cannot take it'
# 5 self-validating objects: the SHA-256 trailer.
mut trailer-segment "5 trailer (segments)" replicator/format_segment.cpp \
    'if (std::memcmp(digest.data(), trailer.data(), kTrailerSize) != 0)' \
    'if (std::memcmp(digest.data(), trailer.data(), kTrailerSize) != 0 && false)' \
    'unit_tests:[format]'
mut trailer-snapshot "5 trailer (snapshots)" replicator/format_snapshot.cpp \
    '(r.verify_trailer && r.hasher.finish() != r.tail)' '(r.verify_trailer && r.hasher.finish() != r.tail && false)' \
    'unit_tests:[format]'
# 5 encryption: the wrong key, at open and at decode; the AEAD tag.
mut key-at-open "5 wrong key refused at open" replicator/startup.cpp \
    'if (latest && latest_enc && cipher_ && !encryption_switch)' 'if (false)' \
    'vfs_tests:a wrong, missing or unexpected key is named, and nothing is written;vfs_tests:key rotation starts a new generation when forced, and each generation keeps its key'
# (Not listed: removing restore.cpp's early check_cipher on the snapshot header
# is equivalent: the snapshot reader's own check, key-at-decode-snapshot, gives
# the same WrongEncryptionKey before any page is written.)
mut key-at-decode-segment "5 wrong key refused at decode (segments)" replicator/format_segment.cpp \
    'if (Status st = check_cipher(header.encryption, cipher, name); !st) return std::move(st).error();' '' \
    'unit_tests:[encryption]'
mut key-at-decode-snapshot "5 wrong key refused at decode (snapshots)" replicator/format_snapshot.cpp \
    'if (Status st = check_cipher(h->encryption, cipher, name); !st) return st;' '' \
    'unit_tests:[encryption]'
mut aead-tag "5 encrypted chunks authenticated" replicator/encryption.cpp \
    'if (!gcm_->open(nonce, aad_, sealed, plain_.get())) {' 'if ((void)gcm_->open(nonce, aad_, sealed, plain_.get()), false) {' \
    'unit_tests:[encryption]'
# 6 data before metadata: no one-line mutation breaks it. Two guards hold it:
# step() returns when the snapshot upload failed, before upload_pending(), and
# upload_pending() refuses while need_snapshot_ (removing either alone survives,
# as it should). vfs: "data before metadata: ..." tests the pair.
# 9 a snapshot is a consistent image: no checkpoint writes the database file under it.
mut snapshot-ckpt-veto "9 consistent snapshot" vfs/vfs.cpp \
    'if (ofst == kShmCkptLock && n == 1 && !r->checkpoint_allowed()) {' 'if (false) {' \
    'vfs_tests:[snapshot]'
# The large-object paths run in CI (cli: a 64 MiB database): these two
# mutations send it down the small-object paths, which must be noticed.
mut large-ranged-restore "CI reaches the parallel ranged-GET restore" replicator/restore.cpp \
    'if (chosen.snapshot_bytes <= 2 * kChunk || options.parallel <= 1) {' 'if (true) {' \
    'cli_tests:[large]'
mut large-multipart "CI reaches the multipart snapshot upload" s3/config.h \
    'uint64_t part_size = 8ull << 20;' 'uint64_t part_size = 256ull << 20;' \
    'cli_tests:[large]'
# Listings follow continuation tokens (DESIGN: known traps).
mut list-continuation "listing pages" s3/client_listing.cpp \
    'if (!page->is_truncated) return {};' 'return {};' \
    'integration_tests:2500 keys listed across pages, with prefix and delimiter'

if [[ "${1:-}" == "--list" ]]; then
    for i in "${!IDS[@]}"; do printf '%-26s %-45s %s\n' "${IDS[$i]}" "${INVS[$i]}" "${FILES[$i]}"; done
    exit 0
fi
SELECTED=("$@")
selected() {
    [[ ${#SELECTED[@]} -eq 0 ]] && return 0
    local s
    for s in "${SELECTED[@]}"; do [[ "$s" == "$1" ]] && return 0; done
    return 1
}
for s in "${SELECTED[@]}"; do
    found=0
    for id in "${IDS[@]}"; do [[ "$id" == "$s" ]] && found=1; done
    [[ $found == 1 ]] || { echo "mutate.sh: no mutation '$s' (see --list)" >&2; exit 2; }
done

# ---- the scratch worktree and its build ----
if [[ ! -e "$WT/.git" ]]; then
    git -C "$ROOT" worktree add --detach "$WT" "$REF" >/dev/null
else
    git -C "$WT" checkout --quiet --detach --force "$(git -C "$ROOT" rev-parse "$REF")"
fi
echo "mutating $(git -C "$WT" log --oneline -1) in $WT"
BUILD="$WT/build-tests"
# Same layout under the same base dir as a developer's build-tests: ccache hits.
export CCACHE_BASEDIR="$WT"
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
cmake -S "$WT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBOTTOMLESS_WERROR=ON "${launcher[@]}" >/dev/null

# ---- the server ----
OWN_SERVER=0
if [[ -n "${LIBSQL_BOTTOMLESS_ENDPOINT:-}" ]]; then
    echo "using the S3 server at $LIBSQL_BOTTOMLESS_ENDPOINT (from the environment)"
elif [[ -n "${BOTTOMLESS_S3_DIR:-}" ]] && "$ROOT/scripts/s3-server.sh" status >/dev/null 2>&1; then
    eval "$("$ROOT/scripts/s3-server.sh" env)"
elif BOTTOMLESS_S3_DIR=/tmp/bottomless-s3-dev "$ROOT/scripts/s3-server.sh" status >/dev/null 2>&1; then
    export BOTTOMLESS_S3_DIR=/tmp/bottomless-s3-dev
else
    export BOTTOMLESS_S3_DIR="$(mktemp -d /tmp/bottomless-mutate-s3.XXXXXX)"
    OWN_SERVER=1
    "$ROOT/scripts/s3-server.sh" start
fi
[[ -n "${LIBSQL_BOTTOMLESS_ENDPOINT:-}" ]] || eval "$("$ROOT/scripts/s3-server.sh" env)"

CURRENT_FILE=""
cleanup() {
    [[ -n "$CURRENT_FILE" ]] && git -C "$WT" checkout --quiet -- "$CURRENT_FILE"
    [[ $OWN_SERVER == 1 ]] && "$ROOT/scripts/s3-server.sh" stop || true
}
trap cleanup EXIT

# Replaces FROM by TO in FILE (both literal); fails unless FROM occurs exactly once.
apply() {
    FROM="$2" TO="$3" python3 - "$1" <<'PY'
import os, sys
path = sys.argv[1]
src = open(path).read()
frm, to = os.environ["FROM"], os.environ["TO"]
n = src.count(frm)
if n != 1:
    sys.exit(f"pattern occurs {n} times")
line = src[: src.index(frm)].count("\n") + 1
open(path, "w").write(src.replace(frm, to))
print(line)
PY
}

binaries_of() {  # the binaries a TESTS field runs
    local IFS=';' spec
    for spec in $1; do echo "${spec%%:*}"; done | sort -u
}

# Runs each spec; prints the first that fails (empty: all passed).
run_tests() {
    local IFS=';' spec
    for spec in $1; do
        local bin="${spec%%:*}" filter="${spec#*:}"
        # A test name (not a [tag] expression) has ',' '[' ']' escaped, as
        # Catch2 reads them as operators (CatchAddTests.cmake does the same).
        if [[ "$filter" != \[* ]]; then filter="${filter//,/\\,}"; fi
        if ! (cd "$BUILD/tests" && timeout "$TIMEOUT" "./$bin" "$filter" -w NoTests >"$LOG_DIR/last.log" 2>&1); then
            echo "$bin \"$filter\""
            return 0
        fi
    done
}

build() {  # targets...
    nice -n 5 cmake --build "$BUILD" -j"$JOBS" --target "$@" >"$LOG_DIR/build.log" 2>&1
}

LOG_DIR="$(mktemp -d /tmp/bottomless-mutate-log.XXXXXX)"
all_bins=()
for i in "${!IDS[@]}"; do
    selected "${IDS[$i]}" || continue
    mapfile -t b < <(binaries_of "${TESTS[$i]}")
    all_bins+=("${b[@]}")
done
mapfile -t all_bins < <(printf '%s\n' "${all_bins[@]}" | sort -u)

# ---- the baseline: every test used must pass unmutated ----
echo "baseline build (${all_bins[*]}) ..."
build "${all_bins[@]}" || { tail -30 "$LOG_DIR/build.log"; echo "baseline build failed" >&2; exit 1; }
declare -A seen
for i in "${!IDS[@]}"; do
    selected "${IDS[$i]}" || continue
    [[ -n "${seen[${TESTS[$i]}]:-}" ]] && continue
    seen[${TESTS[$i]}]=1
    failed="$(run_tests "${TESTS[$i]}")"
    if [[ -n "$failed" ]]; then
        tail -40 "$LOG_DIR/last.log"
        echo "baseline: $failed fails without any mutation: fix that first" >&2
        exit 1
    fi
done
echo "baseline passes"

# ---- one mutation at a time ----
survivors=0 stale=0 total=0
results=()
for i in "${!IDS[@]}"; do
    selected "${IDS[$i]}" || continue
    total=$((total + 1))
    id="${IDS[$i]}" file="${FILES[$i]}"
    t0=$SECONDS
    if ! line="$(apply "$WT/$file" "${FROMS[$i]}" "${TOS[$i]}" 2>&1)"; then
        results+=("$(printf '%-26s %-34s STALE: %s' "$id" "$file" "$line")")
        stale=$((stale + 1))
        continue
    fi
    CURRENT_FILE="$file"
    mapfile -t bins < <(binaries_of "${TESTS[$i]}")
    if ! build "${bins[@]}"; then
        # Not a behaviour change: the mutation itself needs fixing.
        verdict="STALE: does not build ($(grep -m1 'error' "$LOG_DIR/build.log" | cut -c1-120))"
        stale=$((stale + 1))
    else
        failed="$(run_tests "${TESTS[$i]}")"
        if [[ -n "$failed" ]]; then verdict="killed by $failed"; else verdict="SURVIVED (${TESTS[$i]})"; survivors=$((survivors + 1)); fi
    fi
    git -C "$WT" checkout --quiet -- "$file"
    CURRENT_FILE=""
    results+=("$(printf '%-26s %-34s %s (%ds)' "$id" "$file:$line" "$verdict" $((SECONDS - t0)))")
    echo "${results[-1]}"
done
# Leave the build matching the unmutated tree.
build "${all_bins[@]}" || true

echo
echo "== mutations of $(git -C "$WT" log --oneline -1 | cut -c1-60)"
printf '%s\n' "${results[@]}"
echo "$total mutation(s): $((total - survivors - stale)) killed, $survivors survived, $stale stale"
rm -rf "$LOG_DIR"
[[ $survivors == 0 && $stale == 0 ]]
