"""GRPO baseline for deepscaler_7b: the same trainer and settings with discrete rollouts (soft thinking off)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from deepscaler_7b import get_config as base  # noqa: E402


def get_config():
    c = base()
    c.name = "grpo-deepscaler-7b"
    c.rl.algorithm = "grpo"
    c.rollout.mode = "discrete"
    c.eval.mode = "discrete"
    c.trainer.output_dir = "runs/grpo-deepscaler-7b"
    return c
