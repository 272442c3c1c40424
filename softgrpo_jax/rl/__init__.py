"""RL objective for SofT-GRPO / GRPO: per-position log-probs (discrete and Gumbel-reparameterised), group
advantages and verl's clipped PPO loss with a k3 KL to the reference (docs/algorithm.md, "Log-density of a soft step" and "Objective")."""

from softgrpo_jax.rl.logprobs import (
    dirichlet_logprob,
    discrete_logprob,
    discrete_positions,
    gaussian_logprob,
    gumbel_logprob,
    gumbel_noise,
    rebuild_inputs,
    token_logprobs,
)
from softgrpo_jax.rl.objective import (
    LossConfig,
    accumulate_terms,
    aggregation_weights,
    combine_loss,
    finalize_metrics,
    group_advantages,
    kl_penalty,
    loss_denominator,
    loss_fn,
    ppo_loss_terms,
)

__all__ = [
    "LossConfig", "accumulate_terms", "aggregation_weights", "combine_loss", "dirichlet_logprob", "discrete_logprob",
    "discrete_positions", "finalize_metrics", "gaussian_logprob", "group_advantages", "gumbel_logprob", "gumbel_noise",
    "kl_penalty", "loss_denominator", "loss_fn", "ppo_loss_terms", "rebuild_inputs", "token_logprobs",
]
