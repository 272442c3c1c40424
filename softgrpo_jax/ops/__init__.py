"""The probability-weighted embedding step of soft thinking, one call for rollout and training."""

from softgrpo_jax.ops.soft_embed import soft_embed, soft_embed_fused, soft_weights

__all__ = ["soft_embed", "soft_embed_fused", "soft_weights"]
