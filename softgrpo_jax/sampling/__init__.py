from softgrpo_jax.sampling.engine import RolloutEngine, bucket_length
from softgrpo_jax.sampling.rollout import FINISH_NAMES, Rollout, RolloutStats
from softgrpo_jax.sampling.step import DISCRETE, GUMBEL, MODES, SOFT, SamplingConfig, filter_sorted, step

__all__ = ["Rollout", "RolloutEngine", "RolloutStats", "SamplingConfig", "filter_sorted", "step", "bucket_length", "MODES",
           "DISCRETE", "SOFT", "GUMBEL", "FINISH_NAMES"]
