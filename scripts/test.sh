#!/usr/bin/env bash
# The test command: installs what is missing, builds, starts the test S3 server
# (Ceph RGW on loopback), runs every test with ctest, stops the server (also on
# failure or Ctrl-C) and exits non-zero if anything failed.
#
# Then (SANITIZERS=0 skips): the whole suite again built with ASan+UBSan
# ($BUILD_DIR-asan) and the threaded tests (vfs, integration) with TSan
# ($BUILD_DIR-tsan). Then the fuzzers (FUZZ=0 skips). docs/TESTING.md.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh -L unit         # extra arguments go to ctest (and to the sanitizer runs)
#   SANITIZERS=0 scripts/test.sh    # without the ASan/UBSan and TSan runs
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

# ---- sanitizers ----
# ASan+UBSan over every test, TSan over the binaries with threads of their
# own (the VFS's uploader, the S3 client's parallel transfers). Shell-driven
# tests run too: the sqlite3 on their PATH preloads the sanitizer runtime
# (tests/CMakeLists.txt). Fewer crash-test kills: each is slower here.
sanitizer_run() {  # build dir, cmake option, ctest args...
    local dir="$1" option="$2"
    shift 2
    local launcher=()
    command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
    cmake -S "$ROOT" -B "$dir" -DCMAKE_BUILD_TYPE="${SAN_BUILD_TYPE:-Debug}" -DBOTTOMLESS_WERROR=ON "$option" \
        "${launcher[@]}" >/dev/null
    if [[ "$option" == *TSAN* ]]; then
        cmake --build "$dir" -j"$JOBS" --target vfs_tests integration_tests
        set -- -R '^(vfs|integration):' "$@"
    else
        cmake --build "$dir" -j"$JOBS"
    fi
    BOTTOMLESS_CRASH_ITERATIONS="${SAN_CRASH_ITERATIONS:-6}" \
        UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}" \
        ctest --test-dir "$dir" --output-on-failure --no-tests=error --timeout 900 -j"$JOBS" "$@"
}
# On by default: CI runs them (a clean-clone run of everything here: 14 min).
if [[ "${SANITIZERS:-1}" == 1 ]]; then
    sanitizer_run "$BUILD_DIR-asan" -DBOTTOMLESS_ASAN=ON "$@"
    sanitizer_run "$BUILD_DIR-tsan" -DBOTTOMLESS_TSAN=ON "$@"
fi
[ "${FUZZ:-1}" = 0 ] || "$ROOT/scripts/fuzz.sh" ci  # every fuzzer ~20 s (FUZZ=0 skips; docs/TESTING.md)
