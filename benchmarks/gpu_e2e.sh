#!/usr/bin/env bash
# `softgrpo train` end to end on this machine's default JAX backend (a GPU: bf16 rollouts with the Pallas soft
# embedding, cuDNN attention, the jitted donated update, orbax checkpoints, resume, HF export), for a machine that
# cannot download anything: the demo config on a randomly initialised SmolLM2-135M-shaped model (transformers writes
# it from the config and tokenizer that `python benchmarks/gpu_e2e_prep.py` put in $DEST/model) and the demo's
# reasoning-gym data prepared there ($DEST/data). Two steps, then a second process resumes to four. Random weights
# earn no reward, so this proves the pipeline and measures its step times, not learning.
#
#     python benchmarks/gpu_e2e_prep.py                 # on a machine with the embedded default (writes .gpu/)
#     bash benchmarks/gpu_e2e.sh                        # on the GPU machine; run directory in $R (default /tmp/e2e)
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEST=${DEST:-.gpu}
R=${R:-/tmp/e2e}
export SOFTGRPO_DATA_DIR=${SOFTGRPO_DATA_DIR:-$PWD/$DEST/data} HF_HUB_OFFLINE=1 PYTHONPATH=${PYTHONPATH:-.}
rm -rf "$R"; mkdir -p "$R"
SRC=$DEST/model DST=$R/model $PY - <<'PYEOF' || exit 1
import os, shutil, torch, transformers
src, dst = os.environ["SRC"], os.environ["DST"]
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(src), dtype=torch.bfloat16)
model.save_pretrained(dst)
for f in os.listdir(src):
    if f != "config.json":
        shutil.copy(os.path.join(src, f), dst)
print("random model written:", sorted(os.listdir(dst)))
PYEOF
common=(--config configs/demo_smollm2.py --config.model.path="$R/model" --config.trainer.output_dir="$R/run"
        --config.data.eval_limit=16 --config.eval.n_samples=2 "--config.eval.ks=(1,2)" --config.eval.batch_size=32)
t0=$(date +%s)
$PY -m softgrpo_jax.cli train "${common[@]}" --config.trainer.total_steps=2 || { echo "first run rc=$?"; exit 1; }
t1=$(date +%s); echo "== first run (steps 1-2) $((t1 - t0)) s"
$PY -m softgrpo_jax.cli train "${common[@]}" --config.trainer.total_steps=4 || { echo "resumed run rc=$?"; exit 1; }
echo "== resumed run (steps 3-4) $(( $(date +%s) - t1 )) s"
$PY - "$R/run/metrics.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
keys = ("step", "reward_mean", "response_length", "grad_norm", "kl_loss", "time_rollout_s", "time_logprob_s",
        "time_update_s", "step_time_s")
print(" | ".join(keys))
for r in rows:
    print(" | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k)) for k in keys))
assert [r["step"] for r in rows] == [1, 2, 3, 4], "steps missing or repeated"
PYEOF
