"""`softgrpo compare`, the CPU setting: discrete GRPO against SofT-GRPO on the embedded SmolLM2-135M-Instruct, three
seeds each, every policy and the untrained model evaluated in discrete and in Gumbel soft-thinking decoding (the
original's evaluation settings, softgrpo_jax/compare.py DECODINGS), 16 samples per held-out problem. Everything else
is the demo's setting (configs/demo_smollm2.py: bf16 compute with float32 master weights, lr 2e-5, a 96-token
budget, the lenient reward, reward 0 for a truncated response), the same for both arms: they differ only in
rl.algorithm and rollout.mode. No learning rate was searched for either arm.

    softgrpo compare --config compare_smollm2          # report: runs/compare-smollm2/compare.md (+ .json, .png)

Problems. The untrained model should leave both arms room: pass@1 between ~15% and ~50% and pass@16 below ~90%.
Probed with `softgrpo compare --config compare_smollm2 --config.compare.arms=() --config.data.eval_limit=16
--config.data.reasoning_gym.tasks=...` (the untrained model only; 16 held-out problems x 16 samples; 2-core AMD
EPYC, Zen 4; pass@1 / unbiased pass@16 in %, discrete | soft):

| tasks (+ and -, no parentheses) | discrete | soft |
|---|---|---|
| the demo's: 2 terms of 1 digit (8 problems only) | 29.7 / 87.5 | 22.7 / 62.5 |
| 2 terms of 1-2 digits (basic_arithmetic and chain_sum) | 10.5 / 43.8 | 10.2 / 43.8 |
| 3 terms of 1 digit (both) | 6.2 / 31.2 | 5.1 / 31.2 |
| **basic_arithmetic 2 terms of 1-2 digits + chain_sum 2 terms of 1 digit** (chosen) | 21.9 / 56.2 | 15.2 / 62.5 |

More terms or digits than the demo's on every problem left SmolLM2-135M under 11% pass@1; the demo's own problems
reach 88% pass@16 in discrete decoding. The chosen mix (half the problems with up to two-digit operands) sits inside
the band in both decodings.

Time. Measured on the same 2-core EPYC while other jobs held the load average at 3.5-6 (the process got about one
core): a training step of 2 prompts x 8 rollouts took 34-36 s (the first 51 s), for either arm (4 x 8: 66-72 s);
a run's start-up (model, data, compiling) about 30 s; evaluation about 0.43 s per sample (16 problems x 16 samples
in 104-114 s per decoding for the chosen problems, 70-139 s over all probes, compiling included). That allows,
within 60 minutes on 2 cores: 8 steps of 2 prompts x 8 rollouts per run (128 rollouts, 8 optimiser updates), 3 seeds
x 2 arms, and 12 held-out problems x 16 samples x 2 decodings for 7 policies. Estimate: 6 runs x (30 s + 51 s +
7 x 35 s + 2 x 192 x 0.43 s = 490 s) + the untrained model's 165 s = about 52 minutes (57 at the slowest sample time
seen; less on an idle machine). Measured in full on an idle 2-core Zen 4 EPYC: 28.8 minutes (docs/compare.md has
the result). So small a setting cannot separate the arms (8 updates;
12 problems give pass@1 a standard error of several points): it shows the pipeline and the seed noise. The GPU
setting (configs/compare_gpu.py) is the one sized to separate them.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from demo_smollm2 import get_config as demo  # noqa: E402

TASKS = (
    ("basic_arithmetic", 1.0, (("min_terms", 2), ("max_terms", 2), ("min_digits", 1), ("max_digits", 2),
                               ("operators", ("+", "-")), ("allow_parentheses", False), ("allow_negation", False))),
    ("chain_sum", 1.0, (("min_terms", 2), ("max_terms", 2), ("min_digits", 1), ("max_digits", 1))),
)


def get_config():
    c = demo()
    c.name = "compare-smollm2"
    c.data.reasoning_gym.tasks = repr(TASKS)
    c.data.reasoning_gym.train_size = 512
    c.data.reasoning_gym.test_size = 64
    c.data.eval_limit = 12
    c.rl.group_size = 8
    c.rl.train_batch_size = 2
    c.rl.mini_batch_size = 2  # one optimiser update per step
    c.rl.micro_batch_size = 16
    c.trainer.total_steps = 8
    c.trainer.save_every = 4
    c.trainer.export_hf = False  # the comparison keeps numbers, not policies (compare.keep_checkpoints keeps them)
    c.trainer.output_dir = "runs/compare-smollm2"
    c.eval.n_samples = 16
    c.eval.ks = (1, 2, 4, 8, 16)
    c.eval.batch_size = 64
    c.eval.max_new_tokens = 96
    c.compare.arms = ("grpo", "softgrpo")
    c.compare.seeds = (0, 1, 2)
    c.compare.decodings = ("discrete", "soft")
    return c
