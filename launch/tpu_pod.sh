#!/usr/bin/env bash
# Run softgrpo on every worker of a Cloud TPU VM pod slice (v4/v5e/v5p/v6e), one process per host.
#
#   launch/tpu_pod.sh setup  # once: copy the checkout to every worker, install it with jax[tpu]
#   launch/tpu_pod.sh train --config deepscaler_1p5b --config.model.path=/data/r1-1.5b ...
#   launch/tpu_pod.sh plan --config deepscaler_1p5b --mesh 1,16,1 --device v5p   # local: no pod needed
#   launch/tpu_pod.sh logs [train|eval] | stop
#
# Settings (environment): TPU_NAME, ZONE, PROJECT (default: gcloud's), REMOTE_DIR: the checkout on each worker
# (default softgrpo_jax in your home folder; relative paths are taken from it); its logs/ folder holds the logs and
# the pid file. RUN_DIR: where the outputs go; on a multi-host slice it must be a filesystem every worker sees (a
# Filestore / NFS mount or a gcsfuse mount), because every host writes its own shards of each orbax checkpoint.
# JAX finds the coordinator, process count and process id itself on Cloud TPU (no flags needed).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME (the TPU VM name, gcloud compute tpus tpu-vm list)}"
: "${ZONE:?set ZONE (e.g. us-east5-a)}"
REMOTE_DIR=${REMOTE_DIR:-softgrpo_jax}
case "$REMOTE_DIR" in  # remote commands start in the home folder: "~/x" is "x" there, and stays quotable
  "~") REMOTE_DIR=. ;;
  "~/"*) REMOTE_DIR=${REMOTE_DIR#"~/"} ;;
esac
RDIR=$(printf '%q' "$REMOTE_DIR")  # every remote path goes through printf %q
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
HERE=$(cd "$(dirname "$0")/.." && pwd)

ssh_all() {  # run a command on every worker at once
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"
}

cmd=${1:-help}; shift || true
case "$cmd" in
  setup)
    # the source tarball: a private temporary file here, a file in your home folder on the workers (never a fixed
    # name in a shared /tmp, which another user could plant before it is extracted and run)
    TARBALL=$(mktemp "${TMPDIR:-/tmp}/softgrpo_src.XXXXXXXX")
    trap 'rm -f -- "$TARBALL"' EXIT
    REMOTE_TGZ=".softgrpo_src.$$.$RANDOM.tgz"
    tar -C "$HERE" --exclude=.venv --exclude=runs --exclude=.git -czf "$TARBALL" .
    gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:$REMOTE_TGZ" --zone="$ZONE" $PROJECT_FLAG --worker=all
    ssh_all "set -e; mkdir -p -- $RDIR && tar -C $RDIR -xzf $REMOTE_TGZ && rm -f -- $REMOTE_TGZ && cd -- $RDIR && \
      python3 -m venv .venv && .venv/bin/pip install -q -U pip && \
      .venv/bin/pip install -q -e . 'jax[tpu]>=0.10.2,<0.12' && \
      .venv/bin/python -c 'import jax; print(jax.process_count(), jax.device_count(), jax.devices()[0].device_kind)'"
    ;;
  train|eval)
    # every worker runs the same command; process 0 prints and writes logs/exports. nohup: survives ssh drops.
    ARGS=$(printf '%q ' "$@")
    ssh_all "cd -- $RDIR && mkdir -p logs && (nohup .venv/bin/softgrpo $cmd --distributed on $ARGS > logs/$cmd.log 2>&1 & echo \$! > logs/softgrpo.pid)"
    echo "started on all workers; follow with: $0 logs $cmd"
    ;;
  logs)
    which=${1:-train}
    case "$which" in train|eval) ;; *) echo "tpu_pod.sh logs: train or eval, not '$which'" >&2; exit 2 ;; esac
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=0 \
      --command="tail -n 50 -f -- $RDIR/logs/$which.log"
    ;;
  stop)  # SIGTERM: each process finishes its step and saves a checkpoint; run `train` again to resume
    ssh_all "if test -f $RDIR/logs/softgrpo.pid; then kill -TERM \"\$(cat -- $RDIR/logs/softgrpo.pid)\" || true; fi"
    ;;
  plan)
    cd "$HERE" && exec softgrpo plan "$@"
    ;;
  *)
    sed -n '2,15p' "$0"; exit 1 ;;
esac
