"""The smoke setting of the embedded default (what CI runs): the demo at the smallest sizes, a few minutes on CPU."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from demo_smollm2 import get_config as base  # noqa: E402


def get_config():
    c = base()
    c.name = "demo-smollm2-smoke"
    c.data.reasoning_gym.train_size = 64
    c.data.reasoning_gym.test_size = 16
    c.rollout.max_new_tokens = 16
    c.rl.group_size = 2
    c.rl.train_batch_size = 2
    c.rl.mini_batch_size = 2
    c.rl.micro_batch_size = 2
    c.rl.max_tokens_per_micro_batch = 0  # fixed rows: what most tests build on (token budgets have their own)
    c.trainer.total_steps = 2
    c.trainer.save_every = 1
    c.trainer.output_dir = "runs/demo-smollm2-smoke"
    c.eval.n_samples = 2
    c.eval.ks = (1, 2)
    c.eval.batch_size = 8
    c.eval.max_new_tokens = 16
    c.data.eval_limit = 4
    return c
