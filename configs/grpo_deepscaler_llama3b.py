"""GRPO baseline for deepscaler_llama3b: the same trainer and settings with discrete rollouts (soft thinking off)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from deepscaler_llama3b import get_config as base  # noqa: E402


def get_config():
    c = base()
    c.name = "grpo-deepscaler-llama3b"
    c.rl.algorithm = "grpo"
    c.rollout.mode = "discrete"
    c.eval.mode = "discrete"
    c.trainer.output_dir = "runs/grpo-deepscaler-llama3b"
    return c
