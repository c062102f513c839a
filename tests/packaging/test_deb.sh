#!/usr/bin/env bash
# The Debian package from scripts/package.sh, installed as an operator would:
# `dpkg -i` (then `dpkg -P`), and used from the system paths: the sqlite3 shell
# with `.load bottomless` (a bare name: SQLite hands it to dlopen, which finds
# /usr/lib/<multiarch>/bottomless.so) writes to the test S3 server, and
# /usr/bin/bottomless-cli restores what it wrote.
#
#   tests/packaging/test_deb.sh DIST_DIR    (ctest: packaging:deb)
#
# Installing into the machine needs root and a machine where the package is
# not installed already; otherwise (or with BOTTOMLESS_DEB_TEST=extract) the
# package is unpacked with `dpkg -x` into a scratch root and used from there
# through PATH and LD_LIBRARY_PATH (dlopen searches that for a bare name too).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DIST=$1
ARCH=$(dpkg --print-architecture)
MA=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -print-multiarch)
shopt -s nullglob
debs=("$DIST"/bottomless_*_"$ARCH".deb)
[[ ${#debs[@]} == 1 ]] || fail "expected one $DIST/bottomless_*_$ARCH.deb (scripts/package.sh), found ${#debs[@]}"
DEB=${debs[0]}
VERSION=$(dpkg-deb -f "$DEB" Version)
[[ $(basename "$DEB") == "bottomless_${VERSION}_$ARCH.deb" ]] || fail "$DEB is not named bottomless_${VERSION}_$ARCH.deb"
need_s3

mode=${BOTTOMLESS_DEB_TEST:-install}
if [[ $mode == install ]]; then
    if [[ $(id -u) != 0 ]]; then
        log "not root: unpacking with dpkg -x instead of installing"
        mode=extract
    elif dpkg-query -W -f='${Status}' bottomless 2>/dev/null | grep -q 'install ok installed'; then
        log "bottomless is installed on this machine already: unpacking with dpkg -x instead of replacing it"
        mode=extract
    fi
fi

if [[ $mode == install ]]; then
    on_exit '[[ -z ${DEB_INSTALLED:-} ]] || dpkg -P bottomless >/dev/null 2>&1 || log "dpkg -P bottomless failed"'
    DEB_INSTALLED=1
    dpkg -i "$DEB" >"$SCRATCH/dpkg.log" 2>&1 || {
        cat "$SCRATCH/dpkg.log" >&2
        fail "dpkg -i $DEB failed (missing dependencies? apt-get install $DEB resolves them)"
    }
    R=""
    dpkg -L bottomless | grep -qx "/usr/lib/$MA/bottomless.so" || fail "the package has no /usr/lib/$MA/bottomless.so"
else
    R=$SCRATCH/root
    dpkg -x "$DEB" "$R"
    export LD_LIBRARY_PATH="$R/usr/lib/$MA${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
CLI=$R/usr/bin/bottomless-cli
CLI_FOR_CLEANUP=$CLI
log "mode: $mode"

# -- the files, where Debian puts them --
for f in usr/bin/bottomless-cli usr/bin/bottomless-restore-before-start usr/include/bottomless.h \
    "usr/lib/$MA/bottomless.so" "usr/lib/$MA/libbottomless.a" "usr/lib/$MA/libbottomless.so" \
    "usr/lib/$MA/pkgconfig/bottomless.pc" "usr/lib/$MA/cmake/bottomless/bottomlessConfig.cmake" \
    usr/share/doc/bottomless/README.md usr/share/man/man1/bottomless-cli.1; do
    [[ -e $R/$f ]] || fail "/$f is not in the package"
done
depends=$(dpkg-deb -f "$DEB" Depends)
for d in libcurl4 libsqlite3-0 libssl3 libzstd1 libpugixml1v5; do
    [[ $depends == *"$d"* ]] || fail "Depends lacks $d: $depends"
done

# -- the programs run from the system paths --
out=$("$CLI" --version) || fail "bottomless-cli --version failed"
[[ $out == "bottomless-cli $VERSION "* ]] || fail "bottomless-cli --version says '$out', the package is $VERSION"
"$CLI" --help | grep -q restore || fail "bottomless-cli --help does not mention restore"
rc=0
"$R/usr/bin/bottomless-restore-before-start" 2>/dev/null || rc=$?
[[ $rc == 2 ]] || fail "bottomless-restore-before-start without arguments exits $rc, not 2 (usage)"
if [[ $mode == install ]]; then
    [[ $(pkg-config --modversion bottomless) == "$VERSION" ]] || fail "pkg-config does not find bottomless $VERSION in /usr"
    if command -v man >/dev/null; then
        man -w bottomless-cli | grep -q "^/usr/share/man/man1/bottomless-cli.1" || fail "man -w bottomless-cli: $(man -w bottomless-cli 2>&1)"
    fi
fi

# -- the sqlite3 shell loads the extension by its bare name and replicates --
# (run from the scratch directory: nothing named bottomless* is in reach but the package's)
cd "$SCRATCH"
IDS+=(deb.db)
out=$(sqlite3 2>&1 <<EOF
.load bottomless
.open file:$SCRATCH/deb.db?vfs=bottomless&sync=1
PRAGMA journal_mode=wal;
CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<300) INSERT INTO notes(body) SELECT 'deb ' || i FROM n;
SELECT 'flushed ' || json_extract(bottomless_flush(), '$.generation');
EOF
) || fail "sqlite3 with .load bottomless failed: $out"
[[ $out == *"flushed "* ]] || fail "sqlite3 printed: $out"
[[ $out != *rror* ]] || fail "sqlite3 reported an error: $out"
rows=$(restore_and_query "$CLI" deb.db "$SCRATCH/restored.db" "SELECT count(*) || ' ' || sum(length(body)) FROM notes")
expected=$(sqlite3 "$SCRATCH/deb.db" "SELECT count(*) || ' ' || sum(length(body)) FROM notes")
[[ $rows == "$expected" && $rows == 300\ * ]] || fail "restored '$rows', the database holds '$expected'"
log "ok: .load bottomless from the system path wrote 300 rows; /usr/bin/bottomless-cli restored them with $CLI"

if [[ $mode == install ]]; then
    delete_bucket # while the package's CLI is still there
    DEB_INSTALLED=""
    dpkg -P bottomless >/dev/null 2>&1 || fail "dpkg -P bottomless failed"
    [[ ! -e /usr/lib/$MA/bottomless.so && ! -e /usr/bin/bottomless-cli ]] || fail "dpkg -P left files behind"
    log "ok: dpkg -P removed it"
fi
log "ok"
