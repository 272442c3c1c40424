"""run_sample_discrete-token_grpo.sh / _raw.sh: discrete chain of thought (soft thinking off; T 0.6, top_p 0.95,
top_k 30), 32 samples (docs/algorithm.md, "Evaluation")."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from eval_softgrpo_gumbel import get_config as base  # noqa: E402


def get_config():
    c = base()
    c.name = "eval-discrete"
    c.model.path = "runs/grpo-deepscaler-1p5b/hf_export"
    c.eval.mode = "discrete"
    c.eval.temperature = 0.6
    c.eval.top_k = 30
    c.eval.max_topk = 30
    c.trainer.output_dir = "runs/eval-discrete"
    return c
