#!/usr/bin/env bash
# Installs every Debian package that bottomless's build, tests, benchmarks and
# test S3 server need. Idempotent: when everything is present it only checks
# (dpkg-query) and returns in well under a second.
set -euo pipefail

PACKAGES=(
  # build
  build-essential cmake pkg-config
  libcurl4-openssl-dev libssl-dev libsqlite3-dev nlohmann-json3-dev
  libpugixml-dev libzstd-dev catch2
  # the fuzzers (scripts/fuzz.sh): clang and its libFuzzer/sanitizer runtimes
  clang-14 libclang-rt-14-dev
  # packages (scripts/package.sh) and their tests: CPack's Depends, the wheel, a venv
  dpkg-dev python3-setuptools python3-wheel python3-venv
  # tests and demo
  sqlite3 curl python3 iptables uuid-runtime iproute2 procps
  # the test S3 server: Ceph's RADOS Gateway as a one-machine cluster
  radosgw ceph-mon ceph-osd ceph-common
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

echo "install-deps: installing ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
echo "install-deps: done" >&2
