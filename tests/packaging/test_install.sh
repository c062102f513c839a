#!/usr/bin/env bash
# `cmake --install` into a scratch prefix, then the installed example built out
# of tree against that prefix, with find_package (static and shared library)
# and with pkg-config (shared and static), and each build run against the test
# S3 server; its writes restore with the installed bottomless-cli.
#
#   tests/packaging/test_install.sh BUILD_DIR SOURCE_DIR    (ctest: packaging:install)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

BUILD=$1
SRC=$2
P=$SCRATCH/prefix
need_s3

check "cmake --install failed" cmake --install "$BUILD" --prefix "$P" >"$SCRATCH/install.log"
CLI_FOR_CLEANUP=$P/bin/bottomless-cli

# -- what is installed where --
PC=$(find "$P" -name bottomless.pc -path '*/pkgconfig/*')
[[ -n $PC ]] || fail "no pkgconfig/bottomless.pc under $P"
LIBDIR=$(dirname "$(dirname "$PC")")
for f in bin/bottomless-cli bin/bottomless-restore-before-start include/bottomless.h \
    share/doc/bottomless/README.md share/doc/bottomless/CLI.md share/doc/bottomless/INSTALL.md \
    share/doc/bottomless/examples/embedded.cpp share/man/man1/bottomless-cli.1; do
    [[ -s $P/$f ]] || fail "$f is not installed"
done
for f in bottomless.so libbottomless.a libbottomless.so cmake/bottomless/bottomlessConfig.cmake \
    cmake/bottomless/bottomlessConfigVersion.cmake; do
    [[ -e $LIBDIR/$f ]] || fail "${LIBDIR#"$P"/}/$f is not installed"
done

# The loadable extension never links a SQLite of its own; the shared library
# links the system's and exports exactly the header's functions (no
# sqlite3_bottomless_init, so it cannot be `.load`ed by mistake).
readelf -d "$LIBDIR/bottomless.so" | grep -q 'NEEDED.*libsqlite3' && fail "bottomless.so links libsqlite3"
nm -D --defined-only "$LIBDIR/bottomless.so" | grep -q ' T sqlite3_bottomless_init$' ||
    fail "bottomless.so does not export sqlite3_bottomless_init"
readelf -d "$LIBDIR/libbottomless.so" | grep -q 'NEEDED.*libsqlite3' || fail "libbottomless.so does not link libsqlite3"
exports=$(nm -D --defined-only "$LIBDIR/libbottomless.so" | awk '$2 == "T" { print $3 }' | sort | tr '\n' ' ')
[[ $exports == "bottomless_auto_extension bottomless_register bottomless_version " ]] ||
    fail "libbottomless.so exports '$exports', expected exactly the functions of bottomless.h"

# The installed programs run; the restore script finds the CLI next to it.
VERSION=$(sed -n 's/^project(bottomless VERSION \([0-9.]*\).*/\1/p' "$SRC/CMakeLists.txt")
version=$("$P/bin/bottomless-cli" --version) || fail "bottomless-cli --version failed"
[[ $version == "bottomless-cli $VERSION "* ]] || fail "bottomless-cli --version says '$version', expected $VERSION"
rc=0
"$P/bin/bottomless-restore-before-start" 2>/dev/null || rc=$?
[[ $rc == 2 ]] || fail "bottomless-restore-before-start without arguments exits $rc, not 2 (usage)"
if command -v man >/dev/null; then
    man -l "$P/share/man/man1/bottomless-cli.1" 2>/dev/null | grep -q 'restore' ||
        fail "man -l bottomless-cli.1 does not render"
fi

EXAMPLE=$P/share/doc/bottomless/examples/embedded.cpp

# -- find_package, out of tree --
if ! cmake -S "$SRC/tests/packaging/consumer" -B "$SCRATCH/consumer" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$P" -DEMBEDDED_SOURCE="$EXAMPLE" >"$SCRATCH/consumer.log" 2>&1; then
    cat "$SCRATCH/consumer.log" >&2
    fail "the find_package consumer does not configure"
fi
grep -q "from $LIBDIR/cmake/bottomless" "$SCRATCH/consumer.log" || fail "find_package did not pick the scratch prefix"
check "the find_package consumer does not build" cmake --build "$SCRATCH/consumer" -j2 >/dev/null

# -- pkg-config, out of tree --
export PKG_CONFIG_PATH=$LIBDIR/pkgconfig
[[ $(pkg-config --modversion bottomless) == "$VERSION" ]] || fail "pkg-config --modversion disagrees with the CLI"
[[ $(pkg-config --variable=extension bottomless) == "$LIBDIR/bottomless.so" ]] || fail "pkg-config extension= is wrong"
mkdir -p "$SCRATCH/pc"
# shellcheck disable=SC2046 # word splitting of pkg-config's output is the point
check "the pkg-config build (shared) failed" c++ -O1 -o "$SCRATCH/pc/embedded_shared" "$EXAMPLE" \
    $(pkg-config --cflags --libs bottomless) -Wl,-rpath,"$LIBDIR"
libs=$(pkg-config --static --libs bottomless)
# shellcheck disable=SC2046,SC2086
check "the pkg-config build (static) failed" c++ -O1 -o "$SCRATCH/pc/embedded_static" "$EXAMPLE" \
    $(pkg-config --cflags bottomless) ${libs/-lbottomless/-l:libbottomless.a}

# -- each build links what it says, and replicates to the server --
for exe in consumer/embedded_static consumer/embedded_shared pc/embedded_shared pc/embedded_static; do
    needs=$(readelf -d "$SCRATCH/$exe" | grep -c 'NEEDED.*libbottomless' || true)
    case $exe in
        *_static) [[ $needs == 0 ]] || fail "$exe links libbottomless.so" ;;
        *_shared) [[ $needs == 1 ]] || fail "$exe does not link libbottomless.so" ;;
    esac
    id="${exe//\//-}.db"
    IDS+=("$id")
    out=$("$SCRATCH/$exe" "$SCRATCH/$id" 120 2>&1) || fail "$exe failed: $out"
    [[ $out == durable:* ]] || fail "$exe printed '$out'"
    rows=$(restore_and_query "$P/bin/bottomless-cli" "$id" "$SCRATCH/restored-$id" 'SELECT count(*) FROM notes')
    [[ $rows == 120 ]] || fail "$exe: the restored database holds $rows rows, not 120"
    log "ok: $exe ($needs x libbottomless.so) wrote 120 rows, restored"
done
log "ok"
