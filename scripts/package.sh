#!/usr/bin/env bash
# package.sh - builds the two packages an operator installs, into dist/:
#
#   dist/bottomless_<version>_<arch>.deb               Debian package (CPack): the
#       extension in /usr/lib/<multiarch>/ (`.load bottomless` finds it), the
#       libraries, header, CMake and pkg-config files, bottomless-cli,
#       bottomless-restore-before-start, docs and the man page, under /usr
#   dist/bottomless-<version>-py3-none-<platform>.whl  Python package bundling
#       the loadable extension (python/; built offline with Debian's
#       python3-setuptools and python3-wheel)
#
# Installs what is missing (scripts/install-deps.sh), configures the build
# directory if it has not been configured yet (Release, without tests and
# benchmarks), builds what the packages hold, and packages. An existing build
# directory is used as it is configured (scripts/test.sh's `build` works, and
# is what the packaging tests use); a sanitizer or fuzzing build is refused.
#
#   scripts/package.sh
#   BUILD_DIR=build DIST_DIR=/tmp/out scripts/package.sh
#
# Environment: BUILD_DIR (default build-package), DIST_DIR (default dist),
# JOBS (default nproc), PYTHON (default /usr/bin/python3: the interpreter that
# Debian's python3-setuptools and python3-wheel belong to).
# docs/INSTALL.md describes the packages and how to install them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$ROOT/build-package}"
DIST_DIR="${DIST_DIR:-$ROOT/dist}"
JOBS="${JOBS:-$(nproc)}"
PYTHON="${PYTHON:-/usr/bin/python3}"
log() { printf 'package: %s\n' "$*" >&2; }
start=$(date +%s)

"$ROOT/scripts/install-deps.sh"

if [[ ! -f $BUILD_DIR/CMakeCache.txt ]]; then
    log "configuring $BUILD_DIR"
    cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DBOTTOMLESS_TESTS=OFF -DBOTTOMLESS_BENCH=OFF >/dev/null
fi
if grep -Eq '^BOTTOMLESS_(ASAN|TSAN|FUZZ):BOOL=ON' "$BUILD_DIR/CMakeCache.txt"; then
    log "error: $BUILD_DIR is a sanitizer or fuzzing build; package a plain one (BUILD_DIR=... or the default)"
    exit 2
fi
cmake --build "$BUILD_DIR" -j"$JOBS" --target bottomless bottomless_shared bottomless_ext bottomless-cli >/dev/null

VERSION=$(sed -n 's/^project(bottomless VERSION \([0-9.]*\).*/\1/p' "$ROOT/CMakeLists.txt")
ARCH=$(dpkg --print-architecture)
mkdir -p "$DIST_DIR"
STAGE=$(mktemp -d /tmp/bottomless-package.XXXXXX)
trap 'rm -rf "$STAGE"' EXIT

# -- the Debian package --
# The files are installed into a staging root first, and CPack packages that
# root: a bare `cpack` would first build every target of the build directory
# (its "preinstall" step), tests included, which the package does not need.
deb="bottomless_${VERSION}_${ARCH}.deb"
rm -f "$DIST_DIR/$deb"
DESTDIR="$STAGE/root" cmake --install "$BUILD_DIR" --prefix /usr --strip >"$STAGE/install.log"
if ! (cd "$BUILD_DIR" && cpack --config CPackConfig.cmake -B "$STAGE/cpack" -D CPACK_INSTALL_CMAKE_PROJECTS= \
    -D "CPACK_INSTALLED_DIRECTORIES=$STAGE/root;/" >"$STAGE/cpack.log" 2>&1); then
    cat "$STAGE/cpack.log" >&2
    log "error: cpack failed"
    exit 1
fi
mv "$STAGE/cpack/$deb" "$DIST_DIR/$deb"
log "$DIST_DIR/$deb ($(du -k "$DIST_DIR/$deb" | cut -f1) KiB; $(dpkg-deb -f "$DIST_DIR/$deb" Depends))"

# -- the Python wheel --
if ! "$PYTHON" -c 'import setuptools, wheel' 2>/dev/null; then
    log "error: $PYTHON has no setuptools/wheel (Debian: apt-get install python3-setuptools python3-wheel)"
    exit 1
fi
# The wheel carries a stripped copy of the extension (the build's keeps its symbols).
strip --strip-unneeded -o "$STAGE/bottomless.so" "$BUILD_DIR/bottomless.so"
rm -f "$DIST_DIR"/bottomless-"$VERSION"-py3-none-*.whl
# Every build file goes to the stage directory: the source tree stays clean.
if ! (cd "$ROOT/python" && BOTTOMLESS_EXTENSION="$STAGE/bottomless.so" "$PYTHON" setup.py -q \
    egg_info --egg-base "$STAGE" build --build-base "$STAGE/build" \
    bdist_wheel --bdist-dir "$STAGE/bdist" --dist-dir "$DIST_DIR" >"$STAGE/wheel.log" 2>&1); then
    cat "$STAGE/wheel.log" >&2
    log "error: building the wheel failed"
    exit 1
fi
whl=$(cd "$DIST_DIR" && ls bottomless-"$VERSION"-py3-none-*.whl)
log "$DIST_DIR/$whl ($(du -k "$DIST_DIR/$whl" | cut -f1) KiB)"
log "done in $(($(date +%s) - start)) s"
