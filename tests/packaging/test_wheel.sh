#!/usr/bin/env bash
# The Python wheel from scripts/package.sh, installed with pip (offline) into a
# fresh venv; an application writes through bottomless.connect(), flushes, and
# bottomless-cli restores a database with identical content.
#
#   tests/packaging/test_wheel.sh DIST_DIR BOTTOMLESS_CLI    (ctest: packaging:wheel)
#
# Also, for every other python3 on PATH whose sqlite3 cannot load extensions
# (a pyenv build without --enable-loadable-sqlite-extensions, say), the
# package's error for that case is checked with it.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DIST=$1
CLI=$2
CLI_FOR_CLEANUP=$CLI
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-/usr/bin/python3}
shopt -s nullglob
wheels=("$DIST"/bottomless-*-py3-none-*.whl)
[[ ${#wheels[@]} == 1 ]] || fail "expected one $DIST/bottomless-*-py3-none-*.whl (scripts/package.sh), found ${#wheels[@]}"
WHEEL=${wheels[0]}
need_s3

# A fresh venv (pip comes from Debian's python3-venv, no network) and the wheel in it.
"$PYTHON" -m venv "$SCRATCH/venv" || fail "$PYTHON -m venv failed (Debian: apt-get install python3-venv)"
PY=$SCRATCH/venv/bin/python
"$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check "$WHEEL" >"$SCRATCH/pip.log" 2>&1 || {
    cat "$SCRATCH/pip.log" >&2
    fail "pip install $WHEEL failed"
}
cd "$SCRATCH" # not the source tree: `import bottomless` must find the installed package
where=$("$PY" -c 'import bottomless; print(bottomless.loadable_path())')
[[ $where == "$SCRATCH/venv/lib/"*/site-packages/bottomless/bottomless.so ]] || fail "bottomless.loadable_path() is $where"
readelf -d "$where" | grep -q 'NEEDED.*libsqlite3' && fail "the wheel's extension links libsqlite3"

"$PY" "$HERE/wheel_app.py" checks || fail "the API checks failed"

# Write, flush, restore, compare. The file name needs URI escaping; the bucket
# reaches the extension only as connect(bucket=...).
db="$SCRATCH/py app?#1.db"
id=py-app
IDS+=("$id")
written=$(env -u LIBSQL_BOTTOMLESS_BUCKET "$PY" "$HERE/wheel_app.py" write "$db" "$BUCKET" "$id") ||
    fail "writing through bottomless.connect failed"
[[ -e $db && ! -e $SCRATCH/py ]] || fail "the database is not at '$db' (URI escaping)"
"$CLI" -b "$BUCKET" -d "$id" restore -o "$SCRATCH/restored.db" -q >/dev/null || fail "bottomless-cli restore failed"
[[ $(sqlite3 "$SCRATCH/restored.db" 'PRAGMA integrity_check') == ok ]] || fail "the restored database fails integrity_check"
restored=$("$PY" "$HERE/wheel_app.py" hash "$SCRATCH/restored.db")
[[ $restored == "$written" ]] || fail "restored content $restored differs from the written $written"
log "ok: wrote through bottomless.connect (sync), restored identical content ($written)"

# Pythons that cannot load extensions say so (opportunistic: only where one exists).
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for other in $(which -a python3 2>/dev/null | sort -u); do
    "$other" -c 'import sqlite3; sqlite3.Connection.enable_load_extension' 2>/dev/null && continue
    msg=$(PYTHONPATH=$site "$other" "$HERE/wheel_app.py" no-extensions "$SCRATCH/x.db" 2>&1) ||
        fail "$other (no extension loading): $msg"
    [[ $msg == *enable-loadable-sqlite-extensions* ]] || fail "$other: unclear error: $msg"
    log "ok: $other cannot load extensions and is told so"
done
log "ok"
