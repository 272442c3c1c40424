"""run_sample_gumbel.sh: a SofT-GRPO model, soft thinking with Gumbel noise (T 1.0, top_p 0.95, top_k = K = 5,
tau 0.1, noise 1), 32 samples per problem, 32768 new tokens, seed 0 (docs/algorithm.md, "Evaluation")."""

from softgrpo_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "eval-softgrpo-gumbel"
    c.model.path = "runs/softgrpo-deepscaler-1p5b/hf_export"  # any HF dir / GGUF / orbax checkpoint
    c.model.compute_dtype = "bfloat16"
    c.data.eval = ("aime24:test", "aime25:test", "amc23:test", "math500:test", "gsm8k:test")
    c.eval.mode = "gumbel"
    c.eval.temperature = 1.0
    c.eval.top_p = 0.95
    c.eval.top_k = 5
    c.eval.max_topk = 5
    c.eval.tau = 0.1
    c.eval.noise_factor = 1.0
    c.eval.n_samples = 32
    c.eval.ks = (1, 2, 4, 8, 16, 32)
    c.eval.max_new_tokens = 32768
    c.eval.seed = 0
    c.trainer.output_dir = "runs/eval-softgrpo-gumbel"
    return c
