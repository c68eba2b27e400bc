#!/usr/bin/env bash
# Reliability entry point: installs what the classes need (nftables, iproute2, strace, curl,
# python3), builds release binaries, and runs tunnel-reliability, which checks every class of
# reference/reliability-tests.md §2 and writes docs/RELIABILITY.md with the figures.
#
#   bash bench/reliability.sh                  full run (~15 minutes on 2 cores), 60 s per fuzz target
#   bash bench/reliability.sh --quick          CI size (what .ci/run runs, on the debug build)
#   bash bench/reliability.sh --hours 24       a day-long soak instead of 1,000 cycles
#   bash bench/reliability.sh --fuzz-secs 600  longer fuzzing
#   bash bench/reliability.sh --only soak      one class (net, impaired, tamper, flood, relayed-flood, slowloris,
#                                              soak, crash, disk, fuzz)
#
# Needs root (network namespaces, nft, strace attaching to the device). Exit status 1 when a
# check fails; the report says which.
set -euo pipefail
cd "$(dirname "$0")/.."

declare -A need=([ip]=iproute2 [nft]=nftables [tc]=iproute2 [strace]=strace [curl]=curl [python3]=python3)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi

cargo build --release --locked -p tunnel-device -p tunnel-client -p tunnel-relay -p tunnel-examples --bins
exec target/release/tunnel-reliability "$@"
