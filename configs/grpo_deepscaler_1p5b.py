"""GRPO baseline for deepscaler_1p5b: the same trainer and settings with discrete rollouts (soft thinking off)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from deepscaler_1p5b import get_config as base  # noqa: E402


def get_config():
    c = base()
    c.name = "grpo-deepscaler-1p5b"
    c.rl.algorithm = "grpo"
    c.rollout.mode = "discrete"
    c.eval.mode = "discrete"
    c.trainer.output_dir = "runs/grpo-deepscaler-1p5b"
    return c
