#!/usr/bin/env bash
# The libFuzzer harnesses of tests/fuzz/ (docs/TESTING.md, "Fuzzing").
#
#   scripts/fuzz.sh ci                      # every harness ~20 s over its seeds; non-zero on any finding
#   scripts/fuzz.sh long SECONDS [h ...]    # a long campaign: SECONDS per harness, corpus kept in a scratch dir
#   scripts/fuzz.sh build                   # configure and build only
#   scripts/fuzz.sh seeds                   # rewrite tests/fuzz/corpus from the project's encoders
#
# Environment: FUZZ_BUILD_DIR (default build-fuzz), FUZZ_SECONDS (ci: per
# harness, default 20), FUZZ_WORK (long: scratch dir, default
# /tmp/bottomless-fuzz), FUZZ_NICE (default 19 for long, 0 for ci), FUZZ_CC
# and FUZZ_CXX (default clang-14, clang++-14).
# A finding (crash, leak, timeout, out-of-memory) leaves its input in
# tests/fuzz/crashers/<harness>/ and makes the script exit non-zero; replay
# one with: build-fuzz/tests/fuzz/<harness> <file>.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${FUZZ_BUILD_DIR:-$ROOT/build-fuzz}"
FUZZ_DIR="$ROOT/tests/fuzz"
HARNESSES=(fuzz_object_header fuzz_segment fuzz_snapshot fuzz_s3_xml fuzz_kdf fuzz_chunk_opener
           fuzz_aws_config fuzz_state_file fuzz_wal fuzz_uri_config)
# A bomb or a hang is a finding: memory per input and time per input are capped.
# 64 MiB per allocation: no input of at most 1.1 MiB has a reason to ask for
# more (the largest legitimate ones: a 16 MiB encryption chunk, 32 MiB of
# scrypt at the default cost); a zstd frame declaring windowLog 27 asks 128.
# -max_len 1.1 MiB lets the header fuzzer reach deep nesting and oversized headers.
COMMON_FLAGS=(-malloc_limit_mb=64 -rss_limit_mb=1024 -timeout=10 -max_len=1150000 -print_final_stats=1)

mode="${1:-}"
shift || true

build() {
  "$ROOT/scripts/install-deps.sh"
  export CCACHE_BASEDIR="$ROOT"
  local launcher=()
  if command -v ccache >/dev/null; then
    launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
  fi
  cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DBOTTOMLESS_FUZZ=ON \
    -DCMAKE_C_COMPILER="${FUZZ_CC:-clang-14}" -DCMAKE_CXX_COMPILER="${FUZZ_CXX:-clang++-14}" -DBOTTOMLESS_TESTS=OFF -DBOTTOMLESS_BENCH=OFF \
    "${launcher[@]}" >/dev/null
  nice -n 10 cmake --build "$BUILD_DIR" -j"${JOBS:-$(nproc)}" --target fuzzers fuzz_make_seeds >/dev/null
}

extra_flags() {  # a harness's dictionary, if it has one, and its own options
  if [ -f "$FUZZ_DIR/$1.dict" ]; then echo "-dict=$FUZZ_DIR/$1.dict"; fi
  # Deep nesting needs long inputs at once, not after libFuzzer's slow length ramp.
  if [ "$1" = fuzz_object_header ]; then echo "-len_control=0"; fi
}

# run HARNESS SECONDS CORPUS_DIR LOG: fuzzes into CORPUS_DIR (seeds read from
# the committed corpus); findings land in tests/fuzz/crashers/HARNESS/.
run() {
  local h="$1" secs="$2" corpus="$3" log="$4" nice_level="$5"
  local crashers="$FUZZ_DIR/crashers/$h"
  mkdir -p "$corpus" "$crashers"
  local d
  d="$(extra_flags "$h")"
  # shellcheck disable=SC2086 # $d is empty or a few words
  nice -n "$nice_level" "$BUILD_DIR/tests/fuzz/$h" "${COMMON_FLAGS[@]}" $d -max_total_time="$secs" \
    -artifact_prefix="$crashers/" "$corpus" "$FUZZ_DIR/corpus/$h" >"$log" 2>&1
}

# One line per harness from libFuzzer's final stats and last status line.
summary() {
  local h="$1" log="$2" corpus="$3" cpu="$4" rc="$5"
  local execs cov ft
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  cov="$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)"
  ft="$(grep -oE 'ft: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)"
  local finding="none"
  if [ "$rc" -ne 0 ]; then
    finding="$(grep -m1 -oE 'ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer): [a-z-]+[^ ]*|runtime error:.*|fuzz property violated:.*' "$log" || echo "exit $rc")"
  fi
  printf '%-20s execs=%-10s cov=%-6s ft=%-6s corpus=%-6s cpu_s=%-6s finding=%s\n' "$h" "${execs:-?}" "${cov:-?}" \
    "${ft:-?}" "$(find "$corpus" -type f | wc -l)" "$cpu" "$finding"
}

# timed FILE CMD...: runs CMD, writes its user+sys CPU seconds (children
# included) to FILE, returns CMD's status.
timed() {
  local out="$1" rc=0 TIMEFORMAT='%U %S'
  shift
  { time "$@" 2>&3; } 3>&2 2>"$out.raw" || rc=$?
  awk '{ printf "%.1f\n", $1 + $2 }' "$out.raw" >"$out"
  rm -f "$out.raw"
  return "$rc"
}

case "$mode" in
  build)
    build
    ;;
  seeds)
    build
    "$BUILD_DIR/tests/fuzz/fuzz_make_seeds" "$FUZZ_DIR/corpus"
    ;;
  ci)
    build
    secs="${FUZZ_SECONDS:-20}"
    work="$(mktemp -d /tmp/bottomless-fuzz-ci.XXXXXX)"
    trap 'rm -rf "$work"' EXIT
    failed=0
    for h in "${HARNESSES[@]}"; do
      rc=0
      timed "$work/$h.cpu" run "$h" "$secs" "$work/$h" "$work/$h.log" "${FUZZ_NICE:-0}" || rc=$?
      summary "$h" "$work/$h.log" "$work/$h" "$(cat "$work/$h.cpu")" "$rc"
      if [ "$rc" -ne 0 ]; then
        failed=1
        echo "---- $h: last lines of its log ----"
        tail -40 "$work/$h.log"
      fi
    done
    if [ "$failed" -ne 0 ]; then
      echo "fuzz: findings above; inputs in tests/fuzz/crashers/" >&2
      exit 1
    fi
    echo "fuzz: every harness ran ${secs} s without a finding"
    ;;
  long)
    secs="${1:?usage: scripts/fuzz.sh long SECONDS [harness ...]}"
    shift
    [ "$#" -gt 0 ] || set -- "${HARNESSES[@]}"
    build
    work="${FUZZ_WORK:-/tmp/bottomless-fuzz}"
    mkdir -p "$work"
    failed=0
    for h in "$@"; do
      rc=0
      log="$work/$h.$(date +%Y%m%d-%H%M%S).log"
      timed "$log.cpu" run "$h" "$secs" "$work/corpus/$h" "$log" "${FUZZ_NICE:-19}" || rc=$?
      summary "$h" "$log" "$work/corpus/$h" "$(cat "$log.cpu")" "$rc" | tee -a "$work/summary.txt"
      [ "$rc" -eq 0 ] || failed=1
    done
    exit "$failed"
    ;;
  *)
    sed -n '2,15p' "${BASH_SOURCE[0]}"
    exit 2
    ;;
esac
