from softgrpo_jax.models.config import ModelConfig, RopeScaling, UnsupportedModelError
from softgrpo_jax.models.transformer import PARAM_SPECS, Transformer, init_cache, param_shapes

__all__ = ["ModelConfig", "RopeScaling", "UnsupportedModelError", "Transformer", "init_cache", "param_shapes",
           "PARAM_SPECS"]
