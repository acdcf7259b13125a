#!/usr/bin/env bash
# Soak benchmark (not in CI): AGENTS simulated agents × 8 GPUs at 1 s against one
# controller for DURATION, with telemetry retention shortened so that pruning
# applies well within the run. Every SOAK_SAMPLE_EVERY (60s) the fleet simulator
# writes a CSV row: controller RSS and CPU, the store's bytes on disk (file
# lengths and allocated blocks), batches acknowledged so far. At the end it opens
# the store and counts its logical bytes (every key and value of every tree).
# This script then prints a summary: the RSS and disk trend once retention
# applies (least-squares slope, and first against last sample) and the space
# amplification (allocated bytes on disk / logical bytes).
#
#   tests/bench/soak.sh                      # the full hour: 1,000 agents, retention 10m
#   tests/bench/soak.sh 10m 1000 2m          # a short run: retention 2m, rollups 4m
#
# Usage: soak.sh [DURATION=1h] [AGENTS=1000] [RETENTION=10m] [OUT=soak.csv]
# Rollups are kept twice RETENTION. SOAK_STORE_COMPRESSION (true, as measured in
# BENCHMARKS.md; the controller's default is false) sets store_compression.
# Needs python3 for the summary.
set -euo pipefail

duration=${1:-1h}
agents=${2:-1000}
retention=${3:-10m}
csv=${4:-soak.csv}
every=${SOAK_SAMPLE_EVERY:-60s}
compression=${SOAK_STORE_COMPRESSION:-true}

root=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
(cd "$root" && cargo build --release -q -p flotilla-controller -p flotilla-tests \
    --bin flotilla-fleet-sim --bin flotilla-controller)

seconds() { # humantime-ish "90s", "10m", "1h" -> seconds
    case $1 in
        *h) echo $((${1%h} * 3600)) ;;
        *m) echo $((${1%m} * 60)) ;;
        *s) echo "${1%s}" ;;
        *) echo "$1" ;;
    esac
}
rollup=$(($(seconds "$retention") * 2))s

config=$(mktemp)
trap 'rm -f "$config"' EXIT
cat >"$config" <<EOF
store_compression = $compression
[telemetry]
retention = "$retention"
rollup_retention = "$rollup"
EOF

echo "soak: $agents agents for $duration, retention $retention, rollups $rollup, compression $compression, a sample every $every -> $csv" >&2
"$target/release/flotilla-fleet-sim" --agents "$agents" --gpus-per-agent 8 --interval 1s \
    --warmup 10s --duration "$duration" --controller-config "$config" \
    --samples-csv "$csv" --sample-every "$every" >"$csv.json"
cat "$csv.json"

# Retention applies once the oldest raw batch is past it and rolled up, and the
# oldest rollup past its own: rollup retention plus one maintenance pass (60 s).
python3 - "$csv" "$csv.json" "$(seconds "$rollup")" <<'EOF'
import csv, json, sys

path, report, rollup_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(open(path))]
steady_from = rollup_s + 60
steady = [r for r in rows if r["elapsed_s"] >= steady_from]
out = {"samples": len(rows), "steady_from_s": steady_from, "steady_samples": len(steady)}


def slope(xs, ys):
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


if len(steady) >= 2:
    xs = [r["elapsed_s"] / 3600 for r in steady]
    for key in ("controller_rss_bytes", "store_allocated_bytes"):
        ys = [r[key] for r in steady]
        out[key + "_first"] = int(ys[0])
        out[key + "_last"] = int(ys[-1])
        out[key + "_max"] = int(max(ys))
        out[key + "_slope_per_hour"] = int(slope(xs, ys))
else:
    out["note"] = "the run ended before retention applied: no trend to report"
r = json.load(open(report))
for key in ("store_logical_bytes", "store_allocated_bytes", "space_amplification", "controller_peak_rss_bytes"):
    out[key] = r.get(key)
print(json.dumps(out))
EOF
