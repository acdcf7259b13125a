#!/usr/bin/env bash
# The long fuzzing run: every target (or the ones named) under libFuzzer for a
# set time each, from the checked-in seeds plus the repository files that seed
# them. Needs a nightly toolchain and cargo-fuzz:
#
#   rustup toolchain install nightly
#   cargo install cargo-fuzz --locked
#   fuzz/run-long.sh                       # 10 minutes per target
#   FUZZ_SECONDS=3600 fuzz/run-long.sh rules_file metrics_page
#
# New coverage goes to fuzz/corpus/TARGET (git-ignored; it carries over between
# runs), crashes to fuzz/artifacts/TARGET. A crash replays on the pinned stable
# toolchain too:
#
#   cargo run -p flotilla-fuzz --bin TARGET -- fuzz/artifacts/TARGET/crash-...
#
# then becomes a seed in fuzz/seeds/TARGET once fixed, so the smoke test in the
# workspace test command keeps it fixed. The summary line of each target
# (executions, coverage, crashes) is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-600}"
targets=("$@")
if ((${#targets[@]} == 0)); then
  targets=(agent_message command_envelope rules_file deployment_spec metrics_page promql_selector)
fi

# Extra read-only corpus directories, as `flotilla_fuzz::seeds::corpus_dirs` lists them.
extra_dirs() {
  case "$1" in
    rules_file) echo deploy/rules ;;
    deployment_spec) echo deploy/examples ;;
    metrics_page) echo tests/fixtures/metrics ;;
  esac
}

# Debug assertions on: integer overflow is a panic, as in the test builds.
cargo +nightly fuzz build --debug-assertions

mkdir -p fuzz/logs
status=0
for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$target"
  log="fuzz/logs/$target.log"
  # shellcheck disable=SC2046 # the extra directories are plain words
  if ! cargo +nightly fuzz run --debug-assertions "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" $(extra_dirs "$target") -- \
      -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=10 -print_final_stats=1 \
      >"$log" 2>&1; then
    status=1
    echo "$target: FAILED (see $log and fuzz/artifacts/$target/)"
  fi
  runs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{s += $2} END {print s + 0}')
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | awk '{print $2}')
  crashes=$(find "fuzz/artifacts/$target" -type f 2>/dev/null | wc -l)
  echo "$target: ${seconds}s, ${runs} executions, coverage ${cov:-?} edges, ${crashes} crash files"
done
exit "$status"
