#!/usr/bin/env bash
# Measures one agent's footprint: 8 simulated GPUs (configurable) at 1 s,
# streaming to a local controller, for DURATION seconds. Prints one JSON line:
# peak RSS (VmHWM) and CPU seconds of the agent process, and the share of one
# core that CPU time is over the run.
#
#   bash tests/bench/agent_footprint.sh [DURATION_S=120] [GPUS=8] [INTERVAL=1s]
#
# It builds the release binaries first. Nothing leaves 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/../.."
duration=${1:-120}
gpus=${2:-8}
interval=${3:-1s}

cargo build --release --locked -q -p flotilla-controller -p flotilla-agent -p flotilla-ctl
bin=target/release
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

"$bin/flotctl" ca init --dir "$work/pki" >/dev/null
"$bin/flotctl" cert issue --node bench-agent --dir "$work/pki" >/dev/null
NO_COLOR=1 "$bin/flotilla-controller" --listen 127.0.0.1:0 --data-dir "$work/controller" \
  --ca "$work/pki/ca.pem" --cert "$work/pki/controller.pem" --key "$work/pki/controller.key" 2>"$work/controller.log" &
for _ in $(seq 100); do grep -q "controller listening" "$work/controller.log" 2>/dev/null && break; sleep 0.1; done
addr=$(grep -o 'local_addr=[^ ]*' "$work/controller.log" | head -1 | cut -d= -f2)

NO_COLOR=1 "$bin/flotilla-agent" --controller "https://$addr" --ca "$work/pki/ca.pem" \
  --cert "$work/pki/nodes/bench-agent.pem" --key "$work/pki/nodes/bench-agent.key" \
  --data-dir "$work/agent" --interval "$interval" --gpu-source simulated --simulated-gpus "$gpus" 2>"$work/agent.log" &
agent=$!
sleep "$duration"

tck=$(getconf CLK_TCK)
read -r utime stime < <(awk '{print $14, $15}' "/proc/$agent/stat")
hwm_kb=$(awk '/VmHWM/ {print $2}' "/proc/$agent/status")
rss_kb=$(awk '/VmRSS/ {print $2}' "/proc/$agent/status")
cpu=$(awk -v u="$utime" -v s="$stime" -v t="$tck" 'BEGIN { printf "%.3f", (u + s) / t }')
share=$(awk -v c="$cpu" -v d="$duration" 'BEGIN { printf "%.3f", 100 * c / d }')
printf '{"gpus":%s,"interval":"%s","duration_s":%s,"agent_peak_rss_bytes":%s,"agent_rss_bytes":%s,"agent_cpu_seconds":%s,"agent_cpu_percent_of_one_core":%s}\n' \
  "$gpus" "$interval" "$duration" $((hwm_kb * 1024)) $((rss_kb * 1024)) "$cpu" "$share"
