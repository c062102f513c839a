#!/usr/bin/env bash
# The demo, on a fresh Debian machine: installs what is missing, builds,
# starts a local S3 server on loopback, writes a database through the
# extension in the sqlite3 shell, deletes it, restores it with
# bottomless-cli, and shows that the restored database is identical.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$ROOT/build}"
cd "$ROOT"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "installing what is missing and building"
"$ROOT/scripts/install-deps.sh"
cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD_DIR" -j"$(nproc)" >/dev/null

say "starting a local S3 server (Ceph RADOS Gateway on 127.0.0.1)"
export BOTTOMLESS_S3_DIR="${BOTTOMLESS_S3_DIR:-$(mktemp -d /tmp/bottomless-demo-s3.XXXXXX)}"
WORK="$(mktemp -d /tmp/bottomless-demo.XXXXXX)"
cleanup() {
  "$ROOT/scripts/s3-server.sh" stop || true
  rm -rf "$WORK"
}
trap cleanup EXIT
"$ROOT/scripts/s3-server.sh" start
eval "$("$ROOT/scripts/s3-server.sh" env)"
export LIBSQL_BOTTOMLESS_BUCKET="demo-$$"
DB="$WORK/app.db"

say "writing $DB through the extension in the sqlite3 shell"
sqlite3 <<SQL
.bail on
.load $BUILD_DIR/bottomless
.open file:$DB?vfs=bottomless
PRAGMA journal_mode=wal;
CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT, at TEXT);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<5000)
  INSERT INTO notes(body, at) SELECT 'note ' || i, datetime('now') FROM n;
UPDATE notes SET body = body || ' (edited)' WHERE id % 7 = 0;
DELETE FROM notes WHERE id % 11 = 0;
SELECT 'durable in S3: ' || bottomless_flush();
-- more transactions: these travel as small WAL segments, not snapshots
INSERT INTO notes(body, at) VALUES ('one more', datetime('now'));
BEGIN; UPDATE notes SET at = datetime('now') WHERE id < 100; COMMIT;
DELETE FROM notes WHERE id BETWEEN 200 AND 260;
SELECT count(*) || ' rows committed' FROM notes;
SELECT 'durable in S3: ' || bottomless_flush();
.once $WORK/before.sql
.dump
SQL

say "deleting the local database"
rm -f "$DB" "$DB-wal" "$DB-shm" "$DB-bottomless"
ls -la "$WORK"

say "what the bucket holds"
"$BUILD_DIR/bottomless-cli" -d app.db ls

say "restoring it with bottomless-cli"
"$BUILD_DIR/bottomless-cli" -d app.db restore -o "$DB"

say "comparing"
sqlite3 "$DB" .dump > "$WORK/after.sql"
echo "integrity_check: $(sqlite3 "$DB" 'PRAGMA integrity_check')"
if cmp -s "$WORK/before.sql" "$WORK/after.sql"; then
  echo "identical: $(sha256sum < "$WORK/after.sql" | cut -c1-16)… ($(wc -l < "$WORK/after.sql") lines of .dump)"
else
  echo "DIFFERENT: the restored database does not match" >&2
  diff "$WORK/before.sql" "$WORK/after.sql" | head -20 >&2
  exit 1
fi
