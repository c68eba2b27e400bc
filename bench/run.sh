#!/usr/bin/env bash
# Benchmark entry point: installs iperf3, OpenSSH and socat, builds release binaries, and runs
# tunnel-bench, which writes docs/BENCHMARKS.md (and docs/BENCHMARKS.json with the raw samples).
#
#   bash bench/run.sh              full run (~15 minutes on 2 cores)
#   bash bench/run.sh --quick      smoke run (under 2 minutes), writes target/bench-quick.md
#   bash bench/run.sh --rounds 5 --secs 10
set -euo pipefail
cd "$(dirname "$0")/.."

declare -A need=([iperf3]=iperf3 [socat]=socat [ssh]=openssh-client [ssh-keygen]=openssh-client [/usr/sbin/sshd]=openssh-server)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "$cmd" ] || missing+=("${need[$cmd]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi

cargo build --release --locked -p tunnel-device -p tunnel-client -p tunnel-relay -p tunnel-examples --bins
exec target/release/tunnel-bench --bin-dir target/release "$@"
