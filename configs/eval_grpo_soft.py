"""run_sample_gumbel_grpo.sh / _raw.sh: a GRPO or base model with soft thinking (T 0.6, top_p 0.95, top_k = K = 30,
tau 0.5, noise 1), 32 samples (docs/algorithm.md, "Evaluation")."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from eval_softgrpo_gumbel import get_config as base  # noqa: E402


def get_config():
    c = base()
    c.name = "eval-grpo-soft"
    c.model.path = "runs/grpo-deepscaler-1p5b/hf_export"
    c.eval.temperature = 0.6
    c.eval.top_k = 30
    c.eval.max_topk = 30
    c.eval.tau = 0.5
    c.trainer.output_dir = "runs/eval-grpo-soft"
    return c
