#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser that reads peer or file input (shared/src/fuzzing.rs).
#
#   bash fuzz/run.sh [SECONDS_PER_TARGET] [SUMMARY_FILE]
#
# Needs the nightly toolchain (cargo-fuzz is installed if missing). Without nightly it prints a loud
# SKIP and exits 0. A crash input is copied to fuzz/regressions/<target>/ (replayed on stable by
# `cargo test -p tunnel-shared --test fuzz_corpus`) and the script exits 1. The summary file gets
# one line per target: target, runs, seconds, corpus size, crashes.
set -uo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
summary=${2:-target/fuzz-summary.tsv}
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "SKIP: no nightly toolchain here; coverage-guided fuzzing needs it (rustup toolchain install nightly)"
  exit 0
fi
export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install --locked cargo-fuzz >/dev/null 2>&1 || { echo "SKIP: cannot install cargo-fuzz"; exit 0; }
fi
targets=(frame control state_json device_toml iam_toml known_devices pairing_string pake)
cargo +nightly fuzz build -O >/dev/null 2>&1 || { echo "FAIL: the fuzz targets do not build"; exit 1; }
# Logs go to fuzz/target/ whatever CARGO_TARGET_DIR says (a missing directory would fail every
# target with no run at all).
mkdir -p target "$(dirname "$summary")"
: > "$summary"
failed=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "regressions/$t"
  log="target/fuzz-$t.log"
  cargo +nightly fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=1024 \
    -malloc_limit_mb=256 -print_final_stats=1 >"$log" 2>&1
  rc=$?
  runs=$(grep -oE '^Done [0-9]+ runs' "$log" | grep -oE '[0-9]+' | tail -1)
  crashes=0
  for a in artifacts/"$t"/*; do
    [ -f "$a" ] || continue
    cp "$a" "regressions/$t/"
    crashes=$((crashes + 1))
  done
  if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
    failed=1
    echo "FAIL: $t (exit $rc, $crashes crash inputs, kept in fuzz/regressions/$t/; log $log)"
  fi
  corpus=$(find "corpus/$t" -type f | wc -l)
  printf '%s\t%s\t%s\t%s\t%s\n' "$t" "${runs:-0}" "$secs" "$corpus" "$crashes" | tee -a "$summary"
done
exit $failed
