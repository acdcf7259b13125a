#!/usr/bin/env bash
# End-to-end check of the NVML GPU source, for a host WITH an NVIDIA GPU and
# driver (CI has neither, so this is run by hand or on a GPU runner):
#
#   bash tests/gpu-check.sh
#
# It builds the release binaries, makes a throwaway CA, starts a controller on a
# free loopback port and an agent with `--gpu-source nvml`, then checks through
# `flotctl nodes show -o json` that real GPU data arrives (UUID, memory total,
# temperature, power), that the UUIDs match nvidia-smi's, and that the agent
# registered for XID events. Exits non-zero on any failure; logs are kept then.
set -euo pipefail
cd "$(dirname "$0")/.."

NODE=gpu-check
WAIT_S=${GPU_CHECK_WAIT_S:-60}

log() { printf '==> %s\n' "$*" >&2; }
fail() {
  printf 'gpu-check: FAIL: %s\n' "$*" >&2
  exit 1
}

command -v cargo >/dev/null || fail "cargo is required (https://rustup.rs)"
command -v python3 >/dev/null || fail "python3 is required for the JSON checks"

log "building release binaries"
cargo build --release -p flotilla-controller -p flotilla-agent -p flotilla-ctl
BIN="${CARGO_TARGET_DIR:-target}/release"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/flotilla-gpu-check.XXXXXX")
D="$WORK/pki"
PIDS=()

cleanup() {
  local rc=$?
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill "$pid" 2>/dev/null || true; done
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do wait "$pid" 2>/dev/null || true; done
  if [ "$rc" -ne 0 ]; then
    for f in controller.log agent.log; do
      [ -f "$WORK/$f" ] || continue
      printf '\n--- last lines of %s\n' "$f" >&2
      tail -n 40 "$WORK/$f" >&2
    done
    printf '\ngpu-check: logs kept in %s\n' "$WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
# Turn signals into an ordinary exit so the EXIT trap stops the daemons.
trap 'exit 130' INT TERM

log "creating a CA in $D"
"$BIN/flotctl" ca init --dir "$D" >/dev/null
"$BIN/flotctl" cert issue --node "$NODE" --dir "$D" >/dev/null

log "starting the controller"
"$BIN/flotilla-controller" --listen 127.0.0.1:0 --data-dir "$WORK/controller" \
  --ca "$D/ca.pem" --cert "$D/controller.pem" --key "$D/controller.key" \
  >"$WORK/controller.log" 2>&1 &
CONTROLLER_PID=$!
PIDS+=("$CONTROLLER_PID")

# The controller picks its port; it logs "controller listening ... local_addr=HOST:PORT".
ADDR=""
for _ in $(seq 1 $((WAIT_S * 2))); do
  kill -0 "$CONTROLLER_PID" 2>/dev/null || fail "the controller exited"
  ADDR=$(sed -n 's/.*controller listening.*local_addr=\([^ ]*\).*/\1/p' "$WORK/controller.log" | head -n 1)
  [ -n "$ADDR" ] && break
  sleep 0.5
done
[ -n "$ADDR" ] || fail "the controller did not log its address within ${WAIT_S}s"
log "controller listening on $ADDR"

log "starting the agent with --gpu-source nvml"
# RUST_LOG is pinned so that the info lines checked below are always logged.
RUST_LOG=info "$BIN/flotilla-agent" --controller "https://$ADDR" \
  --ca "$D/ca.pem" --cert "$D/nodes/$NODE.pem" --key "$D/nodes/$NODE.key" \
  --data-dir "$WORK/agent" --interval 1s --gpu-source nvml \
  >"$WORK/agent.log" 2>&1 &
AGENT_PID=$!
PIDS+=("$AGENT_PID")

ctl() {
  "$BIN/flotctl" --controller "https://$ADDR" --cacert "$D/ca.pem" \
    --cert "$D/operators/admin.pem" --key "$D/operators/admin.key" "$@"
}

# Checks the node JSON in $1; prints why not when it falls short. Quiet with $2=quiet.
check_node() {
  python3 - "$1" "${2:-}" <<'PY'
import json, sys

path, quiet = sys.argv[1], sys.argv[2] == "quiet"
try:
    node = json.load(open(path))
except (OSError, ValueError) as e:
    if not quiet:
        print(f"cannot read the node JSON: {e}", file=sys.stderr)
    sys.exit(1)
problems = []
if node.get("gpu_source") != "nvml":
    problems.append(f"gpu_source is {node.get('gpu_source')!r}, not 'nvml'")
gpus = node.get("gpus") or []
if not gpus:
    note = (node.get("host") or {}).get("gpu_source_note", "")
    problems.append(f"no GPUs reported (note: {note!r})")
for g in gpus:
    name = f"GPU {g.get('index')}"
    if not g.get("uuid"):
        problems.append(f"{name}: no UUID")
    if not (g.get("memory_total_bytes") or 0) > 0:
        problems.append(f"{name}: memory_total_bytes is {g.get('memory_total_bytes')!r}")
    for field in ("temperature_celsius", "power_watts"):
        if g.get(field) is None:
            problems.append(f"{name}: no {field}")
if problems:
    if not quiet:
        print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
if not quiet:
    for g in gpus:
        print(
            f"GPU {g['index']} {g['uuid']} {g.get('model', '')}: "
            f"{g['temperature_celsius']} C, {g['power_watts']} W, "
            f"{g['memory_total_bytes'] / 2**20:.0f} MiB"
        )
PY
}

log "waiting up to ${WAIT_S}s for GPU samples from $NODE"
ok=""
for _ in $(seq 1 "$WAIT_S"); do
  kill -0 "$AGENT_PID" 2>/dev/null || fail "the agent exited (does it accept --gpu-source nvml?)"
  if ctl nodes show "$NODE" -o json >"$WORK/node.json" 2>"$WORK/ctl.err" &&
    check_node "$WORK/node.json" quiet; then
    ok=1
    break
  fi
  sleep 1
done

printf '\n--- flotctl nodes show %s -o json\n' "$NODE"
if [ -s "$WORK/node.json" ]; then cat "$WORK/node.json"; else cat "$WORK/ctl.err"; fi
printf '\n--- nvidia-smi, for comparison\n'
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=uuid,temperature.gpu,power.draw,memory.total --format=csv
else
  echo "(nvidia-smi not found)"
fi
echo

[ -n "$ok" ] || {
  check_node "$WORK/node.json" || true
  fail "no complete GPU data from $NODE within ${WAIT_S}s"
}
printf '\n--- what the agent reported\n'
check_node "$WORK/node.json"

if command -v nvidia-smi >/dev/null; then
  smi_uuids=$(nvidia-smi --query-gpu=uuid --format=csv,noheader | tr -d ' ' | sort)
  our_uuids=$(python3 -c 'import json,sys; print("\n".join(sorted(g["uuid"] for g in json.load(open(sys.argv[1]))["gpus"])))' "$WORK/node.json")
  [ "$smi_uuids" = "$our_uuids" ] || fail "GPU UUIDs differ from nvidia-smi's: ours [$our_uuids], nvidia-smi [$smi_uuids]"
  log "GPU UUIDs match nvidia-smi"
fi

printf '\n--- agent log: NVML and XID lines\n'
grep -E 'NVML|XID' "$WORK/agent.log" || true
grep -qF 'registered for critical XID events' "$WORK/agent.log" ||
  fail "the agent did not register for XID events (see the XID lines above)"

log "PASS: NVML GPU data reached the controller and XID events are watched"
