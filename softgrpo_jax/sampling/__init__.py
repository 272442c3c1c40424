from softgrpo_jax.sampling.engine import FINISH_NAMES, Rollout, RolloutEngine, RolloutStats, bucket_length
from softgrpo_jax.sampling.step import DISCRETE, GUMBEL, MODES, SOFT, SamplingConfig, filter_sorted, step

__all__ = ["Rollout", "RolloutEngine", "RolloutStats", "SamplingConfig", "filter_sorted", "step", "bucket_length", "MODES",
           "DISCRETE", "SOFT", "GUMBEL", "FINISH_NAMES"]
