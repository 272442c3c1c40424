#!/usr/bin/env bash
# Plain multi-node GPU launcher (no scheduler): run this once on every node.
#
#   node 0:  launch/gpu_multinode.sh 2 0 10.0.0.1:8476 --config configs/deepscaler_7b.py --config.model.path=...
#   node 1:  launch/gpu_multinode.sh 2 1 10.0.0.1:8476 --config configs/deepscaler_7b.py --config.model.path=...
#
# Arguments: NUM_NODES NODE_RANK COORDINATOR_HOST[:PORT] (node 0's address, reachable from every node; port
# default 8476), then the arguments of `softgrpo train`. One process per node drives all its GPUs. Every node needs
# the same checkout, model directory and data files (or a shared filesystem), and output_dir must be shared (orbax
# writes each host's shards there). Set SOFTGRPO_CMD=eval to run an evaluation instead.
set -euo pipefail
if [ $# -lt 3 ]; then sed -n '2,12p' "$0"; exit 1; fi
NUM_NODES=$1; NODE_RANK=$2; COORD=$3; shift 3
case "$COORD" in *:*) ;; *) COORD="$COORD:8476" ;; esac
HERE=$(cd "$(dirname "$0")/.." && pwd)
VENV=${SOFTGRPO_VENV:-$HERE/.venv}
export SOFTGRPO_COORDINATOR=$COORD SOFTGRPO_NUM_PROCESSES=$NUM_NODES SOFTGRPO_PROCESS_ID=$NODE_RANK
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
exec "$VENV/bin/softgrpo" "${SOFTGRPO_CMD:-train}" "$@"
