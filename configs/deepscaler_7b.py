"""SofT-GRPO on DeepSeek-R1-Distill-Qwen-7B (SofT-GRPO-deepscaler-8k-qwen7.sh): the 1.5B run with micro-batch 1,
save_freq 200, test_freq 20."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from deepscaler_1p5b import get_config as base  # noqa: E402


def get_config():
    c = base()
    c.name = "softgrpo-deepscaler-7b"
    c.model.path = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"  # replace with your local HF directory
    c.rl.micro_batch_size = 1
    c.trainer.save_every = 200
    c.trainer.eval_every = 20
    c.trainer.output_dir = "runs/softgrpo-deepscaler-7b"
    return c
