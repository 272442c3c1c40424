#!/usr/bin/env bash
# Rehearse a multi-host launch on one machine: N processes on localhost, each with D simulated CPU devices, joined
# by JAX's distributed runtime (gloo collectives). Same code path as a pod, minus the accelerator.
#
#   launch/local_cpu.sh 2 4 --config demo_smollm2_smoke --config.trainer.mesh='(1,-1,1)'
#
# Each process logs to process_<i>.log in a new private folder (mktemp -d under $TMPDIR, or $SOFTGRPO_LOG_DIR).
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,8p' "$0"; exit 1; fi
N=$1; D=$2; shift 2
case "$N$D" in *[!0-9]*|'') echo "local_cpu.sh: N and D must be positive integers (got '$N' '$D')" >&2; exit 2 ;; esac
PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
HERE=$(cd "$(dirname "$0")/.." && pwd)
SOFTGRPO=${SOFTGRPO:-$HERE/.venv/bin/softgrpo}
if [ -n "${SOFTGRPO_LOG_DIR:-}" ]; then
  LOGS=$SOFTGRPO_LOG_DIR
  mkdir -p -- "$LOGS"
else
  LOGS=$(mktemp -d "${TMPDIR:-/tmp}/softgrpo_local.XXXXXXXX")  # private (0700): no other user can plant a file
fi
echo "logs: $LOGS/process_<i>.log"
pids=()
for ((i = 0; i < N; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$D" JAX_PLATFORMS=cpu \
    "$SOFTGRPO" train --coordinator "127.0.0.1:$PORT" --num-processes "$N" --process-id "$i" \
    --cpu-collectives gloo "$@" > "$LOGS/process_$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
tail -n 20 -- "$LOGS/process_0.log"
exit $rc
