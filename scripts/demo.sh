#!/usr/bin/env bash
# The demo: install, build, start a local S3 server, write a database through
# the extension in the sqlite3 shell, delete it, restore it with
# bottomless-cli, and show it is identical.
#
# STATUS: replication and restore are not built yet (issues 3 and 4). Until
# they land this script goes as far as it honestly can: it installs, builds,
# starts the server, loads the extension and opens a database through the
# (pass-through) bottomless VFS, then says what is missing and exits 1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$ROOT/build}"
cd "$ROOT"

"$ROOT/scripts/install-deps.sh"
cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD_DIR" -j"$(nproc)" >/dev/null

export BOTTOMLESS_S3_DIR="${BOTTOMLESS_S3_DIR:-$(mktemp -d /tmp/bottomless-demo-s3.XXXXXX)}"
trap '"$ROOT/scripts/s3-server.sh" stop || true' EXIT
"$ROOT/scripts/s3-server.sh" start
eval "$("$ROOT/scripts/s3-server.sh" env)"

WORK="$(mktemp -d /tmp/bottomless-demo.XXXXXX)"
echo "demo: writing $WORK/app.db through the bottomless VFS"
sqlite3 <<SQL
.load $BUILD_DIR/bottomless
.open file:$WORK/app.db?vfs=bottomless
PRAGMA journal_mode=wal;
CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
INSERT INTO t(v) VALUES ('hello'), ('bottomless');
SELECT count(*) || ' rows written' FROM t;
SQL
rm -rf "$WORK"
echo "demo: not yet possible: the VFS does not replicate yet and bottomless-cli cannot restore yet" >&2
echo "demo: (see issues 3 and 4; scripts/test.sh runs what exists)" >&2
exit 1
