#!/usr/bin/env bash
# The test command: installs what is missing, builds, starts the test S3 server
# (Ceph RGW on loopback), runs every test with ctest, stops the server (also on
# failure or Ctrl-C) and exits non-zero if anything failed.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh -L unit         # extra arguments go to ctest
#   BUILD_DIR=build-asan CMAKE_ARGS=-DBOTTOMLESS_ASAN=ON scripts/test.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$ROOT/build}"
JOBS="${JOBS:-$(nproc)}"
cd "$ROOT"

"$ROOT/scripts/install-deps.sh"

# shellcheck disable=SC2086 # CMAKE_ARGS is a list of words on purpose
cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}" -DBOTTOMLESS_WERROR=ON ${CMAKE_ARGS:-} >/dev/null
cmake --build "$BUILD_DIR" -j"$JOBS"

# A server of our own for this run, in its own state directory, so a
# developer's running server is left alone.
export BOTTOMLESS_S3_DIR="${BOTTOMLESS_S3_DIR:-$(mktemp -d /tmp/bottomless-test-s3.XXXXXX)}"
stop_server() { "$ROOT/scripts/s3-server.sh" stop || true; }
trap stop_server EXIT
"$ROOT/scripts/s3-server.sh" start
eval "$("$ROOT/scripts/s3-server.sh" env)"
export PATH="$BUILD_DIR:$PATH"

# --no-tests=error: a filter that matches nothing is a failure, not a green run.
ctest --test-dir "$BUILD_DIR" --output-on-failure --no-tests=error --timeout 600 -j"$JOBS" "$@"
[ "${FUZZ:-1}" = 0 ] || "$ROOT/scripts/fuzz.sh" ci  # every fuzzer ~20 s (FUZZ=0 skips; docs/TESTING.md)
