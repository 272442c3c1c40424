#!/usr/bin/env bash
# Run softgrpo on every worker of a Cloud TPU VM pod slice (v4/v5e/v5p/v6e), one process per host.
#
#   launch/tpu_pod.sh setup  # once: copy the checkout to every worker, install it with jax[tpu]
#   launch/tpu_pod.sh train --config configs/deepscaler_1p5b.py --config.model.path=/data/r1-1.5b ...
#   launch/tpu_pod.sh plan --config configs/deepscaler_1p5b.py --mesh 1,16,1 --device v5p   # local: no pod needed
#   launch/tpu_pod.sh logs | stop
#
# Settings (environment): TPU_NAME, ZONE, PROJECT (default: gcloud's), REMOTE_DIR (default ~/softgrpo_jax),
# RUN_DIR: where the outputs go; on a multi-host slice it must be a filesystem every worker sees (a Filestore / NFS
# mount or a gcsfuse mount), because every host writes its own shards of each orbax checkpoint.
# JAX finds the coordinator, process count and process id itself on Cloud TPU (no flags needed).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME (the TPU VM name, gcloud compute tpus tpu-vm list)}"
: "${ZONE:?set ZONE (e.g. us-east5-a)}"
REMOTE_DIR=${REMOTE_DIR:-'~/softgrpo_jax'}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
HERE=$(cd "$(dirname "$0")/.." && pwd)

ssh_all() {  # run a command on every worker at once
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"
}

cmd=${1:-help}; shift || true
case "$cmd" in
  setup)
    tar -C "$HERE" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/softgrpo_src.tgz .
    gcloud compute tpus tpu-vm scp /tmp/softgrpo_src.tgz "$TPU_NAME":/tmp/ --zone="$ZONE" $PROJECT_FLAG --worker=all
    ssh_all "mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/softgrpo_src.tgz && cd $REMOTE_DIR && \
      python3 -m venv .venv && .venv/bin/pip install -q -U pip && \
      .venv/bin/pip install -q -e . 'jax[tpu]>=0.10.2,<0.12' && \
      .venv/bin/python -c 'import jax; print(jax.process_count(), jax.device_count(), jax.devices()[0].device_kind)'"
    ;;
  train|eval)
    # every worker runs the same command; process 0 prints and writes logs/exports. nohup: survives ssh drops.
    ARGS=$(printf '%q ' "$@")
    ssh_all "cd $REMOTE_DIR && (nohup .venv/bin/softgrpo $cmd --distributed on $ARGS > /tmp/softgrpo_$cmd.log 2>&1 & echo \$! > /tmp/softgrpo.pid)"
    echo "started on all workers; follow with: $0 logs"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=0 \
      --command="tail -n 50 -f /tmp/softgrpo_train.log"
    ;;
  stop)  # SIGTERM: each process finishes its step and saves a checkpoint; run `train` again to resume
    ssh_all "test -f /tmp/softgrpo.pid && kill -TERM \$(cat /tmp/softgrpo.pid) || true"
    ;;
  plan)
    cd "$HERE" && exec softgrpo plan "$@"
    ;;
  *)
    sed -n '2,14p' "$0"; exit 1 ;;
esac
