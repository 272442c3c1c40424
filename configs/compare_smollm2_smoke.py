"""The smoke setting of `softgrpo compare`: the whole pipeline (both arms, two seeds, one training step each, both
decodings, the untrained model, the report) at the smallest sizes. With the embedded SmolLM2-135M it took 2.3 minutes
on 2 cores (mostly compiling); tests/test_compare.py runs it on a tiny random model with SmolLM2's tokenizer
(`--config.model.path=...`) in about a minute."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from compare_smollm2 import get_config as base  # noqa: E402


def get_config():
    c = base()
    c.name = "compare-smollm2-smoke"
    c.data.reasoning_gym.train_size = 16
    c.data.reasoning_gym.test_size = 4
    c.data.eval_limit = 2
    c.rollout.max_new_tokens = 8
    c.rl.group_size = 2
    c.rl.train_batch_size = 2
    c.rl.mini_batch_size = 2
    c.rl.micro_batch_size = 4
    c.trainer.total_steps = 1
    c.trainer.save_every = 1
    c.trainer.progress = False
    c.trainer.tensorboard = False
    c.trainer.output_dir = "runs/compare-smollm2-smoke"
    c.eval.n_samples = 4
    c.eval.ks = (1, 2, 4)
    c.eval.batch_size = 8
    c.eval.max_new_tokens = 8
    c.compare.seeds = (0, 1)
    return c
