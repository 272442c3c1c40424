"""SofT-GRPO on Llama-3.2-3B-Instruct (SofT-GRPO-deepscaler-8k-llama3.sh): save_freq 80, test_freq 20.

Llama-3.2 has no </think> token. The seed ends thinking at the first emission of the last sub-token of "</think>"
(docs/algorithm.md, "Quirks of the original"); ``rollout.think_end_match="last_subtoken"`` reproduces that. Our default ("full") waits for the whole
string; set it here to be faithful.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from deepscaler_1p5b import get_config as base  # noqa: E402


def get_config():
    c = base()
    c.name = "softgrpo-deepscaler-llama3b"
    c.model.path = "meta-llama/Llama-3.2-3B-Instruct"  # replace with your local HF directory
    c.rollout.think_end_match = "last_subtoken"
    c.trainer.save_every = 80
    c.trainer.eval_every = 20
    c.trainer.output_dir = "runs/softgrpo-deepscaler-llama3b"
    return c
